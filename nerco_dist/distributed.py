"""What training and inference need to know about the other processes of a run.

Rank and world size, joining the process group the launcher describes (with a timeout, so a rank that dies
or hangs makes the others fail instead of waiting forever), gathering token features with their gradients
sent back to the rank that owns them, gathering rows of uneven counts (sparse gradients), gathering
predictions, sums of scalars, RNG states for resuming.
With one process and no process group every function here is a no-op or the identity.
"""

from __future__ import annotations

import datetime
import functools
import os
import random
import re
import sys
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from .errors import InputError


def launched() -> bool:
    """Started by a launcher (deepspeed, torchrun, srun wrapper) for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


class PeerLost(RuntimeError):
    """The other ranks of the run are gone, or never came (exit status 3)."""


def _joined(err: BaseException) -> str:
    """How many ranks reached the rendezvous, when torch's error says (``1/2 clients joined``)."""
    found = re.search(r"(\d+)/(\d+) clients joined", str(err))
    return f" ({found.group(1)} of {found.group(2)} ranks joined)" if found else ""


def init(device: torch.device, timeout_s: float) -> None:
    """Join the launcher's process group (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), or make a
    one-process group when there is no launcher. NCCL on CUDA, gloo on CPU. Collectives that wait longer
    than ``timeout_s`` raise instead of hanging."""
    if initialized():
        return
    if "RANK" not in os.environ:  # no launcher: a group of one, so DeepSpeed runs in a plain process too
        # port 0: the store's server binds a port the kernel picks. A port found free first and bound later
        # can be taken in between (as an outgoing connection's source port: EADDRINUSE)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL: a timed-out collective raises
    # DeepSpeed calls torch's *_tensor collectives, which torch now reports as deprecated on every call
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use (about a minute);
        # gloo does the same job without compiling. NERCO_DS_SHM_COMM=1 brings the compiled op back.
        if os.environ.get("NERCO_DS_SHM_COMM", "0") != "1":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                                   timeout=timeout)
    except Exception as err:  # the rendezvous: DistStoreError, DistNetworkError, a refused or timed-out socket
        raise PeerLost(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the process group did not form "
                       f"at {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within distributed.timeout_s="
                       f"{timeout_s:g} s{_joined(err)}: a rank failed to start or hung, or MASTER_ADDR cannot be "
                       f"reached ({type(err).__name__})") from err
    # DeepSpeed makes groups of its own (its data-parallel group reduces the gradients) through its comm
    # backend, which leaves them torch's default timeout (30 minutes on gloo): a rank hung in backward kept
    # the others waiting that long. Its groups get the run's timeout too.
    deepspeed.comm.comm.cdb.new_group = functools.partial(tdist.new_group, timeout=timeout)


def leave() -> None:
    """Destroy the process group while the interpreter is fully alive. Left to the interpreter's exit, gloo's
    worker threads still hold work with tensors whose teardown then needs the GIL: now and then a rank dies
    with SIGABRT ("terminate called without an active exception") after an otherwise clean exit. DeepSpeed's
    clone of the world group goes too: a later run in this process would otherwise use the destroyed one."""
    if initialized():
        tdist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None


def device_for_rank(name: str, key: str = "--device") -> torch.device:
    """``auto``/``cuda``: this rank's GPU (LOCAL_RANK) when there is one; ``cpu`` otherwise. A name that is no
    device, or a GPU torch does not see, is refused naming ``key`` (the option or config key that gave it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = _known_device(name, key)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def _known_device(name: str, key: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"{key}={name}", "not a device (allowed: auto, cpu, cuda, cuda:N)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and not count:
        raise InputError(f"{key}={name}", "torch sees no CUDA device here (allowed here: auto, cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise InputError(f"{key}={name}", f"torch sees {count} CUDA device{'s' if count > 1 else ''} here "
                                          f"(allowed here: auto, cpu, cuda, cuda:0 to cuda:{count - 1})")
    return device


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if initialized():
        tdist.barrier()


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of a few numbers over all ranks (one collective)."""
    if not initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not initialized():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_uneven(x: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``x`` (their number may differ between ranks), concatenated in rank order on every
    rank, and each rank's number of rows (``counts``, exchanged first when not given). Sent padded to the
    largest count, trimmed after."""
    if counts is None:
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        tdist.all_gather(sizes, n)
        counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order. Backward: the gradient of every rank's loss with respect
    to the gathered rows is summed over ranks, and each rank keeps the rows it contributed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank()
        return gather_uneven(x, counts)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.float()  # summed in fp32 whatever the training precision
        total = total.clone() if total is grad else total.contiguous()
        tdist.all_reduce(total)
        start = sum(ctx.counts[: ctx.rank])
        return total[start : start + ctx.counts[ctx.rank]].to(grad.dtype), None


def gather_rows(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (N_r, d) and labels (N_r,) of every rank, padded to the largest rank's count for the transfer and
    trimmed after it: (keys (sum N_r, d), key_labels, self_index) with ``self_index[i]`` the row of this
    rank's row i among the keys. The keys' gradients flow back to the ranks that own them."""
    if not initialized() or world_size() == 1:
        return x, labels, torch.arange(labels.numel(), device=labels.device)
    key_labels, counts = gather_uneven(labels)
    keys = _GatherRows.apply(x.contiguous(), counts)
    start = sum(counts[: rank()])
    return keys, key_labels, torch.arange(start, start + labels.numel(), device=labels.device)


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rank_stream(seed: int, salt: int = 0, always: bool = False) -> None:
    """After the (identical) model init, give each rank its own dropout stream; one process is left as is
    (but ``always``). ``salt`` (a step) sets a continued run's streams apart from those it started with."""
    if world_size() > 1 or always:
        torch.manual_seed(seed * 1009 + rank() + salt * 1_000_003)


def is_peer_failure(err: BaseException) -> bool:
    """Whether an exception means the collective's peers are gone or stuck (not a bug on this rank)."""
    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
        "gloo", "nccl", "socket"))
