"""A phase's optimisation: SGD (momentum) or AdamW with parameter groups at fractions of the learning rate
(encoder, head, BERT), a linear warmup over a fraction of the phase's steps, then a per-epoch decay
1 / (1 + decay * epoch)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import OptimConfig


ParamGroups = Sequence[tuple[Sequence[nn.Parameter], float]]  # (parameters, fraction of the learning rate)


def build_optimizer(cfg: OptimConfig, groups: ParamGroups, lr: float | None = None) -> torch.optim.Optimizer:
    """One parameter group per (parameters, ratio), at ``ratio`` x ``lr`` (the configured learning rate
    scaled for the global batch; default ``cfg.lr``); empty groups are left out."""
    lr = cfg.lr if lr is None else lr
    groups = [{"params": list(params), "lr": lr * ratio} for params, ratio in groups if len(params)]
    # one fused kernel per step instead of a loop of elementwise ops per tensor (AdamW ~4x faster on CPU)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, warmup: float, decay: float) -> float:
    """Multiplier of the base learning rate before optimisation step ``step`` (0-based) of a phase."""
    warmup_steps = int(warmup * total_steps)
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    return ramp / (1.0 + decay * epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` over the phase's optimizer steps, from ``start_step`` (a resumed phase)."""
    total = steps_per_epoch * cfg.epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + start_step, steps_per_epoch, total, cfg.warmup, cfg.lr_decay))
