#!/usr/bin/env bash
# Compile the torch-free CUDA kernel of the fused NovoGrad op with plain nvcc for sm_80 and sm_90, and check
# with ptxas -v that no kernel has a stack frame or spills.
# Needs nvcc, no GPU and no CUDA build of torch. Exits non-zero when nvcc is missing or a compile fails.
#
#   usage: scripts/check_cuda_compile.sh [--with-bindings]      (NVCC=/path/to/nvcc picks another nvcc)
#
# --with-bindings also syntax-checks cuda/bindings.cpp (the torch side) with the host compiler against the
# installed torch's headers and the toolkit's headers. A CPU torch wheel lacks one generated header,
# c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is written to a temporary directory for that.
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
for src in novograd_cuda novograd_q8; do
  for arch in 80 90; do
    "$nvcc" -c "$csrc/cuda/$src.cu" -I "$csrc" -std=c++17 -O3 --fmad=false \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Werror all-warnings -Xcompiler -Wall,-Werror \
      -Xptxas -v -o "$out/${src}_sm${arch}.o" 2> "$out/ptxas_${src}_sm${arch}.txt" || { cat "$out/ptxas_${src}_sm${arch}.txt" >&2; exit 1; }
    # The launch tables are kernel arguments read in place: a kernel that copies one to local memory (a stack
    # frame) or spills would be slow. ptxas -v says so per kernel.
    if grep -E "[1-9][0-9]* bytes (stack frame|spill)" "$out/ptxas_${src}_sm${arch}.txt" >&2; then
      echo "check_cuda_compile: $src.cu sm_${arch}: a kernel uses a stack frame or spills (ptxas -v above)" >&2
      exit 1
    fi
    kernels=$(grep -c "Compiling entry function" "$out/ptxas_${src}_sm${arch}.txt")
    echo "check_cuda_compile: $src.cu sm_${arch} ok ($(stat -c %s "$out/${src}_sm${arch}.o") bytes, $kernels kernels, no stack frame or spill)"
  done
done

if [[ "${1:-}" == "--with-bindings" ]]; then
  python="${PYTHON:-python}"
  cuda_inc="$(cd "$(dirname "$(readlink -f "$(command -v "$nvcc")")")/.." && pwd)/include"
  # nvcc may be a wrapper script: ask it where its headers are when the guess has no cuda_runtime.h
  if [[ ! -f "$cuda_inc/cuda_runtime.h" ]]; then
    cuda_inc="$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
  fi
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  mapfile -t incs < <("$python" -c "import sysconfig, torch.utils.cpp_extension as c
for p in c.include_paths() + [sysconfig.get_paths()['include']]: print('-isystem'); print(p)")
  "${CXX:-c++}" -fsyntax-only -std=c++20 -DTORCH_EXTENSION_NAME=novograd_ds_cuda "${incs[@]}" -I "$out/stub" \
    -isystem "$cuda_inc" -I "$csrc" -Wall -Werror "$csrc/cuda/bindings.cpp"
  echo "check_cuda_compile: bindings.cpp ok (syntax, torch $("$python" -c 'import torch; print(torch.__version__)'))"
fi
