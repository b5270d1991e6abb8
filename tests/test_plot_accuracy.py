"""experiments/plot_accuracy.py: the sweep files of one corpus merged into one per-seed figure, and files from
different runs refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, script_module

PNG = b"\x89PNG\r\n\x1a\n"


def sweep_file(path: Path, corpus: str, per_seed: dict[str, list[float]]) -> Path:
    path.write_text(json.dumps(dict(corpus=corpus, results={k: dict(per_seed_f1=v) for k, v in per_seed.items()})))
    return path


def plot(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "plot_accuracy.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def merged_scores():
    return script_module("plot_accuracy", "experiments").merged_scores


def test_systems_of_several_files_are_merged_once_each(tmp_path, merged_scores):
    main = sweep_file(tmp_path / "weibo.json", "weibo", {"baseline": [50.0, 40.0], "NerCo": [51.0, 45.5]})
    variant = sweep_file(tmp_path / "weibo_v.json", "weibo",
                         {"baseline": [50.0, 40.0], "NerCo": [51.0, 45.5], "frozen": [30.0, 35.0]})
    assert merged_scores([main, variant]) == ("weibo", {"baseline": [50.0, 40.0], "NerCo": [51.0, 45.5],
                                                        "frozen": [30.0, 35.0]})
    out = tmp_path / "f1.png"
    done = plot(main, variant, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG


def test_the_unrounded_test_f1_is_plotted_where_the_file_has_it(tmp_path, merged_scores):
    """Rounded per-seed F1s can move the mean by 0.01 against the sweep's table (92.93, 92.53, 94.24 -> 93.23;
    the runs' own F1s -> 93.24)."""
    path = tmp_path / "resume.json"
    path.write_text(json.dumps(dict(corpus="resume", results={
        "baseline": dict(per_seed_f1=[92.93, 94.24], per_seed_test=[dict(f1=0.929349), dict(f1=0.942401)])})))
    corpus, scores = merged_scores([path])
    assert corpus == "resume" and scores["baseline"] == pytest.approx([92.9349, 94.2401], abs=1e-9)


def test_files_from_other_runs_or_corpora_are_refused(tmp_path):
    main = sweep_file(tmp_path / "weibo.json", "weibo", {"baseline": [50.0, 40.0]})
    other_runs = sweep_file(tmp_path / "weibo_seed1.json", "weibo", {"baseline": [50.0]})
    other_corpus = sweep_file(tmp_path / "resume.json", "resume", {"baseline": [94.0, 93.0]})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    out = tmp_path / "f1.png"
    for bad, problem in ((other_runs, "baseline scores [50.0], but"), (other_corpus, "corpus 'resume'"),
                         (broken, "not a sweep results file")):
        done = plot(main, bad, "--out", out)
        assert done.returncode == 1
        assert f"{bad}: " in done.stderr and problem in done.stderr
        assert not out.exists()
