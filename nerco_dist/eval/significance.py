"""Is one tagger better than another on the same test sentences? Paired tests over seeds and over sentences."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

from .metrics import _check_aligned, _typed_spans


def sentence_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> np.ndarray:
    """(n_sentences, 3) int64: each sentence's correct, predicted and gold entities (typed spans)."""
    _check_aligned(gold, pred)
    counts = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        gold_spans, pred_spans = _typed_spans([g]), _typed_spans([p])
        counts[i] = (len(gold_spans & pred_spans), len(pred_spans), len(gold_spans))
    return counts


def _micro_f1(counts: np.ndarray) -> np.ndarray:
    """Micro F1 of (..., 3) summed counts: 2 correct / (predicted + gold), 0 where both are 0."""
    correct, total = 2.0 * counts[..., 0], counts[..., 1] + counts[..., 2]
    return np.divide(correct, total, out=np.zeros_like(correct), where=total > 0)


def paired_bootstrap(gold: Sequence[Sequence[str]], pred_a: Sequence[Sequence[str]], pred_b: Sequence[Sequence[str]],
                     samples: int = 10_000, seed: int = 0) -> dict:
    """Berg-Kirkpatrick et al.'s paired bootstrap over test sentences: both systems scored on the same
    resampled sentence sets. ``delta`` is F1(b) - F1(a) on the full set; ``p_b_not_better`` the share of
    resamples where b does not beat a (one-sided; small means b's lead is not an accident of which sentences
    the test set drew); ``ci95`` the 2.5 and 97.5 percentiles of the resampled difference."""
    a, b = sentence_counts(gold, pred_a), sentence_counts(gold, pred_b)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(gold), size=(samples, len(gold)))              # (samples, n)
    delta = _micro_f1(b[picks].sum(axis=1)) - _micro_f1(a[picks].sum(axis=1))  # (samples,)
    return dict(delta=float(_micro_f1(b.sum(axis=0)) - _micro_f1(a.sum(axis=0))),
                p_b_not_better=float((delta <= 0).mean()),
                ci95=[float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))], samples=samples)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Student's paired t-test of b - a over matched pairs (seeds): mean difference, its standard deviation,
    t and the two-sided p-value (``None`` with fewer than two pairs or no spread)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)}: pairs are needed")
    diffs = [y - x for x, y in zip(a, b)]
    out = dict(differences=diffs, mean=statistics.mean(diffs) if diffs else None, std=None, t=None, p=None)
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return out
    from scipy import stats

    result = stats.ttest_rel(b, a)
    out.update(std=statistics.stdev(diffs), t=float(result.statistic), p=float(result.pvalue))
    if math.isnan(out["p"]):
        out["p"] = None
    return out
