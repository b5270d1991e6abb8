"""Phases of a stage: what the next phase starts from, and a run killed inside a later phase resuming there
exactly. Losses are observed and altered through ``train(..., wrap_loss=...)``."""

import json
import time

import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.config import load_config
from nerco_dist.train.monitor import Scalars, read_scalars
from nerco_dist.train.objectives import head_probe_report
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import train

from .conftest import DATA_ROOT, REPO, TINY

FIRST = "frozen_bert"  # the first of two phases: encoder + head (the tiny model has no BERT), then full
PHASES = ["data.max_len=40", f"finetune.{FIRST}.optim.epochs=3", f"finetune.{FIRST}.optim.optimizer=adamw",
          f"finetune.{FIRST}.optim.lr=0.01", f"finetune.{FIRST}.optim.batch_size=8", "finetune.full.optim.epochs=2"]


def config(out, *overrides):
    return load_config(TINY, PHASES + [f"run.out_dir={out}", *overrides], data_root=DATA_ROOT)


def batches_per_epoch(cfg, phase=FIRST) -> int:
    return len(TrainingRun.start(cfg).train_batches(getattr(cfg.finetune, phase).optim.batch_size))


@pytest.mark.parametrize("hand_off", ["best", "last"])
def test_next_phase_starts_from_the_stage_best_or_the_last_weights(tmp_path, data_root, hand_off):
    cfg = config(tmp_path, f"finetune.{FIRST}.hand_off={hand_off}")
    per_epoch = batches_per_epoch(cfg)
    out, calls, seen = tmp_path, {FIRST: 0}, {}

    def wrap(phase, loss):
        def wrapped(model, batch):
            if phase.name == FIRST:
                calls[FIRST] += 1  # the last epoch climbs the loss: the phase's last weights are not the best
                return loss(model, batch) * (-1.0 if calls[FIRST] > 2 * per_epoch else 1.0)
            if not seen:  # the first batch of the next phase, before any step
                seen.update(model={k: v.detach().clone() for k, v in model.state_dict().items()},
                            best=load_checkpoint(out / "best.pt"), last=load_checkpoint(out / "last.pt"))
            return loss(model, batch)
        return wrapped

    train(cfg, wrap_loss=wrap)
    best, last = seen["best"], seen["last"]
    assert best["phase"] == last["phase"] == FIRST and best["epoch"] < 3 and last["epoch"] == 3
    assert last["dev"]["f1"] < best["dev"]["f1"]
    expected = best if hand_off == "best" else last
    assert all(torch.equal(seen["model"][k], v) for k, v in expected["model"].items())


class Interrupted(Exception):
    pass


def test_killed_inside_the_second_phase_resumes_there_and_ends_like_an_uninterrupted_run(tmp_path, data_root):
    sets = ["distributed.checkpoint_every=1"]
    reference = train(config(tmp_path / "reference", *sets))
    cfg = config(tmp_path / "run", *sets)
    stop_at = batches_per_epoch(cfg, "full") + 3  # the second epoch of the full phase
    calls = 0

    def wrap(phase, loss):
        def wrapped(model, batch):
            nonlocal calls
            calls += phase.name == "full"
            if calls == stop_at:
                raise Interrupted
            return loss(model, batch)
        return wrapped

    with pytest.raises(Interrupted):
        train(cfg, wrap_loss=wrap)
    latest = json.loads((tmp_path / "run" / "resume" / "finetune" / "latest.json").read_text())["progress"]
    assert (latest["phase"], latest["epoch"], latest["batch"]) == (1, 1, 2)
    resumed = train(cfg)
    assert resumed["test"] == reference["test"] and resumed["best_epoch"] == reference["best_epoch"]
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(d / name)["model"] for d in (tmp_path / "run", tmp_path / "reference"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_reference_schedule_restarts_the_optimiser_and_its_warmup_at_every_phase(tmp_path, data_root):
    """configs/weibo_nerco.yaml's phases on a tiny model: the LR ramps up from its start in each phase."""
    small = ["data.train=resume/dev.char.bmes", "data.dev=resume/dev.char.bmes", "data.test=resume/dev.char.bmes",
             "data.format=auto", "data.limit=60", "data.max_len=40", "data.char_vectors=null",
             "data.bigram_vectors=null", "data.word_vectors=null", "model.hidden=32", "model.heads=2",
             "model.head_dim=16", "model.char_dim=16", "model.bigram_dim=16", "model.word_dim=16",
             f"run.out_dir={tmp_path}", "run.log_every=1"]
    phases = [f"{p}.optim.{k}={v}" for p in ("contrastive.phase", "finetune.head", "finetune.full")
              for k, v in (("epochs", 2), ("warmup", 0.5), ("batch_size", 10))]
    cfg = load_config(REPO / "configs" / "weibo_nerco.yaml", small + phases, data_root=data_root)
    steps = batches_per_epoch(cfg, "head")  # every phase has batches of 10
    train(cfg)
    ramp = int(0.5 * 2 * steps)
    for stage, tag, optims in (("contrastive", "contrastive/lr", [cfg.contrastive.phase.optim]),
                               ("finetune", "train/lr", [cfg.finetune.head.optim, cfg.finetune.full.optim])):
        logged = scalars(run_dir(tmp_path, stage) / "tensorboard", tag)
        assert len(logged) == 2 * steps * len(optims)
        for k, optim in enumerate(optims):  # after optimizer step i: the LR of step i + 1 of its own phase,
            phase = logged[k * 2 * steps : (k + 1) * 2 * steps]  # lr x min(1, (i + 2) / ramp) / (1 + decay x epoch)
            expected = [optim.lr * min(1.0, (i + 2) / ramp) / (1 + optim.lr_decay * ((i + 1) // steps))
                        for i in range(2 * steps)]
            assert phase == pytest.approx(expected, rel=1e-6), (stage, k)
    assert cfg.finetune.full.optim.lr_decay > 0 == cfg.finetune.head.optim.lr_decay  # both kinds of phase seen


def run_dir(out, stage):
    return out / "contrastive" if stage == "contrastive" else out


def scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(directory.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        values += [e.value for e in acc.Scalars(tag)]
    return values


@pytest.mark.parametrize("switch", ["freeze_embeddings=true", "optim.encoder_lr_ratio=0.0"])
def test_frozen_embeddings_and_the_encoder_lr_ratio(tmp_path, data_root, switch):
    """freeze_embeddings keeps the lattice's tables, and only them, as initialised; encoder_lr_ratio 0 keeps
    the whole encoder while the head trains at the phase's learning rate."""
    cfg = load_config(TINY, ["data.max_len=40", f"run.out_dir={tmp_path}", "finetune.full.optim.epochs=1",
                             f"finetune.full.{switch}"], data_root=data_root)
    initial = TrainingRun.start(cfg).initial_model(None).state_dict()
    train(cfg)
    trained = load_checkpoint(tmp_path / "last.pt")["model"]
    unchanged = {k for k in initial if torch.equal(trained[k], initial[k])}
    if switch.startswith("freeze"):
        assert unchanged == {f"{kind}_embed.{part}" for kind in ("char", "bigram", "word") for part in ("weight", "frozen")}
    else:
        assert unchanged == {k for k in initial if not k.startswith("head.")}  # the frozen rows among them


def test_stage_one_selected_by_a_head_probe_trains_exactly_as_without_it(tmp_path, data_root):
    """contrastive.select=head_f1 scores each stage-1 epoch by the dev F1 of a head trained on its frozen
    features; the probe draws nothing from the training's random streams, so the stage-1 weights are those
    of a run selected on the dev InfoNCE."""
    sets = ["data.max_len=40", "contrastive.enabled=true", "contrastive.phase.optim.epochs=2",
            "finetune.head.optim.optimizer=adamw", "finetune.head.optim.batch_size=8"]
    probed = train(load_config(TINY, sets + [f"run.out_dir={tmp_path / 'probe'}", "contrastive.select=head_f1",
                                                  "contrastive.head_probe_epochs=6", "contrastive.head_probe_lr=0.05"],
                               data_root=data_root),
                   stage="contrastive")
    plain = train(load_config(TINY, sets + [f"run.out_dir={tmp_path / 'plain'}"], data_root=data_root),
                  stage="contrastive")
    a, b = (load_checkpoint(tmp_path / d / "contrastive" / "last.pt") for d in ("probe", "plain"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    best = load_checkpoint(tmp_path / "probe" / "contrastive" / "best.pt")
    assert probed["contrastive"]["best_head_f1"] == best["dev"]["f1"] >= a["dev"]["f1"]
    assert best["dev"]["f1"] > 0 and best["epoch"] == probed["contrastive"]["best_epoch"]
    assert "best_dev_loss" in plain["contrastive"] and "dev_loss" in b


def test_the_head_probe_warms_up_within_its_own_epochs_whatever_the_head_phase_length(tmp_path, data_root):
    """The probe keeps finetune.head's optimiser and warmup fraction but spreads them over its own epochs: a
    head phase of 100 epochs (its 40% warmup alone longer than the probe) scores a checkpoint exactly as one
    of 2 epochs (under the phase's schedule the probe would still be warming up), and the probe's head tags the
    dev split better than the untrained one does."""
    sets = ["data.max_len=40", "finetune.head.optim.optimizer=adamw", "finetune.head.optim.batch_size=8",
            "finetune.head.optim.warmup=0.4", f"run.out_dir={tmp_path}"]
    reports = []
    for head_epochs in (2, 100):
        run = TrainingRun.start(load_config(TINY, sets + [f"finetune.head.optim.epochs={head_epochs}"],
                                            data_root=data_root))
        model = run.initial_model(None)
        reports.append(head_probe_report(run, model, epochs=8, lr=0.05))
    assert reports[0].to_dict() == reports[1].to_dict()
    untrained = run.scores(model, run.splits.dev)
    assert reports[0].f1 > untrained.f1 + 0.02, (reports[0].f1, untrained.f1)


def test_read_scalars_joins_the_events_files_of_a_resumed_run(tmp_path):
    """Two starts of one run write two events files into its folder; the second rewrote step 2 (a resumed
    epoch) and went on. Read back: every step once, the later value, in step order; another tag ignored."""
    for start, steps in enumerate([{1: 0.5, 2: 0.6}, {2: 0.65, 3: 0.7}]):
        scalars = Scalars(tmp_path)
        for step, value in steps.items():
            scalars.add("dev/f1", value, step)
            scalars.add("dev/precision", 1.0, step)
        scalars.close()
        time.sleep(1.1)  # events files are named by the second they were opened
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path, "dev/f1") == pytest.approx({1: 0.5, 2: 0.65, 3: 0.7})
    assert list(read_scalars(tmp_path, "dev/f1")) == [1, 2, 3]
    assert read_scalars(tmp_path, "dev/loss") == {}
