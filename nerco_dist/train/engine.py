"""What the trainer drives to turn a loss into a parameter update: the :class:`Engine` interface —
``forward(fn)``, ``backward(loss)``, ``step()``, ``lr``, ``full_state_dict()``, ``inference_model()``,
``save_state``/``load_state`` — so that the trainer reads the same with one process or many, and the
one-process engine, :class:`LocalEngine`: a torch optimizer, gradient clipping by value (the paper's),
gradient accumulation. The DeepSpeed engine is ``deepspeed_engine.py``; ``engines.py`` picks and builds one.

With ``optim.table_updates: rows`` the embedding tables have an optimizer of their own that computes the
dense update for the rows a batch reads and catches the others up when they are read (``rows.py``,
:class:`TableRows`), beside the engine's; the engine catches up every row before it gives out weights.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import load_tensors, save_tensors
from ..errors import InputError
from .rows import TableRows

LOCAL_FILE = "local.pt"  # the one-process engine's resume checkpoint, in its tag's folder


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
    def load_state(self, path: Path, saved_ranks: int) -> dict:
        """What :meth:`save_state` wrote under ``path`` (on ``saved_ranks`` ranks) into this engine; its
        ``extra``."""

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
                          **tables), path / LOCAL_FILE)

    def load_state(self, path: Path, saved_ranks: int) -> dict:
        if not (path / LOCAL_FILE).is_file():
            raise InputError(path, f"saved by DeepSpeed's engine on {saved_ranks} rank(s): continue it under the "
                                   "deepspeed launcher (1 rank will do) or with distributed.config set")
        state = load_tensors(path / LOCAL_FILE)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.tables is not None:
            self.tables.load_state_dict(state["tables"])
        return state["extra"]
