#!/usr/bin/env bash
# Build, on the CPU machine, what benchmarks/gpu_all.sh needs on the device's GPU image and the image lacks,
# in two git-ignored folders that the device call sends along (`carry`):
#   .whl/       wheels for CPython 3.12 manylinux x86_64 (the image's Python), each at the version installed
#               in the active environment, so that the GPU runs what the tests here ran
#   .gpu-data/  the training benchmark's inputs, copied from $NERCO_DATA_ROOT (default ../shared/data)
# It fails if a carried wheel requires a distribution that is neither carried nor in the image, or if what
# the device call uploads (the working tree that git does not ignore, plus these folders) exceeds 64 MiB.
#
#   bash benchmarks/prepare_gpu.sh      # in the project's venv, with the package index reachable
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=3.12  # the GPU image's (gpu_all.sh's WHEEL_PYTHON)
# glibc 2.28 or later: torch 2.11's wheels need it. pip takes the tags one by one, so list the older ones too.
PLATFORMS=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
for minor in $(seq 28 -1 5); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done
# Distributions the image has; packaging comes with transformers.
IMAGE=(torch triton transformers tensorboard tqdm numpy pyyaml scikit-learn matplotlib packaging)
# What it lacks: DeepSpeed and its requirements, pytest for the gpu tests, pytorch-crf (their CRF reference
# and the CRF baseline), jieba (MSRA's lexicon: its bundled dictionary), setuptools (installs the project).
WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops msgpack ninja
        psutil py-cpuinfo pytest pluggy iniconfig pygments pytorch-crf setuptools)
BUILT=(deepspeed jieba)  # sdists only on the index: built here into pure-Python wheels
DATA=(msra vocab)        # configs/msra.yaml's corpus (bench_train.py sets its vectors aside), BERT's vocabulary
LIMIT_MIB=64

root=${NERCO_DATA_ROOT:-../shared/data}
for folder in "${DATA[@]}"; do
    [[ -d $root/$folder ]] || { echo "prepare_gpu.sh: no $root/$folder (set NERCO_DATA_ROOT)" >&2; exit 1; }
done

pinned() {  # name==version as installed here
    local version
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
        || { echo "prepare_gpu.sh: $1 is not installed in this environment (activate the project's venv)" >&2; exit 1; }
    echo "$1==$version"
}
specs=() builds=()
for name in "${WHEELS[@]}"; do specs+=("$(pinned "$name")"); done
for name in "${BUILT[@]}"; do builds+=("$(pinned "$name")"); done

rm -rf .whl .gpu-data
mkdir -p .whl .gpu-data
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {  # a pip command, quiet unless it fails
    "$@" >"$log" 2>&1 || { grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 20 >&2; exit 1; }
}
echo "downloading ${#specs[@]} wheels for CPython $PYTHON_VERSION manylinux x86_64"
run python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${specs[@]}"
echo "building ${builds[*]}"
run python3 -m pip wheel --no-deps --no-build-isolation -w .whl "${builds[@]}"
for name in "${BUILT[@]}"; do
    compgen -G ".whl/${name//-/_}-*-py3-none-any.whl" >/dev/null \
        || { echo "prepare_gpu.sh: $name did not build as a pure-Python wheel (it would not fit the image's Python)" >&2; exit 1; }
done

cp -RL --no-preserve=mode "${DATA[@]/#/$root/}" .gpu-data/

python3 - "$PYTHON_VERSION" "$LIMIT_MIB" "${IMAGE[@]}" <<'EOF'
"""Every requirement of every carried wheel is carried (at a version it accepts) or in the image; the upload fits."""
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

version, limit_mib, image = sys.argv[1], int(sys.argv[2]), {canonicalize_name(n) for n in sys.argv[3:]}
env = {"python_version": version, "python_full_version": f"{version}.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(Path(".whl").glob("*.whl"))
carried = {canonicalize_name(parse_wheel_filename(w.name)[0]): parse_wheel_filename(w.name)[1] for w in wheels}
problems = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(z.read(metadata).decode()).get_all("Requires-Dist") or []
    for req in map(Requirement, requires):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in carried:
            if not req.specifier.contains(carried[name], prereleases=True):
                problems.append(f"{wheel.name} needs {req}, carried {name} {carried[name]}")
        elif name not in image:
            problems.append(f"{wheel.name} needs {req}: neither carried nor in the image")
if problems:
    sys.exit("prepare_gpu.sh: requirements not met on the image:\n  " + "\n  ".join(problems))


def size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if os.path.isdir(path) else os.path.getsize(path)


tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                      check=True, text=True).stdout.split("\0")
tree = [f for f in tree if f and os.path.isfile(f) and not os.path.islink(f)]
parts = {"working tree": sum(map(os.path.getsize, tree)), ".whl": size(".whl"), ".gpu-data": size(".gpu-data")}
total = sum(parts.values())
print(f"{len(wheels)} wheels: " + " ".join(f"{n}-{v}" for n, v in sorted(carried.items())))
print("upload: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items()) + f"; total {total / 2**20:.1f} MiB"
      + f" (limit {limit_mib} MiB)")
if total > limit_mib * 2**20:
    biggest = sorted(tree, key=os.path.getsize, reverse=True)[:5]
    sys.exit("prepare_gpu.sh: over the limit; the biggest files of the working tree: "
             + ", ".join(f"{f} ({os.path.getsize(f) / 2**20:.1f} MiB)" for f in biggest))
EOF

cat <<'EOF'
ready; the device call (benchmarks/README.md, "Running the GPU scripts with the device tool"):
  command:   bash benchmarks/gpu_all.sh
  carry:     [".whl", ".gpu-data"]
  timeout_s: 600
EOF
