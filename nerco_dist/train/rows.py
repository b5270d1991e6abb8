"""Row-wise updates of the lattice's embedding tables (``optim.table_updates: rows``).

The character, bigram and word tables hold most of a FLAT model's parameters (97.8% of MSRA's 19M), yet a
batch reads a few thousand of their rows. A dense optimiser still moves every entry every step (AdamW's
moments, weight decay, clipping over the full gradient), and DeepSpeed reduces the full gradient across ranks.
Here the tables' gradients are sparse (the rows the batch read; ``LatticeEmbedding.sparse``) and only those
rows move. The semantics, per table row r ("lazy" optimisers):

- **touched rows**: the rows some batch of the step (every rank's, every accumulated micro-batch) read,
  padding excluded, their gradient summed over repeated reads. A row read is touched even where its gradient
  happens to be 0. Frozen pretrained rows are a buffer: never read through ``weight``, never touched.
- **several ranks**: the tables are replicated and kept out of DeepSpeed; each rank's (rows, gradients) are
  all-gathered, summed and divided by the number of ranks (DeepSpeed's averaging), then every rank applies the
  same update.
- **clipping by value** (``optim.clip_value``): element-wise on the touched rows' gradients after averaging:
  the dense clip, whose untouched rows have zero gradient anyway. Under DeepSpeed too (the dense parameters
  there are clipped by DeepSpeed's global norm, which leaves the tables out).
- **AdamW** (:class:`RowAdamW`): each row keeps its moments and its own step count t_r (float32, exact to
  2^24 steps), advanced only when the row is touched; then, as torch's AdamW on that row: decoupled decay
  p_r *= 1 - lr*wd, m_r and v_r updated with the gradient, bias corrections 1 - beta^t_r. An untouched row
  keeps its value, moments and count (dense AdamW decays it and moves it along its first moment). When every
  row is touched at every step, this is AdamW.
- **SGD** (:class:`RowSGD`): torch's SGD (coupled weight decay, momentum buffer without dampening) on the
  touched rows; an untouched row keeps its value and buffer (dense SGD moves it by lr*momentum^k*buffer).
  Buffers start at 0, so a row's first touch sets its buffer to the gradient, as torch's first step does.
- **learning rate**: the phase's schedule (warmup, decay) on both optimisers: :class:`TableRows` steps a
  scheduler of the same factor beside the dense one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..config import OptimConfig
from .optim import ParamGroups, build_scheduler


def touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse gradient's rows (k,) and their summed values (k, dim)."""
    if not grad.is_sparse:
        raise ValueError("a row-wise optimizer needs sparse gradients (LatticeEmbedding.sparse)")
    grad = grad if grad.is_coalesced() else grad.coalesce()
    return grad._indices()[0], grad._values()


class RowAdamW(torch.optim.Optimizer):
    """AdamW on the rows a sparse gradient names, with per-row step counts (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, *touched(p.grad), group)

    def _update(self, p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state.update(row_step=torch.zeros(p.shape[0], device=p.device), exp_avg=torch.zeros_like(p),
                         exp_avg_sq=torch.zeros_like(p))
        lr, (beta1, beta2) = group["lr"], group["betas"]
        steps = state["row_step"].index_select(0, rows) + 1
        state["row_step"].index_copy_(0, rows, steps)
        m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        t = steps.double().unsqueeze(1)  # bias corrections in float64, as torch's (Python floats)
        step_size = (lr / (1 - beta1 ** t)).to(p.dtype)
        bias_correction2_sqrt = ((1 - beta2 ** t) ** 0.5).to(p.dtype)
        values = p.index_select(0, rows)
        if group["weight_decay"]:
            values.mul_(1 - lr * group["weight_decay"])
        values.sub_(m / (v.sqrt() / bias_correction2_sqrt).add_(group["eps"]) * step_size)
        p.index_copy_(0, rows, values)


class RowSGD(torch.optim.Optimizer):
    """SGD with momentum on the rows a sparse gradient names (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = touched(p.grad)
                values = p.index_select(0, rows)
                if group["weight_decay"]:
                    grad = grad.add(values, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    grad = state["momentum_buffer"].index_select(0, rows).mul_(group["momentum"]).add_(grad)
                    state["momentum_buffer"].index_copy_(0, rows, grad)
                p.index_copy_(0, rows, values.add_(grad, alpha=-group["lr"]))


def split_groups(groups: ParamGroups, row_tables: Sequence[nn.Parameter]) -> tuple[ParamGroups, ParamGroups]:
    """``groups`` without ``row_tables``, and ``row_tables`` in groups of their own at their group's ratio."""
    tables = {id(p) for p in row_tables}
    dense = [([p for p in params if id(p) not in tables], ratio) for params, ratio in groups]
    rows = [([p for p in params if id(p) in tables], ratio) for params, ratio in groups]
    return dense, [(params, ratio) for params, ratio in rows if params]


def build_row_optimizer(cfg: OptimConfig, groups: ParamGroups, lr: float) -> torch.optim.Optimizer:
    """The phase's optimizer, row-wise, one group per (tables, ratio) at ``ratio`` x ``lr``."""
    groups = [{"params": list(params), "lr": lr * ratio} for params, ratio in groups]
    if cfg.optimizer == "sgd":
        return RowSGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return RowAdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


class TableRows:
    """What an engine does for the tables updated row-wise, at each optimizer step: average their sparse
    gradients over ranks, clip them by value, step the row optimizer and its LR schedule. The tables are
    replicated: every rank holds them whole and applies the same update."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 clip_value: float | None):
        self.optimizer, self.scheduler, self.clip_value = optimizer, scheduler, clip_value
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @classmethod
    def build(cls, cfg: OptimConfig, groups: ParamGroups, lr: float, steps_per_epoch: int,
              start_step: int) -> "TableRows":
        optimizer = build_row_optimizer(cfg, groups, lr)
        return cls(optimizer, build_scheduler(optimizer, cfg, steps_per_epoch, start_step), cfg.clip_value)

    def broadcast(self) -> None:
        """Rank 0's tables on every rank (they are built alike on each; this makes sure). Collective."""
        if dist.world_size() > 1:
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)

    def gradients(self) -> list[torch.Tensor]:
        """Each table's gradient, coalesced and averaged over ranks (a sparse tensor of the touched rows).
        Collective."""
        world, out = dist.world_size(), []
        for p in self.params:
            if p.grad is None:
                rows, values = torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros((0, *p.shape[1:]))
            else:
                rows, values = touched(p.grad)
            if world == 1:
                out.append(torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape, is_coalesced=True,
                                                   check_invariants=False))
                continue
            rows, counts = dist.gather_uneven(rows)
            values, _ = dist.gather_uneven(values, counts)
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape, check_invariants=False).coalesce()
            grad._values().div_(world)
            out.append(grad)
        return out

    def step(self) -> None:
        for p, grad in zip(self.params, self.gradients()):
            if self.clip_value:
                grad._values().clamp_(-self.clip_value, self.clip_value)
            p.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
