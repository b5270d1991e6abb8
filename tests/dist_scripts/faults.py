"""Run by tests/test_distributed.py as one rank of a 2-process group started without the launcher (RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment), so what the surviving rank does is this code's doing, not
the launcher's. ``nerco train`` with a fault injected on rank 1 at its ``--at``-th fine-tuning batch:

- die: rank 1 exits abruptly; rank 0 must report it and exit, not hang;
- hang: rank 1 stops responding; rank 0 must give up after distributed.timeout_s;
- nan: rank 1's loss is NaN once; every rank skips that step and counts it.

Usage: faults.py MODE AT -- nerco train arguments
"""

import os
import sys
import time

from nerco_dist.cli import main
from nerco_dist import distributed as dist
from nerco_dist.train import trainer


def inject(mode: str, at: int) -> None:
    real = trainer.finetune_loss
    calls = 0

    def faulty(run, model, batch, head_only):
        nonlocal calls
        calls += 1
        loss = real(run, model, batch, head_only)
        if dist.rank() == 1 and calls == at:
            if mode == "die":
                os._exit(17)
            if mode == "hang":
                time.sleep(3600)
            if mode == "nan":
                return loss * float("nan")
        return loss

    trainer.finetune_loss = faulty


if __name__ == "__main__":
    mode, at, sep, *argv = sys.argv[1:]
    assert sep == "--"
    inject(mode, int(at))
    sys.exit(main(argv))
