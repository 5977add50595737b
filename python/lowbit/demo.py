"""`make demo` (for now): LLaMA-7B-shaped random matrices through both formats.

Prints, per layer shape and format: relative RMSE against float, bytes per weight, and decode (M = 1)
timings against F.linear in float32.
"""

import time

import torch
import torch.nn.functional as F

import lowbit

SHAPES = {"attention q/k/v/o": (4096, 4096), "mlp gate/up": (11008, 4096), "mlp down": (4096, 11008)}


def seconds_per_call(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    torch.manual_seed(0)
    info = lowbit.build_info()
    print(f"lowbit {lowbit.__version__}: CPU kernels '{info['cpu_isa']}', {torch.get_num_threads()} threads, "
          f"CUDA {'on' if info['cuda'] else 'off'}")
    print()
    print(f"{'layer':<18} {'N x K':>12} {'format':>7} {'rel. RMSE':>10} {'bytes/weight':>13} "
          f"{'M=1 ms':>8} {'fp32 ms':>8} {'speedup':>8}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        t_float = seconds_per_call(lambda: F.linear(x, w))
        for bits in (4, 3.5):
            qw = lowbit.quantize_weight(w, bits, group_size=128)
            rmse = ((qw.dequantize() - w).norm() / w.norm()).item()
            t = seconds_per_call(lambda: lowbit.linear(x, qw))
            print(f"{name:<18} {f'{n}x{k}':>12} {'int4' if bits == 4 else 'int3.5':>7} {rmse:>10.4f} "
                  f"{qw.nbytes / (n * k):>13.4f} {t * 1e3:>8.3f} {t_float * 1e3:>8.3f} {t_float / t:>7.2f}x")
    print()
    print("Relative RMSE is ||W - dequantize(Q(W))|| / ||W|| on Gaussian weights; bytes/weight counts codes,")
    print("float16 scales and zeros (group size 128). Full kernel benchmark: python benchmarks/bench_kernels.py")


if __name__ == "__main__":
    main()
