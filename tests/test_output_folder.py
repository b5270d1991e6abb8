"""What ``nerco`` reads back from an output folder or is given as a checkpoint:

- no file is unpickled in full: a pickle planted as the local engine's resume state, among DeepSpeed's
  resume files (2 ranks, ZeRO 2) or as a checkpoint for ``eval``, ``predict`` or ``--init`` is refused (exit
  status 2, the file named, on every rank) and its code never runs;
- one run per output folder: a second run stops at once naming the holder, a killed run's lock is taken
  over; the final test scores the stage's best weights kept in memory, not a best.pt read back;
- checkpoints of the wrong kind: a stage-1 one for tagging, one of another model shape for ``eval`` and
  ``--init``;
- places that cannot be written: an output folder that is a dangling link or on a read-only file system,
  a disk that fills during a checkpoint write (one line naming the place, exit status 2, no temporary file
  left); the temporary files a killed write left are removed by the next run on the folder.
"""

import json
import os
from pathlib import Path
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.cli import main
from nerco_dist.config import load_config
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import train

from .conftest import REPO, TINY, Interrupted, interrupt_at

LIGHT = ["data.limit=40", "data.max_len=40", "finetune.full.optim.epochs=1"]


class Planted:
    """A pickle that runs a shell command when unpickled in full (here: it creates ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(path, marker):
    torch.save(Planted(marker), path)


def train_args(out, data_root, *sets):
    return ["train", str(TINY), "--data-root", str(data_root),
            *[a for s in [*LIGHT, f"run.out_dir={out}", *sets] for a in ("--set", s)]]


def test_a_planted_local_resume_state_is_refused_unrun(tmp_path, data_root, capsys):
    out, marker = tmp_path / "run", tmp_path / "ran"
    args = train_args(out, data_root, "distributed.checkpoint_every=1")
    with pytest.raises(Interrupted):
        main(args, wrap_loss=interrupt_at(3))
    (state,) = (out / "resume" / "finetune").glob("*/local.pt")
    plant(state, marker)
    capsys.readouterr()
    assert main(args) == 2
    assert f"nerco: error: {state}: not a readable checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_planted_deepspeed_resume_file_is_refused_unrun_on_every_rank(tmp_path, data_root):
    """Planted in rank 1's ZeRO optimizer partition, the file with DeepSpeed's own (allow-listed) objects:
    rank 0 checks every file first, so both ranks stop with its name instead of rank 0 waiting for rank 1."""
    from .test_distributed import deepspeed_cmd, env, kill_when, nerco_train

    out, marker = tmp_path / "run", tmp_path / "ran"
    args = nerco_train(out, 2, "contrastive.enabled=false")
    latest = out / "resume" / "finetune" / "latest.json"
    kill_when(args, data_root, latest, tmp_path / "killed.log")
    planted = latest.parent / json.loads(latest.read_text())["tag"] / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert planted.is_file()
    plant(planted, marker)
    proc = subprocess.run(deepspeed_cmd(*args), cwd=REPO, env=env(data_root), capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert output.count(f"nerco: error: {planted}: not a readable checkpoint") == 2, output[-3000:]
    assert not marker.exists()


def test_a_planted_checkpoint_is_refused_unrun_by_eval_predict_and_init(tmp_path, data_root, dev_subset, capsys):
    checkpoint, marker = tmp_path / "best.pt", tmp_path / "ran"
    plant(checkpoint, marker)
    text = tmp_path / "raw.txt"
    text.write_text("高勇，男，中国国籍。\n", encoding="utf-8")
    for argv in (["eval", str(checkpoint), "--data", str(dev_subset)], ["predict", str(checkpoint), str(text)],
                 [*train_args(tmp_path / "run", data_root), "--stage", "finetune", "--init", str(checkpoint)]):
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        assert f"nerco: error: {checkpoint}: not a readable checkpoint" in capsys.readouterr().err
        assert not marker.exists(), argv[0]


def test_a_second_run_on_a_busy_output_folder_stops_at_once_and_a_killed_runs_lock_is_taken_over(
        tmp_path, data_root, capsys):
    out = tmp_path / "run"
    args = train_args(out, data_root, "distributed.checkpoint_every=1", "finetune.full.optim.epochs=1000")
    first = subprocess.Popen([sys.executable, "-m", "nerco_dist.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "resume" / "finetune" / "latest.json").exists():  # it holds the folder and trains
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.05)

        def never_trains(phase, loss):
            raise AssertionError("the second run went on to train in the first one's folder")

        capsys.readouterr()
        assert main(args, wrap_loss=never_trains) == 2
        err = capsys.readouterr().err
        assert f"nerco: error: {out}: in use by another nerco train (pid {first.pid} on " in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(args[:-2] + ["--set", "finetune.full.optim.epochs=1", "--no-resume"]) == 0  # the lock is free
    assert (out / ".nerco-train.lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_the_final_test_scores_the_best_weights_kept_in_memory(tmp_path, data_root):
    """best.pt is removed during epoch 2, whose steps are all skipped (NaN losses): epoch 1 stays the best,
    and the test scores its weights, which are also epoch 2's (last.pt) and were scored on dev (= test)."""
    out, second_epoch = tmp_path / "run", False

    def wrap(phase, loss):
        def wrapped(model, batch):
            nonlocal second_epoch
            second_epoch = second_epoch or (out / "best.pt").exists()
            if not second_epoch:
                return loss(model, batch)
            (out / "best.pt").unlink(missing_ok=True)  # another process removes or replaces it
            return loss(model, batch) * float("nan")
        return wrapped

    cfg = load_config(TINY, [*LIGHT, f"run.out_dir={out}", "finetune.full.optim.epochs=2",
                             "distributed.max_nonfinite=1000"], data_root=data_root)
    results = train(cfg, wrap_loss=wrap)
    last = load_checkpoint(out / "last.pt")
    assert results["best_epoch"] == 1 and last["epoch"] == 2 and results["nonfinite_skipped"] > 0
    assert results["test"] == last["dev"]


def untrained_checkpoint(path, data_root, *sets, **extra):
    """A checkpoint as a run writes it, of the tiny model before training."""
    cfg = load_config(TINY, [*LIGHT, *sets], data_root=data_root)
    run = TrainingRun.start(cfg)
    run.checkpoint(path, run.initial_model(None), **extra)
    return path


def test_a_stage_one_checkpoint_is_refused_for_tagging(tmp_path, data_root, dev_subset, capsys):
    stage1 = untrained_checkpoint(tmp_path / "stage1.pt", data_root, stage="contrastive", epoch=1)
    text = tmp_path / "raw.txt"
    text.write_text("高勇，男，中国国籍。\n", encoding="utf-8")
    for argv in (["eval", str(stage1), "--data", str(dev_subset)], ["predict", str(stage1), str(text)],
                 ["analyze", "--baseline", str(stage1), "--nerco", str(stage1), "--data", str(dev_subset),
                  "--out", str(tmp_path / "analysis")]):
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        assert (f"nerco: error: {stage1}: a stage-1 (contrastive) checkpoint: it has no trained output head; "
                "pass the fine-tuned best.pt") in capsys.readouterr().err


def test_a_checkpoint_of_another_shape_is_refused_by_init_and_eval(tmp_path, data_root, dev_subset, capsys):
    wider = untrained_checkpoint(tmp_path / "wider.pt", data_root, "model.char_dim=24", stage="contrastive")
    capsys.readouterr()
    init = [*train_args(tmp_path / "run", data_root), "--stage", "finetune", "--init", str(wider)]
    assert main(init) == 2
    assert (f"nerco: error: {wider}: holds a model of another shape than this run's (the file's first: "
            "char_dim 24 vs 16; char_embed.weight (") in capsys.readouterr().err
    # weights that the checkpoint's own config does not build (a BERT directory that now holds another model)
    plain = load_checkpoint(untrained_checkpoint(tmp_path / "plain.pt", data_root))
    torch.save(dict(load_checkpoint(wider), stage="finetune", model_args=plain["model_args"]), tmp_path / "mismatched.pt")
    assert main(["eval", str(tmp_path / "mismatched.pt"), "--data", str(dev_subset)]) == 2
    assert (f"nerco: error: {tmp_path / 'mismatched.pt'}: holds a model of another shape than the one its own "
            "config builds (the file's first: char_embed.weight (") in capsys.readouterr().err


@pytest.fixture
def small_file_system(tmp_path):
    """``mount(options)``: a tmpfs mounted in ``tmp_path`` (root only; skipped where it cannot be mounted),
    unmounted after the test."""
    mounted = []

    def mount(options: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("nerco: error:")]


def test_an_output_folder_that_is_a_dangling_link_or_read_only_is_one_line(tmp_path, data_root, capsys,
                                                                          small_file_system):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    assert main(train_args(dangling, data_root)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"nerco: error: {dangling}: a symbolic link to {tmp_path / 'gone'}, which does not exist"]
    read_only = small_file_system("ro,size=1m") / "run"
    assert main(train_args(read_only, data_root)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"nerco: error: {read_only}: cannot be written: Read-only file system"]


def test_a_disk_that_fills_during_a_checkpoint_write_is_one_line_and_leaves_no_partial_file(
        tmp_path, data_root, capsys, small_file_system):
    out = small_file_system("size=256k") / "run"  # last.pt (about 180 kB) fits, best.pt after it does not
    assert main(train_args(out, data_root)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].endswith(".pt: cannot be written: No space left on device"), lines
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_killed_writes_temporary_files_are_removed_by_the_next_run(tmp_path, data_root):
    out = tmp_path / "run"
    (out / "resume" / "finetune").mkdir(parents=True)
    # what atomic_path leaves when a kill stops it between creating the temporary file and renaming it
    left = [Path(tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")[1])
            for d, name in ((out, "best.pt"), (out / "resume" / "finetune", "local.pt"))]
    mine = out / "notes.tmp"
    mine.write_text("a user's file that only looks temporary")
    assert main(train_args(out, data_root)) == 0
    assert not any(p.exists() for p in left) and mine.exists()
