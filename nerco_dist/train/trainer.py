"""Training, read top to bottom: data -> model -> loss -> step, in NerCo's two stages.

Stage 1 (contrastive): the encoder's character features are trained with the semantic-class InfoNCE loss;
BERT is frozen and the output head is not trained; the checkpoint with the lowest dev loss is kept.
Stage 2 (fine-tuning): from that encoder, a fresh Linear + CRF head (optionally trained alone first), then
everything on the CRF NLL; the checkpoint with the best dev F1 is kept and scored on test.
Without a contrastive stage this is the paper's baseline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import Config
from ..data.dataset import LengthBucketBatchSampler, Piece
from ..eval.metrics import evaluate
from ..losses import infonce_active, semantic_class_infonce
from ..model.tagger import NerTagger
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import build_engine
from .task import Splits, Task, read_splits

log = logging.getLogger("nerco_dist")

STAGES = ("contrastive", "finetune", "both")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                device=str(device), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class Run:
    """What both stages share: config, data, device, output folder."""

    cfg: Config
    root: Path
    task: Task
    splits: Splits
    train_pieces: list[Piece]
    device: torch.device
    out: Path

    def new_model(self) -> NerTagger:
        return self.task.build_model(self.root, seed=self.cfg.train.seed).to(self.device)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def checkpoint(self, path: Path, model: NerTagger, **extra) -> None:
        save_checkpoint(path, model_state=model.state_dict(), **self.task.state_dict(), **extra)


def default_stage(cfg: Config) -> str:
    return "both" if cfg.contrastive.enabled and not cfg.contrastive.joint else "finetune"


def train(cfg: Config, root: Path, stage: str | None = None, init: Path | None = None) -> dict:
    """Run ``stage`` (default: both stages for NerCo configs, fine-tuning otherwise). ``init`` is a stage-1
    checkpoint for fine-tuning to start from."""
    stage = stage or default_stage(cfg)
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits = read_splits(cfg, root)
    task = Task.from_training_data(cfg, splits.train, root)
    train_pieces = task.encoder.encode(splits.train, split_on_entities=True, source="train ")
    run = Run(cfg, root, task, splits, train_pieces, pick_device(cfg.train.device), Path(cfg.train.out_dir))
    run.out.mkdir(parents=True, exist_ok=True)

    results: dict = dict(stage=stage, machine=machine_info(run.device), config=cfg.to_dict())
    if stage in ("contrastive", "both"):
        results["contrastive"] = contrastive_stage(run)
        init = run.out / "contrastive" / "best.pt"
    if stage in ("finetune", "both"):
        results.update(finetune_stage(run, init))
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(run.out / ("results.json" if stage != "contrastive" else "contrastive/results.json"), results)
    return results


# --- stage 1: semantic-class contrastive learning -------------------------------------------------------


def contrastive_loss(run: Run, model: NerTagger, batch: dict[str, torch.Tensor], features: torch.Tensor):
    """InfoNCE over the batch's character tokens; None when no class qualifies (no backward then)."""
    c = run.cfg.contrastive
    mask = batch["char_mask"]
    labels = batch["class_ids"][mask]
    if not infonce_active(labels, 0, non_entity_queries=c.non_entity_queries):
        return None
    tokens = model.contrastive_features(features)[mask]
    return semantic_class_infonce(tokens, labels, c.temperature, 0, non_entity_queries=c.non_entity_queries,
                                  backend=c.backend)


def contrastive_stage(run: Run) -> dict:
    c, t = run.cfg.contrastive, run.cfg.train
    out = run.out / "contrastive"
    seed_everything(t.seed)
    model = run.new_model()
    for p in model.bert_parameters() + list(model.head.parameters()):
        p.requires_grad_(False)  # BERT frozen; the output head is not trained in this stage
    sampler = LengthBucketBatchSampler([p.lattice_len for p in run.train_pieces], c.batch_size, seed=t.seed)
    batches = run.task.batches(run.train_pieces, sampler)
    dev_pieces = run.task.encoder.encode(run.splits.dev, split_on_entities=True, source="dev ")
    dev_batches = run.task.batches(dev_pieces, LengthBucketBatchSampler(
        [p.lattice_len for p in dev_pieces], c.batch_size, shuffle=False))
    stage_cfg = dataclasses.replace(t, optimizer=c.optimizer, lr=c.lr, weight_decay=c.weight_decay,
                                    warmup=c.warmup, lr_decay=c.lr_decay)
    engine = build_engine(model, stage_cfg, model.encoder_parameters(), [], len(batches), c.epochs)
    writer = SummaryWriter(str(out / "tensorboard"))
    log.info("stage 1 (contrastive): %d batches per epoch, tau %.3f", len(batches), c.temperature)

    best, best_epoch, stale, step = float("inf"), -1, 0, 0
    for epoch in range(c.epochs):
        sampler.set_epoch(epoch)
        model.train()
        tick = time.time()
        for batch in tqdm(batches, desc=f"contrastive {epoch + 1}/{c.epochs}", leave=False, dynamic_ncols=True):
            batch = run.to_device(batch)
            loss = contrastive_loss(run, model, batch, model.encode(batch))
            if loss is None:
                continue
            engine.backward(loss)
            engine.step()
            step += 1
            if step % t.log_every == 0:
                log_contrastive_batch(writer, step, loss, batch, c.non_entity_queries, engine.lr)
        dev_loss = mean_dev_contrastive_loss(run, model, dev_batches)
        writer.add_scalar("contrastive/dev_loss", dev_loss, epoch + 1)
        improved = dev_loss < best
        log.info("contrastive epoch %d: dev loss %.4f%s (%.0fs)", epoch + 1, dev_loss, " *" if improved else "",
                 time.time() - tick)
        if improved:
            best, best_epoch, stale = dev_loss, epoch + 1, 0
            run.checkpoint(out / "best.pt", model, stage="contrastive", epoch=epoch + 1, dev_loss=dev_loss)
        else:
            stale += 1
            if c.patience and stale >= c.patience:
                log.info("no dev improvement for %d epochs: stopping stage 1", stale)
                break
    writer.close()
    return dict(best_epoch=best_epoch, best_dev_loss=best, epochs_run=epoch + 1)


@torch.no_grad()
def mean_dev_contrastive_loss(run: Run, model: NerTagger, dev_batches: Iterable) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in dev_batches:
        batch = run.to_device(batch)
        loss = contrastive_loss(run, model, batch, model.encode(batch))
        if loss is not None:
            total, n = total + loss.item(), n + 1
    model.train()
    return total / max(n, 1)


def log_contrastive_batch(writer: SummaryWriter, step: int, loss: torch.Tensor, batch: dict, non_entity_queries: bool,
                          lr: float) -> None:
    """Loss, how many queries / positive pairs / negatives the batch had, and its class balance."""
    labels = batch["class_ids"][batch["char_mask"]]
    counts = torch.bincount(labels).tolist()
    n = sum(counts)
    query_classes = [(k, m) for k, m in enumerate(counts) if m >= 2 and m < n and (k != 0 or non_entity_queries)]
    writer.add_scalar("contrastive/loss", loss.item(), step)
    writer.add_scalar("contrastive/lr", lr, step)
    writer.add_scalar("contrastive/queries", sum(m for _, m in query_classes), step)
    writer.add_scalar("contrastive/positive_pairs", sum(m * (m - 1) for _, m in query_classes), step)
    writer.add_scalar("contrastive/negatives_per_query",
                      sum(m * (n - m) for _, m in query_classes) / max(sum(m for _, m in query_classes), 1), step)
    writer.add_scalars("contrastive/class_fraction", {str(k): m / n for k, m in enumerate(counts)}, step)


# --- stage 2: fine-tuning (the baseline when there is no stage 1) ----------------------------------------


def load_encoder(model: NerTagger, checkpoint: Path) -> None:
    """Take every weight but the output head from a stage-1 checkpoint: stage 2 starts with a fresh head."""
    state = load_checkpoint(checkpoint)["model"]
    encoder_state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"{checkpoint}: does not match this model (missing {missing}, unexpected {unexpected})")


def finetune_stage(run: Run, init: Path | None) -> dict:
    t, c = run.cfg.train, run.cfg.contrastive
    started = time.time()
    seed_everything(t.seed)
    model = run.new_model()
    if init is not None:
        load_encoder(model, init)
        log.info("stage 2 starts from the encoder of %s", init)
    sampler = LengthBucketBatchSampler([p.lattice_len for p in run.train_pieces], t.batch_size, seed=t.seed)
    batches = run.task.batches(run.train_pieces, sampler)
    bert = model.bert_parameters()
    engine = build_engine(model, t, model.encoder_parameters() + list(model.head.parameters()), bert,
                          len(batches), t.epochs)
    writer = SummaryWriter(str(run.out / "tensorboard"))
    log.info("%d training pieces, %d batches per epoch, %d parameters, device %s", len(run.train_pieces),
             len(batches), sum(p.numel() for p in model.parameters()), run.device)

    best_f1, best_epoch, stale, step = -1.0, -1, 0, 0
    for epoch in range(t.epochs):
        for p in bert:
            p.requires_grad_(epoch >= t.bert_freeze_epochs)
        head_only = epoch < t.head_only_epochs
        sampler.set_epoch(epoch)
        model.train()
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True)
        tick, chars = time.time(), 0
        for batch in progress:
            batch = run.to_device(batch)
            with torch.set_grad_enabled(not head_only):
                features = model.encode(batch)
            loss = model.head.nll(features, batch["labels"], batch["char_mask"])
            if c.joint and not head_only:  # ablation: InfoNCE and CRF NLL in one stage
                infonce = contrastive_loss(run, model, batch, features)
                if infonce is not None:
                    loss = loss + c.joint_weight * infonce
            engine.backward(loss)
            engine.step()
            step += 1
            chars += int(batch["char_mask"].sum())
            if step % t.log_every == 0:
                rate = chars / max(time.time() - tick, 1e-9)
                progress.set_postfix(loss=f"{loss.item():.3f}", chars_per_s=f"{rate:.0f}")
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", engine.lr, step)
                writer.add_scalar("train/chars_per_s", rate, step)

        dev = evaluate([s.tags for s in run.splits.dev],
                       run.task.predict_tags(model, run.splits.dev, t.eval_batch_size, run.device))
        for name in ("precision", "recall", "f1"):
            writer.add_scalar(f"dev/{name}", getattr(dev, name), epoch + 1)
        improved = dev.f1 > best_f1
        log.info("epoch %d: dev P %.2f R %.2f F1 %.2f%s (%.0fs)", epoch + 1, 100 * dev.precision, 100 * dev.recall,
                 100 * dev.f1, " *" if improved else "", time.time() - tick)
        extra = dict(stage="finetune", epoch=epoch + 1, dev=dev.to_dict())
        run.checkpoint(run.out / "last.pt", model, **extra)
        if improved:
            best_f1, best_epoch, stale = dev.f1, epoch + 1, 0
            run.checkpoint(run.out / "best.pt", model, **extra)
        else:
            stale += 1
            if t.patience and stale >= t.patience:
                log.info("no dev improvement for %d epochs: stopping", stale)
                break
    writer.close()

    results = dict(best_epoch=best_epoch, epochs_run=epoch + 1, best_dev_f1=best_f1,
                   wall_time_s=round(time.time() - started, 1))
    if run.splits.test is not None:
        model.load_state_dict(load_checkpoint(run.out / "best.pt")["model"])
        test = evaluate([s.tags for s in run.splits.test],
                        run.task.predict_tags(model, run.splits.test, t.eval_batch_size, run.device))
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", best_epoch, test.format_table())
    return results


# --- inference from a checkpoint ---------------------------------------------------------------------------


def load_for_inference(checkpoint: Path, device: str = "auto") -> tuple[Task, NerTagger]:
    payload = load_checkpoint(checkpoint)
    task = Task.from_checkpoint(payload)
    model = task.build_model()
    model.load_state_dict(payload["model"])
    return task, model.to(pick_device(device)).eval()


def evaluate_checkpoint(checkpoint: Path, data: Path, batch_size: int = 32, device: str = "auto",
                        fmt: str = "auto") -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted BIO tags of a labelled corpus file, with nothing but the checkpoint."""
    from ..data.readers import read_corpus

    task, model = load_for_inference(checkpoint, device)
    sentences = read_corpus(data, fmt).sentences
    return [s.tags for s in sentences], task.predict_tags(model, sentences, batch_size, next(model.parameters()).device)
