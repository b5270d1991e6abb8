"""Self-contained checkpoints: weights plus the config, vocabularies, labels and lexicon reference, so
``eval`` and ``predict`` need nothing else. Written atomically.

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
from .errors import InputError

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, config: dict, vocabs: dict, labels: list[str],
                    lexicon: dict, **extra: Any) -> None:
    payload = dict(format=FORMAT_VERSION, model=model_state, config=config, vocabs=vocabs, labels=list(labels),
                   lexicon=lexicon, **extra)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    payload = load_tensors(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise InputError(path, "not a nerco-dist checkpoint (missing or unknown format version)")
    return payload


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
    ``config``; dropouts aside, they shape nothing) and the first tensors. ``against`` names ``model``."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
