"""The accuracy sweep (experiments/nerco_vs_baseline.py) end to end on the smoke configs, and its reuse of a
finished run only when the stored config trains the same way as today's."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys

import pytest

from nerco_dist.config import Config, load_config

from .conftest import REPO, TINY, script_module


@pytest.fixture(scope="module")
def same_recipe():
    return script_module("nerco_vs_baseline", "experiments").same_recipe


def stored(*overrides: str) -> dict:
    """A config as a finished run's summary holds it, read back as the sweep reads it."""
    return Config.from_dict(load_config(TINY, list(overrides)).to_dict()).to_dict()


def test_where_and_how_fast_a_run_ran_is_not_its_recipe(same_recipe):
    assert same_recipe(stored("run.threads=1", "run.out_dir=a", "run.flush_denormals=false"),
                       stored("run.threads=2", "run.out_dir=b"))
    assert not same_recipe(stored("run.seed=1"), stored("run.seed=2"))
    assert not same_recipe(stored("finetune.full.optim.lr=0.01"), stored("finetune.full.optim.lr=0.02"))


def test_head_probe_keys_count_only_where_the_probe_selects(same_recipe):
    """A run selected on the dev InfoNCE stored the probe defaults of its day (1 epoch); it trained the same."""
    old = stored("contrastive.enabled=true", "contrastive.head_probe_epochs=1", "contrastive.head_probe_lr=1e-3")
    assert same_recipe(old, stored("contrastive.enabled=true"))
    probed = ["contrastive.enabled=true", "contrastive.select=head_f1"]
    assert not same_recipe(stored(*probed, "contrastive.head_probe_epochs=1"), stored(*probed))
    assert not same_recipe(stored(*probed, "contrastive.head_probe_lr=1e-3"), stored(*probed))
    assert same_recipe(stored(*probed), stored(*probed))


def test_the_sweep_end_to_end_and_a_second_call_reuses_every_run(tmp_path, data_root):
    """nerco_vs_baseline.py on the smoke configs (tiny.yaml, tiny_nerco.yaml), two seeds: the table's per-seed F1
    are the runs' own test F1, the paired t-test is recomputed here from them, the learning curves have an
    entry per epoch each run trained; run again, it trains nothing and writes the same scores."""
    command = [sys.executable, str(REPO / "experiments" / "nerco_vs_baseline.py"), "--corpus", "tiny", "--seeds",
               "1", "2", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--store",
               str(tmp_path / "store"), "--data-root", str(data_root), "--set", "run.threads=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "phase 'full'" in first.stderr  # logged as a phase starts training
    report = json.loads((tmp_path / "results" / "nerco_vs_baseline_tiny.json").read_text())
    runs = {(name, seed): json.loads((tmp_path / "runs" / "tiny" / f"{name}_seed{seed}" / "results.json").read_text())
            for name in ("baseline", "NerCo") for seed in (1, 2)}
    for name in ("baseline", "NerCo"):
        assert report["results"][name]["per_seed_f1"] == [round(100 * runs[name, s]["test"]["f1"], 2) for s in (1, 2)]
        assert (tmp_path / "store" / "tiny" / f"{name}_seed1.json").is_file()
    assert report["results"]["NerCo"]["per_seed_epochs"][1] == dict(
        stage1=runs["NerCo", 2]["contrastive"]["epochs_run"], stage1_best=runs["NerCo", 2]["contrastive"]["best_epoch"],
        finetune=runs["NerCo", 2]["epochs_run"], finetune_best=runs["NerCo", 2]["best_epoch"])
    assert report["results"]["baseline"]["per_seed_epochs"][0] == dict(
        finetune=runs["baseline", 1]["epochs_run"], finetune_best=runs["baseline", 1]["best_epoch"])
    diffs = [100 * (runs["NerCo", s]["test"]["f1"] - runs["baseline", s]["test"]["f1"]) for s in (1, 2)]
    t = report["nerco_vs_baseline"]["paired_t_test"]
    assert t["differences"] == pytest.approx(diffs)
    if diffs[0] != diffs[1]:
        assert t["t"] == pytest.approx(statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(2)))
    curves = json.loads((tmp_path / "results" / "nerco_vs_baseline_tiny" / "curves.json").read_text())["runs"]
    assert len(curves["baseline"]["dev_f1"]) == runs["baseline", 1]["epochs_run"]
    assert len(curves["NerCo"]["dev_f1"]) == runs["NerCo", 1]["epochs_run"]
    assert len(curves["NerCo"]["stage1_dev_infonce"]) == runs["NerCo", 1]["contrastive"]["epochs_run"]
    assert curves["baseline"]["dev_f1"][runs["baseline", 1]["best_epoch"] - 1] == \
        pytest.approx(100 * runs["baseline", 1]["best_dev_f1"], abs=0.005)

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "phase 'full'" not in second.stderr + second.stdout  # no phase trained
    again = json.loads((tmp_path / "results" / "nerco_vs_baseline_tiny.json").read_text())
    assert again["results"]["NerCo"]["per_seed_f1"] == report["results"]["NerCo"]["per_seed_f1"]


def test_a_fine_tuning_variant_starts_from_the_finished_stage_one_of_another_tag(tmp_path, data_root):
    """--stage1-tag: NerCo's runs under tag ``b`` (another fine-tuning lr) train no stage 1, carry tag ``a``'s
    stage-1 results, and score on test what fine-tuning from ``a``'s stage-1 checkpoint scores when trained
    here directly; a stage 1 of another config is refused in one line."""
    from nerco_dist.train.trainer import train

    def sweep(*extra):
        command = [sys.executable, str(REPO / "experiments" / "nerco_vs_baseline.py"), "--corpus", "tiny",
                   "--systems", "NerCo", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--results",
                   str(tmp_path / "results"), "--data-root", str(data_root), "--set", "run.threads=1", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)

    first = sweep("--tag", "a")
    assert first.returncode == 0, first.stderr[-2000:]
    variant = sweep("--tag", "b", "--set", "finetune.full.optim.lr=0.02", "--stage1-tag", "a")
    assert variant.returncode == 0, variant.stderr[-2000:]
    assert "contrastive phase" not in variant.stderr and "finetune phase 'full'" in variant.stderr
    runs = tmp_path / "runs" / "tiny"
    a, b = (json.loads((runs / f"NerCo_{tag}_seed1" / "results.json").read_text()) for tag in ("a", "b"))
    assert b["contrastive"] == a["contrastive"] and b["stage1_from"] == str(runs / "NerCo_a_seed1")
    assert b["diagnostics"]["dev_infonce"]["after stage 1"] == a["diagnostics"]["dev_infonce"]["after stage 1"]
    assert b["total_wall_time_s"] == pytest.approx(b["wall_time_s"] + a["contrastive"]["wall_time_s"], abs=0.1)
    direct = load_config(REPO / "configs" / "tiny_nerco.yaml", ["run.threads=1", "finetune.full.optim.lr=0.02",
                         "run.seed=1", f"run.out_dir={tmp_path / 'direct'}"], data_root=data_root)
    assert train(direct, stage="finetune", init=runs / "NerCo_a_seed1" / "contrastive" / "best.pt")["test"] == b["test"]
    assert b["test"] != a["test"]

    refused = sweep("--tag", "c", "--set", "contrastive.phase.optim.lr=0.02", "--stage1-tag", "a")
    assert refused.returncode == 2 and not (runs / "NerCo_c_seed1").exists()
    assert refused.stderr.strip().splitlines()[-1] == (
        f"nerco: error: {runs / 'NerCo_a_seed1' / 'results.json'}: its stage 1 trained under another config "
        "(contrastive.phase.optim.lr: 0.01 -> 0.02)")


@pytest.mark.parametrize("script, args", [
    ("dev_sweep.py", ["tables", "--corpus", "tiny", "--seeds", "1", "--variants", "1"]),
    ("nerco_vs_baseline.py", ["--corpus", "tiny", "--seeds", "1", "--systems", "baseline"])])
def test_a_sweep_stopped_by_sigterm_says_how_to_continue_in_one_line(script, args, tmp_path, data_root):
    command = [sys.executable, str(REPO / "experiments" / script), *args, "--runs", str(tmp_path / "runs"),
               "--data-root", str(data_root), "--set", "run.threads=1"]
    if script == "nerco_vs_baseline.py":
        command += ["--results", str(tmp_path / "results")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    for line in proc.stderr:  # the first phase has started training: stop it
        lines.append(line)
        if "phase 'full'" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=300) == 143, "".join(lines[-20:])
    name = script.removesuffix(".py")
    assert lines[-1].startswith(f"{name}: stopped by SIGTERM at finetune phase 'full', epoch 1, batch ")
    assert lines[-1].endswith(": run the same command again to continue\n")
    assert not any("Traceback" in line for line in lines)
    assert not (REPO / "experiments" / "results" / "dev_sweep" / "tiny_tables").exists()
