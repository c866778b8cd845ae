#!/usr/bin/env bash
# Compile the torch-free CUDA kernel of the fused NovoGrad op with plain nvcc for sm_80 and sm_90.
# Needs nvcc, no GPU and no CUDA build of torch. Exits non-zero when nvcc is missing or the compile fails.
#   usage: scripts/check_cuda_compile.sh            (NVCC=/path/to/nvcc to pick another compiler)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
csrc="$root/novograd_ds/ops/csrc"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC or install the CUDA toolkit)" >&2
  exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 1
for arch in 80 90; do
  "$nvcc" -c "$csrc/cuda/novograd_cuda.cu" -I "$csrc" -std=c++17 -O3 --fmad=false \
    -gencode "arch=compute_${arch},code=sm_${arch}" -Werror all-warnings -Xcompiler -Wall,-Werror \
    -o "$out/novograd_cuda_sm${arch}.o"
  echo "check_cuda_compile: sm_${arch} ok ($(stat -c %s "$out/novograd_cuda_sm${arch}.o") bytes)"
done
