"""NerCo's two stages, their phases and the paper's ablation switches, on a tiny model and real data.
Losses are plugged in through ``train(..., wrap_loss=...)``."""

import dataclasses
import logging
import math
import re
import time

import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.config import load_config
from nerco_dist.train import trainer
from nerco_dist.train.objectives import InfoNCELoss, phase_loss
from nerco_dist.train.phases import load_encoder, stage_phases
from nerco_dist.train.resume import Progress, StageResume
from nerco_dist.train.inputs import read_training_inputs
from nerco_dist.train.run import TrainingRun, new_model, seed_everything

from .conftest import DATA_ROOT, TINY

FAST = ["data.max_len=40", "finetune.full.optim.epochs=1", "contrastive.phase.optim.epochs=1", "contrastive.phase.optim.batch_size=32"]


def tiny_config(tmp_path, *overrides):
    return load_config(TINY, FAST + [f"run.out_dir={tmp_path}", *overrides], data_root=DATA_ROOT)


def initial_model(cfg):
    """The model exactly as a stage builds it before training (same seed, same data)."""
    _, codec, _, pretrained = read_training_inputs(cfg)
    seed_everything(cfg.run.seed)
    return new_model(cfg, codec, pretrained)


def split_state(state):
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    bert = {k: v for k, v in state.items() if k.startswith("bert.")}
    rest = {k: v for k, v in state.items() if k not in head and k not in bert}
    return head, bert, rest


def equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stage_handoff_takes_encoder_and_leaves_a_fresh_head(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true")
    stage1 = initial_model(cfg)
    torch.manual_seed(123)
    for p in stage1.parameters():
        p.data.add_(torch.randn_like(p))  # a "trained" stage-1 model: every weight differs from init
    ckpt = tmp_path / "stage1.pt"
    TrainingRun.start(cfg).checkpoint(ckpt, stage1)
    fresh = initial_model(cfg)
    fresh_head, _, _ = split_state(fresh.state_dict())
    load_encoder(fresh, ckpt)
    head, _, rest = split_state(fresh.state_dict())
    s1_head, _, s1_rest = split_state(stage1.state_dict())
    assert equal(rest, s1_rest)  # encoder from stage 1
    assert equal(head, fresh_head) and not equal(head, s1_head)  # head fresh


def test_both_stages_end_to_end(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true")
    assert trainer.default_stage(cfg) == "both"
    results = trainer.train(cfg)
    assert results["contrastive"]["best_epoch"] == 1 and math.isfinite(results["contrastive"]["best_dev_loss"])
    assert (tmp_path / "contrastive" / "best.pt").is_file() and "test" in results
    stage1 = load_checkpoint(tmp_path / "contrastive" / "best.pt")
    assert stage1["stage"] == "contrastive"
    # stage 1 trains the encoder but never the output head
    head0, _, rest0 = split_state(initial_model(cfg).state_dict())
    head1, _, rest1 = split_state(stage1["model"])
    assert equal(head1, head0) and not equal(rest1, rest0)


def test_head_phase_changes_only_the_head(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "finetune.head.optim.epochs=1", "finetune.full.optim.epochs=0")
    trainer.train(cfg, stage="finetune")
    head0, _, rest0 = split_state(initial_model(cfg).state_dict())
    head1, _, rest1 = split_state(load_checkpoint(tmp_path / "last.pt")["model"])
    assert equal(rest1, rest0)
    assert all(not torch.equal(head1[k], head0[k]) for k in head1)


def test_frozen_bert_is_unchanged_after_stage_one(tmp_path, data_root, tiny_bert):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true", f"model.bert={tiny_bert}")
    trainer.train(cfg, stage="contrastive")
    _, bert0, rest0 = split_state(initial_model(cfg).state_dict())
    _, bert1, rest1 = split_state(load_checkpoint(tmp_path / "contrastive" / "best.pt")["model"])
    assert bert1 and equal(bert1, bert0)
    assert not equal(rest1, rest0)


def test_baseline_switch_skips_stage_one(tmp_path, data_root):
    cfg = tiny_config(tmp_path)  # contrastive.enabled defaults to false: the baseline
    assert trainer.default_stage(cfg) == "finetune"
    results = trainer.train(cfg)
    assert "contrastive" not in results and not (tmp_path / "contrastive").exists()


def record_phases(seen):
    """A ``wrap_loss`` that notes which phase trains with which loss and leaves the loss as it is."""
    def wrap(phase, loss):
        seen.append((phase.name, phase.loss))
        return loss
    return wrap


def test_joint_switch_trains_crf_and_infonce_in_one_stage(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true", "ablation.joint=true")
    assert trainer.default_stage(cfg) == "finetune"  # one stage
    seen = []
    trainer.train(cfg, wrap_loss=record_phases(seen))
    assert seen == [("full", "crf+infonce")] and not (tmp_path / "contrastive").exists()
    seen.clear()
    trainer.train(tiny_config(tmp_path / "plain"), wrap_loss=record_phases(seen))
    assert seen == [("full", "crf")]


def test_joint_loss_is_crf_nll_plus_weighted_infonce(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true", "ablation.joint=true", "ablation.joint_weight=0.25")
    model, batch = double_model_and_batch(cfg)
    (phase,) = stage_phases(cfg, "finetune")
    with torch.no_grad():
        joint = phase_loss(cfg, phase, num_classes=int(batch["class_ids"].max()) + 1)(model, batch)
        features = model.encode(batch)
        nll = model.head.nll(features, batch["labels"], batch["char_mask"])
    tokens = features[batch["char_mask"]]
    labels = batch["class_ids"][batch["char_mask"]].tolist()
    classes = [c for c in set(labels) - {0} if labels.count(c) >= 2]
    infonce = sum(literal_class_term(tokens, labels, c, cfg.contrastive.temperature) for c in classes)
    assert classes and joint.item() == pytest.approx(nll.item() + 0.25 * infonce, rel=1e-9)


def double_model_and_batch(cfg):
    """The tiny model in float64, eval mode (no dropout), and a batch of two training sentences."""
    splits, codec, _, pretrained = read_training_inputs(cfg)
    pieces = codec.encode(splits.train[:2])
    batch = next(iter(codec.batches(pieces, [list(range(len(pieces)))])))
    return new_model(cfg, codec, pretrained).double().eval(), batch


def literal_class_term(f, labels, c, tau):
    """The paper's per-class term, transcribed with loops."""
    f = torch.nn.functional.normalize(f.double(), dim=1)
    P = [i for i in range(len(labels)) if labels[i] == c]
    N = [i for i in range(len(labels)) if labels[i] != c]
    total = 0.0
    for i in P:
        for j in P:
            if i != j:
                pos = math.exp(f[i] @ f[j] / tau)
                neg = sum(math.exp(f[i] @ f[n] / tau) for n in N)
                total += -math.log(pos / (pos + neg))
    return total / (len(P) * (len(P) - 1))


def test_non_entity_queries_switch_adds_exactly_the_o_class_term(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "contrastive.enabled=true")
    model, batch = double_model_and_batch(cfg)
    num_classes = int(batch["class_ids"].max()) + 1
    with torch.no_grad():
        features = model.encode(batch)
        filtered = InfoNCELoss.of(cfg, num_classes, across_ranks=False)(model, batch, features)
        cfg.ablation.non_entity_queries = True
        unfiltered = InfoNCELoss.of(cfg, num_classes, across_ranks=False)(model, batch, features)
    tokens = features[batch["char_mask"]]
    labels = batch["class_ids"][batch["char_mask"]].tolist()
    assert 0 in labels and len(set(labels)) > 2
    o_term = literal_class_term(tokens, labels, 0, cfg.contrastive.temperature)
    assert (unfiltered - filtered).item() == pytest.approx(o_term, rel=1e-9)


def test_seeded_runs_repeat_exactly_on_cpu(tmp_path, data_root):
    states = []
    for name in ("a", "b"):
        trainer.train(tiny_config(tmp_path / name, "contrastive.enabled=true"))
        states.append(load_checkpoint(tmp_path / name / "last.pt")["model"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_stage_time_is_summed_over_a_kill_and_a_resume(monkeypatch):
    clock = iter([100.0, 130.0, 500.0, 510.0])  # run 1 starts, saves; run 2 starts, finishes
    monkeypatch.setattr(time, "time", lambda: next(clock))
    first = Progress()
    assert first.elapsed() == 30.0
    saved = dataclasses.asdict(first)  # what the resume checkpoint holds
    resumed = Progress(**saved)
    assert resumed.elapsed() == 40.0  # 30 s before the kill + 10 s after; the 370 s in between not counted


WRITE_S = 1.0  # each checkpoint write made this much slower: more than a tiny epoch's training and scoring
# the time an epoch takes besides its slowed writes varies from one epoch to the next (a busy machine)
EPOCH_JITTER_S = 0.5


def test_time_left_bounds_the_stage_when_checkpoint_writes_are_slow(tmp_path, data_root, monkeypatch, caplog):
    """The epoch line's "at most N more epochs (X at this pace)" is an upper bound on the stage's remaining
    epochs, the checkpoints written at each epoch's end (last.pt, best.pt, the resume state) included."""
    written = []  # when each write ended: the last one ends the stage's epochs

    def slowly(write):
        def slow(*args, **kwargs):
            time.sleep(WRITE_S)
            write(*args, **kwargs)
            written.append(time.time())
        return slow

    monkeypatch.setattr(TrainingRun, "checkpoint", slowly(TrainingRun.checkpoint))
    monkeypatch.setattr(StageResume, "save", slowly(StageResume.save))
    caplog.set_level(logging.INFO, logger="nerco_dist")
    trainer.train(tiny_config(tmp_path, "data.limit=40", "finetune.full.optim.epochs=2"), stage="finetune")
    estimates = [(record.created, re.search(r"at most (\d+) more epochs? \((\d+) s at this pace\)",
                                            record.getMessage())) for record in caplog.records]
    estimates = [(created, int(m[1]), int(m[2])) for created, m in estimates if m]
    assert [left for _, left, _ in estimates] == [1]
    for logged, _, seconds in estimates:  # printed to the nearest second
        assert written[-1] <= logged + seconds + 0.5 + EPOCH_JITTER_S, (written[-1] - logged, seconds)


def test_a_changed_fine_tuning_key_retrains_stage_two_from_the_finished_stage_one(tmp_path, data_root, caplog):
    """Run again with another fine-tuning lr, a finished stage 1 is reused as it is (its checkpoint
    untouched) and stage 2 trains anew (under another test split, neither trains); with another stage-1 lr, or (where the head probe selects stage 1's epoch) another
    finetune.head key, stage 1 trains again."""
    nerco = ["contrastive.enabled=true"]
    trainer.train(tiny_config(tmp_path, *nerco))
    stage1 = (tmp_path / "contrastive" / "best.pt").read_bytes()

    def rerun(*overrides) -> tuple[bool, bool]:
        """(stage 1 trained, stage 2 trained) by a run of the same folder with ``overrides``."""
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nerco_dist"):
            trainer.train(tiny_config(tmp_path, *nerco, *overrides))
        started = {r.getMessage().split(" phase ")[0] for r in caplog.records if "optimizer (lr" in r.getMessage()}
        return "contrastive" in started, "finetune" in started

    assert rerun() == (False, False)
    assert rerun("finetune.full.optim.lr=0.02") == (False, True)
    assert (tmp_path / "contrastive" / "best.pt").read_bytes() == stage1
    assert rerun("finetune.full.optim.lr=0.02", "data.test=null") == (False, False)  # neither reads test
    assert rerun("finetune.full.optim.lr=0.02", "contrastive.phase.optim.lr=0.02") == (True, True)
    probe = ["contrastive.select=head_f1", "contrastive.head_probe_epochs=1"]
    rerun(*probe)
    assert rerun(*probe, "finetune.full.optim.lr=0.03") == (False, True)
    assert rerun(*probe, "finetune.head.optim.lr=0.03") == (True, True)
