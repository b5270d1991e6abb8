"""A stage is a list of phases; a phase is what one engine trains.

Each phase has a trainable set, a loss, an optimiser section (``config.OptimConfig``: optimizer, learning
rate, warmup, decay, clipping, epochs, batch size), a selection metric with its patience, and what the next
phase starts from. Stage 1 (``contrastive``) is one phase; stage 2 (``finetune``) is up to three: ``head``
(Linear + CRF alone), ``frozen_bert`` (encoder + head) and ``full`` (everything).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..checkpoint import load_checkpoint, require_same_shape
from ..config import Config, OptimConfig, PhaseConfig
from ..errors import InputError
from ..model.tagger import NerTagger

STAGES = ("contrastive", "finetune")

# name -> (trainable parts, loss, selection metric); stage 2's phases run in this order
FINETUNE_PHASES = {"head": (frozenset({"head"}), "crf", "dev_f1"),
                   "frozen_bert": (frozenset({"encoder", "head"}), "crf", "dev_f1"),
                   "full": (frozenset({"encoder", "head", "bert"}), "crf", "dev_f1")}


@dataclass(frozen=True)
class Phase:
    stage: str
    name: str
    trains: frozenset[str]  # of "encoder", "head", "bert"
    loss: str  # "infonce" | "crf" | "crf+infonce" (the joint ablation)
    select: str  # "dev_loss" (the InfoNCE, lower is better) | "dev_f1" | "head_f1" (a head probe's dev F1)
    optim: OptimConfig
    patience: int
    hand_off: str  # "last": the next phase starts from this one's last weights; "best": from the stage's best
    freeze_embeddings: bool  # the lattice's embedding tables stay as they are

    @property
    def lower_is_better(self) -> bool:
        return self.select == "dev_loss"

    def stopped(self, stale: int) -> bool:
        """Whether ``stale`` epochs without a better dev score end this phase early."""
        return bool(self.patience) and stale >= self.patience


def _phase(stage: str, name: str, trains: frozenset, loss: str, select: str, cfg: PhaseConfig) -> Phase:
    return Phase(stage, name, trains, loss, select, cfg.optim, cfg.patience, cfg.hand_off, cfg.freeze_embeddings)


def default_stage(cfg: Config) -> str:
    """Both stages for a NerCo config, fine-tuning alone for a baseline (or the joint ablation)."""
    return "both" if cfg.contrastive.enabled and not cfg.ablation.joint else "finetune"


def stage_phases(cfg: Config, stage: str) -> list[Phase]:
    """The phases ``stage`` runs under ``cfg``, in order (a phase with 0 epochs is left out)."""
    if stage == "contrastive":
        phases = [_phase(stage, "contrastive", frozenset({"encoder"}), "infonce", cfg.contrastive.select,
                         cfg.contrastive.phase)]
    elif stage == "finetune":
        phases = []
        for name, (trains, loss, select) in FINETUNE_PHASES.items():
            joint = cfg.ablation.joint and "encoder" in trains  # ablation: InfoNCE and CRF NLL in one stage
            phases.append(_phase(stage, name, trains, "crf+infonce" if joint else loss, select,
                                 getattr(cfg.finetune, name)))
    else:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    phases = [p for p in phases if p.optim.epochs > 0]
    if not phases:
        where = "contrastive.phase" if stage == "contrastive" else "finetune.{head,frozen_bert,full}"
        raise InputError("config", f"{stage}: no phase to train ({where}.optim.epochs are all 0)")
    return phases


def trainable_parameters(model: NerTagger, phase: Phase) -> list[tuple[list, float]]:
    """The phase's parameter groups with their fractions of its learning rate: the encoder (without the
    embedding tables when ``freeze_embeddings``), the head, BERT."""
    frozen = {id(p) for p in model.embedding_tables()} if phase.freeze_embeddings else set()
    encoder = [p for p in model.encoder_parameters() if id(p) not in frozen] if "encoder" in phase.trains else []
    return [(encoder, phase.optim.encoder_lr_ratio),
            (list(model.head.parameters()) if "head" in phase.trains else [], 1.0),
            (model.bert_parameters() if "bert" in phase.trains else [], phase.optim.bert_lr_ratio)]


def row_tables(model: NerTagger, phase: Phase) -> list[nn.Parameter]:
    """The embedding tables ``phase`` updates row by row (``optim.table_updates: rows``, tables trained),
    their gradients switched to sparse rows; none under ``dense`` (dense gradients)."""
    trained = {id(p) for params, _ in trainable_parameters(model, phase) for p in params}
    rows = phase.optim.table_updates == "rows"
    tables = [p for p in model.embedding_tables() if rows and id(p) in trained]
    model.sparse_table_gradients(bool(tables))
    return tables


def load_encoder(model: NerTagger, checkpoint: Path) -> None:
    """Take every weight but the output head from a stage-1 checkpoint: stage 2 starts with a fresh head."""
    payload = load_checkpoint(checkpoint)
    encoder_state = {k: v for k, v in payload["model"].items() if not k.startswith("head.")}
    fresh_head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}  # not compared
    require_same_shape(checkpoint, dict(encoder_state, **fresh_head), model, saved_config=payload["model_args"],
                       config=asdict(model.cfg), against="this run's")
    model.load_state_dict(encoder_state, strict=False)
