"""Row-wise table updates (``optim.table_updates: rows``, nerco_dist/train/rows.py), through the engine:

- every row touched at every step: the tables follow torch's AdamW / SGD on a dense copy, clipping by value
  and the LR warmup included;
- a partial batch: untouched rows and their optimizer state stay as they were, touched rows follow a
  float64 reference of the lazy semantics written here (per-row step counts, decay of touched rows only);
  the frozen pretrained rows and the padding row never change;
- a run killed mid-epoch and resumed ends with the weights of an uninterrupted run (the row optimizer's
  state is saved and restored), with the local engine and with DeepSpeed.
(Two ranks against one process: tests/test_distributed.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nerco_dist import distributed as dist
from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.config import OptimConfig, load_config
from nerco_dist.errors import InputError
from nerco_dist.model.embedding import LatticeEmbedding
from nerco_dist.train.engine import build_engine
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import train

from .conftest import DATA_ROOT, TINY

TRAINED, FROZEN, DIM = 7, 3, 4
LR, DECAY, CLIP = 0.05, 0.1, 0.3


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


def engine_for(model: Table, optimizer: str, steps: int, warmup: float = 0.0):
    cfg = OptimConfig(optimizer=optimizer, lr=LR, momentum=0.9, weight_decay=DECAY, warmup=warmup, lr_decay=0.0,
                      clip_value=CLIP, epochs=1, batch_size=1, table_updates="rows")
    model.table.sparse = True
    return build_engine(model, cfg, [(list(model.parameters()), 1.0)], steps, row_tables=[model.table.weight])


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
    params = [dense.table.weight]
    if optimizer == "adamw":
        reference = torch.optim.AdamW(params, lr=LR, weight_decay=DECAY, foreach=False)
    else:
        reference = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=DECAY, foreach=False)
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


def lazy_reference(optimizer: str, weights: torch.Tensor, data, frozen_from: int) -> torch.Tensor:
    """The module docstring's semantics of rows.py by hand, in float64, on a dense copy: gradients by dense
    autograd, a row touched when a batch reads it (not padding, not frozen), only touched rows updated."""
    w = weights.double().clone()
    m, v, buf, t = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w), torch.zeros(len(w))
    for ids, target in data:
        read = w.clone().requires_grad_(True)
        trained = (ids > 0) & (ids < frozen_from)
        ((F.embedding(ids.masked_fill(~trained, 0), read) - target.double()) ** 2)[trained].sum().backward()
        g = read.grad.clamp(-CLIP, CLIP)
        for r in sorted(set(ids[trained].tolist())):
            if optimizer == "adamw":
                t[r] += 1
                w[r] *= 1 - LR * DECAY
                m[r] = 0.9 * m[r] + 0.1 * g[r]
                v[r] = 0.999 * v[r] + 0.001 * g[r] ** 2
                w[r] -= LR / (1 - 0.9 ** t[r]) * m[r] / ((v[r] / (1 - 0.999 ** t[r])).sqrt() + 1e-8)
            else:
                buf[r] = 0.9 * buf[r] + g[r] + DECAY * w[r]
                w[r] -= LR * buf[r]
    return w


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_partial_batch_moves_only_the_rows_it_read_as_the_lazy_reference(optimizer):
    torch.manual_seed(1)
    model = Table()
    engine = engine_for(model, optimizer, 4)
    frozen_before, weights_before = model.table.frozen.clone(), model.table.weight.detach().clone()
    # rows 1 and 2 touched at steps 1 and 3 only (their step counts lag row 3's); row 6 never; ids 7-9 frozen
    data = batches([[1, 2, 3, 8, 0], [3, 4, 4, 9], [1, 3, 2, 7], [5, 3, 0, 0]], seed=3)
    for k, (ids, target) in enumerate(data):
        state = copy.deepcopy(engine.tables.optimizer.state.get(model.table.weight, {}))
        before = model.table.weight.detach().clone()
        with torch.no_grad():
            model.scale.fill_(1.0)  # the reference has no scale: keep it at 1
        engine.backward(((model.table(ids) * model.scale - target) ** 2)[ids > 0].sum())
        engine.step()
        untouched = sorted(set(range(TRAINED)) - set(ids[(ids > 0) & (ids < TRAINED)].tolist()))
        assert torch.equal(model.table.weight[untouched], before[untouched]), k
        for key, value in state.items():  # untouched rows' moments, buffers and step counts as they were
            assert torch.equal(engine.tables.optimizer.state[model.table.weight][key][untouched], value[untouched])
    expected = lazy_reference(optimizer, weights_before, data, TRAINED)
    torch.testing.assert_close(model.table.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.table.frozen, frozen_before)  # the pretrained rows never move
    assert torch.equal(model.table.weight[[0, 6]], weights_before[[0, 6]])  # padding, and a row never read
    assert not torch.equal(model.table.weight[1:6], weights_before[1:6])


def test_table_updates_takes_dense_or_rows():
    with pytest.raises(InputError, match="finetune.full.optim.table_updates='sparse': expected one of dense, rows"):
        load_config(TINY, ["finetune.full.optim.table_updates=sparse"], data_root=DATA_ROOT)


class Interrupted(Exception):
    pass


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
    calls = 0

    def wrap(phase, loss):
        def wrapped(model, batch):
            nonlocal calls
            calls += 1
            if calls == stop_at:
                raise Interrupted
            return loss(model, batch)
        return wrapped

    try:
        reference = train(config(tmp_path / "reference"), stage="finetune")
        with pytest.raises(Interrupted):
            train(config(tmp_path / "run"), stage="finetune", wrap_loss=wrap)
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
