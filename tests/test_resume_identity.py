"""Which checkpoints a command continues: a killed run under a raised patience, an added test split or a moved
output folder goes on where it stopped and ends as the run started with those values would have; another
trained key, or a finished stage under another patience, trains again, and the log names the keys."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from nerco_dist import cli
from nerco_dist.checkpoint import load_checkpoint, save_checkpoint
from nerco_dist.config import Config, load_config
from nerco_dist.errors import InputError
from nerco_dist.eval.metrics import evaluate
from nerco_dist.inference import load_for_inference, predict
from nerco_dist.train.inputs import read_config_splits
from nerco_dist.train.resume import Progress, StageIdentity, StageResume, resumed_best
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import train

from .conftest import DATA_ROOT, TINY

SHORT = ["data.max_len=40", "data.limit=60", "finetune.full.optim.epochs=3", "finetune.full.patience=1",
         "run.threads=1"]  # one thread for every run: bitwise comparisons need one summation order
LATEST = ("resume", "finetune", "latest.json")


def config(out, *overrides):
    return load_config(TINY, SHORT + [f"run.out_dir={out}", *overrides], data_root=DATA_ROOT)


class Interrupted(Exception):
    pass


def batches_per_epoch(cfg) -> int:
    return len(TrainingRun.start(cfg).train_batches(cfg.finetune.full.optim.batch_size))


def killed_in_second_epoch(cfg) -> None:
    """``cfg`` trained until the third batch of its second epoch, where a kill (an exception) stops it; the
    resume checkpoint then stands at the first epoch's end."""
    seen, per_epoch = 0, batches_per_epoch(cfg)

    def wrap(phase, loss):
        def wrapped(model, batch):
            nonlocal seen
            seen += 1
            if seen == per_epoch + 3:
                raise Interrupted
            return loss(model, batch)
        return wrapped

    with pytest.raises(Interrupted):
        train(cfg, stage="finetune", wrap_loss=wrap)
    progress = json.loads(Path(cfg.run.out_dir, *LATEST).read_text())["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 0)


def same_weights(a, b) -> bool:
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resuming at phase" in r.getMessage()]


def resumed_at_second_epoch(cfg) -> str:
    return f"finetune: resuming at phase 1, epoch 2, batch 0 (step {batches_per_epoch(cfg)})"


def test_a_killed_run_continues_under_a_raised_patience_an_added_test_split_and_a_moved_folder(
        tmp_path, data_root, caplog):
    final = ["finetune.full.patience=5", "run.threads=1"]
    reference = train(config(tmp_path / "reference", *final), stage="finetune")
    killed_in_second_epoch(config(tmp_path / "run", "data.test=null"))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        resumed = train(config(tmp_path / "moved", *final), stage="finetune")
    assert resumed_lines(caplog) == [resumed_at_second_epoch(config(tmp_path / "moved"))]
    continuing = [r.getMessage() for r in caplog.records if "continuing under" in r.getMessage()]
    assert continuing == ["finetune: continuing under data.test: None -> 'resume/dev.char.bmes'; "
                          "finetune.full.patience: 1 -> 5"]
    assert resumed["test"] == reference["test"] and resumed["best_epoch"] == reference["best_epoch"]
    assert same_weights(tmp_path / "moved" / "last.pt", tmp_path / "reference" / "last.pt")


def test_a_killed_run_under_another_trained_key_starts_afresh_naming_it(tmp_path, data_root, caplog):
    killed_in_second_epoch(config(tmp_path))
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path, "finetune.full.optim.lr=0.02"), stage="finetune")
    assert not resumed_lines(caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("(finetune.full.optim.lr: 0.01 -> 0.02): starting the finetune stage afresh" in w for w in warnings)


def test_a_key_the_saved_config_predates_reads_at_its_default(tmp_path, data_root, caplog):
    """A checkpoint saved before ``optim.base_batch`` existed (its config lacks the key) is continued by a
    config leaving it at its default, and not by one setting it."""
    killed_in_second_epoch(config(tmp_path))
    latest = tmp_path.joinpath(*LATEST)
    record = json.loads(latest.read_text())
    saved_optim = record["progress"]["identity"]["config"]["finetune"]["full"]["optim"]
    assert saved_optim.pop("base_batch") == 0
    latest.write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path, "finetune.full.optim.base_batch=16", "finetune.full.optim.epochs=1"),
              stage="finetune")
    assert not resumed_lines(caplog)
    assert any("finetune.full.optim.base_batch: 0 -> 16" in r.getMessage() for r in caplog.records)

    killed_in_second_epoch(config(tmp_path))
    record = json.loads(latest.read_text())
    record["progress"]["identity"]["config"]["finetune"]["full"]["optim"].pop("base_batch")
    latest.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path), stage="finetune")
    assert resumed_lines(caplog) == [resumed_at_second_epoch(config(tmp_path))]


def test_a_checkpoint_of_other_micro_batches_a_step_on_other_ranks_is_refused_and_kept(tmp_path, data_root, capsys):
    """Launched with another number of ranks that does not make up the saved micro-batches a step, a killed
    run is neither continued nor trained over: one line says how to continue it, and its checkpoint stays as it
    was. So does one saved by DeepSpeed's engine that this process would continue on its own engine."""
    killed_in_second_epoch(config(tmp_path))
    latest = tmp_path.joinpath(*LATEST)
    record = json.loads(latest.read_text())
    record["progress"]["identity"]["world_size"] = 2
    latest.write_text(json.dumps(record))
    kept = {p: p.read_bytes() for p in latest.parent.rglob("*") if p.is_file()}
    argv = ["train", str(TINY), *[arg for item in SHORT for arg in ("--set", item)], "--set",
            f"run.out_dir={tmp_path}", "--data-root", str(DATA_ROOT), "--stage", "finetune"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"nerco: error: {latest.parent}: saved at 2 micro-batches a step (2 ranks x distributed.grad_accum 1), "
        "launched with 1 x 1: pass --set distributed.grad_accum=2 to continue it, or pass --no-resume to train "
        "the finetune stage afresh\n")
    assert {p: p.read_bytes() for p in latest.parent.rglob("*") if p.is_file()} == kept

    tag = latest.parent / record["tag"]
    (tag / "local.pt").rename(tag / "mp_rank_00_model_states.pt")  # as DeepSpeed's engine names its file
    kept = {p: p.read_bytes() for p in latest.parent.rglob("*") if p.is_file()}
    assert cli.main([*argv, "--set", "distributed.grad_accum=2"]) == 2
    assert capsys.readouterr().err == (
        f"nerco: error: {tag}: saved by DeepSpeed's engine on 2 rank(s): continue it under the deepspeed launcher "
        "(1 rank will do) or with distributed.config set; --no-resume trains the finetune stage afresh\n")
    assert {p: p.read_bytes() for p in latest.parent.rglob("*") if p.is_file()} == kept


def identity(stage: str, ranks: int, accum: int) -> StageIdentity:
    return StageIdentity(config("out", f"distributed.grad_accum={accum}"), stage, None, ranks)


def test_fine_tuning_counts_micro_batches_a_step_and_stage_one_its_ranks():
    """Fine-tuning's loss sums over sentences, so 2 ranks and 1 rank accumulating 2 make the same step; stage
    1's negatives are the ranks' micro-batches, so its ranks count, except for reusing it finished."""
    saved = identity("finetune", 2, 1).to_dict()
    assert identity("finetune", 1, 2).changes(saved, finished=False) == {}
    assert identity("finetune", 4, 1).changes(saved, finished=False) == {"micro_batches_per_step": "2 -> 4"}
    assert identity("finetune", 2, 2).changes(saved, finished=True) == {"micro_batches_per_step": "2 -> 4"}
    saved = identity("contrastive", 2, 1).to_dict()
    assert identity("contrastive", 1, 2).changes(saved, finished=False) == {
        "distributed.grad_accum": "1 -> 2", "world_size": "2 -> 1"}
    assert identity("contrastive", 1, 1).changes(saved, finished=True) == {}


def test_other_accumulation_on_the_same_ranks_is_another_config(tmp_path, data_root, caplog):
    """Only another number of ranks is a launch to correct: ``grad_accum`` changed alone starts afresh."""
    killed_in_second_epoch(config(tmp_path))
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path, "distributed.grad_accum=2", "finetune.full.optim.epochs=1"), stage="finetune")
    assert not resumed_lines(caplog)
    assert any("micro_batches_per_step: 1 -> 2): starting the finetune stage afresh" in r.getMessage()
               for r in caplog.records)


def test_stage_one_saved_by_other_ranks_is_refused_with_how_to_continue_it(tmp_path):
    resume = StageResume(tmp_path, identity("contrastive", 1, 1))
    resume.directory.mkdir(parents=True)
    progress = Progress(identity=identity("contrastive", 2, 1).to_dict())
    (resume.directory / "latest.json").write_text(json.dumps(dict(tag="t", progress=dataclasses.asdict(progress))))
    with pytest.raises(InputError, match=r"saved by 2 ranks, launched with 1: stage 1's negatives are its ranks' "
                                         r"micro-batches, so launch 2 to continue it, or pass --no-resume"):
        resume.progress()


def optim_sections(cfg: dict) -> list[dict]:
    """Every phase's ``optim`` mapping in a config as stored."""
    return [cfg["contrastive"]["phase"]["optim"]] + [phase["optim"] for phase in cfg["finetune"].values()]


def test_a_stored_config_lacking_a_key_whose_default_changed_reads_at_its_earlier_value():
    """``optim.table_updates`` came in with the default ``dense``, which later became ``rows``: a stored config
    without the key trained densely and reads so; a user's config without it reads at today's default."""
    cfg = config("out")
    stored = cfg.to_dict()
    assert {optim["table_updates"] for optim in optim_sections(stored)} == {"rows"}
    assert Config.from_record(stored) == cfg
    for optim in optim_sections(stored):
        del optim["table_updates"]
    assert {optim["table_updates"] for optim in optim_sections(Config.from_record(stored).to_dict())} == {"dense"}
    assert Config.from_dict(stored) == cfg


def test_a_checkpoint_saved_before_a_default_changed_continues_only_at_the_earlier_value(
        tmp_path, data_root, caplog):
    """A checkpoint whose config predates ``optim.table_updates`` updated its tables densely: a command at
    today's default (row-wise) starts afresh naming the key; one setting ``dense`` continues it."""
    dense = "finetune.full.optim.table_updates=dense"
    latest = tmp_path.joinpath(*LATEST)

    def killed_before_the_key_existed():
        killed_in_second_epoch(config(tmp_path, dense))
        record = json.loads(latest.read_text())
        del record["progress"]["identity"]["config"]["finetune"]["full"]["optim"]["table_updates"]
        latest.write_text(json.dumps(record))
        caplog.clear()

    killed_before_the_key_existed()
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path, "finetune.full.optim.epochs=1"), stage="finetune")
    assert not resumed_lines(caplog)
    assert any("finetune.full.optim.table_updates: 'dense' -> 'rows'" in r.getMessage() for r in caplog.records)

    killed_before_the_key_existed()
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path, dense), stage="finetune")
    assert resumed_lines(caplog) == [resumed_at_second_epoch(config(tmp_path, dense))]


def test_a_checkpoint_without_a_saved_config_starts_afresh(tmp_path, data_root, caplog):
    killed_in_second_epoch(config(tmp_path))
    latest = tmp_path.joinpath(*LATEST)
    record = json.loads(latest.read_text())
    record["progress"]["fingerprint"] = "0123456789abcdef"  # what earlier versions saved in its place
    del record["progress"]["identity"]
    latest.write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="nerco_dist"):
        train(config(tmp_path), stage="finetune")
    assert not resumed_lines(caplog)
    assert any("config: saved by an earlier version that did not record it" in r.getMessage()
               for r in caplog.records)


def test_a_finished_stage_trains_again_under_another_patience_and_scores_another_test_split(
        tmp_path, data_root, caplog):
    """Another patience trains the stage again; another test split (training never reads it) only scores the
    finished stage's best weights on it, as ``nerco eval`` would."""
    def trained(*overrides) -> tuple[bool, dict]:
        """Whether the stage trained, and its results (the command's date, machine and config aside)."""
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nerco_dist"):
            results = train(config(tmp_path, *overrides), stage="finetune")
        stage = {key: value for key, value in results.items() if key not in ("date", "machine", "config")}
        return any("optimizer (lr" in r.getMessage() for r in caplog.records), stage

    first = trained()
    assert first[0]
    assert trained("run.threads=1", "run.log_every=3") == (False, first[1])
    patience_2 = "finetune.full.patience=2"
    retrained = trained(patience_2)
    assert retrained[0]
    assert any("finetune.full.patience: 1 -> 2" in r.getMessage() for r in caplog.records)
    assert trained(patience_2) == (False, retrained[1])

    no_test = trained(patience_2, "data.test=null")
    assert not no_test[0] and "test" not in no_test[1]
    assert no_test[1]["best_dev_f1"] == retrained[1]["best_dev_f1"]
    other = "data.test=resume/test.char.bmes"
    rescored = trained(patience_2, other)
    assert not rescored[0]
    cfg = config(tmp_path, patience_2, other)
    codec, model = load_for_inference(tmp_path / "best.pt", "cpu", tagging=True)
    test = read_config_splits(cfg).test
    reference = evaluate([s.tags for s in test], predict(codec, model, test, cfg.run.eval_batch_size))
    assert rescored[1]["test"] == reference.to_dict() != retrained[1]["test"]
    assert trained(patience_2) == (False, retrained[1])


@pytest.mark.parametrize("record, value", [({"dev": {"f1": 0.7}}, 0.7), ({"dev_loss": 3.5}, 3.5)])
def test_a_best_written_before_the_resume_checkpoint_of_its_epoch_becomes_the_stage_best(tmp_path, record, value):
    """Killed between writing best.pt for epoch 3 and epoch 3's resume checkpoint: the state names epoch 1 as the
    best, whose weights best.pt no longer holds. The stage's best becomes epoch 3, weights and score together."""
    weights = {"w": torch.arange(3.0)}
    stage = "finetune" if "dev" in record else "contrastive"
    save_checkpoint(tmp_path / "best.pt", model_state=weights, model_args={}, codec={}, stage=stage, epoch=3, **record)
    run = type("Run", (), {"stage_dir": lambda self, _: tmp_path})()
    progress = Progress(epochs_done=2, best=0.5, best_epoch=1, stale=1)
    best = resumed_best(run, stage, progress)
    assert torch.equal(best.state["w"], weights["w"])
    assert (progress.best, progress.best_epoch, progress.stale) == (value, 3, 0)
    progress = Progress(epochs_done=3, best=value, best_epoch=3, stale=0)  # the checkpoint of epoch 3 written
    assert torch.equal(resumed_best(run, stage, progress).state["w"], weights["w"]) and progress.best == value
    with pytest.raises(InputError, match="holds .* epoch 3, but the .* stage being resumed had its best at epoch 1"):
        resumed_best(run, stage, Progress(epochs_done=4, best=0.5, best_epoch=1))
