"""Tokens training never saw: a vector file's token reaches the model as its (unit-norm) pretrained row, a
token no file knows as the learnt ``<unk>`` row; the checkpoint carries those rows, so it loads and tags
without the vector files."""

import numpy as np
import pytest
import torch

from nerco_dist.cli import main
from nerco_dist.data.dataset import collate
from nerco_dist.data.readers import Sentence
from nerco_dist.inference import load_for_inference
from nerco_dist.model.embedding import LatticeEmbedding

from .conftest import TINY

TRAIN = ["张三在北京工作。", "李四去上海读书。", "王五住在广州。"] * 20
TAGS = {"张三": "PER", "李四": "PER", "王五": "PER", "北京": "LOC", "上海": "LOC", "广州": "LOC"}
UNSEEN_IN_FILE, UNSEEN_EVERYWHERE = "杭", "鑫"  # a character only the vector file knows, and one nobody knows


def bio_file(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for text in lines:
            tags = ["O"] * len(text)
            for mention, etype in TAGS.items():
                at = text.find(mention)
                if at >= 0:
                    tags[at : at + len(mention)] = [f"B-{etype}"] + [f"I-{etype}"] * (len(mention) - 1)
            f.write("".join(f"{c} {t}\n" for c, t in zip(text, tags)) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus_and_vectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_rows")
    bio_file(root / "train.bio", TRAIN)
    rng = np.random.default_rng(7)
    chars = sorted(set("".join(TRAIN))) + [UNSEEN_IN_FILE]
    vectors = {c: rng.normal(0, 3, size=16) for c in chars}  # norms near 12: unit-norm rows must rescale them
    with open(root / "char.vec", "w", encoding="utf-8") as f:
        f.write(f"{len(vectors)} 16\n" + "".join(c + " " + " ".join(f"{x:.6f}" for x in v) + "\n"
                                               for c, v in vectors.items()))
    return root, vectors


def train_tiny(root, out, *overrides):
    args = ["train", str(TINY), "--data-root", str(root), "--set", f"run.out_dir={out}",
            "--set", "data.train=train.bio", "--set", "data.dev=train.bio", "--set", "data.test=null",
            "--set", "data.char_vectors=char.vec", "--set", "model.word_dropout=0.2",
            "--set", "finetune.full.optim.epochs=2", "--set", "run.threads=1"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return out / "best.pt"


def rows_of(codec, model, text):
    """The character rows the model reads for ``text`` (eval mode: no word dropout)."""
    piece = codec.encode([Sentence(list(text), ["O"] * len(text))], with_labels=False)[0]
    with torch.no_grad():
        return model.char_embed(collate([piece])["char_ids"][0, : len(text)]).double()


@pytest.mark.parametrize("normalized", [True, False])
def test_unseen_tokens_read_their_pretrained_row_and_unknown_ones_the_learnt_unk(corpus_and_vectors, tmp_path,
                                                                                normalized):
    root, vectors = corpus_and_vectors
    checkpoint = train_tiny(root, tmp_path / "run", f"data.norm_embeddings={str(normalized).lower()}")
    (root / "char.vec").rename(root / "char.vec.away")  # the checkpoint must not need it
    try:
        codec, model = load_for_inference(checkpoint)
    finally:
        (root / "char.vec.away").rename(root / "char.vec")
    rows = rows_of(codec, model, UNSEEN_IN_FILE + UNSEEN_EVERYWHERE + "张")
    expected = torch.tensor(vectors[UNSEEN_IN_FILE], dtype=torch.float64)
    if normalized:
        expected = expected / expected.norm()
    assert torch.allclose(rows[0], expected, rtol=1e-3, atol=2e-3 * expected.abs().max().item())  # fp16 storage
    assert torch.equal(rows[1], model.char_embed.weight[1].double().detach())  # <unk>
    assert codec.vocabs.chars.num_frozen == 1  # the file's one character beyond the training split
    raw = tmp_path / "raw.txt"
    raw.write_text("在杭鑫工作。\n", encoding="utf-8")
    assert main(["predict", str(checkpoint), str(raw)]) == 0


def test_word_dropout_trains_the_unk_row(corpus_and_vectors, tmp_path):
    """Without word dropout ``<unk>`` never occurs in training and its row stays where it started (no weight
    decay here); with it, the row is learnt."""
    root, _ = corpus_and_vectors
    unk = {}
    for rate in (0.0, 0.2):
        _, model = load_for_inference(train_tiny(root, tmp_path / str(rate), f"model.word_dropout={rate}"))
        unk[rate] = model.char_embed.weight[1].detach()
    assert not torch.allclose(unk[0.0], unk[0.2], atol=1e-4)
    assert abs(unk[0.0].norm().item() - 1) < 1e-5  # the unit-norm start, untouched


def test_frozen_rows_take_no_gradient_and_no_optimiser_step():
    table = LatticeEmbedding(num_trained=4, num_frozen=3, dim=5)
    table.load_rows(torch.randn(4, 5) * torch.tensor([[0], [1], [1], [1]]), torch.randn(3, 5))
    frozen_before = table.frozen.clone()
    optimizer = torch.optim.AdamW(table.parameters(), lr=0.1, weight_decay=0.5)
    ids = torch.tensor([[0, 1, 2, 4, 6]])
    out = table(ids)
    # reference: each id's row read directly from the part it belongs to
    assert torch.equal(out[0, 3], table.frozen[0].float()) and torch.equal(out[0, 2], table.weight[2])
    assert not out[0, 0].any()
    out.sum().backward()
    optimizer.step()
    assert torch.equal(table.frozen, frozen_before) and table.frozen.dtype == torch.float16
    assert [n for n, _ in table.named_parameters()] == ["weight"]
    assert not table.weight.grad[3].any() and table.weight.grad[2].any()  # row 3 was not read
