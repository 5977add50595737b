#!/usr/bin/env bash
# Compile check of the CUDA backend (csrc/cuda) on machines without a GPU or a CUDA build of torch:
# every torch-free .cu file is compiled for sm_80 and sm_90, warnings as errors. Run by `make test`.
#
# The torch glue (the .cu files that include ATen, c10 or torch headers) needs the headers of a CUDA
# build of torch; it is compiled too, for sm_90, when LOWBIT_TORCH_CUDA_INCLUDE names that include
# directory (torch/include of a CUDA wheel) and LOWBIT_CUDA_LIB_INCLUDE the cuBLAS, cuSPARSE and
# cuSOLVER headers it includes (where the CUDA toolkit lacks them).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${NVCC:-$(command -v nvcc || true)}
if [ -z "$nvcc" ]; then
  echo "cuda-check: skipped (nvcc not found)"
  exit 0
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/lowbit-cuda-check.XXXXXX")
trap 'rm -rf "$out"' EXIT
common=(-std=c++17 -O3 -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)
kernel_archs=(--threads 2 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

kernels=() glue=()
for f in csrc/cuda/*.cu; do
  if grep -qE '^#include <(ATen|c10|torch)/' "$f"; then glue+=("$f"); else kernels+=("$f"); fi
done

start=$SECONDS
for f in "${kernels[@]}"; do
  echo "cuda-check: $f (sm_80, sm_90)"
  "$nvcc" "${common[@]}" "${kernel_archs[@]}" -c "$f" -o "$out/$(basename "$f").o"
done

compiled_glue=0
if [ -n "${LOWBIT_TORCH_CUDA_INCLUDE:-}" ]; then
  inc=$LOWBIT_TORCH_CUDA_INCLUDE
  for f in "${glue[@]}"; do
    echo "cuda-check: $f (sm_90, torch headers from $inc)"
    "$nvcc" -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
      -I"$inc" -I"$inc/torch/csrc/api/include" ${LOWBIT_CUDA_LIB_INCLUDE:+-I"$LOWBIT_CUDA_LIB_INCLUDE"} \
      -D_GLIBCXX_USE_CXX11_ABI=1 -DLOWBIT_WITH_CUDA=1 -c "$f" -o "$out/$(basename "$f").o"
    compiled_glue=$((compiled_glue + 1))
  done
fi

version=$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
glue_note="${#glue[@]} skipped (no LOWBIT_TORCH_CUDA_INCLUDE)"
[ "$compiled_glue" -gt 0 ] && glue_note="$compiled_glue compiled"
echo "cuda-check: ok, ${#kernels[@]} kernel files compiled with nvcc $version in $((SECONDS - start)) s;" \
  "torch glue: $glue_note"
