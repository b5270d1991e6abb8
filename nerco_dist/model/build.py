"""A tagger for a text codec: table sizes from its vocabularies, initial rows from pretrained vectors."""

from __future__ import annotations

import numpy as np

from ..data.dataset import LatticeEncoder
from ..data.vocab import PretrainedVectors, embedding_matrices
from .config import ModelConfig
from .tagger import KINDS, NerTagger


def build_tagger(codec: LatticeEncoder, cfg: ModelConfig, pretrained: dict[str, PretrainedVectors | None] | None = None,
                 *, normalize: bool = False, seed: int = 0) -> NerTagger:
    """A fresh tagger whose tables fit ``codec``'s vocabularies (trained and frozen rows). With ``pretrained``
    (a new run: the vector files by kind, None where a kind has none) its rows start from those vectors
    (unit-norm with ``normalize``) and seeded random rows; without, as torch initialises them (a checkpoint's
    weights come next)."""
    v = codec.vocabs
    vocabs = dict(zip(KINDS, (v.chars, v.bigrams, v.words)))
    sizes = {kind: (vocab.num_trained, vocab.num_frozen) for kind, vocab in vocabs.items()}
    rows = None
    if pretrained is not None:
        rng = np.random.default_rng(seed)
        dims = dict(char=cfg.char_dim, bigram=cfg.bigram_dim, word=cfg.word_dim)
        rows = {kind: embedding_matrices(vocab, dims[kind], pretrained.get(kind), rng, normalize)
                for kind, vocab in vocabs.items()}
    return NerTagger(cfg, sizes, codec.labels.labels, rows)
