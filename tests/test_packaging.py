"""The wheel installs the Triton ops as ``nerco_dist.kernels`` and no top-level ``kernels`` module: PyPI has a
package of that name, which transformers imports when it is installed, and a ``kernels`` folder at the
repository root would shadow it for every command run there. The editable install imports them from the
source tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_into_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nerco_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nerco_dist/kernels/crf.py" in names and "nerco_dist/kernels/infonce.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    assert "nerco_dist/ds_configs/zero2.json" in names  # the DeepSpeed configs travel with the package
    # a normal install of that wheel imports the kernels under the package
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "import nerco_dist.kernels as k; print(k.__file__); print(k.CRF)"],
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True)
    assert str(target) in out.stdout
    # a DeepSpeed config named as in the repository is found in the installed package, from any folder
    out = subprocess.run([sys.executable, "-c", "from nerco_dist.train.deepspeed_engine import resolve_ds_config as r; "
                          "print(r('configs/ds/zero2.json')); print(r('zero3'))"], cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(target / "nerco_dist" / "ds_configs" / f"zero{z}.json") for z in (2, 3)]


def test_editable_install_imports_kernels_from_the_source_tree():
    import nerco_dist.kernels as k

    assert Path(k.__file__).resolve() == REPO / "nerco_dist" / "kernels" / "__init__.py"
    assert hasattr(k, "CRF") and hasattr(k, "semantic_infonce")


def test_nothing_at_the_repository_root_answers_import_kernels():
    """transformers (5.25) imports the ``kernels`` package when one is installed: from the repository root it
    must not find this project's files instead."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s else None)"], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()  # .../kernels/__init__.py or .../kernels.py
    assert origin == "None" or REPO not in Path(origin).resolve().parents[:2], origin
