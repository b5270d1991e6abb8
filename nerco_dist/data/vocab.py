"""Token vocabularies (built from the training split) and embedding matrices from word2vec files."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from .lexicon import read_word2vec

PAD, UNK = "<pad>", "<unk>"


class Vocabulary:
    """Token <-> id, with ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, tokens: Iterable[str] = ()):
        self.itos: list[str] = [PAD, UNK]
        self.stoi: dict[str, int] = {PAD: 0, UNK: 1}
        for t in tokens:
            self.add(t)

    def add(self, token: str) -> int:
        if token not in self.stoi:
            self.stoi[token] = len(self.itos)
            self.itos.append(token)
        return self.stoi[token]

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, 1)

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        get = self.stoi.get
        return [get(t, 1) for t in tokens]

    @classmethod
    def from_counts(cls, counts: Counter, min_freq: int = 1) -> "Vocabulary":
        """Tokens seen at least ``min_freq`` times, most frequent first (ties by token, so builds repeat)."""
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(ranked)

    def state_dict(self) -> list[str]:
        return list(self.itos[2:])

    @classmethod
    def from_state_dict(cls, tokens: list[str]) -> "Vocabulary":
        return cls(tokens)


def embedding_matrix(vocab: Vocabulary, dim: int, vectors_path: str | None, rng: np.random.Generator) -> np.ndarray:
    """Rows for every token: pretrained where the word2vec file has the token, uniform random otherwise.

    The padding row is zero. With a vectors file, ``dim`` must match the file's dimension.
    """
    scale = np.sqrt(3.0 / dim)
    matrix = rng.uniform(-scale, scale, size=(len(vocab), dim)).astype(np.float32)
    if vectors_path:
        index, vectors = read_word2vec(vectors_path)
        if vectors.shape[1] != dim:
            raise ValueError(f"{vectors_path}: vectors have dimension {vectors.shape[1]}, the model expects {dim}")
        for token, i in vocab.stoi.items():
            row = index.get(token)
            if row is not None:
                matrix[i] = vectors[row]
    matrix[0] = 0.0
    return matrix
