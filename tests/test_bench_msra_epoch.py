"""benchmarks/bench_msra_epoch.py --quick (the tiny config, one rank and two): every arm trains what its row
says (its batches' characters, dense or row-wise tables, one rank or two) and the ratios are those of its rows."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from nerco_dist.config import load_config
from nerco_dist.data.dataset import LengthBucketBatchSampler
from nerco_dist.train.run import TrainingRun

from .conftest import REPO, TINY

STEPS, WARMUP = 3, 1  # --quick's


def timed_chars(run, batch: int, ranks: int) -> int:
    """Characters of the timed batches of every rank, from the sampler as each rank builds it."""
    lengths = [p.lattice_len for p in run.train_pieces]
    total = 0
    for rank in range(ranks):
        sampler = LengthBucketBatchSampler(lengths, batch, seed=run.cfg.run.seed, rank=rank, world_size=ranks)
        batches = itertools.islice(iter(run.codec.batches(run.train_pieces, sampler)), WARMUP + STEPS)
        total += sum(int(b["char_mask"].sum()) for b in list(batches)[WARMUP:])
    return total


def test_quick_run_measures_each_arm_on_its_own_batches(tmp_path, data_root):
    out = tmp_path / "bench.json"
    env = dict(os.environ, NERCO_DATA_ROOT=str(data_root), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "benchmarks/bench_msra_epoch.py", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["ranks"], r["batch"], r["table_updates"]): r for r in result["rows"]}
    assert set(rows) == {(n, b, u) for n in (1, 2) for b in (4, 8) for u in ("dense", "rows")}
    run = TrainingRun.start(load_config(TINY, ["data.limit=120", "data.max_len=60", f"run.out_dir={tmp_path}"],
                                        data_root=data_root))
    for (ranks, batch, updates), r in rows.items():
        assert r["steps"] == STEPS and r["chars"] == timed_chars(run, batch, ranks), r
        assert r["row_wise_tables"] == (3 if updates == "rows" else 0), r
        assert r["epoch_steps_per_rank"] == -(-len(run.train_batches(batch)) // ranks), r
        assert r["epoch_chars"] == sum(p.num_chars for p in run.train_pieces)
        assert r["epoch_cpu_s"] == pytest.approx(r["epoch_chars"] / r["chars_per_cpu_s"], rel=0.01, abs=0.1)
    ratios = result["ratios"]
    speed = {k: r["chars_per_cpu_s"] for k, r in rows.items()}

    def ratio(a, b):  # the JSON rounds each ratio to 3 decimals
        return pytest.approx(speed[a] / speed[b], abs=6e-4)

    assert ratios["rows_over_dense"]["2r/b8"] == ratio((2, 8, "rows"), (2, 8, "dense"))
    assert ratios["ranks_over_one"]["2r/b4/dense"] == ratio((2, 4, "dense"), (1, 4, "dense"))
    assert ratios["batch_over_smallest"]["1r/b8/rows"] == ratio((1, 8, "rows"), (1, 4, "rows"))
    assert len(result["machine"]["load_average"]) == 3 and result["machine"]["deepspeed"]
