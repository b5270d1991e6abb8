#!/usr/bin/env bash
# The kernel and model tests with the GPU image's versions (Python 3.12, torch 2.11, Triton 3.6,
# transformers 5.17) beside the project's own: built once into a git-ignored venv (.venv-image/, rebuilt when
# the versions below change), then the tests, the Triton kernels in the interpreter when there is no GPU.
#
#   .ci/image_versions.sh [PYTEST_ARGS...]    # IMAGE_PYTHON=/path/to/python3.12 if it is not found
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-image
PYTHON_VERSION=3.12
# The image's versions. The index has no CPU build of torch 2.11: this is its CUDA build (with the CUDA
# libraries it requires: the venv is about 5 GB), which runs on the CPU as well.
IMAGE=(torch==2.11.0 triton==3.6.0 transformers==5.17.0)
# The other packages the tests need, unpinned like CI's. NumPy stays below 2.4: Triton 3.6's interpreter turns
# a loop bound into an int with int() of a one-element array, an error since NumPy 2.4, so every kernel with a
# runtime loop would fail under TRITON_INTERPRET=1 (triton-lang/triton#9171, fixed in Triton 3.7; compiled
# kernels are unaffected). jieba: tiny.yaml's lexicon. pytorch-crf: the CRF tests' reference.
OTHERS=("numpy>=1.24,<2.4" pyyaml tqdm tensorboard jieba pytest seqeval pytorch-crf)
TESTS=(tests/test_crf.py tests/test_infonce_kernel.py tests/test_losses.py tests/test_flat.py tests/test_bert.py
       tests/test_stages.py::test_frozen_bert_is_unchanged_after_stage_one)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # a command's output only if it fails (without this machine's notes on missing index folders)
    "$@" >"$log" 2>&1 || { grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 30 >&2; exit 1; }
}

find_python() {  # IMAGE_PYTHON, python3.12 on the PATH, or pyenv's 3.12 (its shim answers only for selected versions)
    local candidate check='import sys; sys.exit("%d.%d" % sys.version_info[:2] != sys.argv[1])'
    for candidate in "${IMAGE_PYTHON:-}" "python$PYTHON_VERSION" \
                     "$(pyenv prefix "$PYTHON_VERSION" 2>/dev/null)/bin/python$PYTHON_VERSION"; do
        if [[ -n $candidate ]] && "$candidate" -c "$check" "$PYTHON_VERSION" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "image_versions.sh: no Python $PYTHON_VERSION found (set IMAGE_PYTHON)" >&2
    exit 1
}

spec="python $PYTHON_VERSION ${IMAGE[*]} ${OTHERS[*]}"
if [[ $(cat "$VENV/.image-spec" 2>/dev/null) != "$spec" ]]; then
    python=$(find_python)
    echo "building $VENV: $python, ${IMAGE[*]}"
    quiet "$python" -m venv --clear "$VENV"
    quiet "$VENV/bin/python" -m pip install --upgrade pip
    # seqeval's source package builds its version with setuptools_scm, so that comes first; torch 2.11 wants
    # setuptools<82
    quiet "$VENV/bin/python" -m pip install "setuptools<82" setuptools_scm wheel
    quiet "$VENV/bin/python" -m pip install --no-build-isolation "${IMAGE[@]}" "${OTHERS[@]}"
    echo "$spec" >"$VENV/.image-spec"
fi
# the project, editable, without its requirements (DeepSpeed: not in the image; it and gensim are not needed
# here); again when the installed one is another checkout's
here='import os, sys, nerco_dist.kernels as k; sys.exit(not k.__file__.startswith(os.getcwd() + os.sep))'
if ! "$VENV/bin/python" -c "$here" 2>/dev/null; then
    quiet "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -e .
fi

export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-"$(cd .. && pwd)/shared/data"}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
"$VENV/bin/python" - <<'EOF'
import platform, numpy, torch, transformers, triton
print(f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
EOF
# the warning NumPy < 2.4 gives for the conversion above, once per loop of every interpreted kernel
"$VENV/bin/python" -m pytest -q -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" \
    "${TESTS[@]}" "$@"
