"""``nerco analyze``: the paper's Table 4 scores, F1 by length and t-SNE plots from checkpoints."""

import json

import pytest

from nerco_dist.cli import main
from nerco_dist.data.readers import read_corpus
from nerco_dist.eval.metrics import evaluate
from nerco_dist.inference import load_for_inference, predict


PNG = b"\x89PNG\r\n\x1a\n"


def test_analyze_writes_tables_and_plots(trained, dev_subset, tmp_path):
    out = tmp_path / "analysis"
    ckpt = str(trained / "best.pt")
    assert main(["analyze", "--baseline", ckpt, "--nerco", ckpt, "--stage1", ckpt, "--data", str(dev_subset),
                 "--out", str(out), "--tsne-tokens", "120"]) == 0
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


def test_sentence_features_join_pieces(trained):
    """Features of a sentence cut into pieces equal, piece by piece, the features of each piece alone."""
    import torch

    from nerco_dist.data.readers import Sentence

    codec, model = load_for_inference(trained / "best.pt", "cpu")
    text = list("高勇，男，中国国籍，无境外居留权。" * 5)  # 85 characters > max_len 60
    whole = codec.sentence_features(model, [Sentence(text, ["O"] * len(text))], 8, torch.device("cpu"))[0]
    pieces = codec.encoder.encode([Sentence(text, ["O"] * len(text))], with_labels=False)
    assert len(pieces) == 2
    for p in pieces:
        alone = codec.sentence_features(model, [Sentence(text[p.start:p.start + p.num_chars], ["O"] * p.num_chars)], 8,
                                       torch.device("cpu"))[0]
        assert abs(whole[p.start:p.start + p.num_chars] - alone).max() < 1e-5
