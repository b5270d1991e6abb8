"""What a training run reads, from its config: the splits, the lexicon, the vector files, and the text codec
built from the training split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Sequence

from ..config import DATA_ROOT_ENV, Config
from ..data.dataset import LabelSet, LatticeEncoder, Piece, Vocabs, lexicon_matches
from ..data.lexicon import Lexicon
from ..data.readers import Sentence, read_bert_vocab
from ..data.splits import Splits, read_splits
from ..data.vocab import PretrainedVectors, Vocabulary
from ..errors import InputError
from ..model.tagger import KINDS

log = logging.getLogger("nerco_dist")


def read_config_splits(cfg: Config) -> Splits:
    """The config's splits; a relative path that is missing names the data root it was looked for under, and
    how to set it."""
    d = cfg.data
    for split in ("train", "dev", "test"):
        written = getattr(d, split)
        path = d.path(written)
        if written and not path.is_file() and not Path(written).expanduser().is_absolute():
            raise InputError(path, f"file not found (data.{split}={written} is relative to the data root {d.root}: "
                                   f"point --data-root or ${DATA_ROOT_ENV} at the folder that holds it)")
    return read_splits(d.path(d.train), d.path(d.dev), d.path(d.test), corpus_format=d.format,
                       dev_fraction=d.dev_fraction, limit=d.limit, seed=cfg.run.seed)


def read_pretrained(cfg: Config) -> dict[str, PretrainedVectors | None]:
    """The configured vector files by kind (None where a kind has none), each read once."""
    m, d = cfg.model, cfg.data
    files = dict(char=(d.char_vectors, m.char_dim), bigram=(d.bigram_vectors, m.bigram_dim),
                 word=(d.word_vectors, m.word_dim))
    return {kind: PretrainedVectors.read(str(d.path(path)), dim) if path else None
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


def codec_for_training(cfg: Config, train: Sequence[Sentence],
                       pretrained: dict[str, PretrainedVectors | None]) -> tuple[LatticeEncoder, list[Piece]]:
    """The text codec built from the training split, and that split encoded (cut so that no entity is split);
    each sentence is matched against the lexicon once, for the vocabulary and the lattice alike."""
    lexicon = Lexicon.load(cfg.data.lexicon_reference())
    matches = lexicon_matches(train, lexicon)
    vocabs = Vocabs.build(train, lexicon, cfg.data.min_freq, matches=matches)
    labels = LabelSet.from_sentences(train)
    bert_vocab = read_bert_vocab(cfg.model.bert) if cfg.model.bert else None
    log.info("lexicon %s: %s words; in the training split %s matches, %s distinct words", lexicon.source,
             f"{len(lexicon):,}", f"{sum(map(len, matches)):,}", f"{len({m.word for found in matches for m in found}):,}")
    log.info("vocab chars %s, bigrams %s, lattice words %s; labels %s", f"{len(vocabs.chars):,}",
             f"{len(vocabs.bigrams):,}", f"{len(vocabs.words):,}", " ".join(labels.labels))
    vocabs = with_pretrained_rows(vocabs, pretrained, cfg.data.pretrained_unseen_rows)
    codec = LatticeEncoder(vocabs, lexicon, labels, cfg.data.max_len, bert_vocab)
    return codec, codec.encode(train, split_on_entities=True, source="train ", matches=matches)


class TrainingInputs(NamedTuple):
    splits: Splits
    codec: LatticeEncoder
    train_pieces: list[Piece]
    pretrained: dict[str, PretrainedVectors | None]  # what a new model's rows start from


def read_training_inputs(cfg: Config) -> TrainingInputs:
    """Everything a training run reads before its first model: splits, vectors, codec, encoded training split."""
    splits = read_config_splits(cfg)
    pretrained = read_pretrained(cfg)
    codec, pieces = codec_for_training(cfg, splits.train, pretrained)
    return TrainingInputs(splits, codec, pieces, pretrained)
