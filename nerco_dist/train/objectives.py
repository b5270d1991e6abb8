"""What a phase minimises and how its epochs are scored on dev.

A loss is a callable ``loss(model, batch) -> Tensor | None`` (None: nothing to learn from this batch, no
step); :func:`phase_loss` builds the one a phase's ``loss`` names. ``train(..., wrap_loss=...)`` is the seam
where tests put their own in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from .. import distributed as dist
from ..config import Config
from ..data.dataset import LengthBucketBatchSampler
from ..eval.metrics import NerReport
from ..losses import contrastive_loss
from ..model.tagger import NerTagger
from .engines import build_engine
from .phases import Phase

LossFn = Callable[[NerTagger, dict], "torch.Tensor | None"]


WrapLoss = Callable[[Phase, "LossFn"], "LossFn"]  # a test's or benchmark's hook around a phase's loss


class InfoNCELoss:
    """Stage 1: semantic-class InfoNCE over the batch's character tokens (with several ranks, every rank's
    tokens are the keys); None when no class qualifies. Keeps the last batch's query selection for logging."""

    def __init__(self, num_classes: int, *, temperature: float, backend: str = "auto",
                 non_entity_queries: bool = False, across_ranks: bool = True):
        self.num_classes, self.temperature, self.backend = num_classes, temperature, backend
        self.non_entity_queries, self.across_ranks = non_entity_queries, across_ranks
        self.selection = None

    @classmethod
    def of(cls, cfg: Config, num_classes: int, across_ranks: bool = True) -> "InfoNCELoss":
        """The loss a config describes (``contrastive`` and the ``ablation`` switch)."""
        return cls(num_classes, temperature=cfg.contrastive.temperature, backend=cfg.contrastive.backend,
                   non_entity_queries=cfg.ablation.non_entity_queries, across_ranks=across_ranks)

    def __call__(self, model: NerTagger, batch: dict, features: torch.Tensor | None = None):
        features = model.encode(batch) if features is None else features
        mask = batch["char_mask"]
        loss, self.selection = contrastive_loss(
            model.contrastive_features(features)[mask], batch["class_ids"][mask], temperature=self.temperature,
            num_classes=self.num_classes, non_entity_queries=self.non_entity_queries, backend=self.backend,
            across_ranks=self.across_ranks)
        return loss

    def scalars(self) -> dict:
        """The last batch's queries, positive pairs, negatives per query and class fractions."""
        return {} if self.selection is None else self.selection.stats()._asdict()


class CrfLoss:
    """Stage 2: mean CRF NLL of the batch's sentences (+ ``joint_weight`` x InfoNCE in the joint ablation);
    the encoder runs without gradients in a phase that does not train it."""

    def __init__(self, trains_encoder: bool, joint: InfoNCELoss | None = None, joint_weight: float = 1.0):
        self.trains_encoder, self.joint, self.joint_weight = trains_encoder, joint, joint_weight

    def __call__(self, model: NerTagger, batch: dict) -> torch.Tensor:
        with torch.set_grad_enabled(self.trains_encoder and torch.is_grad_enabled()):
            features = model.encode(batch)
        loss = model.head.nll(features, batch["labels"], batch["char_mask"])
        if self.joint is not None:
            infonce = self.joint(model, batch, features)
            if infonce is not None:
                loss = loss + self.joint_weight * infonce
        return loss

    def scalars(self) -> dict:
        return {} if self.joint is None else self.joint.scalars()


def phase_loss(cfg: Config, phase: Phase, num_classes: int) -> InfoNCELoss | CrfLoss:
    if phase.loss == "infonce":
        return InfoNCELoss.of(cfg, num_classes)
    joint = InfoNCELoss.of(cfg, num_classes) if phase.loss == "crf+infonce" else None
    return CrfLoss("encoder" in phase.trains, joint, cfg.ablation.joint_weight)


@dataclass
class DevScore:
    """One epoch's dev score: the value the phase selects on, what goes into checkpoints and TensorBoard."""

    value: float
    lower_is_better: bool
    record: dict  # {"dev_loss": x} or {"dev": the dev report}, saved with checkpoints
    scalars: dict[str, float]  # for TensorBoard
    text: str

    def beats(self, best: float | None) -> bool:
        return best is None or (self.value < best if self.lower_is_better else self.value > best)

    @classmethod
    def from_report(cls, report: NerReport) -> "DevScore":
        text = f"dev P {100 * report.precision:.2f} R {100 * report.recall:.2f} F1 {100 * report.f1:.2f}"
        scalars = {f"dev/{name}": getattr(report, name) for name in ("precision", "recall", "f1")}
        return cls(report.f1, False, dict(dev=report.to_dict()), scalars, text)

    @classmethod
    def from_loss(cls, loss: float) -> "DevScore":
        return cls(loss, True, dict(dev_loss=loss), {"contrastive/dev_loss": loss}, f"dev InfoNCE {loss:.4f}")


def head_probe_report(run, model: NerTagger, epochs: int, lr: float) -> NerReport:
    """Dev scores of a Linear + CRF head trained for ``epochs`` at peak LR ``lr`` on the frozen features of
    ``model`` (its untrained head, as stage 1 leaves it), with ``finetune.head``'s optimiser. The probe's
    schedule spans its own epochs: ``finetune.head``'s spans that phase's (100 epochs in the configs), and a
    short probe inside its warmup learns nothing. The model is copied and the random streams are left as
    they were, so the probe does not change the training it scores."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        probe = run.model_with(model.state_dict())
        optim = replace(run.cfg.finetune.head.optim, epochs=epochs, lr=lr)
        batches = run.train_batches(optim.batch_size, grad_accum=1)  # the probe's engine: one batch a step
        engine = build_engine(probe, optim, [(list(probe.head.parameters()), 1.0)], len(batches))
        loss = CrfLoss(trains_encoder=False)
        probe.train()
        for epoch in range(epochs):
            batches.sampler.set_epoch(epoch)
            for batch in batches:
                engine.backward(loss(probe, {k: v.to(run.device) for k, v in batch.items()}))
                engine.step()
        return run.scores(probe, run.splits.dev)


@torch.no_grad()
def mean_dev_infonce(loss: InfoNCELoss, model: NerTagger, dev_batches: Iterable, device: torch.device) -> float:
    """Mean per-batch InfoNCE over the dev batches (each rank takes every world_size-th batch; a batch's
    negatives are its own tokens, so the value does not depend on the number of ranks)."""
    model.eval()
    total, n = 0.0, 0
    for batch in itertools.islice(dev_batches, dist.rank(), None, dist.world_size()):
        value = loss(model, {k: v.to(device) for k, v in batch.items()})
        if value is not None:
            total, n = total + value.item(), n + 1
    model.train()
    total, n = dist.sum_over_ranks([total, n])
    return total / max(n, 1)


def dev_score(run, phase: Phase, model: NerTagger) -> DevScore:
    """The phase's dev score of ``model`` (a :class:`~.run.TrainingRun`'s dev split): its InfoNCE, the F1 of a
    head probe on its features, or its own F1."""
    if phase.select == "dev_loss":
        pieces = run.dev_pieces
        batches = run.codec.batches(pieces, LengthBucketBatchSampler(
            [p.lattice_len for p in pieces], phase.optim.batch_size, shuffle=False))
        loss = InfoNCELoss.of(run.cfg, len(run.codec.labels.classes), across_ranks=False)
        return DevScore.from_loss(mean_dev_infonce(loss, model, batches, run.device))
    if phase.select == "head_f1":
        return DevScore.from_report(head_probe_report(run, model, run.cfg.contrastive.head_probe_epochs,
                                                       run.cfg.contrastive.head_probe_lr))
    return DevScore.from_report(run.scores(model, run.splits.dev))
