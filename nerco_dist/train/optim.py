"""The paper's optimisation: SGD (momentum 0.9) or AdamW with a BERT parameter group at a fraction of the
learning rate, linear warmup, and a per-epoch decay 1 / (1 + decay * epoch)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter], bert_params: Iterable[nn.Parameter] = ()
                    ) -> torch.optim.Optimizer:
    groups = [{"params": list(params), "lr": cfg.lr}]
    bert_params = list(bert_params)
    if bert_params:
        groups.append({"params": bert_params, "lr": cfg.lr * cfg.bert_lr_ratio})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected sgd or adamw")


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, warmup: float, decay: float) -> float:
    """Multiplier of the base learning rate before optimisation step ``step`` (0-based)."""
    warmup_steps = int(warmup * total_steps)
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    return ramp / (1.0 + decay * epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` over optimizer steps, from ``start_step`` (a resumed run or a new engine mid-stage)."""
    total = steps_per_epoch * epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + start_step, steps_per_epoch, total, cfg.warmup, cfg.lr_decay))
