"""Run by tests/test_distributed.py as one rank of a 2-process group started without the launcher (RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment), so what the surviving rank does is this code's doing, not
the launcher's. ``nerco train`` with a fault injected on rank 1 at its ``--at``-th fine-tuning batch:

- die: rank 1 exits abruptly; rank 0 must report it and exit, not hang;
- hang: rank 1 stops responding before its loss is all-reduced (the default process group); rank 0 must
  give up after distributed.timeout_s;
- hang_backward: rank 1 stops responding inside its backward pass, while rank 0 waits in DeepSpeed's gradient
  reduction (DeepSpeed's own process group); the same;
- nan: rank 1's loss is NaN once; every rank skips that step and counts it.

Usage: faults.py MODE AT -- nerco train arguments
"""

import os
import sys
import time

import torch

from nerco_dist import distributed as dist
from nerco_dist.cli import main


class HangInBackward(torch.autograd.Function):
    """The identity, whose backward pass never returns."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(3600)
        return grad


def fault(mode: str, at: int):
    """A ``wrap_loss`` for ``nerco train`` that injects ``mode`` on rank 1 at its ``at``-th batch."""
    calls = 0

    def wrap(phase, loss):
        def faulty(model, batch):
            nonlocal calls
            calls += 1
            value = loss(model, batch)
            if dist.rank() == 1 and calls == at:
                if mode == "die":
                    os._exit(17)
                if mode == "hang":
                    time.sleep(3600)
                if mode == "hang_backward":
                    return HangInBackward.apply(value)
                if mode == "nan":
                    return value * float("nan")
            return value
        return faulty
    return wrap


if __name__ == "__main__":
    mode, at, sep, *argv = sys.argv[1:]
    assert sep == "--"
    sys.exit(main(argv, wrap_loss=fault(mode, int(at))))
