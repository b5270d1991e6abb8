"""Lexicon for FLAT's flat lattice: a character trie over a word list, and word2vec text files.

The trie is kept as a word set plus a set of proper prefixes (the trie's inner nodes), which is how a
Python trie is smallest and fastest: matching walks forward from each character and stops at the first
string that is neither a word nor a prefix.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple

from ..errors import InputError

if TYPE_CHECKING:  # read_word2vec imports it when it runs: the CLI imports this module for every command
    import numpy as np

JIEBA = "jieba"  # the lexicon reference meaning "jieba's bundled dictionary"


class Match(NamedTuple):
    """A lexicon word found in a sentence, covering characters ``head..tail`` inclusive."""

    head: int
    tail: int
    word: str


class Lexicon:
    """Words of two or more characters; :meth:`match` finds every occurrence in a sentence."""

    def __init__(self, words: Iterable[str], source: str = ""):
        self.words = {w for w in words if len(w) >= 2}
        self.prefixes = {w[:i] for w in self.words for i in range(1, len(w))}
        self.source = source

    def __len__(self) -> int:
        return len(self.words)

    def match(self, chars: list[str]) -> list[Match]:
        """All lexicon words in ``chars``, ordered by head then tail."""
        found = []
        n = len(chars)
        for head in range(n):
            piece = chars[head]
            for tail in range(head + 1, n):
                piece += chars[tail]
                if piece in self.words:
                    found.append(Match(head, tail, piece))
                if piece not in self.prefixes:
                    break
        return found

    @classmethod
    def load(cls, reference: str | None) -> "Lexicon":
        """``None`` or ``'jieba'``: jieba's bundled dictionary; otherwise a file of one word per line or a
        word2vec text file (the first field of each line is the word); ``a+b+...``: the union of several."""
        parts = (reference or JIEBA).split("+")
        words = itertools.chain.from_iterable(_words_of(part) for part in parts)
        return cls(words, source=reference or JIEBA)

    @property
    def fingerprint(self) -> str:
        """A short hash of the word list, stored in checkpoints to detect a changed lexicon file."""
        digest = hashlib.sha1("\n".join(sorted(self.words)).encode("utf-8")).hexdigest()
        return digest[:16]


def _words_of(reference: str) -> Iterator[str]:
    if reference == JIEBA:
        import jieba

        return _first_fields(Path(jieba.__file__).parent / "dict.txt")
    return _first_fields(Path(reference), skip_word2vec_header=True)


def _first_fields(path: Path, skip_word2vec_header: bool = False) -> Iterator[str]:
    if not path.is_file():
        raise InputError(path, "lexicon file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first word
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if lineno == 1 and skip_word2vec_header and len(fields) == 2 and all(x.isdigit() for x in fields):
                    continue  # "count dim" header of a word2vec text file
                yield fields[0]
    except UnicodeDecodeError:
        raise InputError(path, "not valid UTF-8") from None


def _word2vec_rows(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, token, value fields) of each line of a word2vec text file but its "count dim" header."""
    if not path.is_file():
        raise InputError(path, "vector file not found")
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # -sig: nor of the header
        try:
            for lineno, line in enumerate(f, start=1):
                fields = [x for x in line.rstrip("\n").split(" ") if x]
                if not fields:
                    continue
                if lineno == 1 and len(fields) == 2 and all(x.isdigit() for x in fields):
                    continue
                yield lineno, fields[0], fields[1:]
        except UnicodeDecodeError:
            raise InputError(path, "not valid UTF-8") from None


def read_word2vec(path: str | os.PathLike) -> tuple[dict[str, int], np.ndarray]:
    """A word2vec text file as (token -> row, float32 matrix); a clear error on a ragged or bad line."""
    import numpy as np

    path = Path(path)
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []
    dim = None
    for lineno, token, values in _word2vec_rows(path):
        if dim is None:
            dim = len(values)
        if len(values) != dim or dim == 0:
            raise InputError(path, f"expected {dim} values after the token, found {len(values)}", lineno)
        try:
            vec = np.asarray(values, dtype=np.float32)
        except ValueError:
            raise InputError(path, "a vector value is not a number", lineno) from None
        if token not in index:
            index[token] = len(rows)
            rows.append(vec)
    if not rows:
        raise InputError(path, "empty vector file")
    return index, np.stack(rows)
