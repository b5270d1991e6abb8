"""Everything that turns text into model inputs and predictions back into text: built from the training
split for a new run, restored from a checkpoint for ``eval`` and ``predict``."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import DATA_ROOT_ENV, Config, resolve_data_path
from .model.config import ModelConfig
from .data.dataset import (LabelSet, LatticeEncoder, Piece, Vocabs, collate, holdout_split, lexicon_matches,
                           split_summary)
from .data.lexicon import JIEBA, Lexicon
from .data.readers import Sentence, read_corpus
from .data.vocab import PretrainedVectors, Vocabulary, embedding_matrices
from .errors import InputError
from .model.tagger import KINDS, NerTagger

log = logging.getLogger("nerco_dist")


def read_bert_vocab(bert_dir: str) -> dict[str, int]:
    path = Path(bert_dir).expanduser() / "vocab.txt"
    if not path.is_file():
        raise InputError(path, f"model.bert={bert_dir!r} is not a local directory with vocab.txt: download the "
                               "model first (e.g. bert-base-chinese: config.json, weights, vocab.txt) and point "
                               "model.bert at that directory; nothing is downloaded at run time")
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def lexicon_reference(config_value: str | None, root: Path) -> str:
    """``data.lexicon`` with each file of a ``a+b`` union under the data root (``jieba`` stays as it is)."""
    parts = (config_value or JIEBA).split("+")
    return "+".join(p if p == JIEBA else str(resolve_data_path(p, root)) for p in parts)


@dataclass
class Splits:
    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence] | None


def read_splits(cfg: Config, root: Path) -> Splits:
    d = cfg.data
    train = _read_split("train", d.train, root, d.format)
    if d.dev:
        dev = _read_split("dev", d.dev, root, d.format)
    else:
        train, dev = holdout_split(train, d.dev_fraction, cfg.run.seed)
        log.info("no dev split: holding out %d of the training sentences (seed %d)", len(dev), cfg.run.seed)
    test = _read_split("test", d.test, root, d.format) if d.test else None
    if d.limit:
        train, dev, test = train[: d.limit], dev[: d.limit], test[: d.limit] if test else None
    if log.isEnabledFor(logging.INFO):  # rank 0: the other ranks log warnings only
        for name, sentences in (("train", train), ("dev", dev), ("test", test)):
            if sentences is not None:
                log.info("%s", split_summary(name, sentences))
    return Splits(train, dev, test)


def _read_split(split: str, path: str, root: Path, corpus_format: str) -> list[Sentence]:
    """A split's sentences; a relative path that is missing names the data root it was looked for under."""
    resolved = resolve_data_path(path, root)
    if not resolved.is_file() and not Path(path).expanduser().is_absolute():
        raise InputError(resolved, f"file not found (data.{split}={path} is relative to the data root {root}: "
                                   f"point --data-root or ${DATA_ROOT_ENV} at the folder that holds it)")
    return read_corpus(resolved, corpus_format).sentences


def read_pretrained(cfg: Config, root: Path) -> dict[str, PretrainedVectors | None]:
    """The configured vector files by kind (None where a kind has none), each read once."""
    m, d = cfg.model, cfg.data
    files = dict(char=(d.char_vectors, m.char_dim), bigram=(d.bigram_vectors, m.bigram_dim),
                 word=(d.word_vectors, m.word_dim))
    return {kind: PretrainedVectors.read(str(resolve_data_path(path, root)), dim) if path else None
            for kind, (path, dim) in files.items()}


def with_pretrained_rows(vocabs: Vocabs, pretrained: dict[str, PretrainedVectors | None],
                         unseen: bool = True) -> Vocabs:
    """The training vocabularies with (``unseen``) every other token of their vector file appended as a
    frozen row, so text training never saw (dev, test, ``predict``'s input) reads its pretrained vector, not
    ``<unk>``. What each file covers is logged: a file that misses most of the vocabulary (another
    tokenisation, the wrong file) leaves those rows random, which the scores alone would not show."""
    tables = dict(zip(KINDS, (vocabs.chars, vocabs.bigrams, vocabs.words)))
    for kind, vectors in pretrained.items():
        if vectors is None:
            continue
        vocab: Vocabulary = tables[kind]
        trained = vocab.itos[2 : vocab.num_trained]
        covered = sum(t in vectors.index for t in trained)
        if unseen:
            tables[kind] = vocab.with_frozen(vectors.index)
        log.info("%s vectors %s: %s of the vocabulary's %s %ss (%.1f%%); %s frozen pretrained rows for %ss "
                 "training never saw", kind, vectors.source, f"{covered:,}", f"{len(trained):,}", kind,
                 100 * covered / max(len(trained), 1), f"{tables[kind].num_frozen:,}", kind)
    return Vocabs(tables["char"], tables["bigram"], tables["word"])


class TextCodec:
    """Text to lattice batches and label ids back to BIO tags for one tagger (its :class:`LatticeEncoder`),
    with the model config those inputs fit. Built from the training split and the vector files for a new run;
    restored from a checkpoint's ``codec`` and ``model_args`` for ``eval`` and ``predict``."""

    def __init__(self, encoder: LatticeEncoder, model_cfg: ModelConfig,
                 pretrained: dict[str, PretrainedVectors | None] | None = None, normalize: bool = False):
        self.encoder, self.model_cfg = encoder, model_cfg
        self.pretrained, self.normalize = pretrained, normalize  # what a new model's rows start from (training)

    @property
    def labels(self) -> LabelSet:
        return self.encoder.labels

    @classmethod
    def for_training(cls, cfg: Config, train: Sequence[Sentence], root: Path) -> tuple["TextCodec", list[Piece]]:
        """A codec built from the training split, and that split encoded (cut so that no entity is split);
        each sentence is matched against the lexicon once, for the vocabulary and the lattice alike."""
        lexicon = Lexicon.load(lexicon_reference(cfg.data.lexicon, root))
        matches = lexicon_matches(train, lexicon)
        pretrained = read_pretrained(cfg, root)
        vocabs = Vocabs.build(train, lexicon, cfg.data.min_freq, matches=matches)
        labels = LabelSet.from_sentences(train)
        bert_vocab = read_bert_vocab(cfg.model.bert) if cfg.model.bert else None
        log.info("lexicon %s: %s words; in the training split %s matches, %s distinct words", lexicon.source,
                 f"{len(lexicon):,}", f"{sum(map(len, matches)):,}",
                 f"{len({m.word for found in matches for m in found}):,}")
        log.info("vocab chars %s, bigrams %s, lattice words %s; labels %s", f"{len(vocabs.chars):,}",
                 f"{len(vocabs.bigrams):,}", f"{len(vocabs.words):,}", " ".join(labels.labels))
        vocabs = with_pretrained_rows(vocabs, pretrained, cfg.data.pretrained_unseen_rows)
        encoder = LatticeEncoder(vocabs, lexicon, labels, cfg.data.max_len, bert_vocab)
        codec = cls(encoder, cfg.model, pretrained, cfg.data.norm_embeddings)
        return codec, encoder.encode(train, split_on_entities=True, source="train ", matches=matches)

    def checkpoint_sections(self) -> dict:
        """What a checkpoint needs to rebuild this codec and its model: ``model_args`` and ``codec``."""
        return dict(model_args=asdict(self.model_cfg), codec=self.encoder.state_dict())

    @classmethod
    def from_checkpoint(cls, payload: dict) -> "TextCodec":
        return cls(LatticeEncoder.from_state_dict(payload["codec"]), ModelConfig.from_args(payload["model_args"]))

    def build_model(self, seed: int = 0, *, initial_rows: bool = True) -> NerTagger:
        """A fresh tagger. Built for training, its tables start from the vector files (unit-norm rows with
        ``data.norm_embeddings``) and seeded random rows; restored from a checkpoint, or with
        ``initial_rows=False`` (weights are loaded next), they are left as torch initialises them."""
        m = self.model_cfg
        v = self.encoder.vocabs
        vocabs = dict(zip(KINDS, (v.chars, v.bigrams, v.words)))
        sizes = {kind: (vocab.num_trained, vocab.num_frozen) for kind, vocab in vocabs.items()}
        rows = None
        if self.pretrained is not None and initial_rows:
            rng = np.random.default_rng(seed)
            dims = dict(char=m.char_dim, bigram=m.bigram_dim, word=m.word_dim)
            rows = {kind: embedding_matrices(vocab, dims[kind], self.pretrained[kind], rng, self.normalize)
                    for kind, vocab in vocabs.items()}
        return NerTagger(m, sizes, self.labels.labels, rows)

    def batches(self, pieces: Sequence[Piece], batch_sampler) -> "BatchIterable":
        return BatchIterable(pieces, batch_sampler, self.labels.label_to_class())

    def _eval_batches(self, model: NerTagger, sentences: Sequence[Sentence], batch_size: int, device: torch.device):
        """Pieces of whole sentences (cut without looking at gold), in eval-mode batches of similar length."""
        pieces = self.encoder.encode(sentences, with_labels=False)
        order = sorted(range(len(pieces)), key=lambda i: pieces[i].lattice_len)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = [pieces[i] for i in order[start : start + batch_size]]
                yield chunk, {k: t.to(device) for k, t in collate(chunk).items()}
        finally:
            model.train(was_training)

    @torch.no_grad()
    def predict_tags(self, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                     device: torch.device) -> list[list[str]]:
        """BIO predictions for whole sentences: long sentences are cut into pieces and joined back."""
        predicted = [["O"] * len(s) for s in sentences]
        for chunk, batch in self._eval_batches(model, sentences, batch_size, device):
            for piece, label_ids in zip(chunk, model.predict(batch)):
                predicted[piece.sentence][piece.start : piece.start + piece.num_chars] = [
                    self.labels.labels[i] for i in label_ids]
        return predicted

    @torch.no_grad()
    def sentence_features(self, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                          device: torch.device) -> list[np.ndarray]:
        """Encoder features (n_chars, hidden) of each whole sentence, pieces joined back."""
        features = [np.zeros((len(s), model.cfg.hidden), dtype=np.float32) for s in sentences]
        for chunk, batch in self._eval_batches(model, sentences, batch_size, device):
            encoded = model.encode(batch).float().cpu().numpy()
            for b, piece in enumerate(chunk):
                features[piece.sentence][piece.start : piece.start + piece.num_chars] = encoded[b, : piece.num_chars]
        return features


class BatchIterable:
    """Re-iterable padded batches for a batch sampler (so ``len`` and ``set_epoch`` keep working)."""

    def __init__(self, pieces: Sequence[Piece], sampler, label_to_class: list[int]):
        self.pieces, self.sampler, self.label_to_class = pieces, sampler, label_to_class

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            yield collate([self.pieces[i] for i in indices], self.label_to_class)
