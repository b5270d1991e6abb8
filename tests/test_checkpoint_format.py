"""What a model is stays apart from how it was trained: checkpoints of format 2 are read through their model
config and codec alone, so a renamed training key never orphans a model; version-1 files (the whole run config
inside) load through an upgrade. The fixtures are tiny models (80 Resume dev sentences, 6 epochs) written by
two earlier releases: 2b35611 (its config still had a ``train:`` section) and 38fc6ea (the last one writing
version 1); ``resume_test30.predict_v1.jsonl`` holds the entity spans those releases' own ``nerco predict``
gave for the first 30 sentences of Resume's test split (both gave the same)."""

import json

import pytest
import torch

from nerco_dist.checkpoint import FORMAT_VERSION, load_checkpoint, load_tensors, save_checkpoint, upgrade_v1
from nerco_dist.errors import InputError
from nerco_dist.cli import main
from nerco_dist.data.readers import read_corpus

from .conftest import REPO, TINY

FIXTURES = REPO / "tests" / "fixtures"
V1 = [FIXTURES / "checkpoint_v1_2b35611.pt", FIXTURES / "checkpoint_v1_38fc6ea.pt"]


@pytest.fixture(scope="module")
def test_text(tmp_path_factory, data_root):
    sentences = read_corpus(data_root / "resume/test.char.bmes").sentences[:30]
    folder = tmp_path_factory.mktemp("text")
    (folder / "raw.txt").write_text("".join("".join(s.chars) + "\n" for s in sentences), encoding="utf-8")
    (folder / "gold.bio").write_text("".join("".join(f"{c} {t}\n" for c, t in zip(s.chars, s.tags)) + "\n"
                                             for s in sentences), encoding="utf-8")
    return folder


def resaved(v1, tmp_path):
    """The version-1 file's upgrade written as a format-2 checkpoint."""
    payload = load_checkpoint(v1)
    path = tmp_path / f"{v1.stem}_v2.pt"
    save_checkpoint(path, **{("model_state" if k == "model" else k): v for k, v in payload.items() if k != "format"})
    assert load_tensors(path)["format"] == FORMAT_VERSION
    return path


def predicted_spans(capsys, checkpoint, raw):
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(raw)]) == 0
    return [[[e["start"], e["end"], e["type"]] for e in json.loads(line)["entities"]]
            for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("v1", V1, ids=lambda p: p.stem)
def test_version_1_checkpoints_predict_as_the_releases_that_wrote_them(v1, tmp_path, test_text, capsys):
    assert load_tensors(v1)["format"] == 1
    recorded = [json.loads(line) for line in (FIXTURES / "resume_test30.predict_v1.jsonl").read_text().splitlines()]
    assert sum(map(len, recorded)) > 20  # the fixture tags entities: a check on all-O output would prove little
    v2 = resaved(v1, tmp_path)
    assert predicted_spans(capsys, v1, test_text / "raw.txt") == recorded
    assert predicted_spans(capsys, v2, test_text / "raw.txt") == recorded
    reports, analyses = [], []
    for checkpoint in (v1, v2):
        out = tmp_path / f"{checkpoint.stem}.eval.json"
        assert main(["eval", str(checkpoint), "--data", str(test_text / "gold.bio"), "--output", str(out)]) == 0
        reports.append({k: v for k, v in json.loads(out.read_text()).items() if k != "checkpoint"})
        folder = tmp_path / f"{checkpoint.stem}_analysis"
        assert main(["analyze", "--baseline", str(checkpoint), "--nerco", str(checkpoint), "--data",
                     str(test_text / "gold.bio"), "--out", str(folder), "--tsne-tokens", "30"]) == 0
        analyses.append([(folder / name).read_text() for name in ("table4.md", "f1_by_length.csv")])
    assert reports[0] == reports[1] and reports[0]["f1"] > 0.3
    assert analyses[0] == analyses[1]


@pytest.mark.parametrize("v1", V1, ids=lambda p: p.stem)
def test_version_1_checkpoints_start_stage_2(v1, tmp_path, data_root):
    """``--init`` takes the encoder of a version-1 file as of its re-save (the tiny config's model shape)."""
    weights = {}
    for name, init in (("v1", v1), ("v2", resaved(v1, tmp_path))):
        out = tmp_path / name
        assert main(["train", str(TINY), "--data-root", str(data_root), "--stage", "finetune", "--init", str(init),
                     "--set", f"run.out_dir={out}", "--set", "data.limit=80", "--set", "finetune.full.optim.epochs=1",
                     "--set", "run.threads=1"]) == 0
        weights[name] = load_checkpoint(out / "last.pt")["model"]
    assert weights["v1"].keys() == weights["v2"].keys()
    assert all(torch.equal(weights["v1"][k], weights["v2"][k]) for k in weights["v1"])


def test_renaming_a_training_key_does_not_orphan_a_checkpoint(tmp_path, test_text, capsys):
    """A format-2 file whose provenance config is in a schema this version has never seen (every section
    renamed) predicts exactly as before: nothing but ``model_args`` and ``codec`` is read."""
    v2 = resaved(V1[1], tmp_path)
    payload = load_tensors(v2)
    renamed = {f"old_{section}": values for section, values in payload["provenance"]["config"].items()}
    payload["provenance"] = dict(config=renamed)
    torch.save(payload, tmp_path / "renamed.pt")
    assert predicted_spans(capsys, tmp_path / "renamed.pt", test_text / "raw.txt") == \
        predicted_spans(capsys, v2, test_text / "raw.txt")


def test_a_version_1_bert_checkpoint_reads_its_vocabulary_from_model_bert_once_more(tmp_path, tiny_bert):
    """Version 1 kept no BERT vocabulary: the upgrade reads vocab.txt of ``model.bert``, one token per id in
    file order; a ``model.bert`` without it is refused naming the file."""
    payload = load_tensors(V1[0])
    payload["config"]["model"]["bert"] = str(tiny_bert)
    upgraded = upgrade_v1(payload)
    lines = (tiny_bert / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert upgraded["codec"]["bert_vocab"] == lines[:-1] and lines[-1] == ""  # the file ends with a newline
    payload["config"]["model"]["bert"] = str(tmp_path)
    with pytest.raises(InputError, match=f"^{tmp_path / 'vocab.txt'}: a version-1 checkpoint of a BERT model"):
        upgrade_v1(payload)
