"""A corpus's train, dev and test splits, read from already-resolved paths."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from .readers import Sentence, read_corpus
from .tags import entities

log = logging.getLogger("nerco_dist")


@dataclass
class Splits:
    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence] | None


def read_splits(train: Path, dev: Path | None, test: Path | None, *, corpus_format: str = "auto",
                dev_fraction: float = 0.05, limit: int | None = None, seed: int = 1) -> Splits:
    """The splits (without ``dev``: a seeded held-out slice of train; ``limit``: the first sentences of each),
    each summarised in the log."""
    train_sentences = _read_split("train", train, corpus_format)
    if dev is not None:
        dev_sentences = _read_split("dev", dev, corpus_format)
    else:
        train_sentences, dev_sentences = holdout_split(train_sentences, dev_fraction, seed)
        log.info("no dev split: holding out %d of the training sentences (seed %d)", len(dev_sentences), seed)
    test_sentences = _read_split("test", test, corpus_format) if test is not None else None
    if limit:
        train_sentences, dev_sentences = train_sentences[:limit], dev_sentences[:limit]
        test_sentences = test_sentences[:limit] if test_sentences is not None else None
    if not train_sentences:
        raise InputError(train, f"no training sentences left beside the dev slice (data.dev_fraction of "
                                f"{len(dev_sentences)} sentences): give a dev split or a larger training file")
    splits = Splits(train_sentences, dev_sentences, test_sentences)
    if log.isEnabledFor(logging.INFO):  # rank 0: the other ranks log warnings only
        for name in ("train", "dev", "test"):
            if getattr(splits, name) is not None:
                log.info("%s", split_summary(name, getattr(splits, name)))
    return splits


def _read_split(split: str, path: Path, corpus_format: str) -> list[Sentence]:
    if not path.is_file():
        raise InputError(path, f"file not found (data.{split})")
    return read_corpus(path, corpus_format).sentences


def holdout_split(sentences: Sequence[Sentence], fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """A seeded held-out slice of the training split, for corpora without a dev set (MSRA)."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(len(order) * fraction)))
    held = set(order[:cut])
    return ([s for i, s in enumerate(sentences) if i not in held], [sentences[i] for i in sorted(held)])


def split_summary(name: str, sentences: Sequence[Sentence]) -> str:
    """A split's size and entities per type in one line, logged at the start of training: a wrong file, a
    limit or a tag scheme read wrongly shows here, before any epoch."""
    types = Counter(e.type for s in sentences for e in entities(s.tags))
    per_type = ", ".join(f"{t} {n:,}" for t, n in sorted(types.items()))
    return (f"{name}: {len(sentences):,} sentences, {sum(len(s) for s in sentences):,} characters, "
            f"{sum(types.values()):,} entities" + (f" ({per_type})" if per_type else ""))
