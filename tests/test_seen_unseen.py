"""experiments/seen_unseen.py on a trained smoke run: its seen and unseen counts add up to the split's
mentions and to the run's own test score, and the unseen share is what a direct count of the files says."""

from __future__ import annotations

import json

import pytest

from nerco_dist.config import load_config
from nerco_dist.data.readers import read_corpus
from nerco_dist.data.tags import entities
from nerco_dist.train.trainer import train

from .conftest import TINY, script_module


def strings(path) -> list[str]:
    """The mentions of the first 150 sentences of a corpus file (the tiny config's limit), read directly."""
    sentences = read_corpus(path, "auto").sentences[:150]
    return ["".join(s.chars[e.start : e.end]) for s in sentences for e in entities(s.tags)]


def test_seen_and_unseen_add_up_to_the_run_and_the_files(tmp_path, data_root, capsys):
    # train = dev = Resume's dev (150 sentences); test = Resume's test: some of its mentions are new
    cfg = load_config(TINY, ["data.test=resume/test.char.bmes", "finetune.full.optim.epochs=1", "run.threads=1",
                             f"run.out_dir={tmp_path / 'run'}"], data_root=data_root)
    results = train(cfg)
    seen_unseen = script_module("seen_unseen", "experiments")
    assert seen_unseen.main(["--run", f"tiny={tmp_path / 'run'}", "--out", str(tmp_path / "out"),
                             "--data-root", str(data_root)]) == 0
    report = json.loads((tmp_path / "out.json").read_text())["runs"]["tiny"]

    train_mentions = set(strings(data_root / "resume" / "dev.char.bmes"))
    test_mentions = strings(data_root / "resume" / "test.char.bmes")
    unseen = sum(m not in train_mentions for m in test_mentions)
    assert report["dev"]["unseen"]["n_gold"] == 0 and report["dev"]["unseen_share"] == 0
    assert report["test"]["unseen"]["n_gold"] == unseen > 0
    assert report["test"]["seen"]["n_gold"] + unseen == len(test_mentions)
    assert report["test"]["unseen_share"] == pytest.approx(unseen / len(test_mentions))

    # the run's own test P/R/F1, put together from the two groups' counts
    groups = [report["test"][g] for g in ("seen", "unseen")]
    correct = sum(round(g["recall"] * g["n_gold"]) for g in groups)
    predicted, gold = sum(g["n_pred"] for g in groups), sum(g["n_gold"] for g in groups)
    precision, recall = correct / predicted, correct / gold
    assert results["test"]["precision"] == pytest.approx(precision)
    assert results["test"]["recall"] == pytest.approx(recall)
    assert "| tiny | test |" in capsys.readouterr().out

    # mentions touching another, per type, counted pairwise on the file; their recalls add up to the run's
    touching = {}
    for sentence in read_corpus(data_root / "resume" / "test.char.bmes", "auto").sentences[:150]:
        spans = list(entities(sentence.tags))
        for e in spans:
            touches = any(o is not e and (o.end == e.start or o.start == e.end) for o in spans)
            touching.setdefault(e.type, [0, 0])[0 if touches else 1] += 1
    by_type = report["test"]["touching"]
    assert {t: [g["touching"]["n_gold"], g["alone"]["n_gold"]] for t, g in by_type.items()} == touching
    assert sum(c[0] for c in touching.values()) > 0
    assert sum(g[k]["n_found"] for g in by_type.values() for k in g) == correct
    assert report["train"]["touching"].keys() == {e.type for s in read_corpus(
        data_root / "resume" / "dev.char.bmes", "auto").sentences[:150] for e in entities(s.tags)}


def test_lexicon_coverage_counts_the_new_dev_mentions_each_lexicon_holds(tmp_path, data_root, capsys):
    # train = Resume's dev (150 sentences), dev = Resume's test: some dev mentions are new
    cfg = load_config(TINY, ["data.dev=resume/test.char.bmes", "data.test=null", "finetune.full.optim.epochs=1",
                             "run.threads=1", f"run.out_dir={tmp_path / 'run'}"], data_root=data_root)
    train(cfg)
    train_mentions = set(strings(data_root / "resume" / "dev.char.bmes"))
    new = sorted({m for m in strings(data_root / "resume" / "test.char.bmes") if m not in train_mentions})
    held = [m for m in new if len(m) >= 2][::3]  # a lattice word has two characters or more
    words = tmp_path / "words.txt"
    words.write_text("\n".join(held + sorted(train_mentions)) + "\n", encoding="utf-8")
    seen_unseen = script_module("seen_unseen", "experiments")
    assert seen_unseen.main(["--run", f"tiny={tmp_path / 'run'}", "--out", str(tmp_path / "out"),
                             "--lexicon", f"mine={words}", "--lexicon", f"with jieba=jieba+{words}",
                             "--data-root", str(data_root)]) == 0
    coverage = json.loads((tmp_path / "out.json").read_text())["lexicon_coverage_of_unseen_dev_mentions"]
    assert coverage["mine"] == dict(lexicon=str(words), unseen_dev_mentions=len(new), held=len(held),
                                    share=pytest.approx(len(held) / len(new)))
    assert len(held) <= coverage["with jieba"]["held"] <= len(new)
    assert f"| mine | {len(held)} of {len(new)} " in capsys.readouterr().out


def test_a_folder_that_is_not_a_finished_run_is_refused_in_one_line(tmp_path, capsys):
    seen_unseen = script_module("seen_unseen", "experiments")
    assert seen_unseen.main(["--run", f"x={tmp_path}", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"nerco: error: {tmp_path / 'results.json'}: not found: not a finished run folder (run.out_dir)\n"
    assert not (tmp_path / "out.json").exists()
