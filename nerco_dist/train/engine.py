"""The one place that builds the training engine: what turns a loss into a parameter update.

The engine owns the optimizer, the learning-rate schedule and gradient clipping; the trainer only calls
``backward(loss)`` and ``step()``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import TrainConfig
from .optim import build_optimizer, build_scheduler


class LocalEngine:
    """Single-process optimisation: backward, clip gradients by value, optimizer and schedule step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, clip_value: float | None):
        self.model, self.optimizer, self.scheduler, self.clip_value = model, optimizer, scheduler, clip_value

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip_value:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(model: nn.Module, cfg: TrainConfig, params: Sequence[nn.Parameter],
                 bert_params: Sequence[nn.Parameter], steps_per_epoch: int, epochs: int) -> LocalEngine:
    """An engine over ``params`` (at ``cfg.lr``) and ``bert_params`` (at ``cfg.lr * cfg.bert_lr_ratio``)."""
    optimizer = build_optimizer(cfg, params, bert_params)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, epochs)
    return LocalEngine(model, optimizer, scheduler, cfg.clip_value)
