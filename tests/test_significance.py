"""Paired significance tests: the bootstrap against a loop over the same resamples scored by ``evaluate``; the
t-test against the closed form of Student's t with two degrees of freedom."""

import math
import random

import numpy as np
import pytest

from nerco_dist.eval.metrics import evaluate
from nerco_dist.eval.significance import paired_bootstrap, paired_t_test


def random_tags(rng, n):
    return [rng.choice(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]) for _ in range(n)]


def test_paired_bootstrap_equals_scoring_each_resample_with_evaluate():
    rng = random.Random(3)
    gold = [random_tags(rng, rng.randint(1, 12)) for _ in range(25)]
    pred_a = [random_tags(rng, len(g)) for g in gold]
    pred_b = [g if rng.random() < 0.6 else random_tags(rng, len(g)) for g in gold]  # b is the better one
    result = paired_bootstrap(gold, pred_a, pred_b, samples=200, seed=5)
    picks = np.random.default_rng(5).integers(0, len(gold), size=(200, len(gold)))
    deltas = []
    for pick in picks:
        sample = lambda seqs: [seqs[i] for i in pick]  # noqa: E731
        deltas.append(evaluate(sample(gold), sample(pred_b)).f1 - evaluate(sample(gold), sample(pred_a)).f1)
    assert result["delta"] == pytest.approx(evaluate(gold, pred_b).f1 - evaluate(gold, pred_a).f1, abs=1e-12)
    assert result["p_b_not_better"] == pytest.approx(np.mean(np.array(deltas) <= 0))
    assert result["ci95"] == pytest.approx([np.percentile(deltas, 2.5), np.percentile(deltas, 97.5)])
    assert result["delta"] > 0 and result["p_b_not_better"] < 0.05


def test_paired_t_test_matches_the_closed_form_for_three_pairs():
    a, b = [50.0, 51.0, 52.0], [51.0, 53.0, 55.0]  # differences 1, 2, 3: mean 2, std 1
    result = paired_t_test(a, b)
    t = 2 / (1 / math.sqrt(3))
    assert result["t"] == pytest.approx(t) and result["mean"] == 2 and result["std"] == 1
    assert result["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))  # two-sided, 2 degrees of freedom
    assert paired_t_test([1.0], [2.0])["p"] is None
    with pytest.raises(ValueError, match="pairs"):
        paired_t_test([1.0, 2.0], [1.0])
