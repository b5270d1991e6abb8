"""The MSRA full phase on CPU: training characters per CPU-second, the cost of a step and the projected epoch,
with the embedding tables updated dense or row-wise (``optim.table_updates``), on one rank or two, at a
small and a large batch, all in one run so that the ratios share the machine's load.

    python3 benchmarks/bench_msra_epoch.py                  # configs/msra.yaml with its vectors (minutes)
    python3 benchmarks/bench_msra_epoch.py --quick          # the tiny config, a few steps (script check)

Each rank count is a set of worker processes of its own (two ranks: DeepSpeed with ``--ds``, gloo, as the
launcher runs them; one rank: the local engine, as ``nerco train configs/msra.yaml`` runs); each worker reads
the data once, then for each of ``--rounds`` rounds and each batch size trains dense, then row-wise, a fresh
model: ``--warmup`` steps, then ``--steps`` timed steps of real MSRA batches through the trainer's own
epoch loop (``StageLoop.train_epoch``; dev scoring excluded), one torch thread per rank. CPU time is the
processes' (all ranks summed); the step's parts (forward, backward, optimizer step) are rank 0's process CPU
time around each engine call. The projected epoch: the phase's training characters at the measured
characters per CPU-second (``epoch_cpu_s``, all ranks), and this rank's batches per epoch at the measured
wall time per step (``epoch_wall_s``, which counts the machine's other load too). The load average is
recorded before every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a row per measurement is the progress report

from common import ResultsFile, machine_info, parse_args

REPO = Path(__file__).resolve().parents[1]
UPDATES = ("dense", "rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=os.environ.get("NERCO_DATA_ROOT", "data"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per arm first")
    parser.add_argument("--batches", default="10,64", help="sentences per step and rank, compared")
    parser.add_argument("--ranks", default="1,2", help="rank counts compared")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each arm, alternating")
    parser.add_argument("--ds", default="zero2", help="DeepSpeed config of the multi-rank runs")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a worker's rows file


def worker_config(args: argparse.Namespace, ranks: int, out: str):
    from nerco_dist.config import default_data_root, load_config

    sets = ["run.threads=1", f"run.out_dir={out}", "distributed.timeout_s=900"]
    if ranks > 1:
        sets.append(f"distributed.config={args.ds}")
    if args.quick:
        sets += ["data.limit=120", "data.max_len=60"]
    base = REPO / "configs" / ("tiny.yaml" if args.quick else "msra.yaml")
    return load_config(base, sets, data_root=default_data_root(args.data_root))


class PartTimer:
    """Process CPU seconds spent in an engine's forward, backward and step, wrapped around the engine."""

    def __init__(self, engine):
        self.seconds = dict(forward=0.0, backward=0.0, step=0.0)
        for part in self.seconds:
            setattr(engine, part, self._timed(part, getattr(engine, part)))

    def _timed(self, part, call):
        def timed(*a):
            tick = time.process_time()
            try:
                return call(*a)
            finally:
                self.seconds[part] += time.process_time() - tick
        return timed


def timed_arm(run, phase, batches: list, warmup: int) -> dict:
    """A fresh model and engine for ``phase``: ``warmup`` steps, then the rest timed (this rank's figures)."""
    from nerco_dist.train.monitor import Scalars
    from nerco_dist.train.resume import BestWeights, Progress
    from nerco_dist.train.trainer import StageLoop

    loop = StageLoop(run, [phase], Progress(), BestWeights(), None, Scalars(None))
    loop.start_phase(run.initial_model(None), 0)
    loss = loop.phase_loss()
    loop.train_epoch(batches[:warmup], loss)
    loop.progress = Progress()
    parts = PartTimer(loop.engine)
    wall, cpu = time.perf_counter(), time.process_time()
    loop.train_epoch(batches[warmup:], loss)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tables = loop.engine.tables
    loop.engine.close()
    chars = sum(int(b["char_mask"].sum()) for b in batches[warmup:])
    return dict(wall_s=wall, cpu_s=cpu, chars=chars, row_wise_tables=len(tables.params) if tables else 0,
                **{f"{k}_cpu_s": v for k, v in parts.seconds.items()})


def arm_row(run, phase, updates: str, batch: int, args) -> dict:
    """One arm, every rank: its figures summed (CPU, characters) or rank 0's (wall, parts)."""
    from nerco_dist import distributed as dist

    phase = dataclasses.replace(phase, optim=dataclasses.replace(phase.optim, batch_size=batch,
                                                                 table_updates=updates))
    epoch_batches = run.train_batches(batch)
    batches = list(itertools.islice(iter(epoch_batches), args.warmup + args.steps))
    load = os.getloadavg()
    mine = timed_arm(run, phase, batches, args.warmup)
    cpu, chars = dist.sum_over_ranks([mine["cpu_s"], mine["chars"]])
    steps, world = len(batches) - args.warmup, dist.world_size()
    epoch_chars = sum(p.num_chars for p in run.train_pieces)
    ms = lambda seconds: round(1e3 * seconds / steps, 2)  # noqa: E731
    return dict(ranks=world, batch=batch, table_updates=updates, row_wise_tables=mine["row_wise_tables"],
                steps=steps, load_average=load, chars=int(chars), chars_per_cpu_s=round(chars / cpu, 1), cpu_ms_per_step_rank=ms(cpu / world),
                wall_ms_per_step=ms(mine["wall_s"]),
                rank0_cpu_ms=dict(forward=ms(mine["forward_cpu_s"]), backward=ms(mine["backward_cpu_s"]),
                                  step=ms(mine["step_cpu_s"])),
                epoch_chars=epoch_chars, epoch_steps_per_rank=len(epoch_batches),
                epoch_cpu_s=round(epoch_chars * cpu / chars, 1),
                epoch_wall_s=round(len(epoch_batches) * mine["wall_s"] / steps, 1))


def worker(args: argparse.Namespace) -> None:
    """This rank's part of one rank count: every arm, rank 0 writing the rows to ``args.worker``."""
    from nerco_dist import distributed as dist
    from nerco_dist.train.phases import stage_phases
    from nerco_dist.train.run import TrainingRun

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as out:
        run = TrainingRun.start(worker_config(args, ranks, out))
        phase = stage_phases(run.cfg, "finetune")[-1]
        rows = []
        for _, batch, updates in itertools.product(range(args.rounds), parse_ints(args.batches), UPDATES):
            rows.append(arm_row(run, phase, updates, batch, args))
            if dist.is_main():
                print(json.dumps(rows[-1]), flush=True)
                args.worker.write_text(json.dumps(rows))
    dist.leave()


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(ranks: int, rows_file: Path) -> list[dict]:
    """This script as ``--worker`` on ``ranks`` processes (the launcher's environment by hand); rank 0's rows."""
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", str(rows_file)]
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{ranks}-rank workers failed:\n" + "\n".join(log[-3000:] for log in logs))
    return json.loads(rows_file.read_text())


def ratios(rows: list[dict]) -> dict:
    """Characters per CPU-second, each arm's mean over rounds, as ratios: rows over dense (per rank count and
    batch), two ranks over one, the large batch over the small one."""
    mean = {}
    for r in rows:
        mean.setdefault((r["ranks"], r["batch"], r["table_updates"]), []).append(r["chars_per_cpu_s"])
    mean = {k: sum(v) / len(v) for k, v in mean.items()}
    ranks, batches = sorted({k[0] for k in mean}), sorted({k[1] for k in mean})
    out = {"rows_over_dense": {f"{n}r/b{b}": round(mean[n, b, "rows"] / mean[n, b, "dense"], 3)
                               for n in ranks for b in batches}}
    out["ranks_over_one"] = {f"{n}r/b{b}/{u}": round(mean[n, b, u] / mean[ranks[0], b, u], 3)
                             for n in ranks[1:] for b in batches for u in UPDATES}
    out["batch_over_smallest"] = {f"{n}r/b{b}/{u}": round(mean[n, b, u] / mean[n, batches[0], u], 3)
                                  for n in ranks for b in batches[1:] for u in UPDATES}
    return out


def main() -> int:
    args = parse_args("msra_epoch", __doc__, add_arguments=add_arguments, interpret_on_cpu=False)
    if args.quick:
        args.steps, args.warmup, args.batches = 3, 1, "4,8"
    if args.worker is not None:
        worker(args)
        return 0
    if args.device != "cpu":
        raise SystemExit("bench_msra_epoch.py measures CPU time: run it with --device cpu")
    results = ResultsFile(args.out, dict(benchmark="msra_epoch", command=" ".join(sys.argv),
                                         config="tiny.yaml" if args.quick else "msra.yaml", ds_config=args.ds,
                                         machine=machine_info(args.device)))
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in parse_ints(args.ranks):
            for row in run_workers(ranks, Path(tmp) / f"rows{ranks}.json"):
                results.append(row)
    results.set("ratios", ratios(results.payload["rows"]))
    results.set("load_average_after", os.getloadavg())
    print(json.dumps(results.payload["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
