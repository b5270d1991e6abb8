"""What every benchmark shares: the command line, the machine header, timing and the results file.

Benchmarks time; the tests check. A benchmark script supplies a grid of cases and a setup function that
builds one case's inputs and returns the callables to time; :func:`run_cases` times each callable, computes
speedups against a baseline implementation from the same run, and rewrites the results JSON after every case,
so that a run cut short (a timeout, an out-of-memory kill) keeps every row already measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

import nerco_dist.machine
from nerco_dist.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(benchmark: str, description: str, *,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               interpret_on_cpu: bool = True) -> argparse.Namespace:
    """The options every benchmark takes, plus those ``add_arguments`` adds. Call it before importing the
    Triton kernels: on ``--device cpu`` it sets TRITON_INTERPRET=1 (``interpret_on_cpu``; read when a kernel
    is defined) so that they run in the interpreter."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny grid (for the Triton interpreter on CPU)")
    parser.add_argument("--out", type=Path, help=f"results JSON, or a folder for the default name "
                        f"(default: results/{benchmark}_<device>[_quick].json)")
    parser.add_argument("--budget", type=float, help="seconds after which the remaining cases are skipped")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.device == "cpu":
        if interpret_on_cpu:
            os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(args.threads)
    if args.out is None or args.out.is_dir():
        args.out = (args.out or RESULTS) / default_name(benchmark, args.device, args.quick)
    return args


def cpu_time_arguments(parser: argparse.ArgumentParser, compared: str) -> None:
    """What the CPU-time benchmarks share: ``--rounds`` (runs of each ``compared`` thing, alternating, so that
    the machine's load falls on both alike) and ``--data-root``."""
    parser.add_argument("--rounds", type=int, default=2, help=f"runs of each {compared}, alternating")
    parser.add_argument("--data-root", default=os.environ.get("NERCO_DATA_ROOT", "data"))


def require_cpu(args: argparse.Namespace, script: str) -> None:
    """A CPU-time benchmark refuses another device and a round count below 1."""
    if args.device != "cpu":
        raise SystemExit(f"{script} measures CPU time: run it with --device cpu")
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: expected an integer >= 1")


def default_name(benchmark: str, device: str, quick: bool) -> str:
    """<benchmark>_<card or cpu>[_quick].json; CPU runs with interpreted kernels say so in the name."""
    if device == "cuda":
        where = "_".join(re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower()))
    else:
        where = "cpu_interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"
    return f"{benchmark}_{where}{'_quick' if quick else ''}.json"


def machine_info(device: str) -> dict[str, Any]:
    """The trainer's machine record, plus what matters for timings: the CPU model and load, whether the
    kernels were interpreted, the GPU's memory and pytorch-crf's version (the CRF baseline)."""
    info = nerco_dist.machine.machine_info(torch.device(device))
    info.update(cpu=_cpu_model(), cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    try:
        info["pytorch-crf"] = importlib.metadata.version("pytorch-crf")
    except importlib.metadata.PackageNotFoundError:
        info["pytorch-crf"] = None
    if device == "cuda":
        card = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_memory_gib=round(card.total_memory / 2**30, 1), gpu_capability=f"{card.major}.{card.minor}")
    return info


def _cpu_model() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor()


def median_ms(fn: Callable[[], Any], device: str, quick: bool = False) -> float:
    """Median milliseconds per call: triton.testing.do_bench on a GPU (its own warm-up, L2 flushed between
    calls), torch.utils.benchmark's blocked_autorange on CPU (block-size estimation doubles as warm-up)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.1 if quick else 1.0).median * 1e3


def peak_extra_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Peak GPU memory of one call above what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux: ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# an epoch's log line with its dev score: "epoch 2: dev P .." (earlier commits), "... epoch 2/6: loss .., dev P .."
EPOCH_LINE = re.compile(r"epoch (\d+)(?:/\d+)?: .*?dev P [\d.]+ R [\d.]+ F1 ([\d.]+)")


def train_epochs(cmd: list[str], env: dict[str, str], cwd: Path, start: re.Pattern) -> list[tuple[int, float, float]]:
    """Run a training command, reading its log as it comes: for each epoch line after the line ``start``
    matches (the epoch loop begins, so start-up and data loading are left out), the epoch, the child's CPU
    seconds since then and the dev F1. A failed run raises with the log's tail."""
    child = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    begun, epochs, log = None, [], []
    for line in child.stdout:
        log.append(line)
        if begun is None and start.search(line):
            begun = cpu_seconds(child.pid)
        match = EPOCH_LINE.search(line)
        if match and begun is not None:
            epochs.append((int(match.group(1)), cpu_seconds(child.pid) - begun, float(match.group(2))))
    if child.wait() != 0 or not epochs:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {child.returncode}):\n{''.join(log[-20:])}")
    return epochs


class ResultsFile:
    """A JSON object (header fields and ``rows``) rewritten atomically each time a row is added."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.payload = {**header, "rows": []}
        write_json(self.path, self.payload, indent=1)

    def append(self, row: dict[str, Any]) -> None:
        self.payload["rows"].append(row)
        write_json(self.path, self.payload, indent=1)

    def set(self, key: str, value: Any) -> None:
        self.payload[key] = value
        write_json(self.path, self.payload, indent=1)


class Case(NamedTuple):
    """One case, built: figures that describe its inputs, the callables to time keyed (impl, op), and where
    an op has a defined amount of work, its floating-point operations (the same for every implementation:
    the algorithm's, not what a path happens to compute), for TFLOP/s and the fraction of the card's peak."""

    stats: dict[str, Any]
    fns: dict[tuple[str, str], Callable[[], Any]]
    flops: dict[str, float] | None = None


# dense tensor-core peaks (TFLOP/s, without sparsity) of the cards the GPU script meets, by the dtype of the
# inputs; fp32 counts TF32, which the benchmarks turn on for fp32 matmuls
PEAK_TFLOPS = {"h100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
               "h200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}}


def peak_tflops(device: str, dtype: str | None) -> float | None:
    """The card's peak for ``dtype``, or None (a CPU, an unknown card or dtype)."""
    if device != "cuda" or dtype is None:
        return None
    name = torch.cuda.get_device_name().lower()
    card = next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), {})
    return card.get(dtype)


def throughput(flops: dict[str, float], ms: dict[str, dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """TFLOP/s per implementation and op where the op's work is known and it was timed, with its fraction of
    ``peak`` (None where the peak is not known)."""
    rows = {}
    for impl, ops in ms.items():
        for op, t in ops.items():
            if op in flops and isinstance(t, float) and t > 0:
                tflops = flops[op] / (t * 1e-3) / 1e12
                rows.setdefault(impl, {})[op] = dict(tflops=_round(tflops),
                                                     fraction_of_peak=_round(tflops / peak) if peak else None)
    return rows


class Target(NamedTuple):
    """A GPU goal: ``metric`` ("ms" or "peak_mib") of ``impl``/``op`` on the case with these parameters."""

    case: dict[str, Any]
    impl: str
    op: str
    metric: str
    limit: float


def run_cases(args: argparse.Namespace, benchmark: str, cases: list[dict[str, Any]],
              setup: Callable[[dict[str, Any], str], Case], baseline: str, *, settings: dict[str, Any],
              targets: tuple[Target, ...] = ()) -> ResultsFile:
    """Time every case's callables and append one row per case to ``args.out``.

    A row holds the case parameters, its ``stats``, ``ms`` (and ``peak_mib`` on a GPU) per implementation and
    op, and ``speedup``: the baseline implementation's time for the same op divided by each one's. A callable
    that runs out of GPU memory is recorded as "OOM"; one whose first result is not finite is listed under
    ``nonfinite`` (a sanity flag only: correctness is the tests' job).
    """
    header = {"benchmark": benchmark, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "device": args.device, "quick": args.quick, "baseline": baseline, "settings": settings,
              "machine": machine_info(args.device)}
    results = ResultsFile(args.out, header)
    print(f"{benchmark}: {len(cases)} cases -> {args.out}", flush=True)
    deadline = None if args.budget is None else time.monotonic() + args.budget
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            results.append({"case": case, "status": "skipped (budget)"})
            continue
        row = _time_case(setup, case, args, baseline)
        results.append(row)
        print(_format_row(row), flush=True)
    if targets and args.device == "cuda":
        results.set("targets", [_verdict(target, results.payload["rows"]) for target in targets])
        for verdict in results.payload["targets"]:
            print("target", verdict, flush=True)
    return results


def _time_case(setup, case, args, baseline) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "status": "ok"}
    built = setup(case, args.device)
    row["stats"] = built.stats
    ms: dict[str, dict[str, Any]] = {}
    peak: dict[str, dict[str, Any]] = {}
    nonfinite = []
    for impl, op in list(built.fns):
        fn = built.fns.pop((impl, op))  # dropped once timed: the case's inputs are freed with the last one
        try:
            if not _finite(fn()):
                nonfinite.append(f"{impl} {op}")
            ms.setdefault(impl, {})[op] = _round(median_ms(fn, args.device, args.quick))
            peak.setdefault(impl, {})[op] = _round(peak_extra_mib(fn, args.device))
        except torch.cuda.OutOfMemoryError:
            ms.setdefault(impl, {})[op] = peak.setdefault(impl, {})[op] = "OOM"
        del fn
    if args.device == "cuda":
        torch.cuda.empty_cache()
        row["peak_mib"] = peak
    row["ms"] = ms
    if built.flops:
        row["throughput"] = throughput(built.flops, ms, peak_tflops(args.device, case.get("dtype")))
    base = ms.get(baseline, {})
    row["speedup"] = {impl: {op: _round(base[op] / t) for op, t in ops.items()
                             if isinstance(t, float) and isinstance(base.get(op), float)}
                      for impl, ops in ms.items()}
    if nonfinite:
        row["nonfinite"] = nonfinite
    return row


def _finite(result: Any) -> bool:
    """The one sanity check a benchmark makes: a floating-point result has no inf or NaN."""
    return not (isinstance(result, torch.Tensor) and result.is_floating_point()) or bool(torch.isfinite(result).all())


def _round(value: float | None) -> float | None:
    """Four significant digits: run-to-run noise is larger than that."""
    return None if value is None else float(f"{value:.4g}")


def _format_row(row: dict[str, Any]) -> str:
    case = ", ".join(f"{k}={v}" for k, v in row["case"].items())
    cells = []
    for impl, ops in row["ms"].items():
        for op, t in ops.items():
            x = row["speedup"][impl].get(op)
            cells.append(f"{impl} {op} " + (t if isinstance(t, str) else f"{t:.3f} ms")
                         + ("" if x is None else f" ({x:.2f}x)"))
    flag = f"  NONFINITE: {row['nonfinite']}" if "nonfinite" in row else ""
    return f"[{case}] " + " | ".join(cells) + flag


def _verdict(target: Target, rows: list[dict[str, Any]]) -> dict[str, Any]:
    verdict: dict[str, Any] = dict(target._asdict(), measured=None, met=False)
    for row in rows:
        if row["case"] == target.case and row["status"] == "ok":
            value = row["ms" if target.metric == "ms" else "peak_mib"].get(target.impl, {}).get(target.op)
            verdict["measured"] = value
            verdict["met"] = isinstance(value, float) and value <= target.limit
    return verdict
