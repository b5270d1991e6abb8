"""Test setup: without CUDA, Triton kernels run in the interpreter on CPU tensors (with CUDA they compile,
for ``pytest -m gpu``); corpora are read from the data root."""
import os
import shutil
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a @triton.jit kernel is defined
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# One intra-op thread: the tests' tensors are small, and on a shared 2-core machine extra OpenMP threads
# spin against each other (training epochs ran several times slower with 2 threads than with 1 under load).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# As shipped, tiny.yaml trains 4 epochs so that a smoke run learns visibly (tests/test_walkthrough.py); every other
# test that trains it sets its own epochs (1 or 2), which keeps the suite fast and its exact comparisons fixed.
TINY = REPO / "configs" / "tiny.yaml"
LIMIT = 150  # tiny.yaml's data.limit
DATA_ROOT = Path(os.environ.get("NERCO_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def one_torch_thread_after():
    """Back to one thread after each test: ``nerco train``, ``eval`` and ``predict`` run in-process set torch's
    threads (``auto`` by default, which takes two cores of an idle 2-core machine)."""
    yield
    torch.set_num_threads(1)


def script_module(name: str, folder: str = "benchmarks"):
    """``FOLDER/NAME.py`` as a module (``benchmarks/`` and ``experiments/`` are not packages; their scripts
    import their neighbours)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / folder))


def stop_signals_at_their_defaults() -> None:
    """A child's ``preexec_fn``: SIGINT and SIGHUP as a terminal's foreground process starts with them. Under
    a non-interactive shell's background job (``cmd &``) SIGINT is ignored, under ``nohup`` SIGHUP; a child
    inherits that, and a training run then keeps ignoring it (as it should: ``nohup`` means it), so Ctrl-C
    and a hang-up could not be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Interrupted(Exception):
    pass


def interrupt_at(n):
    """A ``wrap_loss`` that stops the run at its ``n``-th training batch, as a kill would."""
    calls = 0

    def wrap(phase, loss):
        def wrapped(model, batch):
            nonlocal calls
            calls += 1
            if calls == n:
                raise Interrupted
            return loss(model, batch)
        return wrapped
    return wrap


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "resume").is_dir():
        message = f"corpora not found under {DATA_ROOT} (set NERCO_DATA_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DATA_ROOT


# --- shared fixtures: a tiny model trained through the CLI, the data it saw, a tiny random BERT ---------------


@pytest.fixture(scope="module")
def dev_subset(tmp_path_factory, data_root):
    """The sentences tiny.yaml trains and tests on, as a file for ``nerco eval --data``."""
    from nerco_dist.data.readers import read_corpus

    sentences = read_corpus(data_root / "resume/dev.char.bmes").sentences[:LIMIT]
    path = tmp_path_factory.mktemp("subset") / "dev150.bio"
    path.write_text("".join("".join(f"{c} {t}\n" for c, t in zip(s.chars, s.tags)) + "\n" for s in sentences),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    from nerco_dist.cli import main

    out = tmp_path_factory.mktemp("tiny")
    code = main(["train", str(TINY), "--data-root", str(data_root), "--set", f"run.out_dir={out}",
                 "--set", "finetune.full.optim.epochs=2"])
    assert code == 0
    return out


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


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory, data_root) -> Path:
    """Both stages of tiny.yaml under ZeRO 2 with tests/test_distributed.py's RUN settings, two ranks on one node
    through the deepspeed launcher, never interrupted: the output folder (and its launch.log) that every resumed
    or multi-node run of those settings must reproduce."""
    from .test_distributed import launch, nerco_train

    out = tmp_path_factory.mktemp("zero2")
    proc = launch(nerco_train(out, 2), data_root)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out
