"""Row-wise tables with catch-up (``optim.table_updates: rows``, nerco_dist/train/rows.py) against dense
AdamW: do they train the same, and what does the catch-up cost?

    python3 experiments/table_rows_catch_up.py            # both parts (a minute or two on 2 cores)
    python3 experiments/table_rows_catch_up.py --part agreement --seeds 1 2 3

``agreement``: configs/tiny.yaml (4 epochs) per seed, three arms: ``dense`` (as shipped: torch's fused AdamW),
``dense_unfused`` (torch's single-tensor AdamW: the same arithmetic, rounded differently), ``rows``. Test F1
of each, and the largest difference of the embedding tables from ``dense`` after several steps (the rows
arm's tables read caught up on a copy, so that reading them does not change its run): a difference of the
size ``dense_unfused`` shows is rounding, amplified by training, not the catch-up.

``cost``: CPU ms per optimizer step on one MSRA-size table (500k x 50, float32; ``--touched`` distinct rows
read per step, Zipf-distributed ids; one thread): torch's fused AdamW on the dense gradient, the lazy
row-wise AdamW this replaced (each row moves only when read, per-row bias corrections), and ``RowAdamW``
(catch-up of the rows read, then the step), with the carry at 1 step and at an MSRA epoch of batch 10
(4420 steps) since the last flush; and the flush of every row. Results: experiments/results/table_rows_catch_up.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from nerco_dist.atomic import write_json
from nerco_dist.config import default_data_root, load_config
from nerco_dist.machine import machine_info
from nerco_dist.train import engine as engine_module
from nerco_dist.train import trainer
from nerco_dist.train.optim import build_optimizer
from nerco_dist.train.rows import RowAdamW

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_STEPS = (1, 2, 4, 8, 19, 38, 57, 76)


def caught_up(tables) -> list[torch.Tensor]:
    """The row-wise tables as a flush would leave them, the optimizer and tables restored after."""
    optimizer = tables.optimizer
    saved = [(p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v
                                   for k, v in optimizer.state[p].items()}) for p in tables.params]
    tables.flush()
    out = [p.detach().clone() for p in tables.params]
    with torch.no_grad():
        for p, (weights, state) in zip(tables.params, saved):
            p.copy_(weights)
            optimizer.state[p] = state
    return out


def recording(snapshots: dict):
    """``build_engine`` whose engines record the embedding tables after the steps in SNAPSHOT_STEPS."""
    build = engine_module.build_engine

    def build_recording(model, *args, **kwargs):
        engine = build(model, *args, **kwargs)
        step = engine.step

        def recorded_step():
            step()
            if engine.at_boundary and engine.steps in SNAPSHOT_STEPS:
                snapshots[engine.steps] = (caught_up(engine.tables) if engine.tables else
                                           [p.detach().clone() for p in model.embedding_tables()])
        engine.step = recorded_step
        return engine
    return build_recording


def unfused_build_optimizer(cfg, groups, lr=None):
    """``build_optimizer`` with torch's single-tensor AdamW instead of the fused one."""
    if cfg.optimizer != "adamw":
        return build_optimizer(cfg, groups, lr)
    lr = cfg.lr if lr is None else lr
    return torch.optim.AdamW([{"params": list(p), "lr": lr * r} for p, r in groups if len(p)], lr=lr,
                             weight_decay=cfg.weight_decay, foreach=False)


def train_arm(arm: str, seed: int, data_root: Path, out: Path) -> tuple[float, dict]:
    """Test F1 of one arm and its tables after SNAPSHOT_STEPS."""
    updates = "rows" if arm == "rows" else "dense"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.seed={seed}", "run.threads=1", f"run.out_dir={out}",
                                                       f"finetune.full.optim.table_updates={updates}"],
                      data_root=data_root)
    snapshots: dict = {}
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(trainer, "build_engine", recording(snapshots)))
        if arm == "dense_unfused":
            patches.enter_context(mock.patch.object(engine_module, "build_optimizer", unfused_build_optimizer))
        results = trainer.train(cfg, stage="finetune")
    return results["test"]["f1"], snapshots


def agreement(seeds: list[int], data_root: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:  # a fresh run each time (a finished one would be reused)
            arms = {arm: train_arm(arm, seed, data_root, Path(out) / arm) for arm in ("dense", "dense_unfused", "rows")}
        dense = arms["dense"][1]
        row = dict(seed=seed, test_f1={arm: round(100 * f1, 2) for arm, (f1, _) in arms.items()})
        for arm in ("dense_unfused", "rows"):
            row[f"max_table_diff_{arm}"] = {
                step: float(f"{max((a - b).abs().max() for a, b in zip(tables, dense[step])):.3g}")
                for step, tables in sorted(arms[arm][1].items())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


class LazyAdamW:
    """The row-wise AdamW this replaced, for timing: each row read moves with its own step count and bias
    corrections; a row not read stays."""

    def __init__(self, p: torch.Tensor, lr: float = 1e-3, weight_decay: float = 0.01):
        self.p, self.lr, self.wd = p, lr, weight_decay
        self.row_step = torch.zeros(p.shape[0])
        self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        steps = self.row_step.index_select(0, rows) + 1
        self.row_step.index_copy_(0, rows, steps)
        m = self.m.index_select(0, rows).lerp_(grad, 0.1)
        v = self.v.index_select(0, rows).mul_(0.999).addcmul_(grad, grad, value=0.001)
        self.m.index_copy_(0, rows, m)
        self.v.index_copy_(0, rows, v)
        t = steps.double().unsqueeze(1)
        values = self.p.index_select(0, rows).mul_(1 - self.lr * self.wd)
        denom = (v.sqrt() / ((1 - 0.999 ** t) ** 0.5).float()).add_(1e-8)
        values.sub_(m / denom * (self.lr / (1 - 0.9 ** t)).float())
        self.p.index_copy_(0, rows, values)


def zipf_rows(n: int, touched: int, g: torch.Generator) -> torch.Tensor:
    """About ``touched`` distinct ids of ``n``, drawn with probability ~ 1/rank."""
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    rows = torch.unique(torch.multinomial(weights, touched * 2, replacement=True, generator=g))
    return rows[torch.randperm(len(rows), generator=g)[:touched]].sort().values


def per_step_ms(step, batches) -> float:
    tick = time.process_time()
    for rows, grad in batches:
        step(rows, grad)
    return round(1e3 * (time.process_time() - tick) / len(batches), 2)


def cost(rows_n: int, dim: int, touched: int, steps: int, epoch_steps: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    reads = [zipf_rows(rows_n, touched, g) for _ in range(steps)]
    batches = [(rows, torch.randn(len(rows), dim, generator=g)) for rows in reads]
    dense = torch.nn.Parameter(torch.randn(rows_n, dim) * 0.1)
    dense.grad = torch.zeros_like(dense)
    fused = torch.optim.AdamW([dense], lr=1e-3, weight_decay=0.01, fused=True)

    def dense_step(rows, grad):  # the gradient written in place, as a backward would (its cost not counted)
        dense.grad.index_copy_(0, rows, grad)
        fused.step()
        dense.grad.index_fill_(0, rows, 0.0)
    out = dict(rows=rows_n, dim=dim, touched_per_step=touched, steps=steps,
               dense_fused_adamw=per_step_ms(dense_step, batches))
    lazy = LazyAdamW(dense.detach().clone())
    out["lazy_rows_before"] = per_step_ms(lazy.step, batches)
    table = torch.nn.Parameter(dense.detach().clone())
    optimizer = RowAdamW([table], lr=1e-3, weight_decay=0.01)

    def row_step(rows, grad):
        optimizer.catch_up(table, rows)  # the forward's hook
        table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, table.shape, is_coalesced=True,
                                             check_invariants=False)
        optimizer.step()
    for k in range(epoch_steps):  # an epoch's steps since the last flush: a long carry
        row_step(*batches[k % steps])
    out["rows_catch_up_carry_epoch"] = per_step_ms(row_step, batches)
    tick = time.process_time()
    optimizer.flush()
    out["flush_ms"] = round(1e3 * (time.process_time() - tick), 1)
    out["rows_catch_up_carry_1"] = per_step_ms(row_step, batches)
    out["carry_steps_epoch"] = epoch_steps
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["agreement", "cost", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--touched", type=int, default=1000)
    parser.add_argument("--data-root")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "table_rows_catch_up.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    payload = dict(machine=machine_info(torch.device("cpu")))
    if args.part in ("agreement", "both"):
        payload["agreement"] = agreement(args.seeds, default_data_root(args.data_root))
    if args.part in ("cost", "both"):
        payload["cost"] = cost(500_000, 50, args.touched, steps=50, epoch_steps=4420)
        print(json.dumps(payload["cost"]), flush=True)
    write_json(args.out, payload, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
