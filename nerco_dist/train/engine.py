"""The one place that builds the training engine: what turns a loss into a parameter update.

Two engines behind one small interface — ``forward(fn)``, ``backward(loss)``, ``step()``, ``lr``,
``full_state_dict()``, ``inference_model()``, ``save_state``/``load_state`` — so the trainer reads the same
with one process or many:

- :class:`LocalEngine`: one process, a torch optimizer, gradient clipping by value (the paper's), gradient
  accumulation;
- :class:`~.deepspeed_engine.DeepSpeedEngine` (``deepspeed_engine.py``): ``deepspeed.initialize`` with a ZeRO
  stage 0-3 JSON, gradients averaged over ranks, clipping by DeepSpeed's global norm.

Both take the optimizer and LR schedule of a phase's optimiser section (``optim.py``), with the learning rate
scaled for the global batch (``distributed.lr_scaling``). The model knows nothing of either. With
``optim.table_updates: rows`` the embedding tables have an optimizer of their own that computes the dense
update for the rows a batch reads and catches the others up when they are read (``rows.py``,
:class:`TableRows`), beside the engine's; the engine catches up every row before it gives out weights. Under
DeepSpeed the tables are kept out of DeepSpeed's sight (replicated, their touched rows exchanged by
``TableRows``) and clipped by value.

An engine trains a fixed set of parameters for one phase (DeepSpeed reads ``requires_grad`` once, in
``initialize``): every phase gets a new engine on a fresh model, so its optimiser and warmup start anew.
"""

from __future__ import annotations

import abc
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..checkpoint import load_tensors, save_tensors
from ..config import DistributedConfig, OptimConfig
from .optim import ParamGroups, build_optimizer, build_scheduler
from .rows import TableRows, split_groups

log = logging.getLogger("nerco_dist")


def scaled_lr(lr: float, micro_batch: int, d: DistributedConfig, world: int) -> float:
    """``lr`` for the global batch micro x accumulation x world size: unchanged (``none``), or scaled by
    global / base (``linear``) or its square root (``sqrt``); ``base_batch`` 0 means the micro batch."""
    base = d.base_batch or micro_batch
    ratio = micro_batch * d.grad_accum * world / base
    if d.lr_scaling == "none":
        return lr
    if d.lr_scaling == "linear":
        return lr * ratio
    if d.lr_scaling == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"distributed.lr_scaling={d.lr_scaling!r}: expected none, linear or sqrt")


def uses_deepspeed(d: DistributedConfig) -> bool:
    """DeepSpeed when a DeepSpeed config is given or the launcher started several ranks."""
    return bool(d.config) or dist.launched()


class Engine(abc.ABC):
    """What the trainer drives, in one process or many: a micro-batch's forward (``forward(fn)`` runs
    ``fn()``, the loss of ``model``), ``backward``, ``step`` (the optimizer and LR schedule at an accumulation
    boundary), the weights for scoring and checkpoints, and its resume state."""

    model: nn.Module
    grad_accum: int = 1
    distributed = False
    tables: TableRows | None = None  # the tables updated row-wise, when the phase asks for it

    def __init__(self):
        self.micro_steps = 0

    @property
    def at_boundary(self) -> bool:
        """No gradient accumulation pending: the last micro-batch ended with an optimizer step."""
        return self.micro_steps % self.grad_accum == 0

    @abc.abstractmethod
    def forward(self, fn: Callable): ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self) -> None: ...

    @property
    @abc.abstractmethod
    def lr(self) -> float: ...

    @abc.abstractmethod
    def full_state_dict(self) -> dict:
        """Every weight, whole and fp32, on every rank."""

    @abc.abstractmethod
    def inference_model(self, weights: dict | None = None) -> nn.Module:
        """An fp32 model for scoring (with ``weights``, or the engine's own)."""

    @abc.abstractmethod
    def save_state(self, path: Path, extra: dict) -> None: ...

    @abc.abstractmethod
    def load_state(self, path: Path) -> dict: ...

    def flush_tables(self) -> None:
        """Every row of the row-wise tables up to date (they lag until read): before weights are given out.
        Resume saves leave them as they are, with what brings them up to date."""
        if self.tables is not None:
            self.tables.flush()

    def close(self) -> None:
        if self.tables is not None:
            self.tables.close()


class LocalEngine(Engine):
    """Single-process optimisation: backward, clip gradients by value, optimizer and schedule step (and the
    tables' row-wise step)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, clip_value: float | None, grad_accum: int = 1,
                 tables: TableRows | None = None):
        super().__init__()
        self.model, self.optimizer, self.scheduler, self.clip_value = model, optimizer, scheduler, clip_value
        self.grad_accum, self.tables = grad_accum, tables
        self.steps = 0
        if tables is not None:
            tables.watch(model)

    def forward(self, fn: Callable):
        return fn()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if not self.at_boundary:
            return
        if self.clip_value:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.tables is not None:
            self.tables.step()
        self.steps += 1

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict:
        self.flush_tables()
        return self.model.state_dict()

    def inference_model(self, weights: dict | None = None) -> nn.Module:
        if weights is None:
            self.flush_tables()
        else:
            self.model.load_state_dict(weights)
        return self.model

    def save_state(self, path: Path, extra: dict) -> None:
        """Weights, optimizer (and the tables' row optimizer) and ``extra`` (plain values and tensors) under
        ``path``. The LR schedule is not saved: it is rebuilt at the resumed step."""
        tables = {} if self.tables is None else dict(tables=self.tables.state_dict())
        save_tensors(dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), extra=extra,
                          **tables), path / "local.pt")

    def load_state(self, path: Path) -> dict:
        state = load_tensors(path / "local.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.tables is not None:
            self.tables.load_state_dict(state["tables"])
        return state["extra"]


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
    lr = scaled_lr(optim.lr, optim.batch_size, d, dist.world_size())
    steps = max(1, steps_per_epoch // d.grad_accum)
    dense, rows = split_groups(groups, row_tables)
    optimizer = build_optimizer(optim, dense, lr)
    scheduler = build_scheduler(optimizer, optim, steps, start_step)
    tables = TableRows.build(optim, rows, lr, steps, start_step) if rows else None
    if not uses_deepspeed(d):
        return LocalEngine(model, optimizer, scheduler, optim.clip_value, d.grad_accum, tables)
    from .deepspeed_engine import DeepSpeedEngine, deepspeed_config  # DeepSpeed's code only where it runs

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
