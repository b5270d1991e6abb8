"""Pretrained lattice inputs: character, bigram and word vectors trained with gensim's Word2Vec on raw text
(plus the character columns of training splits), written as word2vec text files for ``data.char_vectors``,
``data.bigram_vectors`` and ``data.word_vectors``.

The tokens are the lattice's own: characters, the bigrams :func:`dataset.char_bigrams` forms (with its end
marker), and words, found by forward maximum matching against the project's lexicon (single characters
where no word starts) or by jieba's own segmentation, so every vector is looked up under the name the
vocabularies use.

The text is streamed: every pass (gensim's vocabulary count, then one per epoch) reads the files again line
by line, so memory grows with the vocabulary, not with the text (tens of millions of characters fit in a
few hundred MB).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..atomic import atomic_path
from ..errors import InputError
from .lexicon import Lexicon
from .readers import read_corpus

if TYPE_CHECKING:  # the CLI reads this module's options for every command, ``--help`` included: nothing heavy
    import numpy as np

log = logging.getLogger("nerco_dist")

KINDS = ("char", "bigram", "word")
# a token seen fewer times gets no vector: of the bigrams of the benchmark's 37M characters of raw text, 1
# keeps 1.04M, 3 keeps 491k, 5 keeps 356k (every row kept is also a frozen row in each checkpoint)
MIN_COUNT = 3
SEGMENTERS = ("fmm", "jieba")  # how raw text becomes word tokens: forward maximum matching, or jieba.cut


def raw_lines(path: Path) -> Iterator[tuple[list[str], int]]:
    """Each non-empty line's characters (whitespace dropped) with the line's size in bytes; an undecodable
    line is an error naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(path, "not valid UTF-8", lineno) from None
            chars = [c for c in text if not c.isspace()]
            if chars:
                yield chars, len(raw)


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


def tokenizer(kind: str, lexicon: Lexicon | None = None, segmenter: str = "fmm") -> Callable[[list[str]], list[str]]:
    """What one line of characters becomes for ``kind``'s vectors."""
    if kind == "char":
        return list
    if kind == "bigram":
        from .dataset import char_bigrams  # the lattice's bigrams; that module needs torch

        return char_bigrams
    if segmenter == "jieba":
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return lambda chars: jieba.lcut("".join(chars))
    return lambda chars: segment(chars, lexicon)


class TokenStream:
    """The token sequences of raw text files and training splits, the raw files read again on every pass (a
    restartable iterable, as gensim wants one). The training splits are read once, as one string per sentence
    (they are small, and a reader's warnings then come once). ``progress`` is called with the bytes of text
    behind each sequence."""

    def __init__(self, raw_files: Sequence[Path], corpus_files: Sequence[Path],
                 tokenize: Callable[[list[str]], list[str]], progress: Callable[[int], object] = lambda n: None):
        self.raw_files, self.tokenize, self.progress = list(raw_files), tokenize, progress
        self.sentences = [text for path in corpus_files for s in read_corpus(path).sentences  # as raw_lines
                          if (text := "".join(c for c in s.chars if not c.isspace()))]  # reads: no space token

    def __iter__(self) -> Iterator[list[str]]:
        for path in self.raw_files:
            for chars, size in raw_lines(path):
                yield self.tokenize(chars)
                self.progress(size)
        for sentence in self.sentences:
            yield self.tokenize(list(sentence))
            self.progress(len(sentence.encode("utf-8")))

    def size_bytes(self) -> int:
        """What one pass reports to ``progress``."""
        return sum(p.stat().st_size for p in self.raw_files) + sum(len(s.encode("utf-8")) for s in self.sentences)


def check_inputs(raw_files: Sequence[Path], corpus_files: Sequence[Path]) -> None:
    """Missing files are refused before any vector is trained."""
    for path in raw_files:
        if not path.is_file():
            raise InputError(path, "raw text file not found")
    for path in corpus_files:
        if not path.is_file():
            raise InputError(path, "training split not found")
    if not raw_files and not corpus_files:
        raise InputError("--raw", "no text: give at least one --raw file or --corpus split")


def train_vectors(stream: TokenStream, *, dim: int, epochs: int, min_count: int, window: int, seed: int,
                  workers: int, name: str = "vectors"):
    """Skip-gram Word2Vec over ``stream`` (one vocabulary pass, then ``epochs`` passes). One worker repeats
    the vectors exactly for a seed on one machine; several threads interleave their updates. Each pass is
    logged with the time left (the progress bar is off when the output is not a terminal)."""
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    started = time.monotonic()

    class LogEpochs(CallbackAny2Vec):
        def __init__(self):
            self.epoch = 0

        def on_epoch_end(self, model) -> None:
            self.epoch += 1
            elapsed = time.monotonic() - started
            log.info("%s: pass %d/%d done, %.0f s, about %.0f s left", name, self.epoch + 1, epochs + 1, elapsed,
                     elapsed / (self.epoch + 1) * (epochs - self.epoch))

    model = Word2Vec(vector_size=dim, window=window, min_count=min_count, sg=1, workers=workers, seed=seed)
    model.build_vocab(corpus_iterable=stream)
    log.info("%s: pass 1/%d (vocabulary) done, %.0f s; %s tokens seen at least %d times", name, epochs + 1,
             time.monotonic() - started, f"{len(model.wv.index_to_key):,}", min_count)
    if not model.wv.index_to_key:
        raise InputError("--min-count", f"no token occurs {min_count} times: no vectors to train")
    model.train(corpus_iterable=stream, total_examples=model.corpus_count, epochs=epochs, callbacks=[LogEpochs()])
    return model.wv


def write_word2vec(path: Path, tokens: Sequence[str], vectors: np.ndarray) -> None:
    """A word2vec text file with its "count dim" header, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(tokens)} {vectors.shape[1]}\n")
        for token, row in zip(tokens, vectors):
            f.write(token + " " + " ".join(f"{x:.6f}" for x in row) + "\n")


def build_vectors(raw_files: Sequence[Path], corpus_files: Sequence[Path], lexicon: Lexicon | None, out: Path, *,
                  dim: int = 50, epochs: int = 5, min_count: int = MIN_COUNT, window: int = 5, seed: int = 1,
                  workers: int | None = None, segmenter: str = "fmm", kinds: Sequence[str] = KINDS) -> dict[str, Path]:
    """Train and write ``out/<kind>.vec`` for each kind; the paths written. ``workers``: default every core."""
    from tqdm import tqdm

    check_inputs(raw_files, corpus_files)
    workers = workers or os.cpu_count() or 1
    logging.getLogger("gensim").setLevel(logging.WARNING)  # it logs its progress every second; the bar does
    written = {}
    stream = TokenStream(raw_files, corpus_files, list)
    total = stream.size_bytes() * (epochs + 1)  # the vocabulary pass, then each epoch
    for kind in kinds:
        bar = tqdm(desc=f"{kind} vectors", total=total, unit="B", unit_scale=True, disable=None)
        stream.tokenize, stream.progress = tokenizer(kind, lexicon, segmenter), bar.update
        with bar:
            wv = train_vectors(stream, dim=dim, epochs=epochs, min_count=min_count, window=window, seed=seed,
                               workers=workers, name=f"{kind} vectors")
        written[kind] = out / f"{kind}.vec"
        write_word2vec(written[kind], list(wv.index_to_key), wv.vectors)
        log.info("vectors: %s, %s tokens -> %s", kind, f"{len(wv.index_to_key):,}", written[kind])
    return written


def check_options(dim: int, epochs: int, min_count: int, window: int, workers: int | None = None) -> None:
    """Bad values are refused before any text is read."""
    for name, value in (("dim", dim), ("epochs", epochs), ("min-count", min_count), ("window", window),
                        ("workers", 1 if workers is None else workers)):
        if value < 1:
            raise ValueError(f"--{name}={value}: expected an integer >= 1")
