"""Entity-level NER metrics: micro and per-type P/R/F1, Span F and Type Acc, F1 by sentence length,
scores over the mentions seen and unseen in training, and recall over the mentions that touch another.

Entities are read conlleval-style by :func:`nerco_dist.data.tags.entities`, so the scores match seqeval's
default mode. Span F and Type Acc split an entity error into a boundary error and a type error (NerCo
paper, Table 4); F1 by sentence length is the paper's Figure 3.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

from nerco_dist.data.tags import entities
from nerco_dist.atomic import atomic_path

# Length buckets in characters: [0,20), [20,40), ..., [100, inf). Chinese NER test sentences mostly fall
# under 100 characters; the open last bucket keeps the long tail from producing noisy near-empty points.
DEFAULT_LENGTH_EDGES = (0, 20, 40, 60, 80, 100)

LENGTH_CSV_FIELDS = ("system", "bucket", "sentences", "gold_entities", "precision", "recall", "f1")


@dataclass
class TypeScore:
    precision: float
    recall: float
    f1: float
    support: int  # gold entities of this type


@dataclass
class NerReport:
    """Scores of one system on one corpus; fractions in [0, 1]."""

    precision: float
    recall: float
    f1: float
    span_precision: float
    span_recall: float
    span_f1: float
    type_acc: float
    n_gold: int
    n_pred: int
    n_correct: int  # predicted entities with correct span and type
    n_span_correct: int  # predicted entities with correct span, any type
    per_type: dict[str, TypeScore] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        """Plain-text table in percent, for logs and the CLI."""
        head = f"{'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"
        rule = "-" * len(head)
        lines = [head, rule]
        for name, s in sorted(self.per_type.items()):
            lines.append(_table_row(name, s.precision, s.recall, s.f1, s.support))
        lines += [
            rule,
            _table_row("micro", self.precision, self.recall, self.f1, self.n_gold),
            _table_row("span", self.span_precision, self.span_recall, self.span_f1, self.n_gold),
            f"Span F {100 * self.span_f1:.2f}   Type Acc {100 * self.type_acc:.2f} "
            f"({self.n_correct}/{self.n_span_correct} predicted entities with a correct span)",
        ]
        return "\n".join(lines)


def _table_row(name: str, p: float, r: float, f: float, support: int) -> str:
    return f"{name:<12}{100 * p:>10.2f}{100 * r:>10.2f}{100 * f:>10.2f}{support:>10d}"


def _precision_recall_f1(n_correct: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0 where undefined, as seqeval does."""
    p = n_correct / n_pred if n_pred else 0.0
    r = n_correct / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _check_aligned(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags but pred has {len(p)}")


def _typed_spans(seqs: Sequence[Sequence[str]]) -> set[tuple[int, int, int, str]]:
    """Entities of every sentence as (sentence index, start, end, type)."""
    return {(i, e.start, e.end, e.type) for i, tags in enumerate(seqs) for e in entities(tags)}


def evaluate(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> NerReport:
    """Entity-level scores of ``pred`` against ``gold`` (one tag list per sentence, BIO or any scheme)."""
    _check_aligned(gold, pred)
    gold_set, pred_set = _typed_spans(gold), _typed_spans(pred)
    correct = gold_set & pred_set

    gold_spans = {s[:3] for s in gold_set}
    pred_spans = {s[:3] for s in pred_set}
    n_span_correct = len(gold_spans & pred_spans)

    n_gold_by_type = Counter(s[3] for s in gold_set)
    n_pred_by_type = Counter(s[3] for s in pred_set)
    n_correct_by_type = Counter(s[3] for s in correct)
    per_type = {}
    for etype in sorted(n_gold_by_type.keys() | n_pred_by_type.keys()):
        p, r, f = _precision_recall_f1(n_correct_by_type[etype], n_pred_by_type[etype], n_gold_by_type[etype])
        per_type[etype] = TypeScore(p, r, f, n_gold_by_type[etype])

    p, r, f = _precision_recall_f1(len(correct), len(pred_set), len(gold_set))
    sp, sr, sf = _precision_recall_f1(n_span_correct, len(pred_spans), len(gold_spans))
    return NerReport(
        precision=p, recall=r, f1=f,
        span_precision=sp, span_recall=sr, span_f1=sf,
        type_acc=len(correct) / n_span_correct if n_span_correct else 0.0,
        n_gold=len(gold_set), n_pred=len(pred_set),
        n_correct=len(correct), n_span_correct=n_span_correct,
        per_type=per_type,
    )


def mentions(chars: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> set[str]:
    """The surface strings of the entities of a corpus (e.g. its training split)."""
    return {"".join(c[e.start : e.end]) for c, t in zip(chars, tags) for e in entities(t)}


def scores_by_seen(chars: Sequence[Sequence[str]], gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                   seen: set[str]) -> dict[str, dict]:
    """P/R/F1 over the entities whose surface string is in ``seen`` (gold and predicted alike) and over the
    others: does the model recognise new names or recall the training set's?"""
    _check_aligned(gold, pred)
    out = {}
    for group, wanted in (("seen", True), ("unseen", False)):
        def keep(spans):
            return {s for s in spans if ("".join(chars[s[0]][s[1] : s[2]]) in seen) == wanted}

        gold_set, pred_set = keep(_typed_spans(gold)), keep(_typed_spans(pred))
        p, r, f = _precision_recall_f1(len(gold_set & pred_set), len(pred_set), len(gold_set))
        out[group] = dict(precision=p, recall=r, f1=f, n_gold=len(gold_set), n_pred=len(pred_set))
    return out


def _touching(spans: set[tuple[int, int, int, str]]) -> set[tuple[int, int, int, str]]:
    """The spans that start where another ends or end where another starts, in the same sentence."""
    starts = {(s[0], s[1]) for s in spans}
    ends = {(s[0], s[2]) for s in spans}
    return {s for s in spans if (s[0], s[1]) in ends or (s[0], s[2]) in starts}


def recall_by_touching(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, dict]:
    """Recall per entity type over the gold mentions that touch another gold mention, with no character
    between them (a list of names written without separators, as MSRA's test set has), and over the others:
    ``{type: {"touching"|"alone": {n_gold, n_found, recall}}}``. Recall only: a predicted span belongs to
    neither group as such."""
    _check_aligned(gold, pred)
    gold_set, pred_set = _typed_spans(gold), _typed_spans(pred)
    touching = _touching(gold_set)
    out: dict[str, dict] = {}
    for etype in sorted({s[3] for s in gold_set}):
        out[etype] = {}
        for group, wanted in (("touching", True), ("alone", False)):
            spans = {s for s in gold_set if s[3] == etype and (s in touching) == wanted}
            found = len(spans & pred_set)
            out[etype][group] = dict(n_gold=len(spans), n_found=found, recall=found / len(spans) if spans else 0.0)
    return out


class LengthRow(NamedTuple):
    """Scores over the sentences whose character count falls in one bucket."""

    bucket: str
    sentences: int
    gold_entities: int
    precision: float
    recall: float
    f1: float


def _bucket_labels(edges: Sequence[int]) -> list[str]:
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"length edges must be non-negative and strictly increasing, got {tuple(edges)}")
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    return labels + [f"{edges[-1]}+"]


def f1_by_length(
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    edges: Sequence[int] = DEFAULT_LENGTH_EDGES,
) -> list[LengthRow]:
    """Entity P/R/F1 per sentence-length bucket ``[edges[k], edges[k+1])``, the last one open-ended.

    Length is the number of tags, i.e. characters for character-level Chinese NER. Sentences shorter than
    ``edges[0]`` are left out (none with the default edges).
    """
    labels = _bucket_labels(edges)
    _check_aligned(gold, pred)

    def bucket_of(length: int) -> int | None:
        if length < edges[0]:
            return None
        return sum(1 for e in edges[1:] if length >= e)

    bucket = [bucket_of(len(tags)) for tags in gold]
    gold_set, pred_set = _typed_spans(gold), _typed_spans(pred)
    n_sent = Counter(bucket)
    n_gold = Counter(bucket[s[0]] for s in gold_set)
    n_pred = Counter(bucket[s[0]] for s in pred_set)
    n_correct = Counter(bucket[s[0]] for s in gold_set & pred_set)
    return [
        LengthRow(label, n_sent[k], n_gold[k], *_precision_recall_f1(n_correct[k], n_pred[k], n_gold[k]))
        for k, label in enumerate(labels)
    ]


def write_length_csv(rows_by_system: dict[str, Sequence[LengthRow]], path: str | os.PathLike) -> None:
    """One CSV for all systems (long format: one row per system and bucket), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LENGTH_CSV_FIELDS)
        for system, rows in rows_by_system.items():
            for row in rows:
                # repr keeps floats exact, so the file reads back to the same numbers
                writer.writerow([system, row.bucket, row.sentences, row.gold_entities,
                                 repr(row.precision), repr(row.recall), repr(row.f1)])

