"""Run configuration: YAML files with ``--set section.key=value`` overrides, checked against dataclasses.

Corpus and vector paths are relative to the data root: ``--data-root``, else ``$NERCO_DATA_ROOT``, else
``data/``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

DATA_ROOT_ENV = "NERCO_DATA_ROOT"


@dataclass
class DataConfig:
    train: str = ""
    dev: str | None = None  # None: a seeded held-out slice of train (dev_fraction)
    test: str | None = None
    format: str = "auto"  # auto | conll | weibo | cluener
    dev_fraction: float = 0.05
    max_len: int = 200  # characters per model input; longer sentences are cut into pieces
    lexicon: str | None = None  # None: jieba's dictionary; else a word list or word2vec file
    char_vectors: str | None = None
    bigram_vectors: str | None = None
    word_vectors: str | None = None
    min_freq: int = 1
    limit: int | None = None  # use only the first N sentences of each split (quick experiments, smoke tests)


@dataclass
class ModelConfig:
    char_dim: int = 50
    bigram_dim: int = 50
    word_dim: int = 50
    hidden: int = 160
    layers: int = 1
    heads: int = 8
    head_dim: int = 20
    ff_ratio: int = 3
    position_fusion: str = "four"  # four | two
    attn_scaled: bool = True
    embed_dropout: float = 0.5
    attn_dropout: float = 0.0
    ff_dropout: float = 0.15
    residual_dropout: float = 0.15
    output_dropout: float = 0.3
    bert: str | None = None  # a local Hugging Face directory (nothing is downloaded)
    crf_constraints: bool = True  # forbid O -> I-X and B-X -> I-Y (in the likelihood and at decode)
    projection_head: bool = False  # contrastive loss on an MLP projection of the features, not the features


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    bert_lr_ratio: float = 0.05  # BERT learns at this fraction of lr once unfrozen
    bert_freeze_epochs: int = 0
    warmup: float = 0.1  # fraction of the first epoch's steps
    lr_decay: float = 0.05  # per-epoch factor 1 / (1 + lr_decay * epoch)
    clip_value: float | None = 5.0
    epochs: int = 100
    batch_size: int = 10
    eval_batch_size: int = 32
    patience: int = 0  # epochs without dev improvement before stopping; 0 = never stop early
    head_only_epochs: int = 0  # first epochs of fine-tuning train only Linear + CRF (encoder under no_grad)
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default
    out_dir: str = "runs/run"
    log_every: int = 20


@dataclass
class ContrastiveConfig:
    """Stage 1 of NerCo, and the paper's ablations of it."""

    enabled: bool = False  # false: the baseline, fine-tuning only
    joint: bool = False  # ablation: one stage on CRF NLL + joint_weight * InfoNCE instead of two stages
    joint_weight: float = 1.0
    non_entity_queries: bool = False  # ablation: no filtering of non-entity queries (O is a query class too)
    temperature: float = 0.07
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    lr_decay: float = 0.05
    epochs: int = 30
    batch_size: int = 32
    patience: int = 10  # selection: lowest dev contrastive loss
    backend: str = "auto"  # auto | torch | triton: where the loss runs (auto: Triton on CUDA)


@dataclass
class DistributedConfig:
    """Multi-process training with DeepSpeed; the defaults leave a single process on the local engine."""

    config: str | None = None  # DeepSpeed JSON (configs/ds/zero2.json); unset: DeepSpeed only under a launcher
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size x grad_accum x ranks
    lr_scaling: str = "none"  # none | linear | sqrt: lr x (global batch / base_batch), or its square root
    base_batch: int = 0  # the global batch the configured lr is for; 0: the stage's batch_size
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (DeepSpeed engine only)
    timeout_s: float = 600.0  # a collective waiting longer (a rank died or hangs) fails the run
    max_nonfinite: int = 10  # consecutive non-finite losses (each step skipped) before the run aborts
    checkpoint_every: int = 0  # optimizer steps between resume checkpoints; 0: at the end of each epoch only


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<config>") -> "Config":
        sections = {}
        for f in dataclasses.fields(cls):
            values = raw.get(f.name) or {}
            if not isinstance(values, dict):
                raise InputError(source, f"section '{f.name}' must be a mapping")
            section_cls = f.default_factory
            known = {g.name for g in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            if unknown:
                raise InputError(source, f"unknown key(s) in '{f.name}': {', '.join(sorted(unknown))}")
            hints = typing.get_type_hints(section_cls)
            sections[f.name] = section_cls(**{k: _typed(v, hints[k], f"{f.name}.{k}", source)
                                              for k, v in values.items()})
        unknown = set(raw) - set(sections)
        if unknown:
            raise InputError(source, f"unknown section(s): {', '.join(sorted(unknown))}")
        return cls(**sections)


def _typed(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` as the field's type (``bool``, ``int``, ``float``, ``str``, or one of them ``| None``). A float
    written ``1e-3`` is read by YAML 1.1 as a string, so floats also accept numeric strings."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is float and not isinstance(value, bool):
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
    raise InputError(source, f"{key}: expected {kind.__name__}{' or null' if len(kinds) > 1 else ''}, got {value!r}")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is read first and this
    file's sections are merged over it key by key."""
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
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    raw = _read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise InputError("--set", f"expected section.key=value, got {item!r}")
        raw.setdefault(parts[0], {})
        if not isinstance(raw[parts[0]], dict):
            raise InputError(path, f"section '{parts[0]}' must be a mapping")
        raw[parts[0]][parts[1]] = _parse_value(value)
    return Config.from_dict(raw, str(path))


def data_root(flag: str | None = None) -> Path:
    return Path(flag or os.environ.get(DATA_ROOT_ENV) or "data")


def resolve_data_path(path: str | None, root: Path) -> Path | None:
    """A config path: absolute as given, otherwise under the data root."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p
