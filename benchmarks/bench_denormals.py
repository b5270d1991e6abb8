"""What flushing denormals to zero saves on CPU: the Resume baseline's full phase, with its pretrained vectors,
trained with ``run.flush_denormals`` true and false, alternating, at one thread; CPU seconds and dev F1 per
epoch for each run.

Adam's first moment of an embedding row that a batch does not touch decays by beta1 at each step and after
some 800 steps is denormal, where some x86 cores take a slow path; a flushing run keeps it at 0. The
per-epoch times show when the slow-down sets in; the dev F1s show whether flushing changed what is learned.

    python3 benchmarks/bench_denormals.py                       # 6 epochs, 2 rounds (~30 CPU-minutes)
    python3 benchmarks/bench_denormals.py --epochs 3 --rounds 1 --out /tmp/denormals.json

Writes results/denormals_cpu.json (a row per run as soon as it ends) and the per-epoch plot beside it.
CPU time is the child's user + system time (``/proc/PID/stat``) at each epoch's log line, from the line that
starts the phase: start-up and data loading are left out, each epoch's dev evaluation is in.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from common import ResultsFile, cpu_time_arguments, machine_info, parse_args, require_cpu, train_epochs

REPO = Path(__file__).resolve().parents[1]
START = re.compile(r"finetune phase 'full'")


def recipe(epochs: int, flush: bool) -> list[str]:
    """configs/resume.yaml's full phase alone for ``epochs`` epochs (no early stop, no test), seed 1."""
    return ["finetune.head.optim.epochs=0", f"finetune.full.optim.epochs={epochs}", "finetune.full.patience=0",
            "data.test=null", "run.threads=1", "run.seed=1", f"run.flush_denormals={str(flush).lower()}"]


def train_run(overrides: list[str], out: Path, data_root: str) -> dict:
    """One ``nerco train configs/resume.yaml``: CPU seconds and dev F1 of each epoch."""
    argv = ["train", str(REPO / "configs" / "resume.yaml"), "--no-resume"]
    for item in overrides + [f"run.out_dir={out}"]:
        argv += ["--set", item]
    env = {**os.environ, "NERCO_DATA_ROOT": data_root, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    epochs = train_epochs([sys.executable, "-m", "nerco_dist.cli", *argv], env, REPO, START)
    since_start = [0.0] + [cpu for _, cpu, _ in epochs]
    return dict(epoch_cpu_s=[round(b - a, 2) for a, b in zip(since_start, since_start[1:])],
                dev_f1=[f1 for _, _, f1 in epochs])


def plot(rows: list[dict], path: Path) -> None:
    from nerco_dist.eval.plots import plot_lines

    series = {f"flush_denormals={r['flush_denormals']} (round {r['round']})": r["epoch_cpu_s"] for r in rows}
    plot_lines(series, path, "Resume baseline, full phase, one thread: CPU seconds per epoch", "epoch",
               "CPU seconds")


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=6)
    cpu_time_arguments(parser, "setting")


def main() -> int:
    args = parse_args("denormals", __doc__, add_arguments=add_arguments, interpret_on_cpu=False)
    require_cpu(args, "bench_denormals.py")
    if args.epochs < 1:
        raise SystemExit(f"--epochs={args.epochs}: expected an integer >= 1")
    results = ResultsFile(args.out, dict(benchmark="denormals", command=" ".join(sys.argv), epochs=args.epochs,
                                         recipes={str(f): recipe(args.epochs, f) for f in (False, True)},
                                         machine=machine_info("cpu")))
    with tempfile.TemporaryDirectory(prefix="denormals_") as tmp:
        for round_ in range(args.rounds):
            for flush in (False, True):
                row = dict(round=round_ + 1, flush_denormals=flush,
                           **train_run(recipe(args.epochs, flush), Path(tmp) / "out", args.data_root))
                results.append(row)
                print(row, flush=True)
    rows = results.payload["rows"]
    summary = {}
    for flush in (False, True):
        mine = [r for r in rows if r["flush_denormals"] == flush]
        summary[f"flush_{str(flush).lower()}"] = dict(
            median_total_cpu_s=statistics.median(sum(r["epoch_cpu_s"]) for r in mine),
            median_epoch_cpu_s=[statistics.median(e) for e in zip(*(r["epoch_cpu_s"] for r in mine))],
            final_dev_f1=[r["dev_f1"][-1] for r in mine])
    off, on = summary["flush_false"], summary["flush_true"]
    summary["speedup_total"] = round(off["median_total_cpu_s"] / on["median_total_cpu_s"], 2)
    summary["speedup_last_epoch"] = round(off["median_epoch_cpu_s"][-1] / on["median_epoch_cpu_s"][-1], 2)
    results.set("summary", summary)
    plot(rows, args.out.with_suffix(".png"))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
