"""Optional BERT: a tiny random BertConfig saved beside the real bert-base-chinese vocab; frozen epochs
leave it unchanged, unfrozen epochs train it at a fraction of the learning rate."""

import shutil

import pytest
import torch

from nerco_dist.config import load_config
from nerco_dist.train.checkpoint import load_checkpoint
from nerco_dist.train.trainer import train

from .test_cli import TINY


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, data_root):
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = data_root / "vocab" / "bert-base-chinese-vocab.txt"
    n_vocab = sum(1 for _ in open(vocab, encoding="utf-8"))
    config = BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    shutil.copy(vocab, directory / "vocab.txt")
    return directory


def bert_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("bert.")}


@pytest.mark.parametrize("freeze_epochs", [1, 0])
def test_frozen_bert_is_unchanged_and_unfrozen_bert_trains(tiny_bert, data_root, tmp_path, freeze_epochs):
    from transformers import BertModel

    cfg = load_config(TINY, [f"model.bert={tiny_bert}", f"train.bert_freeze_epochs={freeze_epochs}",
                             "train.epochs=1", f"train.out_dir={tmp_path}", "data.max_len=40"])
    train(cfg, data_root)
    trained = bert_weights(load_checkpoint(tmp_path / "last.pt")["model"])
    initial = {f"bert.{k}": v for k, v in BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).state_dict().items()}
    assert trained.keys() == initial.keys() and trained
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    if freeze_epochs:
        assert changed == []
    else:
        assert len(changed) > len(trained) // 2
