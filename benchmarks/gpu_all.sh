#!/usr/bin/env bash
# Every GPU check and benchmark in one device call, most valuable first:
#   setup    a venv over the image's Python with the carried wheels (.whl/) and the project (editable)
#   tests    python3 -m pytest -m gpu: the compiled kernels against float64 references, bf16 included
#   crf      benchmarks/bench_crf.py       infonce  benchmarks/bench_infonce.py
#   train    benchmarks/bench_train.py (reads msra/ and vocab/ from .gpu-data/)
# Each stage runs under its own time limit (LIMIT below; the script refuses to start if they sum to more than
# MAX_TOTAL, which leaves the device tool's 600 s room to copy). The benchmarks rewrite their JSON after every
# row, so a stage cut short keeps what it measured. Whatever happens, $OUT ends with two files: summary.log
# (all this script prints: a few lines per stage) and gpu_results.tar.gz (the JSONs, the tests' junit XML,
# each stage's full log). Exit status 1 if a stage failed, ran out of time or left out its results file (WRITES).
#
#   bash benchmarks/gpu_all.sh [--dry-run] [STAGE...]    # STAGE...: only these (setup always runs)
#   bash benchmarks/gpu_all.sh --limits                  # the stage limits, then exit
#
# Prepare on the CPU machine with benchmarks/prepare_gpu.sh (see benchmarks/README.md). --dry-run is the same
# script on a CPU: kernels in the Triton interpreter, DeepSpeed on its CPU accelerator, the benchmarks'
# --quick sizes, the gpu tests collected and skipped (no CUDA), the active environment used as it is unless
# its Python is the wheels' 3.12, $OUT a new temporary folder unless set. It checks that every stage runs and
# writes its files, not the GPU's times: a stage may take DRY_RUN_FACTOR times its limit (a guard against a
# hang), and one over its GPU limit is reported as such without failing the run.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=(setup tests crf infonce train)
declare -A LIMIT=([setup]=40 [tests]=125 [crf]=50 [infonce]=100 [train]=205)
MAX_TOTAL=520
DRY_RUN_FACTOR=10  # a dry run's stage limit, in GPU limits: interpreted kernels on a busy CPU took 2x and more
# what each stage leaves in the results folder when it succeeds (a glob)
declare -A WRITES=([setup]=setup.log [tests]=gpu_tests.xml [crf]='crf_*.json' [infonce]='infonce_*.json'
                   [train]='train_*.json')
WHEEL_PYTHON=3.12  # the GPU image's Python, the one benchmarks/prepare_gpu.sh fetches wheels for

total=0
for stage in "${STAGES[@]}"; do total=$((total + LIMIT[$stage])); done
if ((total > MAX_TOTAL)); then
    echo "gpu_all.sh: the stage limits sum to ${total} s, over ${MAX_TOTAL} s: lower one" >&2
    exit 2
fi

dry_run=0
selected=()
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        --limits)
            for stage in "${STAGES[@]}"; do echo "$stage ${LIMIT[$stage]}"; done
            echo "total $total (at most $MAX_TOTAL)"
            exit 0 ;;
        *) [[ -v "LIMIT[$arg]" ]] || { echo "gpu_all.sh: unknown stage or option '$arg' (stages: ${STAGES[*]})" >&2; exit 2; }
           selected+=("$arg") ;;
    esac
done
((${#selected[@]})) || selected=("${STAGES[@]}")

export REPO=$PWD DRY_RUN=$dry_run WHEEL_PYTHON TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export WORK=$(mktemp -d "${TMPDIR:-/tmp}/nerco-gpu.XXXXXX")
export RES=$WORK/results ENV=$WORK/venv
mkdir -p "$RES"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nerco-gpu-out.XXXXXX")}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.log
: >"$SUMMARY"

if ((dry_run)); then
    export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu DEVICE=cpu QUICK=--quick
    export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-$REPO/../shared/data}
else
    unset TRITON_INTERPRET DS_ACCELERATOR  # compiled kernels; DeepSpeed finds the GPU
    export DEVICE=cuda QUICK=
    export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-$REPO/.gpu-data}
fi
# Install into a venv of our own only with wheels to install and a Python they fit (always on the GPU image).
install=1
if ((dry_run)) && { [[ ! -d .whl ]] || ! python3 -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$WHEEL_PYTHON')"; }; then
    install=0
fi
export INSTALL=$install

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

collect() {  # the results so far into $OUT; run after every stage and at exit, so even a kill leaves them
    tar -czf "$OUT/.gpu_results.tar.gz.part" -C "$WORK" results && mv -f "$OUT/.gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
}
trap 'collect; rm -rf "$WORK"' EXIT
stage_pid=
trap '[[ -n $stage_pid ]] && kill $stage_pid; say "gpu_all.sh: interrupted"; exit 130' INT TERM

# --- the stages: each runs as `bash -c stage_NAME` under `timeout`, its output in $RES/NAME.log ------------------

stage_setup() {
    set -e
    python3 -VV
    if ((DRY_RUN == 0)); then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        [[ -d .whl ]] || { echo "no .whl/: run benchmarks/prepare_gpu.sh on the CPU machine and carry .whl and .gpu-data"; exit 1; }
        for corpus in msra vocab; do
            [[ -d $NERCO_DATA_ROOT/$corpus ]] || { echo "no $NERCO_DATA_ROOT/$corpus: run benchmarks/prepare_gpu.sh and carry .gpu-data"; exit 1; }
        done
    fi
    if ((INSTALL)); then
        # A venv that sees the image's packages (its site folders, added by a .pth: this works whether the
        # image's python3 is a system Python or a venv itself) below the carried wheels, which win; pip is the
        # image's. Editable, so that pytest's imports from the repository root find nerco_dist.ds_configs too.
        python3 -m venv --without-pip "$ENV"
        local purelib
        purelib=$("$ENV/bin/python3" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
        python3 - >"$purelib/image-site-packages.pth" <<'EOF'
import site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))
EOF
        export PATH=$ENV/bin:$PATH
        python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
        python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation -e .
    else
        echo "dry run: no wheels for this Python (.whl/ missing or not Python $WHEEL_PYTHON): the active environment as it is"
    fi
    python3 - <<'EOF'
import importlib.metadata as md
import os
import torch
assert torch.cuda.is_available() or os.environ["DRY_RUN"] == "1", "torch sees no CUDA device"
import deepspeed, jieba, pytest, torchcrf  # noqa: F401  (what the image lacks, carried)
import nerco_dist.ds_configs, nerco_dist.kernels  # noqa: F401  (the package-dir mapping; the Triton ops)
versions = " ".join(f"{d}={md.version(d)}" for d in ("torch", "triton", "transformers", "deepspeed", "pydantic"))
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"ok: {versions}; {gpu}")
EOF
}

stage_tests() {
    # Only the module with gpu tests: collecting them all imports test modules that need packages the image
    # lacks (seqeval). Compiled on CUDA; on CPU (dry run) the tests are collected and skip.
    # -v: a line per test as it ends, so that a stage cut short still says which passed (the XML comes at the end).
    python3 -m pytest -v -rfE -p no:cacheprovider -m gpu tests/test_gpu_kernels.py --junitxml="$RES/gpu_tests.xml"
}

# The kernel benchmarks stop starting cases 20 s before their limit (skipped cases are recorded as such).
stage_crf() {
    python3 benchmarks/bench_crf.py --device "$DEVICE" $QUICK --out "$RES" --budget $((LIMIT_crf - 20))
}

stage_infonce() {
    python3 benchmarks/bench_infonce.py --device "$DEVICE" $QUICK --out "$RES" --budget $((LIMIT_infonce - 20))
}

stage_train() {
    python3 benchmarks/bench_train.py --device "$DEVICE" $QUICK --out "$RES"
}

export -f stage_setup stage_tests stage_crf stage_infonce stage_train
for stage in "${STAGES[@]}"; do export "LIMIT_$stage=${LIMIT[$stage]}"; done

run_stage() {  # run_stage NAME: its limit, its log, a few summary lines; status 1 if it failed
    local name=$1 start=$SECONDS rc verdict seconds limit note
    limit=$((LIMIT[$name] * (DRY_RUN ? DRY_RUN_FACTOR : 1)))
    # in the background, so that a signal to this script is handled at once (its trap stops the stage)
    timeout --kill-after=5 "$limit" bash -c "stage_$name" >"$RES/$name.log" 2>&1 &
    stage_pid=$!
    wait $stage_pid
    rc=$?
    stage_pid=
    seconds=$((SECONDS - start))
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="TIMED OUT after $limit s" ;;
        *) verdict="FAILED (exit status $rc)" ;;
    esac
    if ((rc == 0)) && ! compgen -G "$RES/${WRITES[$name]}" >/dev/null; then
        verdict="FAILED (wrote no ${WRITES[$name]})" rc=1
    fi
    note="limit ${LIMIT[$name]} s"
    if ((DRY_RUN)); then
        ((seconds > LIMIT[$name])) && note+=", over it: not a failure in a dry run"
        note="GPU $note; dry-run limit $limit s"
    fi
    say "== $name: $verdict, $seconds s ($note)"
    python3 benchmarks/gpu_summary.py "$name" "$RES" 2>&1 | tee -a "$SUMMARY"
    if ((rc != 0)); then
        say "-- last lines of $name.log:"
        tail -n 12 "$RES/$name.log" | cut -c 1-200 | tee -a "$SUMMARY"
    fi
    collect
    return $((rc != 0))
}

mode=$( ((dry_run)) && echo " --dry-run (stage limits x$DRY_RUN_FACTOR)")
say "gpu_all.sh$mode: stages ${selected[*]}; limits sum to $total s; results in $OUT"
status=0
if ! run_stage setup; then
    say "setup failed: the other stages need it, none run"
    exit 1
fi
((INSTALL)) && export PATH=$ENV/bin:$PATH
for stage in "${STAGES[@]:1}"; do
    [[ " ${selected[*]} " == *" $stage "* ]] || continue
    run_stage "$stage" || status=1
done
say "gpu_all.sh: $( ((status)) && echo 'some stages failed' || echo 'all stages ok'), ${SECONDS} s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
