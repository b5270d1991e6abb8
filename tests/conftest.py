"""Test setup: Triton kernels run in the interpreter on CPU tensors; corpora are read from the data root."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit launch
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tests' tensors are small, and on a shared 2-core machine extra OpenMP threads
# spin against each other (measured: a training epoch 7x slower with 2 threads under load than with 1).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("NERCO_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "resume").is_dir():
        message = f"corpora not found under {DATA_ROOT} (set NERCO_DATA_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DATA_ROOT
