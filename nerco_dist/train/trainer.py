"""Single-process training: data -> model -> CRF loss -> step, dev F1 model selection, test at the end."""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import Config
from ..data.dataset import LengthBucketBatchSampler
from ..eval.metrics import NerReport, evaluate
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import build_engine
from .task import Task, read_splits

log = logging.getLogger("nerco_dist")


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


def train(cfg: Config, root: Path) -> dict:
    t = cfg.train
    seed_everything(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # data
    splits = read_splits(cfg, root)
    task = Task.from_training_data(cfg, splits.train, root)
    train_pieces = task.encoder.encode(splits.train, split_on_entities=True, source="train ")
    sampler = LengthBucketBatchSampler([p.lattice_len for p in train_pieces], t.batch_size, seed=t.seed)
    batches = task.batches(train_pieces, sampler)
    dev_gold = [s.tags for s in splits.dev]

    # model and engine
    model = task.build_model(root, seed=t.seed).to(device)
    bert = model.bert_parameters()
    engine = build_engine(model, t, model.encoder_parameters() + list(model.head.parameters()), bert,
                          len(batches), t.epochs)
    writer = SummaryWriter(str(out / "tensorboard"))
    log.info("%d training pieces, %d batches per epoch, %d parameters, device %s", len(train_pieces),
             len(batches), sum(p.numel() for p in model.parameters()), device)

    best_f1, best_epoch, stale, step = -1.0, -1, 0, 0
    for epoch in range(t.epochs):
        for p in bert:
            p.requires_grad_(epoch >= t.bert_freeze_epochs)
        sampler.set_epoch(epoch)
        model.train()
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True)
        tick, chars = time.time(), 0
        for batch in progress:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model.loss(batch)
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

        dev = evaluate(dev_gold, task.predict_tags(model, splits.dev, t.eval_batch_size, device))
        for name in ("precision", "recall", "f1"):
            writer.add_scalar(f"dev/{name}", getattr(dev, name), epoch + 1)
        improved = dev.f1 > best_f1
        log.info("epoch %d: dev P %.2f R %.2f F1 %.2f%s (%.0fs)", epoch + 1, 100 * dev.precision, 100 * dev.recall,
                 100 * dev.f1, " *" if improved else "", time.time() - tick)
        state = dict(model_state=model.state_dict(), **task.state_dict(), epoch=epoch + 1, dev=dev.to_dict())
        save_checkpoint(out / "last.pt", **state)
        if improved:
            best_f1, best_epoch, stale = dev.f1, epoch + 1, 0
            save_checkpoint(out / "best.pt", **state)
        else:
            stale += 1
            if t.patience and stale >= t.patience:
                log.info("no dev improvement for %d epochs: stopping", stale)
                break

    results = dict(best_epoch=best_epoch, epochs_run=epoch + 1, best_dev_f1=best_f1,
                   wall_time_s=round(time.time() - started, 1), machine=machine_info(device),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), config=cfg.to_dict())
    if splits.test is not None:
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
        test = evaluate([s.tags for s in splits.test],
                        task.predict_tags(model, splits.test, t.eval_batch_size, device))
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", best_epoch, test.format_table())
    writer.close()
    write_json(out / "results.json", results)
    return results


def evaluate_checkpoint(checkpoint: Path, data: Path, batch_size: int = 32, device: str = "auto",
                        fmt: str = "auto") -> NerReport:
    """Evaluate a checkpoint on a labelled corpus file, with nothing but the checkpoint."""
    from ..data.readers import read_corpus

    task, model = load_for_inference(checkpoint, device)
    sentences = read_corpus(data, fmt).sentences
    return evaluate([s.tags for s in sentences],
                    task.predict_tags(model, sentences, batch_size, next(model.parameters()).device))


def load_for_inference(checkpoint: Path, device: str = "auto"):
    payload = load_checkpoint(checkpoint)
    task = Task.from_checkpoint(payload)
    model = task.build_model()
    model.load_state_dict(payload["model"])
    return task, model.to(pick_device(device)).eval()
