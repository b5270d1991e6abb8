"""Training, read top to bottom: data -> model -> loss -> step, in NerCo's two stages.

Stage 1 (contrastive): the encoder's character features are trained with the semantic-class InfoNCE loss;
BERT is frozen and the output head is not trained; the checkpoint with the lowest dev loss is kept.
Stage 2 (fine-tuning): from that encoder, a fresh Linear + CRF head (optionally trained alone first), then
everything on the CRF NLL; the checkpoint with the best dev F1 is kept and scored on test.
Without a contrastive stage this is the paper's baseline.

One process or several (``distributed.py``): each rank trains on its share of the length-bucketed batches
and the engine (``engine.py``) averages gradients; in stage 1 every rank's tokens are the negatives of every
query. Evaluation splits the sentences over the ranks and gathers the predictions. Rank 0 writes checkpoints
(plain fp32), results and TensorBoard. Resume checkpoints go under ``out_dir/resume/``: a run killed
mid-stage and started again with the same command continues from the last one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..atomic import write_json
from ..config import Config, TrainConfig
from ..data.dataset import LengthBucketBatchSampler, Piece
from ..data.readers import Sentence
from ..eval.metrics import evaluate
from ..losses import infonce_active, semantic_class_infonce
from ..model.tagger import NerTagger
from . import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import build_engine, read_latest, uses_deepspeed
from .task import Splits, Task, read_splits

log = logging.getLogger("nerco_dist")

STAGES = ("contrastive", "finetune", "both")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: training has diverged."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                device=str(device), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), world_size=dist.world_size())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class _NoWriter:
    """TensorBoard on ranks other than 0: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_scalars = add_scalar

    def close(self) -> None:
        pass


@dataclass
class Progress:
    """Where a stage stands; saved with every resume checkpoint (``out_dir/resume/<stage>/``)."""

    epoch: int = 0  # the epoch being trained
    batch: int = 0  # this rank's batches of that epoch already trained
    step: int = 0  # optimizer steps so far in this stage
    best: float | None = None  # best dev score so far (stage 1: lowest loss; stage 2: highest F1)
    best_epoch: int = -1
    stale: int = 0  # epochs since the best
    nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    nonfinite_run: int = 0  # ... in a row
    fingerprint: str = ""  # the config and world size that wrote it
    seconds: float = 0.0  # wall time spent in this stage, summed over every run that trained it

    def __post_init__(self) -> None:
        self._since = time.time()  # not a field: a resumed run counts from its own start

    def elapsed(self) -> float:
        """``seconds`` brought up to now: a killed and resumed stage reports its whole training time."""
        now = time.time()
        self.seconds, self._since = self.seconds + now - self._since, now
        return self.seconds


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
        """A plain fp32 checkpoint for ``eval``/``predict`` (rank 0 writes it, atomically)."""
        if dist.is_main():
            save_checkpoint(path, model_state=model.state_dict(), **self.task.state_dict(), **extra)

    def sampler(self, pieces: list[Piece], batch_size: int) -> LengthBucketBatchSampler:
        """This rank's share of the shuffled, length-bucketed batches."""
        return LengthBucketBatchSampler([p.lattice_len for p in pieces], batch_size, seed=self.cfg.train.seed,
                                        rank=dist.rank(), world_size=dist.world_size())

    def writer(self, path: Path):
        return SummaryWriter(str(path)) if dist.is_main() else _NoWriter()

    def engine(self, model: NerTagger, params, bert_params, cfg: TrainConfig, steps_per_epoch: int, epochs: int,
               start_step: int):
        return build_engine(model, cfg, params, bert_params, steps_per_epoch, epochs,
                            distributed=self.cfg.distributed, device=self.device, start_step=start_step)

    # resume checkpoints

    def fingerprint(self, stage: str, init: Path | None = None) -> str:
        """What must not change for a resume checkpoint to be continued (not timeouts, threads or logging)."""
        cfg = self.cfg.to_dict()
        for key in ("timeout_s", "max_nonfinite", "checkpoint_every"):
            cfg["distributed"].pop(key)
        for key in ("threads", "log_every", "eval_batch_size"):
            cfg["train"].pop(key)
        text = json.dumps(dict(cfg=cfg, stage=stage, init=str(init), world_size=dist.world_size()), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def progress(self, stage: str, init: Path | None = None) -> Progress:
        """Where the last run of this command left ``stage`` (a fresh start when it left nothing, or left
        the checkpoint of another config)."""
        latest = read_latest(self.out / "resume" / stage)
        fingerprint = self.fingerprint(stage, init)
        if latest is None:
            return Progress(fingerprint=fingerprint)
        if latest["progress"]["fingerprint"] != fingerprint:
            log.warning("%s: resume checkpoint of another config or world size: starting %s afresh",
                        self.out / "resume" / stage, stage)
            return Progress(fingerprint=fingerprint)
        state = Progress(**latest["progress"])
        log.info("%s: resuming at epoch %d, batch %d (step %d)", stage, state.epoch + 1, state.batch, state.step)
        return state

    def restore(self, engine, stage: str, state: Progress) -> None:
        """Weights, optimizer and RNG of the checkpoint ``state`` came from (nothing for a fresh start)."""
        if state.step or state.epoch or state.batch:
            engine.load_checkpoint(self.out / "resume" / stage)

    def save_resume(self, engine, stage: str, state: Progress) -> None:
        """A resume checkpoint, between optimizer steps only (gradients being accumulated are not saved)."""
        if engine.at_boundary:
            state.elapsed()
            engine.save_checkpoint(self.out / "resume" / stage, dataclasses.asdict(state))


def default_stage(cfg: Config) -> str:
    return "both" if cfg.contrastive.enabled and not cfg.contrastive.joint else "finetune"


def train(cfg: Config, root: Path, stage: str | None = None, init: Path | None = None, resume: bool = True) -> dict:
    """Run ``stage`` (default: both stages for NerCo configs, fine-tuning otherwise). ``init`` is a stage-1
    checkpoint for fine-tuning to start from. ``resume``: continue from the resume checkpoints a killed
    run of the same command left in ``out_dir`` (False: start afresh)."""
    stage = stage or default_stage(cfg)
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = dist.device_for_rank(cfg.train.device)
    if uses_deepspeed(cfg):
        dist.init(device, cfg.distributed.timeout_s)
    if not dist.is_main():
        log.setLevel(logging.WARNING)
    splits = read_splits(cfg, root)
    task = Task.from_training_data(cfg, splits.train, root)
    train_pieces = task.encoder.encode(splits.train, split_on_entities=True, source="train ")
    run = Run(cfg, root, task, splits, train_pieces, device, Path(cfg.train.out_dir))
    if dist.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            shutil.rmtree(run.out / "resume", ignore_errors=True)
    dist.barrier()

    results: dict = dict(stage=stage, machine=machine_info(run.device), config=cfg.to_dict())
    if stage in ("contrastive", "both"):
        results["contrastive"] = run_once(run, "contrastive", None, lambda: contrastive_stage(run))
        init = run.out / "contrastive" / "best.pt"
    if stage in ("finetune", "both"):
        results.update(run_once(run, "finetune", init, lambda: finetune_stage(run, init)))
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if dist.is_main():
        write_json(run.out / ("results.json" if stage != "contrastive" else "contrastive/results.json"), results)
    dist.barrier()
    return results


def run_once(run: Run, stage: str, init: Path | None, train_stage: Callable[[], dict]) -> dict:
    """A stage's results; read back, not trained again, when an earlier run of this command finished it."""
    done = run.out / "resume" / f"{stage}.done.json"
    fingerprint = run.fingerprint(stage, init)
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("fingerprint") == fingerprint:
            log.info("%s: finished by an earlier run (%s); --no-resume trains it again", stage, done)
            return record["results"]
    results = train_stage()
    dist.barrier()
    if dist.is_main():
        write_json(done, dict(fingerprint=fingerprint, results=results))
        shutil.rmtree(run.out / "resume" / stage, ignore_errors=True)
    dist.barrier()
    return results


# --- one epoch, either stage: data -> loss -> step ------------------------------------------------------


def train_epoch(run: Run, stage: str, engine, batches, state: Progress,
                loss_of: Callable[[dict], torch.Tensor | None], writer, log_batch: Callable | None = None) -> None:
    """This rank's batches of one epoch, from ``state.batch`` on (a resumed run skips what it trained).
    A loss that is not finite on some rank skips the step on every rank; ``max_nonfinite`` in a row abort."""
    d, t = run.cfg.distributed, run.cfg.train
    prefix, epochs = ("contrastive", run.cfg.contrastive.epochs) if stage == "contrastive" else ("train", t.epochs)
    desc = f"{'contrastive' if stage == 'contrastive' else 'epoch'} {state.epoch + 1}/{epochs}"
    bar = tqdm(total=len(batches), initial=state.batch, desc=desc, leave=False, dynamic_ncols=True,
               disable=not dist.is_main())
    tick, tokens, all_tokens = time.time(), 0, 0
    for batch in itertools.islice(batches, state.batch, None):
        batch = run.to_device(batch)
        loss = engine.forward(lambda: loss_of(batch))
        n = int(batch["char_mask"].sum())
        mean_loss, finite, n_all = mean_over_ranks(loss, n)
        state.batch += 1
        tokens, all_tokens = tokens + n, all_tokens + n_all
        bar.update()
        if not finite:
            skip_nonfinite(state, d.max_nonfinite, writer, prefix)
            continue
        state.nonfinite_run = 0
        if loss is None:  # stage 1: no class of the (global) batch has a positive pair
            continue
        engine.backward(loss)
        engine.step()
        if not engine.at_boundary:
            continue
        state.step += 1
        if state.step % t.log_every == 0:
            elapsed = max(time.time() - tick, 1e-9)
            rate, global_rate = tokens / elapsed, all_tokens / elapsed
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{rate:.0f}", tok_s_all=f"{global_rate:.0f}")
            writer.add_scalar(f"{prefix}/loss", mean_loss, state.step)
            writer.add_scalar(f"{prefix}/lr", engine.lr, state.step)
            writer.add_scalar(f"{prefix}/tokens_per_s_rank", rate, state.step)
            writer.add_scalar(f"{prefix}/tokens_per_s", global_rate, state.step)
            if log_batch is not None:
                log_batch(writer, state.step, batch)
            tick, tokens, all_tokens = time.time(), 0, 0
        if d.checkpoint_every and state.step % d.checkpoint_every == 0:
            run.save_resume(engine, stage, state)
    bar.close()


def mean_over_ranks(loss: torch.Tensor | None, tokens: int) -> tuple[float, bool, int]:
    """The loss averaged over ranks, whether it is finite on every rank, and the tokens of all ranks."""
    value = loss.item() if loss is not None else 0.0
    finite = math.isfinite(value)
    total, bad, all_tokens = dist.sum_over_ranks([value if finite else 0.0, 0.0 if finite else 1.0, tokens])
    return total / dist.world_size(), bad == 0, int(all_tokens)


def skip_nonfinite(state: Progress, limit: int, writer, prefix: str) -> None:
    state.nonfinite += 1
    state.nonfinite_run += 1
    writer.add_scalar(f"{prefix}/nonfinite_skipped", state.nonfinite, state.step)
    log.warning("non-finite loss at epoch %d, batch %d: step skipped (%d in a row, %d in all)", state.epoch + 1,
                state.batch, state.nonfinite_run, state.nonfinite)
    if state.nonfinite_run >= limit:
        raise NonFiniteLoss(f"{state.nonfinite_run} non-finite losses in a row (epoch {state.epoch + 1}, batch "
                            f"{state.batch}, step {state.step}): training diverged; lower the learning rate or "
                            f"check the data (distributed.max_nonfinite={limit})")


# --- stage 1: semantic-class contrastive learning -------------------------------------------------------


def contrastive_loss(run: Run, model: NerTagger, batch: dict[str, torch.Tensor], features: torch.Tensor,
                     across_ranks: bool = True):
    """InfoNCE over the batch's character tokens; None when no class qualifies (no backward then).

    With several ranks (``across_ranks``) the keys — positives and negatives — are every rank's tokens and
    the class sizes those of the global batch; the local queries' loss is scaled by the world size, so that
    the engine's gradient averaging over ranks yields the gradient of the global batch's loss, and the mean
    of this value over ranks is that loss."""
    c = run.cfg.contrastive
    mask = batch["char_mask"]
    labels = batch["class_ids"][mask]
    if not across_ranks or dist.world_size() == 1:
        if not infonce_active(labels, 0, non_entity_queries=c.non_entity_queries):
            return None
        tokens = model.contrastive_features(features)[mask]
        return semantic_class_infonce(tokens, labels, c.temperature, 0, non_entity_queries=c.non_entity_queries,
                                      backend=c.backend)
    tokens = model.contrastive_features(features)[mask]
    keys, key_labels, self_index = dist.gather_rows(tokens, labels)
    if not infonce_active(key_labels, 0, non_entity_queries=c.non_entity_queries):  # the same on every rank
        return None
    return dist.world_size() * semantic_class_infonce(
        tokens, labels, c.temperature, 0, keys=keys, key_labels=key_labels, self_index=self_index,
        non_entity_queries=c.non_entity_queries, backend=c.backend)


def contrastive_stage(run: Run) -> dict:
    c, t = run.cfg.contrastive, run.cfg.train
    out = run.out / "contrastive"
    seed_everything(t.seed)
    model = run.new_model()
    dist.seed_rank_stream(t.seed)
    sampler = run.sampler(run.train_pieces, c.batch_size)
    batches = run.task.batches(run.train_pieces, sampler)
    dev_pieces = run.task.encoder.encode(run.splits.dev, split_on_entities=True, source="dev ")
    dev_batches = run.task.batches(dev_pieces, LengthBucketBatchSampler(
        [p.lattice_len for p in dev_pieces], c.batch_size, shuffle=False))
    stage_cfg = dataclasses.replace(t, optimizer=c.optimizer, lr=c.lr, weight_decay=c.weight_decay,
                                    warmup=c.warmup, lr_decay=c.lr_decay, batch_size=c.batch_size)
    state = run.progress("contrastive")
    # the encoder only: BERT is frozen and the output head is not trained in this stage
    engine = run.engine(model, model.encoder_parameters(), [], stage_cfg, len(batches), c.epochs, state.step)
    run.restore(engine, "contrastive", state)
    writer = run.writer(out / "tensorboard")
    log.info("stage 1 (contrastive): %d batches per epoch and rank, %d ranks, tau %.3f", len(batches),
             dist.world_size(), c.temperature)

    def log_batch(writer, step, batch):
        log_contrastive_batch(writer, step, batch, c.non_entity_queries)

    while state.epoch < c.epochs:
        epoch = state.epoch
        sampler.set_epoch(epoch)
        model.train()
        tick = time.time()
        train_epoch(run, "contrastive", engine, batches, state,
                    lambda batch: contrastive_loss(run, model, batch, model.encode(batch)), writer, log_batch)
        weights = engine.inference_model()  # fp32, on every rank
        dev_loss = mean_dev_contrastive_loss(run, weights, dev_batches)
        writer.add_scalar("contrastive/dev_loss", dev_loss, epoch + 1)
        improved = state.best is None or dev_loss < state.best
        log.info("contrastive epoch %d: dev loss %.4f%s (%.0fs)", epoch + 1, dev_loss, " *" if improved else "",
                 time.time() - tick)
        if improved:
            state.best, state.best_epoch, state.stale = dev_loss, epoch + 1, 0
            run.checkpoint(out / "best.pt", weights, stage="contrastive", epoch=epoch + 1, dev_loss=dev_loss)
        else:
            state.stale += 1
        state.epoch, state.batch = epoch + 1, 0
        run.save_resume(engine, "contrastive", state)
        if c.patience and state.stale >= c.patience:
            log.info("no dev improvement for %d epochs: stopping stage 1", state.stale)
            break
    writer.close()
    engine.close()
    return dict(best_epoch=state.best_epoch, best_dev_loss=state.best, epochs_run=state.epoch,
                wall_time_s=round(state.elapsed(), 1), nonfinite_skipped=state.nonfinite)


@torch.no_grad()
def mean_dev_contrastive_loss(run: Run, model: NerTagger, dev_batches: Iterable) -> float:
    """Mean per-batch loss over the dev batches (each rank takes every world_size-th batch; a batch's
    negatives are its own tokens, so the value does not depend on the number of ranks)."""
    model.eval()
    total, n = 0.0, 0
    for batch in itertools.islice(dev_batches, dist.rank(), None, dist.world_size()):
        batch = run.to_device(batch)
        loss = contrastive_loss(run, model, batch, model.encode(batch), across_ranks=False)
        if loss is not None:
            total, n = total + loss.item(), n + 1
    model.train()
    total, n = dist.sum_over_ranks([total, n])
    return total / max(n, 1)


def log_contrastive_batch(writer: SummaryWriter, step: int, batch: dict, non_entity_queries: bool) -> None:
    """How many queries / positive pairs / negatives this rank's batch had, and its class balance."""
    labels = batch["class_ids"][batch["char_mask"]]
    counts = torch.bincount(labels).tolist()
    n = sum(counts)
    query_classes = [(k, m) for k, m in enumerate(counts) if m >= 2 and m < n and (k != 0 or non_entity_queries)]
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


def finetune_phase(t: TrainConfig, epoch: int) -> tuple[bool, bool]:
    """(head only, BERT trained) in ``epoch``."""
    return epoch < t.head_only_epochs, epoch >= t.bert_freeze_epochs


def finetune_engine(run: Run, model: NerTagger, previous, epoch: int, steps_per_epoch: int, step: int):
    """The engine for ``epoch`` and the model it trains. The local engine holds every parameter the stage
    trains (frozen ones just get no gradient) and lasts the stage. A DeepSpeed engine trains a fixed set, so
    each change of the set (head alone, then the encoder, then BERT) gets a new engine on a fresh model with
    the current weights; the LR schedule goes on, the optimizer's moments start anew."""
    t = run.cfg.train
    head_only, bert_trains = finetune_phase(t, epoch)
    if previous is not None:
        if not previous.distributed or previous.phase == (head_only, bert_trains):
            return previous, model
        weights = previous.full_state_dict()
        previous.close()
        with torch.random.fork_rng(devices=[]):  # a new model draws no random numbers from the training stream
            model = run.new_model()
        model.load_state_dict(weights)
    head, bert = list(model.head.parameters()), model.bert_parameters()
    params, bert_params = model.encoder_parameters() + head, bert
    if uses_deepspeed(run.cfg):
        params, bert_params = (head, []) if head_only else (params, bert if bert_trains else [])
    engine = run.engine(model, params, bert_params, t, steps_per_epoch, t.epochs, step)
    engine.phase = (head_only, bert_trains)
    return engine, model


def finetune_loss(run: Run, model: NerTagger, batch: dict[str, torch.Tensor], head_only: bool) -> torch.Tensor:
    """Mean CRF NLL of the batch (+ joint_weight x InfoNCE in the joint ablation)."""
    c = run.cfg.contrastive
    with torch.set_grad_enabled(not head_only):
        features = model.encode(batch)
    loss = model.head.nll(features, batch["labels"], batch["char_mask"])
    if c.joint and not head_only:  # ablation: InfoNCE and CRF NLL in one stage
        infonce = contrastive_loss(run, model, batch, features)
        if infonce is not None:
            loss = loss + c.joint_weight * infonce
    return loss


def predict(run: Run, model: NerTagger, sentences: list[Sentence]) -> list[list[str]]:
    """Predicted tags of every sentence: rank r predicts sentences r, r + W, ... and all ranks get all of
    them, each sentence exactly once."""
    W, r = dist.world_size(), dist.rank()
    mine = run.task.predict_tags(model, sentences[r::W], run.cfg.train.eval_batch_size, run.device)
    if W == 1:
        return mine
    predicted: list = [None] * len(sentences)
    for k, part in enumerate(dist.gather_objects(mine)):
        predicted[k::W] = part
    return predicted


def finetune_stage(run: Run, init: Path | None) -> dict:
    t = run.cfg.train
    seed_everything(t.seed)
    model = run.new_model()
    if init is not None:
        load_encoder(model, init)
        log.info("stage 2 starts from the encoder of %s", init)
    dist.seed_rank_stream(t.seed)
    sampler = run.sampler(run.train_pieces, t.batch_size)
    batches = run.task.batches(run.train_pieces, sampler)
    writer = run.writer(run.out / "tensorboard")
    log.info("%d training pieces, %d batches per epoch and rank, %d ranks, %d parameters, device %s",
             len(run.train_pieces), len(batches), dist.world_size(), sum(p.numel() for p in model.parameters()),
             run.device)
    state = run.progress("finetune", init)
    engine, model = finetune_engine(run, model, None, state.epoch, len(batches), state.step)
    run.restore(engine, "finetune", state)

    while state.epoch < t.epochs:
        epoch = state.epoch
        head_only, bert_trains = finetune_phase(t, epoch)
        for p in model.bert_parameters():
            p.requires_grad_(bert_trains)
        sampler.set_epoch(epoch)
        model.train()
        tick = time.time()
        train_epoch(run, "finetune", engine, batches, state, lambda batch: finetune_loss(run, model, batch, head_only),
                    writer)
        weights = engine.inference_model()  # fp32, on every rank
        dev = evaluate([s.tags for s in run.splits.dev], predict(run, weights, run.splits.dev))
        for name in ("precision", "recall", "f1"):
            writer.add_scalar(f"dev/{name}", getattr(dev, name), epoch + 1)
        improved = state.best is None or dev.f1 > state.best
        log.info("epoch %d: dev P %.2f R %.2f F1 %.2f%s (%.0fs)", epoch + 1, 100 * dev.precision, 100 * dev.recall,
                 100 * dev.f1, " *" if improved else "", time.time() - tick)
        extra = dict(stage="finetune", epoch=epoch + 1, dev=dev.to_dict())
        run.checkpoint(run.out / "last.pt", weights, **extra)
        if improved:
            state.best, state.best_epoch, state.stale = dev.f1, epoch + 1, 0
            run.checkpoint(run.out / "best.pt", weights, **extra)
        else:
            state.stale += 1
        state.epoch, state.batch = epoch + 1, 0
        if state.epoch < t.epochs:  # a checkpoint is always saved by the engine of the epoch it resumes at
            engine, model = finetune_engine(run, model, engine, state.epoch, len(batches), state.step)
        run.save_resume(engine, "finetune", state)
        if t.patience and state.stale >= t.patience:
            log.info("no dev improvement for %d epochs: stopping", state.stale)
            break
    writer.close()

    results = dict(best_epoch=state.best_epoch, epochs_run=state.epoch, best_dev_f1=state.best,
                   wall_time_s=round(state.elapsed(), 1), nonfinite_skipped=state.nonfinite)
    if run.splits.test is not None:
        dist.barrier()  # best.pt is on disk
        best = engine.inference_model(load_checkpoint(run.out / "best.pt")["model"])
        test = evaluate([s.tags for s in run.splits.test], predict(run, best, run.splits.test))
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", state.best_epoch, test.format_table())
    engine.close()
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
