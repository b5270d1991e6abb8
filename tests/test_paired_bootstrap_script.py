"""experiments/paired_bootstrap.py on hand-made summaries of two runs over Resume's test split: it pairs each
run's stored entities with the right gold sentences (test F1 against a hand count), and refuses summaries
that were not scored on the same split, in one line, writing nothing."""

from __future__ import annotations

import json

import pytest

from nerco_dist.config import load_config
from nerco_dist.data.readers import read_corpus
from nerco_dist.data.tags import entities

from .conftest import LIMIT, TINY, script_module


def summary(path, cfg, found) -> str:
    """A stored summary as nerco_vs_baseline.py writes one (the keys the script reads)."""
    path.write_text(json.dumps(dict(config=cfg.to_dict(), diagnostics=dict(
        test_predicted_entities=[[list(e) for e in sentence] for sentence in found]))))
    return str(path)


@pytest.fixture
def gold_entities(data_root):
    """Resume test's first LIMIT sentences' entities, read directly (tiny.yaml reads that many)."""
    sentences = read_corpus(data_root / "resume" / "test.char.bmes", "auto").sentences[:LIMIT]
    return [[(e.start, e.end, e.type) for e in entities(s.tags)] for s in sentences]


def test_the_second_runs_lead_is_scored_on_the_right_sentences(tmp_path, data_root, gold_entities):
    cfg = load_config(TINY, ["data.test=resume/test.char.bmes"], data_root=data_root)
    # run a misses every third sentence's first entity and predicts nothing else; run b finds every entity
    missing = [s[:1] if i % 3 == 0 else [] for i, s in enumerate(gold_entities)]
    found_a = [[e for e in s if e not in m] for s, m in zip(gold_entities, missing)]
    n_gold, n_missed = sum(map(len, gold_entities)), sum(map(len, missing))
    recall = (n_gold - n_missed) / n_gold
    f1_a = 2 * recall / (1 + recall)  # precision 1
    script = script_module("paired_bootstrap", "experiments")
    out = tmp_path / "out"
    assert script.main(["--run", f"a={summary(tmp_path / 'a.json', cfg, found_a)}",
                        "--run", f"b={summary(tmp_path / 'b.json', cfg, gold_entities)}",
                        "--samples", "500", "--out", str(out), "--data-root", str(data_root)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["runs"]["a"]["test_f1"] == pytest.approx(f1_a)
    assert result["runs"]["b"]["test_f1"] == 1.0
    boot = result["bootstrap"]
    assert boot["delta"] == pytest.approx(1 - f1_a) and boot["samples"] == 500
    assert 0 < boot["ci95"][0] <= boot["ci95"][1] and boot["p_b_not_better"] == 0.0
    assert out.with_suffix(".md").read_text().startswith(
        f"b against a on resume/test.char.bmes: test F1 100.00 against {100 * f1_a:.2f}")

    # b's entities with the last of every sentence that has two dropped: b's lead shrinks by a hand count
    fewer = [s[:-1] if len(s) > 1 else s for s in gold_entities]
    recall_b = sum(map(len, fewer)) / n_gold
    assert script.main(["--run", f"a={tmp_path / 'a.json'}", "--run", f"b={summary(tmp_path / 'c.json', cfg, fewer)}",
                        "--samples", "10", "--out", str(out), "--data-root", str(data_root)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["bootstrap"]["delta"] == pytest.approx(
        2 * recall_b / (1 + recall_b) - f1_a)


def test_runs_scored_on_other_splits_or_without_entities_are_refused_in_one_line(tmp_path, data_root, capsys,
                                                                                gold_entities):
    cfg = load_config(TINY, ["data.test=resume/test.char.bmes"], data_root=data_root)
    other = load_config(TINY, ["data.test=resume/dev.char.bmes"], data_root=data_root)
    a, b = summary(tmp_path / "a.json", cfg, gold_entities), summary(tmp_path / "b.json", other, gold_entities)
    # each sentence's entities moved onto the sentence before it: the first that they overrun is named
    lengths = [len(s) for s in read_corpus(data_root / "resume" / "test.char.bmes", "auto").sentences[:LIMIT]]
    overrun = next(i for i in range(LIMIT - 1) if any(e[1] > lengths[i] for e in gold_entities[i + 1]))
    shifted = summary(tmp_path / "shifted.json", cfg, gold_entities[1:] + gold_entities[:1])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(dict(config=cfg.to_dict())))
    script = script_module("paired_bootstrap", "experiments")
    out = tmp_path / "out"
    for runs, message in (
            ((a, b), f"{b}: scored on another test split than {a} (data.test, format, limit: "
                     f"('resume/dev.char.bmes', 'auto', {LIMIT}) against ('resume/test.char.bmes', 'auto', {LIMIT}))"),
            ((a, bare), f"{bare}: holds no predicted test entities: not a summary nerco_vs_baseline.py stored"),
            ((a,), "--run: two runs are compared, got 1"),
            ((a, shifted), f"{shifted}: test sentence {overrun + 1}: an entity outside its "
                           f"{lengths[overrun]} characters: the file under --data-root is not the one the run was "
                           "scored on")):
        args = [arg for i, run in enumerate(runs) for arg in ("--run", f"r{i}={run}")]
        assert script.main(args + ["--out", str(out), "--data-root", str(data_root)]) == 2
        assert capsys.readouterr().err == f"nerco: error: {message}\n"
        assert not out.with_suffix(".json").exists() and not out.with_suffix(".md").exists()
