"""Self-contained checkpoints, written atomically. A checkpoint keeps what the model *is* apart from how it
was trained: ``model_args`` (the model config), ``codec`` (the text codec's state: vocabularies, labels,
lexicon reference, max_len, BERT vocabulary) and ``model`` (the weights) are what ``eval``, ``predict``,
``analyze`` and ``--init`` read; ``provenance`` (the run config as it was) is only a record, so renaming a
training key never orphans a model. Version-1 files (the whole run config inside) are upgraded on load.

Every torch file the project reads (checkpoints, resume state, DeepSpeed's files) goes through
:func:`load_tensors`: output folders sit on shared file systems, and a full unpickle runs whatever code the
file names, so a file planted there would run its code in the next ``nerco`` that reads it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch

from .atomic import atomic_path
from .data.readers import bert_vocab_tokens
from .errors import InputError

FORMAT_VERSION = 2


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, model_args: dict, codec: dict,
                    provenance: dict | None = None, **extra: Any) -> None:
    payload = dict(format=FORMAT_VERSION, model=model_state, model_args=model_args, codec=codec,
                   provenance=provenance or {}, **extra)
    save_tensors(payload, path)


def save_tensors(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically. Written through a Python file, so that a full disk
    is the OS's error (an :class:`InputError` naming ``path``), not torch's "unexpected pos"."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # torch's zip writer, failing again as it closes after a failed write
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def load_tensors(path: str | os.PathLike, *, allow: Sequence[type] = (), map_location: Any = "cpu",
                 mmap: bool = False) -> Any:
    """A torch file read by torch's weights-only unpickler: tensors, containers and plain values, and the
    classes in ``allow`` (whose unpickling runs no code of the file's choosing). A file that needs anything
    else is refused, naming it; so is one that is not a torch file."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message is mostly advice; the line that says what the file holds is the one to show
        detail = next((line for line in str(err).splitlines() if "unsupported" in line.lower()), "")
        raise InputError(path, "not a readable checkpoint: it holds more than tensors and plain values, and "
                               f"unpickling the rest could run code, so it is refused ({detail.strip()})") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise InputError(path, f"not a readable checkpoint ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint in the current format (a version-1 file upgraded in memory)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    payload = load_tensors(path)
    version = payload.get("format") if isinstance(payload, dict) else None
    if version == 1:
        return upgrade_v1(payload)
    if version != FORMAT_VERSION:
        raise InputError(path, "not a nerco-dist checkpoint (missing or unknown format version)")
    return payload


def upgrade_v1(payload: dict) -> dict:
    """A version-1 payload (the run config embedded, vocabularies as token lists) in format 2: the model
    section and ``data.max_len`` of that config become ``model_args`` and the codec's ``max_len``; the
    vocabularies have no frozen rows; the BERT vocabulary, which version 1 read from ``model.bert`` at load
    time, is read from there once more. The embedded config is kept, unparsed, as provenance."""
    config = payload["config"]
    model_args = dict(config["model"])
    vocabs = {kind: dict(trained=list(tokens), frozen=[]) for kind, tokens in payload["vocabs"].items()}
    codec = dict(vocabs=vocabs, labels=list(payload["labels"]), lexicon=dict(payload["lexicon"]),
                 max_len=config["data"]["max_len"], bert_vocab=_bert_vocab_tokens(model_args.get("bert")))
    upgraded = {k: v for k, v in payload.items() if k not in ("config", "vocabs", "labels", "lexicon")}
    return dict(upgraded, format=FORMAT_VERSION, model_args=model_args, codec=codec,
                provenance=dict(config=config, upgraded_from_format=1))


def _bert_vocab_tokens(bert_dir: str | None) -> list[str] | None:
    if not bert_dir:
        return None
    try:
        return bert_vocab_tokens(bert_dir)
    except InputError as err:
        raise InputError(err.path, f"a version-1 checkpoint of a BERT model: its vocabulary is read from "
                                   f"model.bert={bert_dir!r}, which has no vocab.txt here") from None


def require_trained_head(path: str | os.PathLike, payload: dict) -> None:
    """Refuse a stage-1 checkpoint where tags are wanted: its output head was never trained (stage 1 trains
    the encoder alone), so it would give every character the same tag."""
    if payload.get("stage") == "contrastive":
        raise InputError(path, "a stage-1 (contrastive) checkpoint: it has no trained output head; pass the "
                               "fine-tuned best.pt (run.out_dir/best.pt, not run.out_dir/contrastive/best.pt)")


def require_same_shape(path: str | os.PathLike, weights: dict, model: torch.nn.Module, *, saved_config: dict,
                       config: dict, against: str) -> None:
    """Refuse ``weights`` (read from ``path``) that do not fit ``model``, saying what differs, where torch
    would raise a size-mismatch traceback: the model config keys (``saved_config``, the file's, against
    ``config``; dropouts aside, they shape nothing) and the first tensors. ``against`` names ``model``. An
    empty buffer the file lacks (the frozen rows of a table that has none) does not count."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in weights or v.numel()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    tensors = [f"{k} {theirs[k]} vs {ours[k]}" for k in theirs if k in ours and theirs[k] != ours[k]]
    tensors += [f"{k} missing" for k in ours if k not in theirs] + [f"{k} extra" for k in theirs if k not in ours]
    if not tensors:
        return
    keys = [f"{k} {saved_config.get(k)!r} vs {config.get(k)!r}" for k in config
            if not k.endswith("dropout") and saved_config.get(k) != config.get(k)]
    more = f", {len(tensors) - 3} more tensors" if len(tensors) > 3 else ""
    raise InputError(path, f"holds a model of another shape than {against} (the file's first: "
                           f"{'; '.join(keys + tensors[:3])}{more})")
