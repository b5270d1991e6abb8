"""Bad config values are refused before any work: by key, with the allowed range, exit status 2, nothing
written."""

import dataclasses
import re
import typing

import numpy as np
import pytest
import torch

from nerco_dist.cli import main
from nerco_dist.config import Config, RunConfig, load_config
from nerco_dist.errors import InputError
from nerco_dist.train.run import seed_everything

from .conftest import TINY


@pytest.mark.parametrize("override, message", [
    ("data.max_len=-1", "data.max_len=-1: out of range (allowed: >= 1)"),  # looped forever
    ("data.max_len=0", "data.max_len=0: out of range (allowed: >= 1)"),  # scored F1 0
    ("finetune.full.optim.batch_size=0", "finetune.full.optim.batch_size=0: out of range (allowed: >= 1)"),
    ("finetune.full.optim.batch_size=-3", "finetune.full.optim.batch_size=-3: out of range (allowed: >= 1)"),
    ("contrastive.phase.optim.batch_size=0", "contrastive.phase.optim.batch_size=0: out of range (allowed: >= 1)"),
    ("distributed.grad_accum=0", "distributed.grad_accum=0: out of range (allowed: >= 1)"),
    ("model.heads=0", "model.heads=0: out of range (allowed: >= 1)"),
    ("model.hidden=0", "model.hidden=0: out of range (allowed: >= 1)"),
    ("model.ff_dropout=1.0", "model.ff_dropout=1.0: out of range (allowed: >= 0 and < 1)"),
    ("run.threads=-1", "run.threads=-1: out of range (allowed: >= 0, or auto)"),
    ("run.threads=foo", "run.threads: expected int or auto, got 'foo'"),
    ("run.threads=1.5", "run.threads: expected int or auto, got 1.5"),
    ("run.log_every=0", "run.log_every=0: out of range (allowed: >= 1)"),  # failed after an epoch
    ("run.eval_batch_size=0", "run.eval_batch_size=0: out of range (allowed: >= 1)"),
    ("data.dev_fraction=1.5", "data.dev_fraction=1.5: out of range (allowed: > 0 and < 1)"),  # trained on nothing
    ("finetune.full.optim.lr=0", "finetune.full.optim.lr=0.0: out of range (allowed: > 0)"),
    ("finetune.full.optim.warmup=2", "finetune.full.optim.warmup=2.0: out of range (allowed: >= 0 and <= 1)"),
    ("contrastive.temperature=-0.1", "contrastive.temperature=-0.1: out of range (allowed: > 0)"),
    ("contrastive.head_probe_lr=0", "contrastive.head_probe_lr=0.0: out of range (allowed: > 0)"),
    ("contrastive.head_probe_epochs=0", "contrastive.head_probe_epochs=0: out of range (allowed: >= 1)"),
    ("distributed.timeout_s=0", "distributed.timeout_s=0.0: out of range (allowed: > 0)"),
    ("run.out_dir=", "run.out_dir: must not be empty"),  # wrote into the working directory
    ("run.device=cuda:0", "run.device='cuda:0': expected one of auto, cpu, cuda"),
    ("distributed.timeout_s=.inf", "distributed.timeout_s=inf: not a finite number (allowed: > 0)"),  # traceback
    ("finetune.full.optim.lr=.inf", "finetune.full.optim.lr=inf: not a finite number (allowed: > 0)"),
    ("contrastive.temperature=.nan", "contrastive.temperature=nan: not a finite number (allowed: > 0)"),
    ("model.embed_dropout=-inf", "model.embed_dropout=-inf: not a finite number (allowed: >= 0 and < 1)"),
    ("finetune.full.optim.lr=1" + "0" * 400, "finetune.full.optim.lr=inf: not a finite number (allowed: > 0)"),
    ("run.seed=-1", "run.seed=-1: out of range (allowed: >= 0 and <= 4294967295)"),
    ("run.seed=4294967296", "run.seed=4294967296: out of range (allowed: >= 0 and <= 4294967295)"),
])
def test_out_of_range_values_are_refused_by_key_and_range(override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(TINY, [override])


def float_keys(schema=Config, prefix=""):
    """Every float field of the config schema (``float`` or ``float | None``), found by walking its dataclasses."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from float_keys(hint, f"{prefix}{f.name}.")
        elif float in (typing.get_args(hint) or (hint,)):
            yield prefix + f.name


FLOAT_KEYS = list(float_keys())


# as YAML floats and as numeric strings, each with the value the message shows
@pytest.mark.parametrize("written, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("inf", "inf"),
                                            ("-inf", "-inf"), ("nan", "nan")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_a_non_finite_number_is_refused_in_every_float_field(key, written, shown):
    with pytest.raises(InputError, match=re.escape(f"{key}={shown}: not a finite number (allowed: ")):
        load_config(TINY, [f"{key}={written}"])


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(TINY, ["data.max_len=1", "run.threads=0", "finetune.full.optim.warmup=1",
                             "finetune.full.optim.weight_decay=0", "model.attn_dropout=0", "finetune.full.patience=0",
                             "run.seed=4294967295"])
    assert (cfg.data.max_len, cfg.run.threads, cfg.finetune.full.optim.warmup) == (1, 0, 1.0)
    seed_everything(cfg.run.seed)  # numpy's largest seed
    with pytest.raises(ValueError):
        np.random.seed(cfg.run.seed + 1)  # what run.seed=4294967296 met before its range was checked


def test_threads_are_auto_unless_set_and_may_change_on_resume():
    assert load_config(TINY).run.threads == "auto"
    assert [load_config(TINY, [f"run.threads={n}"]).run.threads for n in ("auto", 0, 3)] == ["auto", 0, 3]
    threads = next(f for f in dataclasses.fields(RunConfig) if f.name == "threads")
    assert threads.metadata["resume"] is False  # a resumed run may take another thread count


def refused(tmp_path, capsys, *overrides: str) -> str:
    """``nerco train`` of the tiny config with these overrides: exit 2, nothing written, the message."""
    out = tmp_path / "out"
    status = main(["train", str(TINY), "--set", f"run.out_dir={out}", *sum((["--set", o] for o in overrides), [])])
    assert status == 2 and not out.exists()
    return capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_device_or_kernel_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys):
    assert "run.device=cuda: torch sees no CUDA device" in refused(tmp_path, capsys, "run.device=cuda")
    message = refused(tmp_path, capsys, "contrastive.enabled=true", "contrastive.backend=triton")
    assert "contrastive.backend=triton: the Triton kernel needs a CUDA device" in message


def test_a_non_finite_timeout_stops_the_command_with_one_line_and_status_2(tmp_path, capsys):
    message = refused(tmp_path, capsys, "distributed.timeout_s=.inf")  # was a traceback from timedelta
    assert message.strip().splitlines() == [
        f"nerco: error: {TINY}: distributed.timeout_s=inf: not a finite number (allowed: > 0)"]


def test_a_stage_with_nothing_to_train_is_refused(tmp_path, capsys):
    message = refused(tmp_path, capsys, "finetune.head.optim.epochs=0", "finetune.full.optim.epochs=0")
    assert "finetune: no phase to train" in message
    assert "contrastive: no phase to train" in refused(tmp_path, capsys, "contrastive.enabled=true",
                                                       "contrastive.phase.optim.epochs=0")


def test_a_missing_training_corpus_and_an_output_folder_that_is_a_file_are_refused(tmp_path, capsys):
    assert "data.train: required" in refused(tmp_path, capsys, "data.train=")
    (tmp_path / "a_file").write_text("")
    status = main(["train", str(TINY), "--set", f"run.out_dir={tmp_path / 'a_file'}"])
    assert status == 2 and "a file, not a folder" in capsys.readouterr().err


def test_a_missing_corpus_names_the_data_root_and_how_to_set_it(tmp_path, capsys):
    root = tmp_path / "empty_root"
    status = main(["train", str(TINY), "--data-root", str(root), "--set", f"run.out_dir={tmp_path / 'out'}"])
    assert status == 2
    assert (f"{root}/resume/dev.char.bmes: file not found (data.train=resume/dev.char.bmes is relative to the "
            f"data root {root}: point --data-root or $NERCO_DATA_ROOT at the folder that holds it)"
            ) in capsys.readouterr().err
