"""Test setup: Triton kernels run in the interpreter on CPU tensors; corpora are read from the data root."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit launch
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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
