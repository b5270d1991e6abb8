"""Row-wise table updates (``optim.table_updates: rows``, nerco_dist/train/rows.py): dense AdamW / SGD
computed for the rows a step reads, the other rows caught up when read.

- every row touched at every step: the tables follow torch's AdamW / SGD on a dense copy, clipping by value
  and the LR warmup included;
- the optimizers alone, float64, rows read at random steps, warmup and decay, weight decay, two groups:
  rows not read stay as they were (value and state) until caught up; after a flush every row and its
  moments / momentum buffer equal torch's dense AdamW (eps 0: the catch-up is exact there) and SGD with
  momentum to 1e-10; with AdamW's eps, the catch-up's movement lies within the bound rows.py states;
- through the engine, partial batches: a forward reads the rows caught up (the gradient is the dense one),
  ``full_state_dict`` gives the dense optimizer's tables; the frozen pretrained rows never change; rows a
  forward caught up but did not read (word dropout) take the step at zero gradient; a closed engine's hooks
  are gone;
- resume: the row optimizer's state round-trips exactly (its float64 and int64 tensors included), and a run
  killed mid-epoch and resumed ends with the weights of an uninterrupted run, with the local engine and with
  DeepSpeed.
(Two ranks against one process: tests/test_distributed.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nerco_dist import distributed as dist
from nerco_dist.checkpoint import load_checkpoint, load_tensors, save_tensors
from nerco_dist.config import OptimConfig, load_config
from nerco_dist.errors import InputError
from nerco_dist.model.embedding import LatticeEmbedding
from nerco_dist.train.engines import build_engine
from nerco_dist.train.rows import RowAdamW, RowSGD
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import train

from .conftest import DATA_ROOT, TINY, Interrupted, interrupt_at

TRAINED, FROZEN, DIM = 7, 3, 4
LR, DECAY, CLIP = 0.05, 0.1, 0.3
ROWS, COLS, STEPS = 9, 3, 80  # the optimizer-level tests' tables and steps


class Table(nn.Module):
    """A lattice table and one dense parameter (the engine's own optimizer needs one): rows x scale."""

    def __init__(self):
        super().__init__()
        self.table = LatticeEmbedding(TRAINED, FROZEN, DIM)
        rows = torch.randn(TRAINED, DIM)
        rows[0] = 0  # padding, as the trainer's tables have it
        self.table.load_rows(rows, torch.randn(FROZEN, DIM))
        self.scale = nn.Parameter(torch.ones(1))

    def loss(self, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((self.table(ids) * self.scale - target) ** 2).sum()


def engine_for(model: Table, optimizer: str, steps: int, warmup: float = 0.0, epochs: int = 1,
               lr_decay: float = 0.0):
    cfg = OptimConfig(optimizer=optimizer, lr=LR, momentum=0.9, weight_decay=DECAY, warmup=warmup,
                      lr_decay=lr_decay, clip_value=CLIP, epochs=epochs, batch_size=1, table_updates="rows")
    model.table.sparse = True
    return build_engine(model, cfg, [(list(model.parameters()), 1.0)], steps, row_tables=[model.table.weight])


def dense_optimizer(optimizer: str, weight: nn.Parameter) -> torch.optim.Optimizer:
    """torch's own optimizer, as the row-wise one is configured by :func:`engine_for`."""
    if optimizer == "adamw":
        return torch.optim.AdamW([weight], lr=LR, weight_decay=DECAY, foreach=False)
    return torch.optim.SGD([weight], lr=LR, momentum=0.9, weight_decay=DECAY, foreach=False)


def batches(rows_per_step: list[list[int]], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in rows_per_step:
        ids = torch.tensor(rows)
        out.append((ids, 2 * torch.randn(len(rows), DIM, generator=g)))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_every_row_touched_follows_the_dense_optimizer_with_clipping_and_warmup(optimizer):
    torch.manual_seed(0)
    model = Table()
    dense = copy.deepcopy(model)
    steps = 5
    engine = engine_for(model, optimizer, steps, warmup=0.6)  # ramp over int(0.6 * 5) = 3 steps
    every = list(range(1, TRAINED))  # all but padding, some twice
    data = batches([every + [2, 5, 5], every + [1], every + [6, 3]] * 2)[:steps]
    reference = dense_optimizer(optimizer, dense.table.weight)
    clipped = 0
    for step, (ids, target) in enumerate(data):
        engine.backward(model.loss(ids, target))
        engine.step()
        dense.loss(ids, target).backward()
        grad = dense.table.weight.grad
        clipped += int((grad[1:].abs() > CLIP).sum())
        grad.clamp_(-CLIP, CLIP)
        reference.param_groups[0]["lr"] = LR * min(1.0, (step + 1) / 3)
        reference.step()
        dense.zero_grad()
        dense.scale.data.copy_(model.scale.data)  # the dense parameter follows the engine's own optimizer
        torch.testing.assert_close(model.table.weight, dense.table.weight, rtol=1e-6, atol=1e-7)
    assert 0 < clipped < steps * (TRAINED - 1) * DIM  # the clip mattered, but not everywhere
    ours, theirs = engine.tables.optimizer.state[model.table.weight], reference.state[dense.table.weight]
    for key in ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("momentum_buffer",):
        torch.testing.assert_close(ours[key][1:], theirs[key][1:], rtol=1e-6, atol=1e-9)
    if optimizer == "adamw":
        assert ours["row_step"][1:].tolist() == [steps] * (TRAINED - 1) and ours["row_step"][0] == 0



def lr_at(step: int, warmup: int = 6, epoch: int = 20, decay: float = 0.5) -> float:
    """A linear warmup over ``warmup`` steps, then 1 / (1 + decay * epoch) with ``epoch`` steps an epoch."""
    return LR * min(1.0, (step + 1) / warmup) / (1 + decay * (step // epoch))


def optimizer_pair(kind: str, eps: float = 0.0, weight_decay: float = DECAY, dtype=torch.float64):
    """A row optimizer on two random tables, in two groups (the second at a third of the rate), and torch's
    dense optimizer on copies of them."""
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(ROWS, COLS, generator=g, dtype=dtype) for _ in range(2)]
    rows, dense = [nn.Parameter(t.clone()) for t in start], [nn.Parameter(t.clone()) for t in start]
    groups = lambda ps: [{"params": [ps[0]], "lr": LR}, {"params": [ps[1]], "lr": LR / 3}]  # noqa: E731
    if kind == "adamw":
        return (RowAdamW(groups(rows), eps=eps, weight_decay=weight_decay),
                torch.optim.AdamW(groups(dense), eps=eps, weight_decay=weight_decay, foreach=False), rows, dense)
    return (RowSGD(groups(rows), momentum=0.9, weight_decay=weight_decay),
            torch.optim.SGD(groups(dense), momentum=0.9, weight_decay=weight_decay, foreach=False), rows, dense)


def reads_and_gradients(steps: int, seed: int = 7, dtype=torch.float64):
    """Per step: the rows read (every row at the first step, then 0 to 3 at random) and each of the two
    tables' gradient on them (standard normal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        count = ROWS if step == 0 else int(torch.randint(4, (1,), generator=g))
        read = torch.randperm(ROWS, generator=g)[:count].sort().values
        out.append((read, [torch.randn(len(read), COLS, generator=g, dtype=dtype) for _ in range(2)]))
    return out


def step_rows(opt, params, read, grads, lr: float) -> None:
    """A step of a row optimizer on sparse gradients of ``read``, its groups at 1 and 1/3 of ``lr``."""
    for p, grad in zip(params, grads):
        p.grad = torch.sparse_coo_tensor(read.unsqueeze(0), grad, p.shape, is_coalesced=True,
                                         check_invariants=False)
    set_lr(opt, lr)
    opt.step()


def set_lr(opt, lr: float) -> None:
    for group, ratio in zip(opt.param_groups, (1.0, 1 / 3)):
        group["lr"] = lr * ratio


def step_both(row_opt, dense_opt, rows, dense, read, grads, lr: float) -> None:
    """A step of each: sparse gradients for the row optimizer, the same rows (zero elsewhere) for torch's."""
    step_rows(row_opt, rows, read, grads, lr)
    for q, grad in zip(dense, grads):
        q.grad = torch.zeros_like(q).index_copy_(0, read, grad)
    set_lr(dense_opt, lr)
    dense_opt.step()


def optimizer_state(opt, p) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_rows_lag_until_caught_up_then_equal_the_dense_optimizer(kind):
    """AdamW with eps 0 (the catch-up is exact there; eps: the next test) and SGD with momentum, weight decay,
    warmup and decay, two groups: float64 to 1e-10 after a flush, weights and moments / buffers alike."""
    row_opt, dense_opt, rows, dense = optimizer_pair(kind)
    data = reads_and_gradients(STEPS)
    last_read = {r: 0 for r in range(ROWS)}
    for step, (read, grads) in enumerate(data):
        before = [(p.detach().clone(), optimizer_state(row_opt, p)) for p in rows]
        step_both(row_opt, dense_opt, rows, dense, read, grads, lr_at(step))
        last_read.update({r: step for r in read.tolist()})
        unread = [r for r in range(ROWS) if r not in read.tolist()]
        for p, (weights, state) in zip(rows, before):  # rows not read: as they were, value and state
            assert torch.equal(p[unread], weights[unread]), step
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "row_step"):
                if key in state:
                    assert torch.equal(row_opt.state[p][key][unread], state[key][unread]), (step, key)
    assert max(STEPS - 1 - s for s in last_read.values()) >= 3  # some row is behind
    assert not torch.allclose(rows[0], dense[0])  # ... and differs until caught up
    row_opt.flush()
    for p, q in zip(rows, dense):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq") if kind == "adamw" else ("momentum_buffer",):
            torch.testing.assert_close(row_opt.state[p][key], dense_opt.state[q][key], rtol=1e-10, atol=1e-14)
        assert row_opt.state[p]["row_step"].tolist() == [STEPS] * ROWS


@pytest.mark.parametrize("before", [3, 5000])
def test_with_eps_adamws_catch_up_moves_as_dense_adamw_within_its_bound(before):
    """With AdamW's eps the catch-up takes the j-th missed step with eps z_j instead, z_j = b2^((j-1)/2)
    sqrt((1 - b2^(s+1)) / (1 - b2^(s+j))) <= 1 (rows.py): each element moves over a gap in dense AdamW's
    direction, by 1 to 1/z_gap times as much; by as much where gradients dwarf eps; past the first
    thousands of steps, at most 0.5% more. Rows read at every step for ``before`` steps at gradient scales
    from 1 (eps negligible) to 1e-9 (eps dominates), then not read for 300 steps; constant rate, no decay."""
    gap, beta2 = 300, 0.999
    scale = torch.tensor([1.0, 1e-6, 1e-8, 3e-9, 1e-9, 1.0, 1e-8, 1e-9, 1e-7])
    row_opt, dense_opt, rows, dense = optimizer_pair("adamw", eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(7)
    for _ in range(before):
        grads = [torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * scale.unsqueeze(1) for _ in range(2)]
        step_both(row_opt, dense_opt, rows, dense, torch.arange(ROWS), grads, LR)
    nothing = (torch.zeros(0, dtype=torch.long), [torch.zeros(0, COLS, dtype=torch.float64)] * 2)
    start = [(p.detach().clone(), q.detach().clone()) for p, q in zip(rows, dense)]
    for _ in range(gap):
        step_both(row_opt, dense_opt, rows, dense, *nothing, LR)
    row_opt.flush()
    z = beta2 ** ((gap - 1) / 2) * ((1 - beta2 ** (before + 1)) / (1 - beta2 ** (before + gap))) ** 0.5
    for p, q, (p0, q0) in zip(rows, dense, start):
        ratio = (p - p0) / (q - q0)
        assert ratio.min() >= 1 - 1e-9 and ratio.max() <= 1 / z + 1e-9
        assert (ratio[scale == 1] - 1).abs().max() < 1e-6  # eps negligible: as dense
        assert ratio[scale <= 1e-8].max() > 1 + 1e-4  # eps matters: the approximation shows
        if before >= 5000:
            assert ratio.max() <= 1.005


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_partial_batches_read_caught_up_rows_and_end_as_the_dense_optimizer(optimizer):
    """Through the engine: each forward reads its rows caught up (the loss's gradient depends on the values
    read), rows no batch read lag, ``full_state_dict`` hands out the dense optimizer's tables; LR warmup
    over 6 steps and decay over 8-step epochs, clipping by value, padding and frozen ids in the batches."""
    torch.manual_seed(1)
    model, steps = Table(), 24
    dense = copy.deepcopy(model)
    engine = engine_for(model, optimizer, steps // 3, warmup=0.25, epochs=3, lr_decay=0.5)
    reference = dense_optimizer(optimizer, dense.table.weight)
    frozen = model.table.frozen.clone()
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        ids = torch.randint(TRAINED + FROZEN, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        target = 2 * torch.randn(len(ids), DIM, generator=g)
        before = model.table.weight.detach().clone()
        with torch.no_grad():
            model.scale.fill_(1.0)  # the reference has no optimizer on its scale: keep both at 1
        engine.backward(model.loss(ids, target))
        engine.step()
        dense.loss(ids, target).backward()
        dense.table.weight.grad.clamp_(-CLIP, CLIP)
        reference.param_groups[0]["lr"] = lr_at(step, warmup=6, epoch=8)
        reference.step()
        dense.zero_grad()
        unread = sorted(set(range(TRAINED)) - set(ids.tolist()))
        assert torch.equal(model.table.weight[unread], before[unread]), step
    assert not torch.allclose(model.table.weight, dense.table.weight)  # rows behind until caught up
    torch.testing.assert_close(engine.full_state_dict()["table.weight"], dense.table.weight, rtol=1e-5, atol=1e-6)
    ours, theirs = engine.tables.optimizer.state[model.table.weight], reference.state[dense.table.weight]
    for key in ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("momentum_buffer",):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)
    assert torch.equal(model.table.frozen, frozen)  # the pretrained rows never move


def test_a_forward_catches_up_the_rows_it_reads_until_the_engine_is_closed():
    """Only the trained rows the forward reads move (not the others behind, not frozen ones); a closed
    engine's hooks are gone (a later model on the same tables must not be caught up by a finished optimizer)."""
    model = Table()
    engine = engine_for(model, "adamw", 4)
    for ids in ([1, 2], [3]):  # rows 1 and 2 then miss step 2
        engine.backward(model.loss(torch.tensor(ids), torch.ones(len(ids), DIM)))
        engine.step()
    before = model.table.weight.detach().clone()
    model.table(torch.tensor([2, 9]))  # id 9 is frozen
    changed = (model.table.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [2]
    engine.close()
    model.table(torch.tensor([1]))
    assert torch.equal(model.table.weight[1], before[1])


def test_rows_a_forward_caught_up_without_reading_them_take_the_step_at_zero_gradient():
    """Word dropout replaces ids after the hook caught their rows up: those rows join the step's rows at zero
    gradient (the dense step), so that every rank catches a row up at the same steps whichever rank's batch
    named it, and the replicas stay equal bit for bit."""
    model = Table()
    engine = engine_for(model, "adamw", 4)
    for ids in ([2, 3, 4], [5]):
        engine.backward(model.loss(torch.tensor(ids), torch.ones(len(ids), DIM)))
        engine.step()
    model.table.word_dropout = 1.0  # every id read as <unk> (id 1)
    engine.backward(model.loss(torch.tensor([2, 3]), torch.ones(2, DIM)))
    assert model.table.weight.grad.coalesce().indices().flatten().tolist() == [1]
    engine.step()
    row_step = engine.tables.optimizer.state[model.table.weight]["row_step"]
    assert row_step.tolist() == [0, 3, 3, 3, 1, 2, 0]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_row_optimizer_state_round_trips_exactly(kind, tmp_path):
    """float32 tables, as trained: saved mid-run with rows behind and loaded into a new optimizer, it ends as
    the uninterrupted one, bit for bit (torch's loading would cast the float64 carry and int64 row steps to
    the tables' float32)."""
    data = reads_and_gradients(60, dtype=torch.float32)
    row_opt, _, rows, _ = optimizer_pair(kind, eps=1e-8, dtype=torch.float32)
    for step, (read, grads) in enumerate(data[:30]):
        step_rows(row_opt, rows, read, grads, lr_at(step))
    save_tensors(row_opt.state_dict(), tmp_path / "rows.pt")
    resumed_opt, _, resumed, _ = optimizer_pair(kind, eps=1e-8, dtype=torch.float32)
    with torch.no_grad():
        for p, q in zip(resumed, rows):
            p.copy_(q)
    resumed_opt.load_state_dict(load_tensors(tmp_path / "rows.pt"))
    for opt, params in ((row_opt, rows), (resumed_opt, resumed)):
        for step, (read, grads) in enumerate(data[30:], start=30):
            step_rows(opt, params, read, grads, lr_at(step))
    for p, q in zip(rows, resumed):
        assert torch.equal(p, q)
        assert resumed_opt.state[q]["carry"].dtype == torch.float64
        assert all(torch.equal(v, resumed_opt.state[q][k]) for k, v in row_opt.state[p].items()
                   if isinstance(v, torch.Tensor))
    for opt in (row_opt, resumed_opt):
        opt.flush()
    assert all(torch.equal(p, q) for p, q in zip(rows, resumed))


def test_table_updates_takes_dense_or_rows():
    with pytest.raises(InputError, match="finetune.full.optim.table_updates='sparse': expected one of dense, rows"):
        load_config(TINY, ["finetune.full.optim.table_updates=sparse"], data_root=DATA_ROOT)


@pytest.mark.parametrize("engine", ["local", "zero2"])
def test_killed_mid_epoch_with_row_wise_tables_resumes_to_the_uninterrupted_weights(tmp_path, data_root, engine):
    """The second epoch's third step is where the kill comes; the row optimizer's moments and step counts
    must come back from the resume checkpoint for the weights to end the same."""
    sets = ["data.max_len=40", "data.limit=40", "finetune.full.optim.epochs=2", "finetune.full.optim.table_updates=rows",
            "distributed.checkpoint_every=1", "run.threads=1"]
    if engine != "local":
        sets.append(f"distributed.config={engine}.json")
    config = lambda out: load_config(TINY, [*sets, f"run.out_dir={out}"], data_root=data_root)  # noqa: E731
    stop_at = len(TrainingRun.start(config(tmp_path / "probe")).train_batches(8)) + 3
    try:
        reference = train(config(tmp_path / "reference"), stage="finetune")
        with pytest.raises(Interrupted):
            train(config(tmp_path / "run"), stage="finetune", wrap_loss=interrupt_at(stop_at))
        resumed = train(config(tmp_path / "run"), stage="finetune")
    finally:
        dist.leave()
    assert resumed["test"] == reference["test"]
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(d / name)["model"] for d in (tmp_path / "run", tmp_path / "reference"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    initial = TrainingRun.start(config(tmp_path / "probe")).initial_model(None).state_dict()
    last = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert not torch.equal(last["char_embed.weight"], initial["char_embed.weight"])  # the tables did train
