"""Entity metrics agree with seqeval (default conlleval mode), Span F / Type Acc match hand counts, plots render."""

import csv
import json
import random
import sys
import warnings

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from nerco_dist.data.tags import entities
from nerco_dist.eval.metrics import (LengthRow, evaluate, f1_by_length, mentions, recall_by_touching, scores_by_seen,
                                      write_length_csv)

TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_corpus(rng: random.Random, n_sent: int, max_len: int) -> list[list[str]]:
    """Unconstrained random tags, so I- after O and I-X after B-Y occur often."""
    return [[rng.choice(TAGS) for _ in range(rng.randint(1, max_len))] for _ in range(n_sent)]


def perturb(rng: random.Random, corpus: list[list[str]], rate: float = 0.3) -> list[list[str]]:
    """A prediction that shares most tags with gold, so scores are neither 0 nor 1."""
    return [[rng.choice(TAGS) if rng.random() < rate else t for t in sent] for sent in corpus]


def random_corpus_like(rng: random.Random, gold: list[list[str]]) -> list[list[str]]:
    """An unrelated prediction of the same shape (scores near 0, often exactly 0)."""
    return [[rng.choice(TAGS) for _ in sent] for sent in gold]


@pytest.fixture(autouse=True)
def _quiet_seqeval():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval's UndefinedMetricWarning for types never predicted
        yield


@pytest.mark.parametrize("seed", range(20))
def test_matches_seqeval_on_random_sequences(seed):
    rng = random.Random(seed)
    gold = random_corpus(rng, n_sent=rng.randint(1, 30), max_len=25)
    pred = perturb(rng, gold) if seed % 4 else random_corpus_like(rng, gold)
    report = evaluate(gold, pred)

    assert report.precision == pytest.approx(precision_score(gold, pred))
    assert report.recall == pytest.approx(recall_score(gold, pred))
    assert report.f1 == pytest.approx(f1_score(gold, pred))
    expected = classification_report(gold, pred, output_dict=True)
    types = {k for k in expected if not k.endswith(" avg")}
    assert set(report.per_type) == types
    for etype in types:
        got, want = report.per_type[etype], expected[etype]
        assert got.precision == pytest.approx(want["precision"])
        assert got.recall == pytest.approx(want["recall"])
        assert got.f1 == pytest.approx(want["f1-score"])
        assert got.support == want["support"]
    assert report.f1 == pytest.approx(expected["micro avg"]["f1-score"])


def test_ill_formed_sequences_read_as_conlleval():
    # I-PER after O starts an entity; I-LOC after B-PER ends PER and starts LOC.
    gold = [["I-PER", "I-PER", "O", "B-PER", "I-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-PER", "B-LOC", "I-LOC"]]
    # gold: PER[0,2) PER[3,4) LOC[4,6); pred: the same three entities
    report = evaluate(gold, pred)
    assert (report.n_gold, report.n_pred, report.n_correct) == (3, 3, 3)
    assert report.f1 == f1_score(gold, pred) == 1.0


def test_span_f_and_type_acc_by_hand():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-PER", "O"],  # PER[0,2) correct; [3,4) right span, wrong type
        ["B-ORG", "I-ORG", "O", "O", "B-LOC"],  # ORG[0,2) wrong span; [4,5) right span, wrong type
    ]
    # gold spans: (0,0,2) (0,3,4) (1,0,3) (1,4,5) -> 4;  pred spans: (0,0,2) (0,3,4) (1,0,2) (1,4,5) -> 4
    # span matches: (0,0,2) (0,3,4) (1,4,5) = 3  ->  span P = R = F = 3/4
    # fully correct: PER(0,0,2) only = 1  ->  P = R = F1 = 1/4;  Type Acc = 1 correct / 3 span-correct
    report = evaluate(gold, pred)
    assert report.span_precision == report.span_recall == report.span_f1 == pytest.approx(0.75)
    assert report.f1 == pytest.approx(0.25)
    assert report.type_acc == pytest.approx(1 / 3)
    assert (report.n_correct, report.n_span_correct) == (1, 3)


def test_span_f_with_unequal_counts_by_hand():
    gold = [["B-PER", "I-PER", "O", "O"]]
    pred = [["B-LOC", "I-LOC", "B-PER", "O"]]
    # gold spans {(0,0,2)}; pred spans {(0,0,2), (0,2,3)}: span P = 1/2, R = 1/1, F = 2/3
    # no entity is fully correct, one has the right span: Type Acc = 0/1
    report = evaluate(gold, pred)
    assert report.span_precision == pytest.approx(0.5)
    assert report.span_recall == pytest.approx(1.0)
    assert report.span_f1 == pytest.approx(2 / 3)
    assert report.type_acc == 0.0


def test_empty_prediction_scores_zero():
    report = evaluate([["B-PER", "O"]], [["O", "O"]])
    assert (report.precision, report.recall, report.f1, report.span_f1, report.type_acc) == (0, 0, 0, 0, 0)


def test_length_mismatch_names_sentence():
    gold = [["O", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O"], ["B-PER", "I-PER"]]
    with pytest.raises(ValueError, match="sentence 1"):
        evaluate(gold, pred)
    with pytest.raises(ValueError, match="sentence 1"):
        f1_by_length(gold, pred)
    with pytest.raises(ValueError, match="2 sentences"):
        evaluate(gold, pred[:1])


def test_report_dict_and_table():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]
    report = evaluate(gold, pred)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert d["per_type"]["ORG"]["support"] == 0
    table = report.format_table()
    for needle in ("PER", "LOC", "ORG", "micro", "Span F", "Type Acc", "50.00"):
        assert needle in table


@pytest.mark.parametrize("seed", range(5))
def test_f1_by_length_matches_seqeval_per_bucket(seed):
    rng = random.Random(100 + seed)
    gold = random_corpus(rng, n_sent=60, max_len=130)
    pred = perturb(rng, gold)
    edges = (0, 20, 40, 60, 80, 100)
    rows = f1_by_length(gold, pred, edges)
    assert [r.bucket for r in rows] == ["0-19", "20-39", "40-59", "60-79", "80-99", "100+"]
    bounds = list(zip(edges, list(edges[1:]) + [float("inf")]))
    for row, (lo, hi) in zip(rows, bounds):
        idx = [i for i, s in enumerate(gold) if lo <= len(s) < hi]
        g, p = [gold[i] for i in idx], [pred[i] for i in idx]
        assert row.sentences == len(idx)
        if not idx:
            assert (row.gold_entities, row.precision, row.recall, row.f1) == (0, 0, 0, 0)
            continue
        assert row.gold_entities == evaluate(g, p).n_gold
        assert row.precision == pytest.approx(precision_score(g, p))
        assert row.recall == pytest.approx(recall_score(g, p))
        assert row.f1 == pytest.approx(f1_score(g, p))


def test_f1_by_length_rejects_bad_edges():
    with pytest.raises(ValueError, match="strictly increasing"):
        f1_by_length([["O"]], [["O"]], edges=(0, 20, 20))


def read_length_csv(path) -> dict[str, list[LengthRow]]:
    """The CSV read back by the csv module (independently of the writer), its header checked."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["system", "bucket", "sentences", "gold_entities", "precision", "recall", "f1"]
        out: dict[str, list[LengthRow]] = {}
        for rec in reader:
            out.setdefault(rec["system"], []).append(LengthRow(
                rec["bucket"], int(rec["sentences"]), int(rec["gold_entities"]),
                float(rec["precision"]), float(rec["recall"]), float(rec["f1"])))
    return out


def test_length_csv_round_trip(tmp_path):
    rng = random.Random(7)
    gold = random_corpus(rng, n_sent=40, max_len=120)
    rows = {"baseline": f1_by_length(gold, perturb(rng, gold)), "NerCo": f1_by_length(gold, perturb(rng, gold))}
    path = tmp_path / "f1_by_length.csv"
    write_length_csv(rows, path)
    assert read_length_csv(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["f1_by_length.csv"]  # no temp file left behind


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically, no temp left


def test_plot_f1_by_length(tmp_path):
    pytest.importorskip("matplotlib")
    from nerco_dist.eval.plots import plot_f1_by_length

    rng = random.Random(3)
    gold = random_corpus(rng, n_sent=50, max_len=120)
    rows = {"baseline": f1_by_length(gold, perturb(rng, gold, 0.4)), "NerCo": f1_by_length(gold, perturb(rng, gold))}
    path = tmp_path / "f1_by_length.png"
    plot_f1_by_length(rows, path)
    _assert_png(path)


def test_plot_f1_by_length_rejects_different_test_sets(tmp_path):
    pytest.importorskip("matplotlib")
    from nerco_dist.eval.plots import plot_f1_by_length

    a = [LengthRow("0-19", 3, 4, 0.5, 0.5, 0.5)]
    b = [LengthRow("0-19", 2, 4, 0.5, 0.5, 0.5)]
    with pytest.raises(ValueError, match="sentence counts"):
        plot_f1_by_length({"baseline": a, "NerCo": b}, tmp_path / "x.png")


def test_plot_f1_by_length_leaves_empty_buckets_out(tmp_path, monkeypatch):
    """A bucket without a sentence (CLUENER has none over 50 characters) is not drawn as an F1 of 0; each
    bucket's label carries its sentence count; the figure has a title."""
    pytest.importorskip("matplotlib")
    from nerco_dist.eval import plots

    drawn = []
    monkeypatch.setattr(plots, "_save_png", lambda fig, path: drawn.append(fig))
    rows = [LengthRow("0-19", 3, 4, 0.5, 0.5, 0.5), LengthRow("20-39", 0, 0, 0.0, 0.0, 0.0),
            LengthRow("40-59", 2, 2, 1.0, 1.0, 1.0), LengthRow("60+", 0, 0, 0.0, 0.0, 0.0)]
    plots.plot_f1_by_length({"runs/a/best.pt": rows}, tmp_path / "x.png", title="F1 by sentence length, test")
    ax = drawn[0].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [50.0, 100.0] and line.get_label() == "runs/a/best.pt"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0-19\nn=3", "40-59\nn=2"]
    assert ax.get_title() == "F1 by sentence length, test"
    with pytest.raises(ValueError, match="no sentence"):
        plots.plot_f1_by_length({"x": [rows[1]]}, tmp_path / "x.png")


def test_plot_tsne(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from nerco_dist.eval.plots import plot_tsne

    rng = np.random.default_rng(0)
    labels = ["O"] * 20 + ["B-PER"] * 10 + ["I-PER"] * 10 + ["B-LOC"] * 10 + ["I-LOC"] * 10
    centres = {"O": 0.0, "PER": 3.0, "LOC": -3.0}
    features = np.stack([rng.normal(centres[t.split("-")[-1]], 1.0, size=8) for t in labels])
    path = tmp_path / "tsne.png"
    plot_tsne(features, labels, path, title="token representations")
    _assert_png(path)
    with pytest.raises(ValueError, match="do not match"):
        plot_tsne(features[:5], labels, path, title="x")


def test_plots_without_matplotlib(tmp_path, monkeypatch):
    from nerco_dist.eval.plots import plot_f1_by_length

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    rows = {"baseline": [LengthRow("0-19", 1, 1, 1.0, 1.0, 1.0)]}
    with pytest.raises(ImportError, match=r"pip install nerco-dist\[plots\]"):
        plot_f1_by_length(rows, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_scores_by_seen_split_a_hand_counted_example():
    train_chars, train_tags = [list("张三在北京")], [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    seen = mentions(train_chars, train_tags)
    assert seen == {"张三", "北京"}
    chars = [list("张三去上海"), list("李四在北京")]
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O", "O"], ["B-PER", "I-PER", "O", "B-ORG", "I-ORG"]]
    split = scores_by_seen(chars, gold, pred, seen)
    # seen gold: 张三, 北京 (LOC); seen predicted: 张三, 北京 (ORG) -> 1 correct of 2 and 2
    assert split["seen"] == dict(precision=0.5, recall=0.5, f1=0.5, n_gold=2, n_pred=2)
    # unseen gold: 上海, 李四; unseen predicted: 李四 -> 1 of 1 predicted, 1 of 2 gold
    assert split["unseen"] == dict(precision=1.0, recall=0.5, f1=2 / 3, n_gold=2, n_pred=1)


def test_recall_by_touching_splits_a_hand_counted_list_of_names():
    # 何光远|何竹康 touch (a list of names); 北京 stands alone; 李四 touches 北京 in the second sentence
    gold = [["B-PER", "I-PER", "I-PER", "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"],
            ["B-PER", "I-PER", "B-LOC", "I-LOC", "O"]]
    pred = [["B-PER", "I-PER", "I-PER", "I-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"],  # the two names merged
            ["B-PER", "I-PER", "B-LOC", "I-LOC", "O"]]
    split = recall_by_touching(gold, pred)
    assert split["PER"] == dict(touching=dict(n_gold=3, n_found=1, recall=1 / 3),
                                alone=dict(n_gold=0, n_found=0, recall=0.0))
    assert split["LOC"] == dict(touching=dict(n_gold=1, n_found=1, recall=1.0),
                                alone=dict(n_gold=1, n_found=1, recall=1.0))


@pytest.mark.parametrize("seed", range(10))
def test_recall_by_touching_agrees_with_a_pairwise_count_and_with_evaluate(seed):
    rng = random.Random(seed)
    gold = random_corpus(rng, 40, 25)
    pred = perturb(rng, gold)
    split = recall_by_touching(gold, pred)
    report = evaluate(gold, pred)
    pred_spans = {(i, e.start, e.end, e.type) for i, tags in enumerate(pred) for e in entities(tags)}
    expected = {}
    for i, tags in enumerate(gold):
        spans = list(entities(tags))
        for e in spans:
            touching = any(o is not e and (o.end == e.start or o.start == e.end) for o in spans)
            group = expected.setdefault(e.type, {}).setdefault("touching" if touching else "alone", [0, 0])
            group[0] += 1
            group[1] += (i, e.start, e.end, e.type) in pred_spans
    for etype, groups in split.items():
        for name, counts in groups.items():
            assert [counts["n_gold"], counts["n_found"]] == expected[etype].get(name, [0, 0])
        assert sum(g["n_gold"] for g in groups.values()) == report.per_type[etype].support
        found = sum(g["n_found"] for g in groups.values())
        assert found / report.per_type[etype].support == pytest.approx(report.per_type[etype].recall)
