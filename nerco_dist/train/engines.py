"""The one place that builds a phase's training engine: the local engine for one process, DeepSpeed's when a
DeepSpeed config is given or the launcher started several ranks (``engine.py``, ``deepspeed_engine.py``).

Both take the optimizer and LR schedule of a phase's optimiser section (``optim.py``), with the learning rate
scaled for the global batch (``distributed.lr_scaling``, from the phase's ``optim.base_batch``), and the row-wise
optimizer of the embedding tables when the phase asks for it (``rows.py``). The model knows nothing of either.

An engine trains a fixed set of parameters for one phase (DeepSpeed reads ``requires_grad`` once, in
``initialize``): every phase gets a new engine on a fresh model, so its optimiser and warmup start anew.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..config import DistributedConfig, OptimConfig
from .deepspeed_engine import DeepSpeedEngine, deepspeed_config
from .engine import Engine, LocalEngine
from .optim import ParamGroups, build_optimizer, build_scheduler
from .rows import TableRows, split_groups

log = logging.getLogger("nerco_dist")


def scaled_lr(optim: OptimConfig, d: DistributedConfig, world: int) -> float:
    """A phase's ``optim.lr`` for its global batch, micro batch x accumulation x world size: unchanged
    (``none``), or scaled by global / ``optim.base_batch`` (``linear``) or its square root (``sqrt``); a base
    of 0 is the phase's micro batch. The base is the phase's own, so a phase trained at a larger batch leaves
    the others' rates alone."""
    base = optim.base_batch or optim.batch_size
    ratio = optim.batch_size * d.grad_accum * world / base
    if d.lr_scaling == "none":
        return optim.lr
    if d.lr_scaling == "linear":
        return optim.lr * ratio
    if d.lr_scaling == "sqrt":
        return optim.lr * math.sqrt(ratio)
    raise ValueError(f"distributed.lr_scaling={d.lr_scaling!r}: expected none, linear or sqrt")


def uses_deepspeed(d: DistributedConfig) -> bool:
    """DeepSpeed when a DeepSpeed config is given or the launcher started several ranks."""
    return bool(d.config) or dist.launched()


def build_engine(model: nn.Module, optim: OptimConfig, groups: ParamGroups, steps_per_epoch: int, *,
                 distributed: DistributedConfig | None = None, device: torch.device | None = None,
                 start_step: int = 0, row_tables: Sequence[nn.Parameter] = ()) -> Engine:
    """An engine training the parameters of ``groups`` (each at its fraction of the scaled ``optim.lr``);
    every other parameter of ``model`` is frozen. ``steps_per_epoch`` counts micro-batches; ``start_step`` is
    where the LR schedule starts (a resumed phase continues its schedule). ``row_tables``: those of the
    parameters whose gradients are sparse rows, updated row-wise (:class:`TableRows`). DeepSpeed when
    ``distributed.config`` is set or several ranks run, the local engine otherwise."""
    d = distributed or DistributedConfig()
    trainable = [p for params, _ in groups for p in params]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    lr = scaled_lr(optim, d, dist.world_size())
    steps = max(1, steps_per_epoch // d.grad_accum)
    dense, rows = split_groups(groups, row_tables)
    optimizer = build_optimizer(optim, dense, lr)
    scheduler = build_scheduler(optimizer, optim, steps, start_step)
    tables = TableRows.build(optim, rows, lr, steps, start_step) if rows else None
    if not uses_deepspeed(d):
        return LocalEngine(model, optimizer, scheduler, optim.clip_value, d.grad_accum, tables)
    ds = deepspeed_config(d, optim.batch_size, device or next(model.parameters()).device)
    log.info("DeepSpeed: ZeRO stage %d, %s, micro batch %d x accumulation %d x %d ranks = global batch %d, "
             "lr %.3g, clipping: %s", ds.get("zero_optimization", {}).get("stage", 0),
             "bf16" if ds["bf16"]["enabled"] else "fp32", optim.batch_size, d.grad_accum, dist.world_size(),
             ds["train_batch_size"], lr,
             f"global norm {ds['gradient_clipping']}" if ds.get("gradient_clipping") else "none")
    if tables is not None:
        log.info("DeepSpeed: the embedding tables (%d rows) kept out, updated row-wise, clipped by value: %s",
                 sum(p.shape[0] for p in tables.params), optim.clip_value)
    return DeepSpeedEngine(model, optimizer, scheduler, ds, trainable, tables)
