"""Ctrl-C, SIGTERM and SIGHUP stop ``nerco train`` after the next optimizer step with a resume checkpoint, one
line saying how to continue and exit status 130 / 143 / 129; the same command then ends exactly where an
uninterrupted run ends. (Under the deepspeed launcher: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.train.stopping import StopSignals, agreed_signal

from .conftest import REPO, stop_signals_at_their_defaults

FAULTS = Path(__file__).resolve().parent / "dist_scripts" / "faults.py"
# 60 sentences (a few more pieces) in batches of 8, 2 epochs
SETS = ["data.limit=60", "finetune.full.optim.epochs=2", "finetune.full.optim.batch_size=8", "run.threads=1"]


def train(out: Path, data_root: Path, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    args = ["train", "configs/tiny.yaml", *[a for s in [f"run.out_dir={out}", *SETS] for a in ("--set", s)]]
    cmd = [sys.executable, str(FAULTS), fault[0], str(fault[1]), "--", *args] if fault else \
        [sys.executable, "-m", "nerco_dist.cli", *args]
    env = dict(os.environ, NERCO_DATA_ROOT=str(data_root), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=stop_signals_at_their_defaults)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = train(out, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode, at, status", [("sigint", 5, 130), ("sigterm", 11, 143), ("sighup", 8, 129)])
def test_a_signal_mid_epoch_writes_a_resume_checkpoint_and_the_same_command_ends_identically(
        mode, at, status, uninterrupted, tmp_path, data_root):
    out = tmp_path / "run"
    stopped = train(out, data_root, (mode, at))
    assert stopped.returncode == status, stopped.stderr[-3000:]
    per_epoch = int(re.search(r"(\d+) batches per epoch", stopped.stderr).group(1))
    assert at < 2 * per_epoch
    epoch, batch = divmod(at - 1, per_epoch)  # the signal came inside batch ``at``: its step is the last one
    name = mode.upper()
    assert f"nerco: stopped by {name} at finetune phase 'full', epoch {epoch + 1}, batch {batch + 1}; resume " \
           f"checkpoint in {out}/resume/finetune: run the same command again to continue" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    progress = json.loads((out / "resume" / "finetune" / "latest.json").read_text())["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (epoch, batch + 1, at)
    assert not (out / "results.json").exists()

    resumed = train(out, data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"finetune: resuming at phase 1, epoch {epoch + 1}, batch {batch + 1} (step {at})" in resumed.stderr
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, uninterrupted))
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(out / name)["model"], load_checkpoint(uninterrupted / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_second_ctrl_c_stops_at_once(tmp_path, data_root):
    stopped = train(tmp_path / "run", data_root, ("sigint_twice", 3))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "nerco: interrupted at once: the same command continues from the last resume checkpoint" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (tmp_path / "run" / "resume" / "finetune").exists()


@pytest.fixture
def stop_signals_at_defaults():
    """This process's SIGINT and SIGHUP at their defaults for one test (a background job or ``nohup`` may
    have left them ignored, and StopSignals leaves an ignored signal ignored), then as they were."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    stop_signals_at_their_defaults()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_signals_are_recorded_only_while_entered_and_sigterm_then_sighup_decide_the_status(stop_signals_at_defaults):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    with StopSignals() as signals:
        assert signals.flags() == [0.0, 0.0, 0.0]  # SIGINT, SIGTERM, SIGHUP
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGHUP)  # a hang-up outranks a Ctrl-C
        assert signals.received == signal.SIGHUP and signals.flags() == [0.0, 0.0, 1.0]
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # after a SIGTERM: not a "second Ctrl-C"
        os.kill(os.getpid(), signal.SIGHUP)
        assert signals.received == signal.SIGTERM and signals.flags() == [0.0, 1.0, 0.0]
    assert {s: signal.getsignal(s) for s in before} == before
    # summed over ranks: one rank got Ctrl-C, another a hang-up, a third SIGTERM
    assert agreed_signal([1.0, 0.0, 0.0]) == signal.SIGINT and agreed_signal([2.0, 0.0, 1.0]) == signal.SIGHUP
    assert agreed_signal([1.0, 1.0, 1.0]) == signal.SIGTERM and agreed_signal([0.0, 0.0, 0.0]) is None


def test_a_signal_ignored_when_the_run_starts_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a shell script
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
