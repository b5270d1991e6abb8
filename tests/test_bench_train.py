"""The training benchmark times what it says: its BERT-base-shaped encoder, built by bench_train.py's own functions,
is a 12 x 768 BERT of over 100M parameters that reads the batch's BERT ids, and its FLAT encoder has no BERT.
On the tiny config (the corpus only sizes FLAT's embeddings; the benchmark reads MSRA)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from nerco_dist.config import load_config
from nerco_dist.train.run import TrainingRun

from .conftest import TINY, script_module


@pytest.fixture(scope="module")
def bench_train():
    """benchmarks/bench_train.py as a module (benchmarks/ is not a package; it imports its neighbour common.py)."""
    tqdm_disable = os.environ.get("TQDM_DISABLE")  # set by the module for its own runs
    try:
        return script_module("bench_train")
    finally:
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_bert_base_shaped_encoder_is_bert_base_and_reads_the_batch_bert_ids(bench_train, data_root, tmp_path):
    vocab = data_root / "vocab" / "bert-base-chinese-vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:  # 400 MB of weights: gone when the test ends
        bert = bench_train.random_bert(Path(tmp) / "bert", vocab, *bench_train.BERT_BASE)
        built = {}
        for name, extra in bench_train.encoders(bert, quick=False):
            cfg = load_config(TINY, [*bench_train.NO_VECTORS, *extra, f"run.out_dir={tmp_path / name}"],
                              data_root=data_root)
            run = TrainingRun.start(cfg)
            built[name] = run, run.initial_model(None)
    assert set(built) == {"flat", "flat+bert-base-shaped"}
    run, model = built["flat+bert-base-shaped"]
    flat = built["flat"][1]
    assert (model.bert.config.num_hidden_layers, model.bert.config.hidden_size) == (12, 768)
    assert parameters(model) > 100e6
    assert flat.bert is None and parameters(flat) < parameters(model) / 50

    batch = next(iter(run.train_batches(8)))
    seen = []
    hook = model.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0]),
        with_kwargs=True)
    model.eval()
    with torch.no_grad():
        model.encode(batch)
    hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], batch["bert_ids"])

    # ... and those are BERT's ids of the batch's characters: [CLS] chars [SEP], the characters in BERT's vocabulary
    tokens = vocab.read_text(encoding="utf-8").split("\n")  # not splitlines(): some tokens are line separators
    chars = run.codec.vocabs.chars.itos
    same = compared = 0
    for row, n in enumerate(batch["char_mask"].sum(1).tolist()):
        ids = batch["bert_ids"][row].tolist()
        assert (tokens[ids[0]], tokens[ids[n + 1]]) == ("[CLS]", "[SEP]")
        for char_id, bert_id in zip(batch["char_ids"][row, :n].tolist(), ids[1 : n + 1]):
            char, token = chars[char_id], tokens[bert_id]
            if token != "[UNK]" and char_id > 1:  # neither side's unknown
                compared += 1
                same += token in (char, char.lower())
    assert compared > 0.9 * batch["char_mask"].sum().item() and same == compared


@pytest.mark.parametrize("updates", ["dense", "rows"])
def test_flat_alone_times_its_full_phase_with_both_table_updates(bench_train, data_root, tmp_path, updates):
    cfg = load_config(TINY, [*bench_train.NO_VECTORS, "contrastive.enabled=true", f"run.out_dir={tmp_path}",
                             f"contrastive.phase.optim.table_updates={updates}",
                             f"finetune.full.optim.table_updates={updates}"], data_root=data_root)
    run = TrainingRun.start(cfg)
    timed = [(p.stage, p.name, p.optim.table_updates) for p in bench_train.grid_phases(run, flat_alone=True)]
    other = {"dense": "rows", "rows": "dense"}[updates]
    assert timed == [("contrastive", "contrastive", updates), ("finetune", "full", updates),
                     ("finetune", "full", other)]
    assert timed[:2] == [(p.stage, p.name, p.optim.table_updates)
                         for p in bench_train.grid_phases(run, flat_alone=False)]
