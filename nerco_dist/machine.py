"""What a result was measured on: written into every results file (training runs and benchmarks)."""

from __future__ import annotations

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
