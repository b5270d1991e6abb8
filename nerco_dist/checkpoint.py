"""Self-contained checkpoints: weights plus the config, vocabularies, labels and lexicon reference, so
``eval`` and ``predict`` need nothing else. Written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import InputError

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, config: dict, vocabs: dict, labels: list[str],
                    lexicon: dict, **extra: Any) -> None:
    payload = dict(format=FORMAT_VERSION, model=model_state, config=config, vocabs=vocabs, labels=list(labels),
                   lexicon=lexicon, **extra)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise InputError(path, f"not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise InputError(path, "not a nerco-dist checkpoint (missing or unknown format version)")
    return payload
