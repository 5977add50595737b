#!/usr/bin/env bash
# The CUDA backend on a GPU machine, in one command: build lowbit with its CUDA kernels, run
# tests/test_cuda.py, run compute-sanitizer (memcheck and racecheck on the tiled kernel over every
# format, group size and token-tile count), then the benchmarks (benchmarks/results/kernels_cuda.*,
# generate_cuda.*).
#
#     bash benchmarks/run_cuda.sh                 # every step
#     bash benchmarks/run_cuda.sh build test      # only these steps: build test sanitize sweep kernels generate
#
# Logs and results are also copied to $OUT when it is set (the device tool brings that folder back).
# Environment: PYTHON (default python3, the one with a CUDA build of torch), TORCH_CUDA_ARCH_LIST
# (default 9.0 here, the H100/H200; the package default is 8.0;9.0+PTX).
set -uo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
logs=${OUT:-/tmp/lowbit-cuda}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize kernels generate)
failed=()

run() {  # run NAME COMMAND...: output to the terminal and to $logs/NAME.log
  local name=$1 start=$SECONDS
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

sanitized_calls="
import torch, lowbit
for bits in (4, 3.5):
    for n, k, g in ((100, 328, 32), (48, 4096, 64), (40, 640, 128), (200, 576, 256)):
        qw = lowbit.quantize_weight(torch.randn(n, k), bits, g).to('cuda')
        w = qw.dequantize().double()
        for m in (1, 9, 16):  # 1 and 2 token tiles (beyond 16 rows cuBLAS runs, whose own kernels racecheck flags)
            x = torch.randn(m, k, device='cuda').half()
            y = lowbit.linear(x, qw).double()
            ref = x.double() @ w.T
            assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-3, (bits, n, k, g, m)
torch.cuda.synchronize()
print('sanitized calls ran')"

for step in "${steps[@]}"; do
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
      run build "$py" -m pip install --no-build-isolation --no-deps -v -e . || exit 1
      run build_info "$py" -c "import lowbit; info = lowbit.build_info(); print(info); assert info['cuda']" || exit 1
      ;;
    test)
      run test "$py" -m pytest -q -rs --tb=short tests/test_cuda.py tests/test_tiled.py
      ;;
    sanitize)
      # Without torch's caching allocator every tensor is its own allocation, so memcheck sees the end of it.
      run memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$py" -c "$sanitized_calls"
      run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$py" -c "$sanitized_calls"
      ;;
    sweep)
      run sweep "$py" benchmarks/bench_kernels.py --device cuda --sweep
      ;;
    kernels)
      run bench_kernels "$py" benchmarks/bench_kernels.py --device cuda ${LOWBIT_BENCH_ARGS:-} &&
        cp benchmarks/results/kernels_cuda.json benchmarks/results/kernels_cuda.md "$logs/"
      ;;
    generate)  # each decode step a CUDA graph
      run bench_generate "$py" benchmarks/bench_generate.py --device cuda &&
        cp benchmarks/results/generate_cuda.json benchmarks/results/generate_cuda.md "$logs/"
      ;;
    *)
      echo "unknown step $step (build test sanitize sweep kernels generate)"
      exit 2
      ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed: ${steps[*]}"
