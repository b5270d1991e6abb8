"""Token vocabularies: trained rows for the training split's tokens, frozen pretrained rows for the tokens a
vector file knows beyond them; and the matrices that fill both from word2vec files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .lexicon import read_word2vec

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


class Vocabulary:
    """Token <-> id: ``<pad>`` = 0, ``<unk>`` = 1, then the training split's tokens (ids below
    ``num_trained``: the rows training updates), then tokens only a pretrained vector file knows (the frozen
    rows, so that text training never saw keeps its pretrained vectors instead of becoming ``<unk>``)."""

    def __init__(self, tokens: Iterable[str] = (), frozen: Iterable[str] = ()):
        self.itos: list[str] = [PAD, UNK]
        self.stoi: dict[str, int] = {PAD: PAD_ID, UNK: UNK_ID}
        self._append(tokens)
        self.num_trained = len(self.itos)
        self._append(frozen)

    def _append(self, tokens: Iterable[str]) -> None:
        for t in tokens:
            if t not in self.stoi:
                self.stoi[t] = len(self.itos)
                self.itos.append(t)

    def with_frozen(self, tokens: Iterable[str]) -> "Vocabulary":
        """This vocabulary with the ``tokens`` it lacks appended as frozen rows."""
        return Vocabulary(self.itos[2 : self.num_trained], list(self.itos[self.num_trained :]) + list(tokens))

    @property
    def num_frozen(self) -> int:
        return len(self.itos) - self.num_trained

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, UNK_ID)

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        get = self.stoi.get
        return [get(t, UNK_ID) for t in tokens]

    @classmethod
    def from_counts(cls, counts: Counter, min_freq: int = 1) -> "Vocabulary":
        """Tokens seen at least ``min_freq`` times, most frequent first (ties by token, so builds repeat)."""
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(ranked)

    def state_dict(self) -> dict[str, list[str]]:
        return dict(trained=self.itos[2 : self.num_trained], frozen=self.itos[self.num_trained :])

    @classmethod
    def from_state_dict(cls, state: dict[str, list[str]]) -> "Vocabulary":
        return cls(state["trained"], state["frozen"])


@dataclass
class PretrainedVectors:
    """A word2vec file read once: token -> row, and the rows (float32)."""

    source: str
    index: dict[str, int]
    vectors: np.ndarray

    @classmethod
    def read(cls, path: str, dim: int) -> "PretrainedVectors":
        index, vectors = read_word2vec(path)
        if vectors.shape[1] != dim:
            raise ValueError(f"{path}: vectors have dimension {vectors.shape[1]}, the model expects {dim}")
        return cls(path, index, vectors)

    def rows(self, tokens: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``tokens`` the file has, their vectors)."""
        found = [(i, self.index[t]) for i, t in enumerate(tokens) if t in self.index]
        at = np.array([i for i, _ in found], dtype=np.int64)
        return at, self.vectors[np.array([r for _, r in found], dtype=np.int64)] if found else \
            np.zeros((0, self.vectors.shape[1]), dtype=np.float32)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each non-zero row scaled to L2 norm 1 (FLAT's ``norm_embed``): pretrained and random rows then carry
    the same weight, whatever scale the vector file was trained to."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def embedding_matrices(vocab: Vocabulary, dim: int, pretrained: PretrainedVectors | None, rng: np.random.Generator,
                       normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(trained rows, frozen rows) of ``vocab``: a trained row is pretrained where the file has the token and
    uniform random otherwise (the padding row zero); the frozen rows are the file's vectors. ``normalize``:
    every row but padding at unit L2 norm."""
    scale = np.sqrt(3.0 / dim)
    trained = rng.uniform(-scale, scale, size=(vocab.num_trained, dim)).astype(np.float32)
    frozen = np.zeros((vocab.num_frozen, dim), dtype=np.float32)
    if pretrained is not None:
        at, rows = pretrained.rows(vocab.itos[: vocab.num_trained])
        trained[at] = rows
        at, rows = pretrained.rows(vocab.itos[vocab.num_trained :])
        if len(at) != vocab.num_frozen:
            raise ValueError(f"{vocab.num_frozen - len(at)} frozen tokens have no vector in the pretrained file")
        frozen[at] = rows
    trained[PAD_ID] = 0.0
    if normalize:
        trained, frozen = unit_rows(trained), unit_rows(frozen)
    return trained, frozen
