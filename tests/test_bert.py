"""Optional BERT: a tiny random BertConfig saved beside the real bert-base-chinese vocab; frozen epochs
(the ``frozen_bert`` phase) leave it unchanged, unfrozen ones (``full``) train it at a fraction of the learning rate."""

import pytest
import torch

from nerco_dist.config import load_config
from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.train.trainer import train

from .conftest import TINY


def bert_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("bert.")}


@pytest.mark.parametrize("phase", ["frozen_bert", "full"])
def test_frozen_bert_is_unchanged_and_unfrozen_bert_trains(tiny_bert, data_root, tmp_path, phase):
    from transformers import BertModel

    freeze_epochs = int(phase == "frozen_bert")
    cfg = load_config(TINY, [f"model.bert={tiny_bert}", f"finetune.frozen_bert.optim.epochs={freeze_epochs}",
                             f"finetune.full.optim.epochs={1 - freeze_epochs}", f"run.out_dir={tmp_path}",
                             "data.max_len=40"], data_root=data_root)
    train(cfg)
    trained = bert_weights(load_checkpoint(tmp_path / "last.pt")["model"])
    initial = {f"bert.{k}": v for k, v in BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).state_dict().items()}
    assert trained.keys() == initial.keys() and trained
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    if freeze_epochs:
        assert changed == []
    else:
        assert len(changed) > len(trained) // 2
