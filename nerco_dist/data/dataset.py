"""From sentences to padded lattice batches.

A sentence of n characters becomes a flat lattice: the n characters (head = tail = position) followed by
every lexicon word it contains (head, tail = the word's first and last character). Long sentences are cut
into pieces of at most ``max_len`` characters; each piece remembers where it came from so predictions on
the pieces can be joined back into whole sentences.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .lexicon import Lexicon, Match
from .readers import Sentence
from .tags import OUTSIDE, Entity, entities, repair_orphan_inside, semantic_class
from .vocab import Vocabulary

log = logging.getLogger("nerco_dist")

SENTENCE_ENDS = "。！？!?"
CLAUSE_ENDS = "，；,;"
END_BIGRAM = "</s>"


def piece_spans(chars: Sequence[str], max_len: int, protected: Sequence[Entity] = ()) -> list[tuple[int, int]]:
    """Cut a sentence into ``[start, end)`` pieces of at most ``max_len`` characters, whatever the spans: FLAT's
    attention costs the square of a piece's length, so no input may make one piece longer.

    Cuts go after a sentence end (。！？) if the window has one, else after a clause end (，；), else at the
    last allowed position; never inside a ``protected`` span (training passes the gold entities) unless the
    span is longer than ``max_len``: only such a span leaves no allowed cut in a window, and it is then cut
    as unprotected text is.
    """
    n = len(chars)
    inside = [False] * (n + 1)
    for s, e, _ in protected:
        for c in range(s + 1, e):
            inside[c] = True
    pieces, start = [], 0
    while n - start > max_len:
        window = range(start + 1, start + max_len + 1)
        allowed = [c for c in window if not inside[c]] or list(window)
        cut = allowed[-1]
        for ends in (SENTENCE_ENDS, CLAUSE_ENDS):
            hits = [c for c in allowed if chars[c - 1] in ends]
            if hits:
                cut = hits[-1]
                break
        pieces.append((start, cut))
        start = cut
    if start < n:
        pieces.append((start, n))
    return pieces


@dataclass(frozen=True)
class LabelSet:
    """BIO labels (``O`` first) and the semantic classes they map to (``O`` = class 0)."""

    labels: tuple[str, ...]
    # label -> id, built once: every encoded piece looks its tags up here
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.labels)})

    @classmethod
    def from_sentences(cls, sentences: Sequence[Sentence]) -> "LabelSet":
        tags = set().union(*(s.tags for s in sentences))
        types = sorted({semantic_class(t) for t in tags} - {OUTSIDE})
        return cls((OUTSIDE,) + tuple(f"{p}-{t}" for t in types for p in "BI"))

    @property
    def classes(self) -> tuple[str, ...]:
        return (OUTSIDE,) + tuple(sorted({semantic_class(t) for t in self.labels} - {OUTSIDE}))

    def label_to_class(self) -> list[int]:
        """For each label id, its semantic class id."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[semantic_class(t)] for t in self.labels]

    def ids(self, tags: Sequence[str], where: str = "") -> list[int]:
        try:
            return [self.index[t] for t in tags]
        except KeyError as err:
            raise ValueError(f"{where}label {err.args[0]!r} is not in the training label set") from None


@dataclass
class Vocabs:
    chars: Vocabulary
    bigrams: Vocabulary
    words: Vocabulary

    @classmethod
    def build(cls, sentences: Sequence[Sentence], lexicon: Lexicon, min_freq: int = 1,
              matches: Sequence[Sequence[Match]] | None = None) -> "Vocabs":
        """Vocabularies of the training sentences. ``matches``: their :func:`lexicon_matches`, when the caller
        also encodes them and so need not match the lexicon twice."""
        if matches is None:
            matches = lexicon_matches(sentences, lexicon)
        chars, bigrams, words = Counter(), Counter(), Counter()
        for s, found in zip(sentences, matches, strict=True):
            chars.update(s.chars)
            bigrams.update(char_bigrams(s.chars))
            words.update(m.word for m in found)
        return cls(Vocabulary.from_counts(chars, min_freq), Vocabulary.from_counts(bigrams, min_freq),
                   Vocabulary.from_counts(words, 1))

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in ("chars", "bigrams", "words")}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabs":
        return cls(*(Vocabulary.from_state_dict(state[k]) for k in ("chars", "bigrams", "words")))


def char_bigrams(chars: Sequence[str]) -> list[str]:
    return [a + b for a, b in zip(chars, list(chars[1:]) + [END_BIGRAM])]


def lexicon_matches(sentences: Sequence[Sentence], lexicon: Lexicon) -> list[list[Match]]:
    """Each sentence's lexicon words. Computed once, they serve both :meth:`Vocabs.build` and
    :meth:`LatticeEncoder.encode` of the same sentences."""
    return [lexicon.match(s.chars) for s in sentences]


def _matches_within(matches: list[Match], start: int, end: int) -> list[Match]:
    """The matches inside characters ``[start, end)``, renumbered from ``start``, in the same order: exactly
    what matching those characters alone finds, without walking the trie again."""
    if start == 0 and all(m.tail < end for m in matches):
        return matches
    return [Match(m.head - start, m.tail - start, m.word) for m in matches if m.head >= start and m.tail < end]


@dataclass
class Piece:
    """One model input: characters ``start:end`` of sentence ``sentence``."""

    sentence: int
    start: int
    char_ids: list[int]
    bigram_ids: list[int]
    word_ids: list[int]
    word_heads: list[int]
    word_tails: list[int]
    label_ids: list[int] | None
    bert_ids: list[int] | None

    @property
    def num_chars(self) -> int:
        return len(self.char_ids)

    @property
    def lattice_len(self) -> int:
        return len(self.char_ids) + len(self.word_ids)


class LatticeEncoder:
    """Turns characters (and tags) into :class:`Piece` ids; everything it needs is in its state dict, which
    every checkpoint carries (the lexicon by reference and fingerprint: a word list can be millions of words)."""

    def __init__(self, vocabs: Vocabs, lexicon: Lexicon, labels: LabelSet, max_len: int,
                 bert_vocab: dict[str, int] | None = None):
        self.vocabs, self.lexicon, self.labels, self.max_len = vocabs, lexicon, labels, max_len
        self.bert_vocab = bert_vocab

    def state_dict(self) -> dict:
        bert = sorted(self.bert_vocab, key=self.bert_vocab.get) if self.bert_vocab is not None else None
        return dict(vocabs=self.vocabs.state_dict(), labels=list(self.labels.labels), max_len=self.max_len,
                    lexicon=dict(source=self.lexicon.source, fingerprint=self.lexicon.fingerprint), bert_vocab=bert)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LatticeEncoder":
        """The encoder a checkpoint saved; its lexicon is read again from the reference, with a warning when the
        file's words are no longer those training matched against."""
        lexicon = Lexicon.load(state["lexicon"]["source"])
        if lexicon.fingerprint != state["lexicon"]["fingerprint"]:
            log.warning("lexicon %s differs from the one used in training (fingerprint %s, now %s)",
                        state["lexicon"]["source"], state["lexicon"]["fingerprint"], lexicon.fingerprint)
        bert = state.get("bert_vocab")
        return cls(Vocabs.from_state_dict(state["vocabs"]), lexicon, LabelSet(tuple(state["labels"])),
                   state["max_len"], {t: i for i, t in enumerate(bert)} if bert is not None else None)

    def encode(self, sentences: Sequence[Sentence], with_labels: bool = True, split_on_entities: bool = False,
               source: str = "", matches: Sequence[list[Match]] | None = None) -> list[Piece]:
        """Encode sentences into pieces of at most ``max_len`` characters. ``split_on_entities`` (training)
        keeps gold entities whole, except those longer than ``max_len``: they are cut, counted in one warning
        per file. A piece's tags are BIO on their own: one that begins inside an entity begins it with B-.
        ``matches``: the sentences' :func:`lexicon_matches` if the caller has them (else each sentence is
        matched here, once, and its pieces share the result)."""
        if matches is not None and len(matches) != len(sentences):
            raise ValueError(f"{len(matches)} lexicon match lists for {len(sentences)} sentences")
        pieces, cut_entities = [], Counter()
        for k, s in enumerate(sentences):
            found = matches[k] if matches is not None else self.lexicon.match(s.chars)
            protected = entities(s.tags) if split_on_entities else ()
            cut_entities[s.origin.rpartition(":")[0] or f"{source}sentences"] += sum(
                e.end - e.start > self.max_len for e in protected)
            where = f"{s.origin}: " if s.origin else f"{source}sentence {k + 1}: "
            for start, end in piece_spans(s.chars, self.max_len, protected):
                tags = repair_orphan_inside(s.tags[start:end])[0] if with_labels else None
                pieces.append(self._encode_piece(k, start, s.chars[start:end], _matches_within(found, start, end),
                                                 tags, where))
        for file, count in cut_entities.items():
            if count:
                log.warning("%s: %d %s longer than data.max_len=%d characters %s cut into pieces (the part after "
                            "each cut begins with B-)", file, count, "entity" if count == 1 else "entities",
                            self.max_len, "was" if count == 1 else "were")
        return pieces

    def _encode_piece(self, sentence_index: int, start: int, chars: list[str], matches: list[Match],
                      tags: list[str] | None, where: str) -> Piece:
        return Piece(
            sentence=sentence_index,
            start=start,
            char_ids=self.vocabs.chars.lookup(chars),
            bigram_ids=self.vocabs.bigrams.lookup(char_bigrams(chars)),
            word_ids=self.vocabs.words.lookup(m.word for m in matches),
            word_heads=[m.head for m in matches],
            word_tails=[m.tail for m in matches],
            label_ids=self.labels.ids(tags, where) if tags is not None else None,
            bert_ids=self._bert_ids(chars) if self.bert_vocab is not None else None,
        )

    def batches(self, pieces: Sequence[Piece], batch_sampler) -> "BatchIterable":
        """Padded batches of ``pieces`` in the sampler's order, with semantic class ids beside the labels."""
        return BatchIterable(pieces, batch_sampler, self.labels.label_to_class())

    def _bert_ids(self, chars: list[str]) -> list[int]:
        """[CLS] chars [SEP] in BERT's vocabulary; a character it lacks falls back to its lower case, then [UNK]."""
        vocab = self.bert_vocab
        unk = vocab["[UNK]"]
        return [vocab["[CLS]"]] + [vocab.get(c, vocab.get(c.lower(), unk)) for c in chars] + [vocab["[SEP]"]]


def collate(pieces: Sequence[Piece], label_to_class: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch. Lattice tensors are (B, L) with each sample's characters first, then its words;
    character tensors are (B, C). ``class_ids`` (semantic classes) come with labels when a map is given."""
    B = len(pieces)
    L = max(p.lattice_len for p in pieces)
    C = max(p.num_chars for p in pieces)
    char_ids = torch.zeros(B, L, dtype=torch.long)
    bigram_ids = torch.zeros(B, L, dtype=torch.long)
    word_ids = torch.zeros(B, L, dtype=torch.long)
    heads = torch.zeros(B, L, dtype=torch.long)
    tails = torch.zeros(B, L, dtype=torch.long)
    lattice_mask = torch.zeros(B, L, dtype=torch.bool)
    char_mask = torch.zeros(B, C, dtype=torch.bool)
    labels = torch.zeros(B, C, dtype=torch.long)
    for b, p in enumerate(pieces):
        n, m = p.num_chars, len(p.word_ids)
        char_ids[b, :n] = torch.tensor(p.char_ids)
        bigram_ids[b, :n] = torch.tensor(p.bigram_ids)
        word_ids[b, n : n + m] = torch.tensor(p.word_ids, dtype=torch.long)
        heads[b, :n] = tails[b, :n] = torch.arange(n)
        heads[b, n : n + m] = torch.tensor(p.word_heads, dtype=torch.long)
        tails[b, n : n + m] = torch.tensor(p.word_tails, dtype=torch.long)
        lattice_mask[b, : n + m] = True
        char_mask[b, :n] = True
        if p.label_ids is not None:
            labels[b, :n] = torch.tensor(p.label_ids)
    batch = dict(char_ids=char_ids, bigram_ids=bigram_ids, word_ids=word_ids, heads=heads, tails=tails,
                 lattice_mask=lattice_mask, char_mask=char_mask, is_char=torch.zeros(B, L, dtype=torch.bool))
    batch["is_char"][:, :C] = char_mask
    if pieces[0].label_ids is not None:
        batch["labels"] = labels
        if label_to_class is not None:
            batch["class_ids"] = torch.tensor(label_to_class)[labels].masked_fill(~char_mask, 0)
    if pieces[0].bert_ids is not None:
        bert_ids = torch.zeros(B, C + 2, dtype=torch.long)
        for b, p in enumerate(pieces):
            bert_ids[b, : len(p.bert_ids)] = torch.tensor(p.bert_ids)
        batch["bert_ids"] = bert_ids
        batch["bert_mask"] = bert_ids != 0
    return batch


class BatchIterable:
    """Re-iterable padded batches for a batch sampler (so ``len`` and ``set_epoch`` keep working)."""

    def __init__(self, pieces: Sequence[Piece], sampler, label_to_class: list[int]):
        self.pieces, self.sampler, self.label_to_class = pieces, sampler, label_to_class

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            yield collate([self.pieces[i] for i in indices], self.label_to_class)


class LengthBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar lattice length, so padding (which costs L^2 in FLAT) stays small.

    Shuffling draws a pool of ``pool_batches`` batches at a time, sorts the pool by length, cuts it into
    batches and shuffles the batches; the order is a function of (seed, epoch). An optimizer step takes
    ``world_size`` x ``grad_accum`` of them, rank ``rank`` taking every ``world_size``-th: the epoch is padded
    (by repeating its first batches) to whole steps, so every rank steps together and an epoch ends on a step.
    The batches of step k are then the same for every launch with the same ``world_size`` x ``grad_accum``
    (2 ranks, or 1 rank accumulating 2), which is what lets a run continue on another number of ranks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.pool_size = pool_batches * batch_size  # indices drawn, sorted and batched together
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: self.lengths[i])
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = random.Random(self.seed * 100003 + self.epoch)
        rng.shuffle(order)
        batches = []
        for p in range(0, len(order), self.pool_size):
            pool = sorted(order[p : p + self.pool_size], key=lambda i: self.lengths[i])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_step = self.world_size * self.grad_accum
        if per_step > 1:
            total = math.ceil(len(batches) / per_step) * per_step
            batches = [batches[i % len(batches)] for i in range(total)][self.rank :: self.world_size]
        return iter(batches)

    def __len__(self) -> int:
        per_step = self.world_size * self.grad_accum
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / per_step) * self.grad_accum

    def __repr__(self) -> str:
        return f"LengthBucketBatchSampler(n={len(self.lengths)}, batch_size={self.batch_size})"
