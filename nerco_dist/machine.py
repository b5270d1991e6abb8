"""The machine: what a result was measured on (written into every results file, training runs and
benchmarks), and process settings that make training on it faster."""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import platform
import time

import torch

from . import distributed as dist

log = logging.getLogger("nerco_dist")

LIBRARIES = ("triton", "transformers", "deepspeed")


def machine_info(device: torch.device) -> dict:
    """Platform, CPU, GPU, library versions, threads, world size and the date."""
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                device=str(device), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), world_size=dist.world_size(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    for name in LIBRARIES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def keep_freed_memory() -> bool:
    """Keep freed memory in the process instead of returning it to the system (glibc only; False elsewhere).

    glibc serves a block over its mmap threshold (128 KiB at first) with a fresh mapping and unmaps it when
    freed, so each training step page-faults on its large tensors again: a fifth to a third of a CPU step's
    time. The threshold is fixed at its largest (32 MiB; larger blocks are still mapped) and the heap is never
    trimmed, so freed blocks are reused. Process-wide; training processes call it at start."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


def flush_denormals(enabled: bool = True) -> bool:
    """Flush denormal floats to zero on CPU (x86 FTZ/DAZ; False where the CPU cannot).

    Adam's first moment of a row that gets no gradient decays by beta1 each step, so the embedding rows a
    batch does not touch, and unused rows of FLAT's position table, sink through the denormal range, where
    some x86 cores take a slow path (on the AMD EPYC of benchmarks/bench_denormals.py it made no measurable
    difference). Such values move a weight by less than 1e-30. The setting is per thread and threads inherit
    it when created: call it before torch's first parallel op."""
    return torch.set_flush_denormal(enabled)


def auto_threads(cores: int, load: float, local_ranks: int) -> int:
    """Torch CPU threads for one rank (``run.threads=auto``): the cores not already busy (``load``, rounded half up),
    shared evenly by the ranks on this node; at least one. Torch's default, a thread per core, oversubscribes a
    machine that is already busy: its threads wait for each other at every parallel region, and epochs on a
    loaded 2-core machine ran 3.5-7x slower than with one thread."""
    return max(1, (cores - int(load + 0.5)) // local_ranks)


def local_ranks() -> int:
    """Ranks on this node, as the launcher says: LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE (DeepSpeed's
    launcher, which the project's launch scripts use); 1 without a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def auto_threads_here() -> tuple[int, str]:
    """:func:`auto_threads` for this process on this machine, and what it was decided from (for the log).
    The cores are those this process may run on; the load is the 1-minute average at start, scaled to those
    cores when they are only some of the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] * cores / (os.cpu_count() or cores)
    ranks = local_ranks()
    why = f"{cores} cores, {load:.1f} busy, {ranks} rank{'' if ranks == 1 else 's'} on this node"
    return auto_threads(cores, load, ranks), why


def apply_threads(setting: int | str, key: str = "run.threads") -> None:
    """torch's CPU thread count from ``setting`` (``key``: the config key or option that gave it): ``auto``
    decided from this machine, and logged with why; 0 leaves torch's default."""
    threads = setting
    if setting == "auto":
        threads, why = auto_threads_here()
        log.info("%s=auto: %d torch thread%s (%s)", key, threads, "" if threads == 1 else "s", why)
    if threads:
        torch.set_num_threads(threads)
