"""``nerco analyze``: the paper's Table 4 scores, F1 by length and t-SNE plots from checkpoints."""

import json
import re
import subprocess
import sys

import pytest

from nerco_dist.data.readers import read_corpus
from nerco_dist.eval.metrics import evaluate
from nerco_dist.inference import load_for_inference, predict, sentence_features

from .conftest import LIMIT

PNG = b"\x89PNG\r\n\x1a\n"
TSNE_TOKENS = 120


@pytest.fixture(scope="module")
def analysis(trained, dev_subset, tmp_path_factory):
    """``nerco analyze`` of the tiny model as all three checkpoints, run as a user runs it: its output folder
    and its stderr."""
    out = tmp_path_factory.mktemp("analysis")
    ckpt = str(trained / "best.pt")
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "analyze", "--baseline", ckpt, "--nerco", ckpt,
                           "--stage1", ckpt, "--data", str(dev_subset), "--out", str(out),
                           "--tsne-tokens", str(TSNE_TOKENS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_analyze_writes_tables_and_plots(analysis, trained, dev_subset):
    out, _ = analysis
    table = json.loads((out / "table4.json").read_text())["scores"]
    sentences = read_corpus(dev_subset).sentences
    codec, model = load_for_inference(trained / "best.pt", "cpu")
    report = evaluate([s.tags for s in sentences], predict(codec, model, sentences, 32))
    for name in ("baseline", "NerCo"):
        assert table[name]["span_f"] == pytest.approx(report.span_f1)
        assert table[name]["type_acc"] == pytest.approx(report.type_acc)
    for png in ("f1_by_length.png", "tsne_baseline.png", "tsne_after_stage_1.png", "tsne_nerco_after_stage_2.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert (out / "f1_by_length.csv").read_text().count("baseline") == 6


def test_analyze_logs_each_step_on_stderr_as_it_starts_and_ends(analysis, dev_subset):
    """Minutes of t-SNE on a full test set are not silent: every step, in order, then the total."""
    out, stderr = analysis
    progress = [line.partition(" INFO ")[2] for line in stderr.splitlines() if " INFO analyze: " in line]
    steps = [f"scoring baseline on {dev_subset.name} ({LIMIT} sentences, 1/2)",
             f"scoring NerCo on {dev_subset.name} ({LIMIT} sentences, 2/2)", "plotting F1 by length",
             *(f"t-SNE of {TSNE_TOKENS} entity tokens, {view} ({k}/3)"
               for k, view in enumerate(("baseline", "after stage 1", "NerCo after stage 2"), 1))]
    expected = [pattern for step in steps for pattern in (re.escape(f"analyze: {step}..."),
                                                           re.escape(f"analyze: {step} done in ") + r"\d+\.\d s")]
    expected.append(re.escape(f"analyze: written to {out} in ") + r"\d+\.\d s")
    assert len(progress) == len(expected), stderr[-3000:]
    for line, pattern in zip(progress, expected):
        assert re.fullmatch(pattern, line), (line, pattern)


def test_sentence_features_join_pieces(trained):
    """Features of a sentence cut into pieces equal, piece by piece, the features of each piece alone."""
    import torch

    from nerco_dist.data.readers import Sentence

    codec, model = load_for_inference(trained / "best.pt", "cpu")
    text = list("高勇，男，中国国籍，无境外居留权。" * 5)  # 85 characters > max_len 60
    whole = sentence_features(codec, model, [Sentence(text, ["O"] * len(text))], 8, torch.device("cpu"))[0]
    pieces = codec.encode([Sentence(text, ["O"] * len(text))], with_labels=False)
    assert len(pieces) == 2
    for p in pieces:
        alone = sentence_features(codec, model, [Sentence(text[p.start:p.start + p.num_chars], ["O"] * p.num_chars)], 8,
                                       torch.device("cpu"))[0]
        assert abs(whole[p.start:p.start + p.num_chars] - alone).max() < 1e-5


def test_analyze_refuses_a_file_with_too_few_entity_characters_before_writing(trained, tmp_path):
    data = tmp_path / "noent.bmes"
    data.write_text("中 O\n国 O\n\n北 B-LOC\n京 I-LOC\n", encoding="utf-8")
    ckpt = str(trained / "best.pt")
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "analyze", "--baseline", ckpt, "--nerco", ckpt,
                           "--data", str(data), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines()[-1] == (f"nerco: error: {data}: 2 gold entity characters: the analysis "
                                                    "needs at least 4")
