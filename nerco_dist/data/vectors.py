"""Pretrained lattice inputs: character, bigram and word vectors trained with gensim's Word2Vec on raw text
(plus the character columns of training splits), written as word2vec text files for ``data.char_vectors``,
``data.bigram_vectors`` and ``data.word_vectors``.

The tokens are the lattice's own: characters, the bigrams :func:`dataset.char_bigrams` forms (with its end
marker), and words found by forward maximum matching against the project's lexicon (single characters where
no word starts), so every vector is looked up under the name the vocabularies use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path
from ..errors import InputError
from .dataset import char_bigrams
from .lexicon import Lexicon, word2vec_tokens
from .readers import read_corpus
from .vocab import Vocabulary

log = logging.getLogger("nerco_dist")

KINDS = ("char", "bigram", "word")


def read_raw_text(path: Path) -> list[list[str]]:
    """One sequence of characters per non-empty line (whitespace dropped); an undecodable line is an
    error naming the file and line."""
    if not path.is_file():
        raise InputError(path, "raw text file not found")
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(path, "not valid UTF-8", lineno) from None
            chars = [c for c in text if not c.isspace()]
            if chars:
                lines.append(chars)
    if not lines:
        raise InputError(path, "no text")
    return lines


def segment(chars: Sequence[str], lexicon: Lexicon) -> list[str]:
    """Forward maximum matching: at each position the longest lexicon word that starts there, else the
    character."""
    longest = {}
    for m in lexicon.match(list(chars)):
        longest[m.head] = max(longest.get(m.head, m.head), m.tail)
    words, i = [], 0
    while i < len(chars):
        end = longest.get(i, i)
        words.append("".join(chars[i : end + 1]))
        i = end + 1
    return words


def token_sequences(texts: Iterable[Sequence[str]], kind: str, lexicon: Lexicon | None = None) -> list[list[str]]:
    if kind == "char":
        return [list(t) for t in texts]
    if kind == "bigram":
        return [char_bigrams(t) for t in texts]
    return [segment(t, lexicon) for t in texts]


def training_texts(raw_files: Sequence[Path], corpus_files: Sequence[Path]) -> list[list[str]]:
    """The raw text's lines and the training sentences' characters (pass training splits only)."""
    texts = [chars for path in raw_files for chars in read_raw_text(path)]
    texts += [s.chars for path in corpus_files for s in read_corpus(path).sentences]
    return texts


def train_vectors(sequences: list[list[str]], dim: int, epochs: int, min_count: int, window: int, seed: int,
                  bar: tqdm):
    """Skip-gram Word2Vec on ``sequences`` (one worker, so a seed repeats the vectors exactly on one machine;
    another CPU's BLAS can round differently); ``bar`` advances once per epoch."""
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    class EpochBar(CallbackAny2Vec):
        def on_epoch_end(self, model) -> None:
            bar.update()

    return Word2Vec(sentences=sequences, vector_size=dim, window=window, min_count=min_count, sg=1, workers=1,
                    seed=seed, epochs=epochs, callbacks=[EpochBar()]).wv


def write_word2vec(path: Path, tokens: Sequence[str], vectors: np.ndarray) -> None:
    """A word2vec text file with its "count dim" header, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(tokens)} {vectors.shape[1]}\n")
        for token, row in zip(tokens, vectors):
            f.write(token + " " + " ".join(f"{x:.6f}" for x in row) + "\n")


def build_vectors(raw_files: Sequence[Path], corpus_files: Sequence[Path], lexicon: Lexicon, out: Path, *,
                  dim: int = 50, epochs: int = 5, min_count: int = 1, window: int = 5, seed: int = 1,
                  kinds: Sequence[str] = KINDS) -> dict[str, Path]:
    """Train and write ``out/<kind>.vec`` for each kind; the paths written."""
    texts = training_texts(raw_files, corpus_files)
    logging.getLogger("gensim").setLevel(logging.WARNING)  # it logs its progress every second; the bar does
    log.info("vectors: %d lines, %d characters", len(texts), sum(len(t) for t in texts))
    written = {}
    with tqdm(total=epochs * len(kinds), desc="word2vec epochs", disable=None) as bar:
        for kind in kinds:
            bar.set_postfix(kind=kind)
            wv = train_vectors(token_sequences(texts, kind, lexicon), dim, epochs, min_count, window, seed, bar)
            written[kind] = out / f"{kind}.vec"
            write_word2vec(written[kind], list(wv.index_to_key), wv.vectors)
            log.info("vectors: %s, %d tokens -> %s", kind, len(wv.index_to_key), written[kind])
    return written


def check_options(dim: int, epochs: int, min_count: int, window: int) -> None:
    """Bad values are refused before any text is read."""
    for name, value in (("dim", dim), ("epochs", epochs), ("min-count", min_count), ("window", window)):
        if value < 1:
            raise ValueError(f"--{name}={value}: expected an integer >= 1")


def coverage(vocab: Vocabulary, path: Path) -> tuple[int, int]:
    """How many of the vocabulary's tokens (the training split's: all but <pad> and <unk>) the word2vec file
    has a vector for, and of how many: the rows :func:`vocab.embedding_matrix` fills from the file rather
    than at random."""
    tokens = set(vocab.itos[2:])
    return len(tokens.intersection(word2vec_tokens(path))), len(tokens)
