"""experiments/plot_curves.py: the learning curves of run folders, read back from TensorBoard as the trainer
writes it, into a JSON and PNGs; a folder that is not a run refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nerco_dist.train.monitor import Scalars

from .conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def run_folder(path: Path, dev_f1: list[float], stage1: list[float] = ()) -> Path:
    """A run folder as the trainer leaves it: dev F1 (a fraction) by epoch 1, 2, ..., stage 1's dev loss."""
    for folder, tag, values in ((path / "tensorboard", "dev/f1", dev_f1),
                                (path / "contrastive" / "tensorboard", "contrastive/dev_loss", stage1)):
        if values:
            scalars = Scalars(folder)
            for epoch, value in enumerate(values, 1):
                scalars.add(tag, value, epoch)
                scalars.add("train/loss", 9.0, 100 * epoch)
            scalars.close()
    return path


def plot(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "plot_curves.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_curves_of_a_baseline_and_a_two_stage_run(tmp_path):
    base = run_folder(tmp_path / "base", [0.84366, 0.9076, 0.91641])
    nerco = run_folder(tmp_path / "nerco", [0.85, 0.9], stage1=[15.03246, 13.90199, 13.5])
    done = plot("--run", f"baseline={base}", "--run", f"NerCo={nerco}", "--out", tmp_path / "msra", "--title", "MSRA")
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "msra.json").read_text())["runs"]
    assert runs["baseline"]["dev_f1"] == [84.37, 90.76, 91.64] and "stage1_dev_infonce" not in runs["baseline"]
    assert runs["NerCo"]["dev_f1"] == [85.0, 90.0] and runs["NerCo"]["stage1_dev_infonce"] == [15.0325, 13.902, 13.5]
    for png in ("msra_dev_f1.png", "msra_stage1_dev_infonce.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG)
    assert "baseline: 3 fine-tuning epochs, best dev F1 91.64" in done.stdout


def test_a_run_still_in_stage_one_has_no_dev_f1_yet(tmp_path):
    nerco = run_folder(tmp_path / "nerco", [], stage1=[15.0, 14.0])
    done = plot("--run", f"NerCo={nerco}", "--out", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "c.json").read_text())["runs"]["NerCo"]["dev_f1"] == []
    assert not (tmp_path / "c_dev_f1.png").exists() and (tmp_path / "c_stage1_dev_infonce.png").is_file()


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path):
    for bad in (f"x={tmp_path}", "no-equals-sign"):
        done = plot("--run", bad, "--out", tmp_path / "c")
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("nerco: error: ")
    assert not (tmp_path / "c.json").exists()
