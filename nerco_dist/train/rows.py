"""Row-wise updates of the lattice's embedding tables (``optim.table_updates: rows``): dense AdamW or SGD,
computed only for the rows that matter.

The character, bigram and word tables hold most of a FLAT model's parameters (97.8% of MSRA's 19M), yet a
batch reads a few thousand of their rows. A dense optimiser moves every entry every step, and that motion
matters: AdamW carries a row read once along its decaying first moment for dozens of steps (its first update
is lr(1-b1)/sqrt(1-b2) = 3.16 lr, then each shrinks by b1/sqrt(b2): about 30 lr in all), and decays every
row. Updating only the rows a step read ("lazy" AdamW, per-row bias corrections) moves a rare row about
1 lr per read instead: on ``configs/tiny.yaml`` it lost 25 F1 points. So here a row is updated when a step
reads it, and otherwise left behind until something reads it, when the steps it missed (zero gradient) are
applied at once, in closed form ("catch-up"). The weights anyone reads are the dense optimiser's:

- **touched rows**: the rows some batch of the step (every rank's, every accumulated micro-batch) read,
  padding excluded, their gradient summed over repeated reads, and at zero gradient the rows a forward
  caught up without reading them (below); these take the optimiser's step as the dense one does (global
  step count, bias corrections, decay, clipping by value: at zero gradient, the step dense training takes).
  Frozen pretrained rows are a buffer: never read through ``weight``, never touched.
- **catch-up**: each row keeps the step it is up to date with (``row_step``). Before a forward reads a table,
  a pre-hook (:meth:`TableRows.watch`) catches up the rows its ids name (and ``<unk>`` under word dropout),
  so the forward sees the dense values; the optimizer step catches up the rows only other ranks read;
  :meth:`TableRows.flush` catches up every row, before the weights are read outside training
  (``full_state_dict``, ``inference_model``: dev scoring, ``last.pt``/``best.pt``, the hand-off between
  phases). Resume checkpoints hold the rows as they stand with what catches them up, so that a save does not
  change the arithmetic of the run it interrupts.
- **the missed steps**: a step with zero gradient acts on every row behind it the same way, linearly (in the
  row's weights, moments or momentum buffer) with coefficients that depend only on the step the row was
  last up to date with, s. For every s since the last flush the optimiser keeps those coefficients (the
  ``carry``, a few float64 numbers per step) and advances them at each step: O(steps since the last flush),
  0.1 ms (AdamW) to 0.2 ms (SGD) per table at 4420 (an MSRA epoch at batch 10); then O(1) per row caught up.
- **AdamW** (:class:`RowAdamW`): torch's AdamW on the touched rows with the global step t. A row up to date
  at step s and k steps behind: m *= b1^k, v *= b2^k, p = A p - S E, with A the product of the missed steps'
  decays 1 - lr_i wd, E = b1 m / (sqrt(b2 v) + eps sqrt(1 - b2^(s+1))) per element (the first missed step's
  direction) and S the sum over the missed steps i of lr_i sqrt(1 - b2^i) / (1 - b1^i) (b1/sqrt(b2))^(i-s-1)
  times the decays after i. Exact (up to rounding) for eps = 0, where each missed step's update is geometric
  in b1/sqrt(b2). With eps it is not, and dense AdamW's per-element sum has no closed form (summing it step
  by step costs what the dense step costs): missed step j takes eps z_j instead of eps, with
  z_j = b2^((j-1)/2) sqrt((1 - b2^(s+1)) / (1 - b2^(s+j))) <= 1 (z_1 = 1: the first missed step is exact).
  Each missed step then moves an element the way dense AdamW does, by at most 1/z_j times as much, the
  relative excess at most (1/z_j - 1) eps / (eps + sqrt(v_hat)): nothing where gradients dwarf eps. For an
  element that eps dominates, the excess over a gap is 0.7% a thousand steps into the phase, 0.45% after
  5000, but up to about 50% in its first steps, where 1 - b2^(s+j) grows fastest (tests/test_table_rows.py).
- **SGD** (:class:`RowSGD`): torch's SGD (coupled weight decay, momentum buffer without dampening) on the
  touched rows. A missed step maps (p, buf) by [[1 - lr_i wd, -lr_i momentum], [wd, momentum]]; the carry
  is the product of those 2x2 matrices: exact (up to rounding).
- **several ranks**: the tables are replicated and kept out of DeepSpeed; each rank's (rows, gradients) are
  all-gathered, summed and divided by the number of ranks (DeepSpeed's averaging), then every rank applies the
  same update. A row a forward caught up is touched on every rank at that step (word dropout may leave it
  unread), so every rank catches up the same rows at the same steps, from the same state with the same
  coefficients, in element-wise operations that round alike anywhere: the replicas stay equal bit for bit.
- **clipping by value** (``optim.clip_value``): element-wise on the touched rows' gradients after averaging:
  the dense clip, whose untouched rows have zero gradient anyway. Under DeepSpeed too (the dense parameters
  there are clipped by DeepSpeed's global norm, which leaves the tables out).
- **learning rate**: the phase's schedule (warmup, decay) on both optimisers: :class:`TableRows` steps a
  scheduler of the same factor beside the dense one; each step's rate enters the carry as it is taken.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..config import OptimConfig
from ..data.vocab import PAD_ID, UNK_ID
from ..model.embedding import LatticeEmbedding
from .optim import ParamGroups, build_scheduler

FLUSH_ROWS = 1 << 16  # rows caught up at a time by a flush (bounds its temporaries)


def touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse gradient's rows (k,) and their summed values (k, dim)."""
    if not grad.is_sparse:
        raise ValueError("a row-wise optimizer needs sparse gradients (LatticeEmbedding.sparse)")
    grad = grad if grad.is_coalesced() else grad.coalesce()
    return grad._indices()[0], grad._values()


class RowOptimizer(torch.optim.Optimizer):
    """A dense optimizer computed for the rows a sparse gradient names, every other row caught up when read
    (module docstring). State per table: ``step`` (steps taken), ``row_step`` (int64, the step each row is up
    to date with), ``carry`` (float64, one row of coefficients per step s from ``since`` on: what brings a row
    up to date at s to ``step``), and the subclass's own (moments, buffers)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = touched(p.grad)
                state = self._state(p, group)
                self.catch_up(p, rows)
                step = state["step"] + 1
                self._update(p, rows, grad, group, step)
                state["row_step"].index_fill_(0, rows, step)
                carry = self._advance(state["carry"], group, step)
                state["carry"], state["step"] = torch.cat([carry, self._fresh(p, group, step)]), step

    @torch.no_grad()
    def catch_up(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (distinct) of ``p`` brought up to date with the steps taken; those that were behind."""
        state = self.state.get(p)
        if not state:
            return rows[:0]
        rows = rows[state["row_step"][rows] < state["step"]]
        if rows.numel():
            carry = state["carry"][state["row_step"][rows] - state["since"]].to(p.dtype)
            self._coast(p, rows, carry, self._group(p))
            state["row_step"].index_fill_(0, rows, state["step"])
        return rows

    @torch.no_grad()
    def flush(self) -> None:
        """Every row of every table up to date: the dense optimizer's weights and state."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for rows in torch.arange(p.shape[0], device=p.device).split(FLUSH_ROWS):
                        self.catch_up(p, rows)
                    state["since"], state["carry"] = state["step"], self._fresh(p, group, state["step"])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, but every tensor keeps its saved dtype (torch casts them all to the parameter's: the
        float64 carry and int64 ``row_step`` would lose what makes a resumed run exact)."""
        super().load_state_dict(state_dict)
        saved = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(saved, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)

    def _state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state.update(step=0, since=0, row_step=torch.zeros(p.shape[0], dtype=torch.long, device=p.device),
                         carry=self._fresh(p, group, 0), **self._buffers(p, group))
        return state

    def _group(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _buffers(self, p: torch.Tensor, group: dict) -> dict:
        """The optimizer's own per-element state, zero."""
        raise NotImplementedError

    def _fresh(self, p: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """(1, width) float64: the carry of a row up to date at ``step``, before any step after it."""
        raise NotImplementedError

    def _advance(self, carry: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """``carry`` with the effect of ``step`` (at the group's current rate) on rows that missed it."""
        raise NotImplementedError

    def _coast(self, p: torch.Tensor, rows: torch.Tensor, carry: torch.Tensor, group: dict) -> None:
        """Apply ``carry`` ((k, width), ``p``'s dtype) to ``rows``, in element-wise operations only."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict, step: int) -> None:
        """The dense optimizer's ``step`` on ``rows`` (up to date with the step before), gradient ``grad``."""
        raise NotImplementedError


# RowAdamW's carry columns: the missed steps' weight decay (A), coast (S), (b1/sqrt(b2))^k, b1^k, b2^k, and
# eps sqrt(1 - b2^(s+1)) (module docstring)
DECAY, COAST, RATIO_POWER, BETA1_POWER, BETA2_POWER, EPS = range(6)


class RowAdamW(RowOptimizer):
    """torch's AdamW, computed for the rows a step reads and caught up on the others (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _buffers(self, p: torch.Tensor, group: dict) -> dict:
        return dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    def _fresh(self, p: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        eps = group["eps"] * (1 - group["betas"][1] ** (step + 1)) ** 0.5
        return torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, eps]], dtype=torch.float64, device=p.device)

    def _advance(self, carry: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        decay = 1 - lr * group["weight_decay"]
        rate = lr * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
        carry[:, COAST].mul_(decay).add_(carry[:, RATIO_POWER], alpha=rate)
        carry[:, DECAY].mul_(decay)
        carry[:, RATIO_POWER].mul_(beta1 / beta2 ** 0.5)
        carry[:, BETA1_POWER].mul_(beta1)
        carry[:, BETA2_POWER].mul_(beta2)
        return carry

    def _coast(self, p: torch.Tensor, rows: torch.Tensor, carry: torch.Tensor, group: dict) -> None:
        state, (beta1, beta2) = self.state[p], group["betas"]
        column = lambda c: carry[:, c : c + 1]  # noqa: E731
        m, v = state["exp_avg"].index_select(0, rows), state["exp_avg_sq"].index_select(0, rows)
        direction = (m * beta1) / (v.sqrt() * beta2 ** 0.5 + column(EPS))
        p.index_copy_(0, rows, p.index_select(0, rows) * column(DECAY) - column(COAST) * direction)
        state["exp_avg"].index_copy_(0, rows, m * column(BETA1_POWER))
        state["exp_avg_sq"].index_copy_(0, rows, v * column(BETA2_POWER))

    def _update(self, p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict, step: int) -> None:
        state, lr, (beta1, beta2) = self.state[p], group["lr"], group["betas"]
        m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        values = p.index_select(0, rows)
        if group["weight_decay"]:
            values.mul_(1 - lr * group["weight_decay"])
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])  # torch's AdamW, op for op
        p.index_copy_(0, rows, values.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step)))


class RowSGD(RowOptimizer):
    """torch's SGD with momentum, computed for the rows a step reads and caught up on the others (module
    docstring). The carry: the product of the missed steps' 2x2 maps of (weight, buffer), row-major."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _buffers(self, p: torch.Tensor, group: dict) -> dict:
        return dict(momentum_buffer=torch.zeros_like(p)) if group["momentum"] else {}

    def _fresh(self, p: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64, device=p.device)

    def _advance(self, carry: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        missed = torch.tensor([[1 - lr * decay, -lr * momentum], [decay, momentum]], dtype=torch.float64,
                              device=carry.device)
        return torch.matmul(missed, carry.view(-1, 2, 2)).view(-1, 4)

    def _coast(self, p: torch.Tensor, rows: torch.Tensor, carry: torch.Tensor, group: dict) -> None:
        values, buffers = p.index_select(0, rows), self.state[p].get("momentum_buffer")
        if buffers is None:
            p.index_copy_(0, rows, values * carry[:, 0:1])
            return
        buffer = buffers.index_select(0, rows)
        p.index_copy_(0, rows, values * carry[:, 0:1] + buffer * carry[:, 1:2])
        buffers.index_copy_(0, rows, values * carry[:, 2:3] + buffer * carry[:, 3:4])

    def _update(self, p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict, step: int) -> None:
        values = p.index_select(0, rows)
        if group["weight_decay"]:
            grad = grad.add(values, alpha=group["weight_decay"])
        if group["momentum"]:
            buffers = self.state[p]["momentum_buffer"]
            grad = buffers.index_select(0, rows).mul_(group["momentum"]).add_(grad)
            buffers.index_copy_(0, rows, grad)
        p.index_copy_(0, rows, values.add_(grad, alpha=-group["lr"]))


def split_groups(groups: ParamGroups, row_tables: Sequence[nn.Parameter]) -> tuple[ParamGroups, ParamGroups]:
    """``groups`` without ``row_tables``, and ``row_tables`` in groups of their own at their group's ratio."""
    tables = {id(p) for p in row_tables}
    dense = [([p for p in params if id(p) not in tables], ratio) for params, ratio in groups]
    rows = [([p for p in params if id(p) in tables], ratio) for params, ratio in groups]
    return dense, [(params, ratio) for params, ratio in rows if params]


def build_row_optimizer(cfg: OptimConfig, groups: ParamGroups, lr: float) -> RowOptimizer:
    """The phase's optimizer, row-wise, one group per (tables, ratio) at ``ratio`` x ``lr``."""
    groups = [{"params": list(params), "lr": lr * ratio} for params, ratio in groups]
    if cfg.optimizer == "sgd":
        return RowSGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return RowAdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def rows_read(table: LatticeEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """The trained rows a forward of ``table`` on ``ids`` may read (distinct): the ids below its frozen ones,
    padding excluded, and ``<unk>`` when word dropout may put it anywhere."""
    read = ids[(ids < table.num_trained) & (ids != PAD_ID)]
    if table.training and table.word_dropout > 0:
        read = torch.cat([read, read.new_tensor([UNK_ID])])
    return torch.unique(read)


class TableRows:
    """What an engine does for the tables updated row-wise: at each optimizer step, average their sparse
    gradients over ranks, clip them by value, step the row optimizer and its LR schedule; before a forward
    reads a table, catch up the rows it reads (:meth:`watch`); before the weights are read outside training,
    catch up every row (:meth:`flush`). The tables are replicated: every rank holds them whole and applies the
    same update."""

    def __init__(self, optimizer: RowOptimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 clip_value: float | None):
        self.optimizer, self.scheduler, self.clip_value = optimizer, scheduler, clip_value
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._caught_up: dict[int, list[torch.Tensor]] = {id(p): [] for p in self.params}  # by forwards, this step

    @classmethod
    def build(cls, cfg: OptimConfig, groups: ParamGroups, lr: float, steps_per_epoch: int,
              start_step: int) -> "TableRows":
        optimizer = build_row_optimizer(cfg, groups, lr)
        return cls(optimizer, build_scheduler(optimizer, cfg, steps_per_epoch, start_step), cfg.clip_value)

    def watch(self, model: nn.Module) -> None:
        """Catch up, before each forward of ``model``'s tables, the rows it reads (until :meth:`close`). Call
        it after any deep copy of ``model`` (a copy would carry the hooks)."""
        for module in model.modules():
            if isinstance(module, LatticeEmbedding) and any(module.weight is p for p in self.params):
                self._hooks.append(module.register_forward_pre_hook(self._before_read))

    def _before_read(self, table: LatticeEmbedding, args: tuple) -> None:
        rows = self.optimizer.catch_up(table.weight, rows_read(table, args[0]))
        if rows.numel():
            self._caught_up[id(table.weight)].append(rows)

    def flush(self) -> None:
        """Every row up to date: the tables as the dense optimizer would have them."""
        self.optimizer.flush()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

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
            rows, values = self._local_gradient(p)
            if world > 1:
                rows, counts = dist.gather_uneven(rows)
                values, _ = dist.gather_uneven(values, counts)
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape, check_invariants=False).coalesce()
            if world > 1:
                grad._values().div_(world)
            out.append(grad)
        return out

    def _local_gradient(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of ``p`` for the step and their gradient (not coalesced): the rows its gradient
        names, and at zero gradient those its forwards caught up without reading them (ids word dropout
        replaced, ``<unk>``). A row at zero gradient takes the dense step, the same as catching it up; and so
        every rank catches up the same rows at the same steps, which keeps the replicas equal bit for bit."""
        if p.grad is None:
            rows, values = torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros((0, *p.shape[1:]))
        else:
            rows, values = touched(p.grad)
        caught_up, self._caught_up[id(p)] = self._caught_up[id(p)], []
        if caught_up:
            extra = torch.cat(caught_up)
            rows, values = torch.cat([rows, extra]), torch.cat([values, values.new_zeros((len(extra), *p.shape[1:]))])
        return rows, values

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
