"""Run by tests/test_distributed.py (and tests/test_stopping.py) as ``nerco train`` with a fault injected on
the last rank (rank 1 of a 2-process group started without the launcher, with RANK, WORLD_SIZE, MASTER_ADDR/PORT
in the environment, so what the surviving rank does is this code's doing, not the launcher's; or the only
process) at its ``AT``-th training batch:

- die: the rank exits abruptly; rank 0 must report it and exit, not hang;
- hang: the rank stops responding before its loss is all-reduced (the default process group); rank 0 must
  give up after distributed.timeout_s;
- hang_backward: the rank stops responding inside its backward pass, while rank 0 waits in DeepSpeed's
  gradient reduction (DeepSpeed's own process group); the same;
- nan: the rank's loss is NaN once; every rank skips that step and counts it;
- sigint, sigterm, sighup: the rank sends itself SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) or
  SIGHUP (a closed terminal);
  sigint_twice: two SIGINTs (Ctrl-C pressed again);
- sigterm_parent: the rank sends SIGTERM to its parent process, the deepspeed launcher, which passes it on
  to every rank (a scheduler ending the job);
- die_in_repeated_save: rank 0 is killed (SIGKILL) in the middle of writing the first file of a resume save
  made at the same step as the save before it (the epoch-end save after ``checkpoint_every``'s save of the
  epoch's last step), the file truncated as DeepSpeed's in-place write truncates it (AT is not used).

Usage: faults.py MODE AT -- nerco train arguments
"""

import os
import signal
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
    """A ``wrap_loss`` for ``nerco train`` that injects ``mode`` on the last rank at its ``at``-th batch."""
    calls = 0

    def wrap(phase, loss):
        def faulty(model, batch):
            nonlocal calls
            calls += 1
            value = loss(model, batch)
            if dist.rank() == dist.world_size() - 1 and calls == at:
                if mode in ("sigint", "sigterm", "sighup", "sigint_twice"):
                    os.kill(os.getpid(), getattr(signal, mode.removesuffix("_twice").upper()))
                if mode == "sigint_twice":
                    os.kill(os.getpid(), signal.SIGINT)
                if mode == "sigterm_parent":
                    os.kill(os.getppid(), signal.SIGTERM)
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


def die_in_repeated_save() -> None:
    """Arm ``die_in_repeated_save``: rank 0 dies inside the first ``torch.save`` of a save that repeats the
    previous save's step, leaving that file a few bytes long."""
    from nerco_dist.train.resume import StageResume

    save, torch_save, last = StageResume.save, torch.save, {}

    def watched_save(self, engine, progress):
        at = (self.stage, progress.phase, progress.step)
        last["repeat"], last["at"] = last.get("at") == at, at
        return save(self, engine, progress)

    def dying_torch_save(obj, f, *args, **kwargs):
        path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)  # not an in-memory buffer
        if last.get("repeat") and dist.rank() == 0 and path is not None:
            with open(path, "wb") as out:
                out.write(b"PK\x03\x04")
            os.kill(os.getpid(), signal.SIGKILL)
        return torch_save(obj, f, *args, **kwargs)

    StageResume.save, torch.save = watched_save, dying_torch_save


if __name__ == "__main__":
    # the deepspeed launcher puts --local_rank=N first; nerco's own parser takes it
    launcher_args = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    mode, at, sep, *argv = [a for a in sys.argv[1:] if a not in launcher_args]
    assert sep == "--"
    argv += launcher_args
    if mode == "die_in_repeated_save":
        die_in_repeated_save()
    sys.exit(main(argv, wrap_loss=fault(mode, int(at))))
