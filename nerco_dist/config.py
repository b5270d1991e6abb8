"""Run configuration: YAML files with ``--set section.key=value`` overrides, checked against dataclasses.

A stage is a list of phases (``contrastive.phase``; ``finetune.head``, ``.frozen_bert``, ``.full``), each with
its own optimiser section (:class:`OptimConfig`), patience and hand-off.

Corpus and vector paths are relative to the data root: ``--data-root``, else ``$NERCO_DATA_ROOT``, else
``data/``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .data.lexicon import JIEBA
from .errors import InputError
from .model.config import ModelConfig

DATA_ROOT_ENV = "NERCO_DATA_ROOT"

# Field metadata. "resume": False: may change between a killed run and its resume, and leaves a finished stage's
# results standing; "ends": decides only when a stage ends or what its results score: a killed run continues
# under a changed value, a finished stage is reused only at the value it finished with. "ge"/"gt"/"le"/"lt": the
# allowed range of a number, always finite (checked when a config is read, so a bad value stops a run before any
# work).
# "words": the strings a number field also takes in place of a number (run.threads: auto).
RESUMABLE = {"resume": False}
ENDS = {"resume": "ends"}


@dataclass
class DataConfig:
    # the folder relative paths below are read under: a command sets it once, when it reads the config
    # (--data-root, else $NERCO_DATA_ROOT, else data/)
    root: str = field(default="data", metadata=RESUMABLE)
    train: str = ""
    dev: str | None = None  # None: a seeded held-out slice of train (dev_fraction)
    test: str | None = field(default=None, metadata=ENDS)  # scored once, after the stage
    format: str = "auto"  # auto | conll | weibo | cluener
    dev_fraction: float = field(default=0.05, metadata={"gt": 0, "lt": 1})
    # characters per model input, whatever the tags (an entity longer than this is cut too); longer sentences are
    # cut into pieces
    max_len: int = field(default=200, metadata={"ge": 1})
    lexicon: str | None = None  # None: jieba's dictionary; else a word list or word2vec file; a+b: their union
    char_vectors: str | None = None
    bigram_vectors: str | None = None
    word_vectors: str | None = None
    # tokens outside the training vocabulary that a vector file knows keep its vector (frozen rows) instead of
    # becoming <unk>: at dev, test and predict time
    pretrained_unseen_rows: bool = True
    # every table row at unit L2 norm (FLAT's norm_embed): pretrained and random rows weigh the same
    norm_embeddings: bool = True
    min_freq: int = field(default=1, metadata={"ge": 1})
    limit: int | None = field(default=None, metadata={"ge": 1})  # only the first N sentences of each split (quick runs)

    def path(self, value: str | None) -> Path | None:
        """A path this section names: absolute as written, otherwise under ``root``."""
        return resolve_data_path(value, Path(self.root))

    def lexicon_reference(self) -> str:
        """``lexicon`` with each file of a ``a+b`` union under ``root`` (``jieba`` stays as it is)."""
        return "+".join(p if p == JIEBA else str(self.path(p)) for p in (self.lexicon or JIEBA).split("+"))


@dataclass
class OptimConfig:
    """How one phase updates its parameters. Each phase builds its own optimiser: a new phase restarts the
    moments and the warmup by design."""

    optimizer: str = "sgd"  # sgd | adamw
    lr: float = field(default=1e-3, metadata={"gt": 0})
    momentum: float = field(default=0.9, metadata={"ge": 0, "lt": 1})  # sgd only
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    # BERT, in a phase that trains it, at this fraction of lr
    bert_lr_ratio: float = field(default=0.05, metadata={"ge": 0})
    # the encoder (all but the head and BERT) at this fraction of lr
    encoder_lr_ratio: float = field(default=1.0, metadata={"ge": 0})
    # linear ramp from 0 over this fraction of the phase's steps
    warmup: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    # then lr / (1 + lr_decay * epoch), epochs within the phase; 0: constant
    lr_decay: float = field(default=0.05, metadata={"ge": 0})
    # clipping by value (local engine, and row-wise tables under DeepSpeed too; DeepSpeed clips the rest by norm)
    clip_value: float | None = field(default=5.0, metadata={"gt": 0})
    # the lattice's embedding tables: rows (the dense update computed for the rows that matter: train/rows.py)
    # | dense (every row, every step)
    table_updates: str = "rows"
    epochs: int = field(default=100, metadata={"ge": 0})  # at most; 0 skips the phase
    batch_size: int = field(default=10, metadata={"ge": 1})
    # the global batch lr was tuned for, which distributed.lr_scaling scales it from; 0: batch_size (so only
    # ranks and accumulation scale it)
    base_batch: int = field(default=0, metadata={"ge": 0})


@dataclass
class PhaseConfig:
    """One phase of a stage: its optimiser, when to stop, and what the next phase starts from."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    # epochs without a better dev score (the stage's best) before the phase ends; 0: never
    patience: int = field(default=0, metadata={**ENDS, "ge": 0})
    hand_off: str = "last"  # the next phase starts from the last weights of this one, or the stage's best
    freeze_embeddings: bool = False  # the character, bigram and word tables are not trained in this phase


def _phase(epochs: int, **optim) -> Callable[[], PhaseConfig]:
    return lambda: PhaseConfig(optim=OptimConfig(epochs=epochs, **optim))


@dataclass
class ContrastiveConfig:
    """Stage 1 of NerCo: the encoder (BERT frozen, no output head) on semantic-class InfoNCE, selected by
    the lowest dev InfoNCE (or the dev F1 of a head probe); stage 2 starts from that encoder."""

    enabled: bool = False  # false: the baseline, fine-tuning only
    temperature: float = field(default=0.07, metadata={"gt": 0})
    backend: str = "auto"  # auto | torch | triton: where the loss runs (auto: Triton on CUDA)
    select: str = "dev_loss"  # dev_loss: lowest dev InfoNCE | head_f1: dev F1 of a head trained on the features
    # head_f1: that head's epochs and peak LR (finetune.head's optimiser, its warmup spread over these epochs);
    # 5 x 3e-2 chosen on Weibo dev (docs/results.md, "The head probe"); one process only
    head_probe_epochs: int = field(default=5, metadata={"ge": 1})
    head_probe_lr: float = field(default=3e-2, metadata={"gt": 0})
    phase: PhaseConfig = field(default_factory=lambda: PhaseConfig(
        optim=OptimConfig(optimizer="adamw", warmup=0.05, epochs=30, batch_size=32), patience=10,
        hand_off="best"))


@dataclass
class FinetuneConfig:
    """Stage 2 (the baseline when there is no stage 1): Linear + CRF on BIO tags, selected by dev F1, in
    up to three phases run in this order; a phase with 0 epochs is skipped."""

    head: PhaseConfig = field(default_factory=_phase(0))  # Linear + CRF alone, the encoder fixed
    frozen_bert: PhaseConfig = field(default_factory=_phase(0))  # encoder + head, BERT fixed
    full: PhaseConfig = field(default_factory=_phase(100))  # everything, BERT at optim.bert_lr_ratio


@dataclass
class AblationConfig:
    """The paper's ablations of stage 1."""

    joint: bool = False  # one stage on CRF NLL + joint_weight * InfoNCE instead of two stages
    joint_weight: float = field(default=1.0, metadata={"ge": 0})
    non_entity_queries: bool = False  # no filtering of non-entity queries (O is a query class too)


@dataclass
class RunConfig:
    """What every stage shares: seed, device, output folder, logging."""

    seed: int = field(default=1, metadata={"ge": 0, "le": 2**32 - 1})  # numpy's seeds
    device: str = "auto"  # auto | cpu | cuda
    # torch CPU threads; auto: the cores not already busy, shared by this node's ranks (machine.auto_threads);
    # 0: torch's default (a thread per core, however busy the machine)
    threads: int | str = field(default="auto", metadata={**RESUMABLE, "ge": 0, "words": ("auto",)})
    out_dir: str = field(default="runs/run", metadata={**RESUMABLE, "non_empty": True})  # a moved run continues
    log_every: int = field(default=20, metadata={**RESUMABLE, "ge": 1})  # optimizer steps between logged scalars
    eval_batch_size: int = field(default=32, metadata={**RESUMABLE, "ge": 1})
    # CPU: values below float32's smallest normal (1.2e-38) read and written as 0 (machine.flush_denormals);
    # false: IEEE gradual underflow, as releases before it trained
    flush_denormals: bool = field(default=True, metadata=RESUMABLE)


@dataclass
class DistributedConfig:
    """Multi-process training with DeepSpeed; the defaults leave a single process on the local engine."""

    config: str | None = None  # DeepSpeed JSON (configs/ds/zero2.json); unset: DeepSpeed only under a launcher
    # micro-batches per optimizer step; global batch = batch_size x grad_accum x ranks
    grad_accum: int = field(default=1, metadata={"ge": 1})
    # none | linear | sqrt: each phase's lr x (its global batch / its optim.base_batch), or the square root
    lr_scaling: str = "none"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (DeepSpeed engine only)
    # a collective waiting longer fails the run
    timeout_s: float = field(default=600.0, metadata={**RESUMABLE, "gt": 0})
    # non-finite losses in a row (steps skipped) before aborting
    max_nonfinite: int = field(default=10, metadata={**RESUMABLE, "ge": 1})
    # optimizer steps between resume checkpoints; 0: epoch ends
    checkpoint_every: int = field(default=0, metadata={**RESUMABLE, "ge": 0})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<config>") -> "Config":
        return _build(cls(), _with_stage_optim(_without_retired(raw, source), source), "", source)

    @classmethod
    def from_record(cls, raw: dict, source: str = "<stored config>") -> "Config":
        """A config as a run stored it (:meth:`to_dict`, in a resume checkpoint or a finished run's results):
        it holds every key of its day, so a key it lacks did not exist yet and is read at the value every run
        used before it (:data:`EARLIER_DEFAULTS`), not at today's default."""
        return cls.from_dict(_with_earlier_defaults(raw), source)


FINETUNE_PHASES = ("head", "frozen_bert", "full")


def _with_stage_optim(raw: Any, source: str) -> Any:
    """``finetune.optim``, the stage's optimiser stated once, merged under each phase's own ``optim`` (a phase
    says only what differs). Epochs stay per phase: a phase left at 0 is skipped, so a stage-wide count would
    switch on phases nobody asked for."""
    section = raw.get("finetune") if isinstance(raw, dict) else None
    if not isinstance(section, dict) or "optim" not in section:
        return raw
    shared = section["optim"]
    if not isinstance(shared, dict):
        raise InputError(source, f"finetune.optim must be a mapping, got {shared!r}")
    if "epochs" in shared:
        raise InputError(source, "finetune.optim.epochs: epochs are set per phase (finetune.PHASE.optim.epochs)")
    phases = {k: v for k, v in section.items() if k != "optim"}
    for name in FINETUNE_PHASES:
        phase = phases.get(name) or {}
        if not isinstance(phase, dict):
            raise InputError(source, f"finetune.{name} must be a mapping, got {phase!r}")
        phases[name] = {**phase, "optim": _merged(shared, phase.get("optim") or {})}
    return {**raw, "finetune": phases}


# keys of earlier versions: where each went (a config using one is refused with this message)
_OPTIM_KEYS = [f.name for f in dataclasses.fields(OptimConfig)]
MOVED = {
    **{f"train.{k}": f"finetune.full.optim.{k}" for k in _OPTIM_KEYS},
    **{f"train.{k}": f"run.{k}" for k in ("seed", "device", "threads", "out_dir", "log_every", "eval_batch_size")},
    "train.patience": "finetune.full.patience",
    "train.head_only_epochs": "finetune.head.optim.epochs (a phase of its own, before the others)",
    "train.bert_freeze_epochs": "finetune.frozen_bert.optim.epochs (a phase of its own, before 'full')",
    **{f"contrastive.{k}": f"contrastive.phase.optim.{k}" for k in _OPTIM_KEYS},
    "contrastive.patience": "contrastive.phase.patience",
    **{f"contrastive.{k}": f"ablation.{k}" for k in ("joint", "joint_weight", "non_entity_queries")},
}
# keys of earlier versions whose old default means what today's config means without them: read at that value
# (a stored config), they are dropped; at any other, refused as moved
RETIRED = {
    "distributed.base_batch": (0, "PHASE.optim.base_batch (finetune.optim.base_batch for every fine-tuning "
                                  "phase): it was the base of every phase's scaling, stage 1's too"),
}


# keys whose default has changed since they were added, by (section field, key) (``optim``: every phase's
# optimiser), with the value runs had before the key existed; a stored config lacking one reads at that value
EARLIER_DEFAULTS = {("optim", "table_updates"): "dense"}


def _with_earlier_defaults(raw: Any) -> Any:
    """``raw`` with each :data:`EARLIER_DEFAULTS` key it lacks set at its earlier value, at any depth."""
    if not isinstance(raw, dict):
        return raw
    out = {}
    for name, value in raw.items():
        value = _with_earlier_defaults(value)
        if isinstance(value, dict):
            value = {**{key: v for (section, key), v in EARLIER_DEFAULTS.items() if section == name}, **value}
        out[name] = value
    return out


def _without_retired(raw: Any, source: str) -> Any:
    """``raw`` without the :data:`RETIRED` keys it holds at their old default; one at another value is refused,
    naming where it went."""
    for key, (default, moved_to) in RETIRED.items():
        section, name = key.split(".")
        values = raw.get(section) if isinstance(raw, dict) else None
        if not isinstance(values, dict) or name not in values:
            continue
        if values[name] != default:
            raise InputError(source, f"{key} has moved to {moved_to}")
        raw = {**raw, section: {k: v for k, v in values.items() if k != name}}
    return raw


_CHOICES = {"optimizer": ("sgd", "adamw"), "select": ("dev_loss", "head_f1"), "hand_off": ("last", "best"),
            "backend": ("auto", "torch", "triton"), "format": ("auto", "conll", "weibo", "cluener"),
            "position_fusion": ("four", "two"), "lr_scaling": ("none", "linear", "sqrt"),
            "precision": ("auto", "bf16", "fp32"), "device": ("auto", "cpu", "cuda"),
            "table_updates": ("dense", "rows")}
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b),
           "lt": ("<", lambda v, b: v < b)}


def _check_range(key: str, value: Any, metadata: dict, source: str) -> None:
    """Refuse a number outside the field's range (metadata ge/gt/le/lt), a non-finite float (no field takes
    inf or nan: each would train to nothing or fail later), or an empty string where one is needed, naming
    the key and what is allowed."""
    if metadata.get("non_empty") and isinstance(value, str) and not value.strip():
        raise InputError(source, f"{key}: must not be empty")
    bounds = [(op, bound, test) for name, (op, test) in _BOUNDS.items() if (bound := metadata.get(name)) is not None]
    words = metadata.get("words", ())
    allowed = " and ".join(f"{op} {bound}" for op, bound, _ in bounds) + "".join(f", or {w}" for w in words)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(source, f"{key}={value!r}: not a finite number (allowed: {allowed or 'any finite number'})")
    if value is None or value in words or all(test(value, bound) for _, bound, test in bounds):
        return
    raise InputError(source, f"{key}={value!r}: out of range (allowed: {allowed})")


def _unknown_key(key: str, value: Any, known: dict) -> str:
    """The message for a key the config does not have: where it moved, if it did."""
    if key in MOVED:
        return f"{key} has moved to {MOVED[key]}"
    if isinstance(value, dict) and any(k.startswith(key + ".") for k in MOVED):
        moves = [f"{key}.{k} -> {MOVED.get(f'{key}.{k}', '?')}" for k in value]
        return f"section {key!r} has gone; its keys moved: " + "; ".join(moves)
    return f"unknown key {key} (known here: {', '.join(known)})"


def _build(default: Any, values: Any, prefix: str, source: str) -> Any:
    """``default`` (a config dataclass) with ``values`` (a mapping, possibly nested) applied and type-checked."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise InputError(source, f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(default)}
    for key, value in values.items():
        if key not in fields:
            raise InputError(source, _unknown_key(prefix + key, value, fields))
    hints = typing.get_type_hints(type(default))
    changes = {}
    for key, value in values.items():
        current = getattr(default, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _build(current, value or {}, f"{prefix}{key}.", source)
        else:
            words = fields[key].metadata.get("words", ())
            changes[key] = value if value in words else _typed(value, hints[key], prefix + key, source, words)
            if key in _CHOICES and changes[key] not in _CHOICES[key] + (None,):
                raise InputError(source, f"{prefix}{key}={value!r}: expected one of {', '.join(_CHOICES[key])}")
            _check_range(prefix + key, changes[key], fields[key].metadata, source)
    return dataclasses.replace(default, **changes)


def _typed(value: Any, hint: Any, key: str, source: str, words: tuple[str, ...] = ()) -> Any:
    """``value`` as the field's type (``bool``, ``int``, ``float``, ``str``, or one of them ``| None``; a number
    ``| str`` is a number field with ``words``, which the caller has already let through). A float written
    ``1e-3`` is read by YAML 1.1 as a string, so floats also accept numeric strings."""
    kinds = typing.get_args(hint) or (hint,)
    optional = type(None) in kinds
    if value is None and optional:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is float and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            return math.inf if value > 0 else -math.inf  # past float's range: refused as not finite, by key
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind in (bool, str) and isinstance(value, kind):
        return value
    expected = " or ".join([kind.__name__, *(["null"] if optional else []), *words])
    raise InputError(source, f"{key}: expected {expected}, got {value!r}")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is read first and this
    file is merged over it key by key, at every depth."""
    if not path.is_file():
        raise InputError(path, "config file not found")
    if path.resolve() in seen:
        raise InputError(path, "config 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        raise InputError(path, f"invalid YAML: {getattr(err, 'problem', err)}", None if line is None else line + 1) from None
    except UnicodeDecodeError:
        raise InputError(path, "not valid UTF-8") from None
    if not isinstance(raw, dict):
        raise InputError(path, "a config must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merged(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _merged(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` mapping by mapping, at every depth."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged


def load_config(path: str | os.PathLike, overrides: list[str] = (), overlays: list[str | os.PathLike] = (),
                data_root: str | os.PathLike | None = None) -> Config:
    """Read a YAML config, merge ``overlays`` over it in order (YAML files saying only what they change, such
    as ``configs/budget/cpu.yaml``), then apply ``section.key=value`` overrides (``finetune.full.optim.lr=3e-4``:
    any depth; values parsed as YAML). ``data_root`` (the command's, from :func:`default_data_root`) replaces
    the config's own ``data.root``; every relative data path is read under it."""
    path = Path(path)
    raw = _read_yaml(path)
    for overlay in overlays:
        raw = _merged(raw, _read_yaml(Path(overlay)))
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise InputError("--set", f"expected section.key=value, got {item!r}")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(path, f"{'.'.join(parts[: depth + 1])} must be a mapping")
        node[parts[-1]] = _parse_value(value)
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and data_root is not None:
        data["root"] = str(data_root)
    return Config.from_dict(raw, str(path))


def default_data_root(flag: str | os.PathLike | None = None) -> Path:
    """The data root of a command: its ``--data-root``, else ``$NERCO_DATA_ROOT``, else ``data/``. Called where
    a command reads its arguments (the CLI, the scripts), and nowhere below."""
    return Path(flag or os.environ.get(DATA_ROOT_ENV) or "data")


def resolve_data_path(path: str | None, root: Path) -> Path | None:
    """A config path: absolute as given, otherwise under the data root."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p
