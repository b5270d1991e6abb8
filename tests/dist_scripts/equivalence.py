"""Run by tests/test_distributed.py under the deepspeed launcher (2 CPU ranks, gloo).

For ZeRO stages 0, 2 and 3: one step of each training stage on W ranks, each rank its own slice of a fixed
batch, against one process on the concatenated batch (computed on every rank, no communication):

- stage 1: the loss (mean over ranks of the value each rank backpropagates = the global InfoNCE) and the
  parameter gradients after DeepSpeed's averaging, with negatives gathered across ranks;
- stage 2: the same for the CRF NLL (equal slices, so the mean of the ranks' means is the global mean);
- with the tables updated row-wise (``--rows-stages``, cases ``.../rows``): the tables kept out of DeepSpeed,
  their gradients the touched rows averaged over ranks (``TableRows.gradients``), and after one SGD step
  (lr 1, clipping by value at the median of the reference's non-zero table gradients) every rank's tables
  equal the one-process tables minus the clipped reference gradient.

Rank 0 writes the largest differences to OUT (JSON); the test asserts on them.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from nerco_dist import distributed as dist
from nerco_dist.config import DistributedConfig, OptimConfig, load_config
from nerco_dist.model.build import build_tagger
from nerco_dist.model.tagger import KINDS
from nerco_dist.train.engines import build_engine
from nerco_dist.train.inputs import read_training_inputs
from nerco_dist.train.objectives import CrfLoss, InfoNCELoss

REPO = Path(__file__).resolve().parents[2]


def grads_after_averaging(engine, model) -> dict[str, torch.Tensor]:
    """Full gradients as DeepSpeed will apply them (averaged over ranks), whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)
        out[name] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.detach().cpu().clone()
    return out


def reference(model, batch, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    ref = copy.deepcopy(model)
    loss = loss_fn(ref, batch)
    loss.backward()
    return loss.item(), {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in ref.named_parameters() if p.requires_grad}


def named_tables(model) -> dict[str, torch.Tensor]:
    return {f"{kind}_embed.weight": p for kind, p in zip(KINDS, model.embedding_tables())}


def table_step(engine, model, ref_grads: dict[str, torch.Tensor], clip: float) -> dict:
    """One row-wise SGD step of lr 1: the largest difference from the reference (the tables minus the
    reference gradient clipped by value), the fraction of clipped entries, and whether every rank holds the
    same tables after it."""
    tables = named_tables(model)
    before = {n: p.detach().clone() for n, p in tables.items()}
    engine.step()
    diff, clipped, total = 0.0, 0, 0
    for n, p in tables.items():
        g = ref_grads[n]
        diff = max(diff, (p.detach() - (before[n] - g.clamp(-clip, clip))).abs().max().item())
        clipped, total = clipped + int((g.abs() > clip).sum()), total + int((g != 0).sum())
    replicas = dist.gather_objects({n: p.detach().clone() for n, p in tables.items()})
    same = all(torch.equal(r[n], replicas[0][n]) for r in replicas for n in tables)
    return dict(table_step_diff=diff, clipped_fraction=clipped / total, replicas_equal=same)


def table_gradients(engine, model) -> dict[str, torch.Tensor]:
    """The row-wise tables' gradients as the row optimizer will apply them (averaged over ranks), dense."""
    names = {id(p): n for n, p in named_tables(model).items()}
    return {names[id(p)]: g.to_dense() for p, g in zip(engine.tables.params, engine.tables.gradients())}


def median_table_gradient(model, ref_grads: dict[str, torch.Tensor]) -> float:
    values = torch.cat([ref_grads[n][ref_grads[n] != 0] for n in named_tables(model)])
    return values.abs().median().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--rows-stages", default="0,2,3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init(torch.device("cpu"), timeout_s=120)
    W, r = dist.world_size(), dist.rank()
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.max_len=40", "data.limit=40", "contrastive.enabled=true"],
                      data_root=args.data_root)
    _, codec, pieces, _ = read_training_inputs(cfg)
    per_rank = 4
    everything = pieces[: per_rank * W]
    mine = everything[r * per_rank : (r + 1) * per_rank]
    collate = lambda ps: next(iter(codec.batches(ps, [list(range(len(ps)))])))  # noqa: E731
    global_batch, local_batch = collate(everything), collate(mine)
    num_classes = len(codec.labels.classes)
    losses = {"contrastive": (InfoNCELoss.of(cfg, num_classes), InfoNCELoss.of(cfg, num_classes, across_ranks=False)),
              "finetune": (CrfLoss(trains_encoder=True),) * 2}  # (this rank's, the one process's)

    report = {}
    cases = [(int(z), False) for z in args.stages.split(",")] + [(int(z), True) for z in args.rows_stages.split(",")]
    for zero, rows in cases:
        d = DistributedConfig(config=str(REPO / "configs" / "ds" / f"zero{zero}.json"))
        for stage, (loss_fn, reference_loss) in losses.items():
            torch.manual_seed(0)
            model = build_tagger(codec, cfg.model, seed=0).eval()  # no dropout: both sides compute the same function
            params = model.encoder_parameters() + (list(model.head.parameters()) if stage == "finetune" else [])
            for p in model.parameters():
                p.requires_grad_(any(p is q for q in params))
            ref_loss, ref_grads = reference(model, global_batch, reference_loss)
            clip = median_table_gradient(model, ref_grads)
            optim = OptimConfig(optimizer="sgd", batch_size=per_rank, epochs=1, lr=1.0, warmup=0.0, clip_value=clip)
            model.sparse_table_gradients(rows)
            engine = build_engine(model, optim, [(params, 1.0)], 1, distributed=d, device=torch.device("cpu"),
                                  row_tables=model.embedding_tables() if rows else ())
            loss = engine.forward(lambda: loss_fn(model, local_batch))
            engine.backward(loss)
            grads = grads_after_averaging(engine, model)
            if rows:
                grads.update(table_gradients(engine, model))
            (loss_sum,) = dist.sum_over_ranks([loss.item()])
            dist_loss = loss_sum / W
            diffs = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
            scale = max(g.abs().max().item() for g in ref_grads.values())
            worst = max(diffs, key=diffs.get)
            record = report[f"zero{zero}/{stage}" + ("/rows" if rows else "")] = dict(
                loss=dist_loss, ref_loss=ref_loss, loss_diff=abs(dist_loss - ref_loss),
                max_grad_diff=diffs[worst], worst_param=worst, max_grad=scale,
                params_compared=len(diffs), local_tokens=int(local_batch["char_mask"].sum()),
                nonzero_grads=sum(int(g.abs().max() > 0) for g in ref_grads.values()))
            if rows:
                record.update(table_step(engine, model, ref_grads, clip))
            else:
                engine.step()
            engine.close()
    if r == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
