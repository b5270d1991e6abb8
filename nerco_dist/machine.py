"""The machine: what a result was measured on (written into every results file, training runs and
benchmarks), and process settings that make training on it faster."""

from __future__ import annotations

import ctypes
import importlib.metadata
import platform
import time

import torch

from . import distributed as dist

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
