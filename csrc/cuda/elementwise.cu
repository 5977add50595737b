// The two memory-bound helpers of the CUDA backend: laying out activations for the matmul kernel
// (perm gather, conversion to float16 with a per-row power-of-two scale) and dequantizing a weight in
// the canonical layout (the canonical ops on CUDA: dequantize, and linear through cuBLAS).
#include <algorithm>

#include "device.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kPrepareThreads = 512;

// Block-wide maximum (every thread gets it).
__device__ float block_max(float v) {
  __shared__ float warp_max[kPrepareThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_max[0];
  for (int i = 1; i < kPrepareThreads / 32; ++i) v = fmaxf(v, warp_max[i]);
  return v;
}

// One block per activation row m.
template <typename T>
__global__ void __launch_bounds__(kPrepareThreads)
    prepare_kernel(const T* x, const int64_t K, const int64_t stride0, const int64_t stride1, const int32_t* perm,
                   const bool scale_rows, __half* out, const int64_t out_stride, float* row_scale) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * stride0;
  float inverse = 1.f;
  if (scale_rows) {
    float amax = 0.f;
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < K; k += kPrepareThreads) amax = fmaxf(amax, fabsf(to_float(row[k * stride1])));
    amax = block_max(amax);
    // The power of two 2^e with max |x| / 2^e in [2^14, 2^15): float16 holds the row without overflow,
    // bfloat16 values exactly (8 significant bits), and values down to 2^-28 max |x| as normal numbers.
    int e = 0;
    if (amax > 0.f && isfinite(amax)) {
      frexpf(amax, &e);  // amax in [2^(e-1), 2^e)
      e = min(max(e - 15, -100), 100);
    }
    inverse = ldexpf(1.f, -e);
    if (threadIdx.x == 0) row_scale[m] = ldexpf(1.f, e);
  }
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < out_stride; j += kPrepareThreads) {
    float v = 0.f;
    if (j < K) {
      const int64_t source = perm ? perm[j] : j;
      if (source >= 0 && source < K) v = to_float(row[source * stride1]) * inverse;
    }
    out[m * out_stride + j] = __float2half_rn(v);
  }
}

// 16 float values -> dst[0..15] with 16-byte stores (dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_16(T* dst, const float (&v)[16]) {
  constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < 16; i += kPerVector) {
    T packed[kPerVector];
#pragma unroll
    for (int k = 0; k < kPerVector; ++k) packed[k] = from_float<T>(v[i + k]);
    *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(packed);
  }
}

// One thread per 16 stored columns (one int3.5 block, 8 int4 bytes, 16 int8 bytes) of one row; byte loads,
// so any alignment of the codes works. Values as lowbit.formats.dequantize computes them in float32:
// c = q (times 15/7 on int3.5's odd columns), w = (c - z) * s, each step rounded (no fused multiply-add).
// Without perm, rows whose 16-column runs start 16-byte aligned (K a multiple of 16) take vector stores.
template <Format F, typename T>
__global__ void dequantize_kernel(const PackedWeight w, const int32_t* perm, const int64_t K, T* out) {
  const int64_t blocks_per_row = ceil_div(K, 16);
  const int64_t total = w.N * blocks_per_row;
  const bool vector_rows = perm == nullptr && K % 16 == 0;
  const int group_shift = __ffs(static_cast<int>(w.group_size)) - 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / blocks_per_row, col0 = 16 * (i - n * blocks_per_row);
    const uint8_t* p = w.codes + n * w.row_bytes + packed_row_bytes(F, col0);
    uint32_t codes[16];
    if constexpr (F == Format::kInt8) {
#pragma unroll
      for (int k = 0; k < 16; ++k) codes[k] = p[k];
    } else if constexpr (F == Format::kInt4) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t byte = p[k];
        codes[2 * k] = byte & 15u, codes[2 * k + 1] = byte >> 4;
      }
    } else {
      uint64_t bits = 0;
#pragma unroll
      for (int k = 0; k < 7; ++k) bits |= static_cast<uint64_t>(p[k]) << (8 * k);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const auto pair = static_cast<uint32_t>(bits >> (7 * k)) & 0x7fu;
        codes[2 * k] = pair & 15u, codes[2 * k + 1] = pair >> 4;
      }
    }
    const int64_t group = n * w.n_groups + (col0 >> group_shift);
    const float s = __half2float(__ushort_as_half(w.scales[group]));
    const float z = __half2float(__ushort_as_half(w.zeros[group]));
    float values[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      float code = static_cast<float>(codes[k]);
      if (F == Format::kInt35 && k % 2 == 1) code = __fmul_rn(code, kStep3);
      values[k] = __fmul_rn(__fsub_rn(code, z), s);
    }
    T* dst = out + n * K;
    if (vector_rows) {
      store_16(dst + col0, values);
      continue;
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int64_t col = col0 + k;
      if (col >= K) break;
      const int64_t target = perm ? perm[col] : col;
      if (target >= 0 && target < K) dst[target] = from_float<T>(values[k]);
    }
  }
}

template <Format F>
cudaError_t launch_dequantize(const PackedWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                              cudaStream_t stream) {
  const int64_t work = w.N * ceil_div(K, 16);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(work, 256), 1 << 20));
  return for_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    dequantize_kernel<F, T><<<blocks, 256, 0, stream>>>(w, perm, K, static_cast<T*>(out));
  });
}

}  // namespace

cudaError_t prepare_activations(const void* x, DType dtype, int64_t M, int64_t K, int64_t stride0, int64_t stride1,
                                const int32_t* perm, bool scale_rows, uint16_t* out, int64_t out_stride,
                                float* row_scale, cudaStream_t stream) {
  if (M < 1) return cudaSuccess;
  if (M > 0x7fffffff || out_stride < K || (scale_rows && row_scale == nullptr)) return cudaErrorInvalidValue;
  auto* o = reinterpret_cast<__half*>(out);
  const auto grid = static_cast<unsigned>(M);
  return for_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    prepare_kernel<<<grid, kPrepareThreads, 0, stream>>>(static_cast<const T*>(x), K, stride0, stride1, perm,
                                                         scale_rows, o, out_stride, row_scale);
  });
}

cudaError_t dequantize(const PackedWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                       cudaStream_t stream) {
  if (w.N < 1 || K < 1) return cudaSuccess;
  return visit_format(w.format, [&](auto format) {
    return launch_dequantize<decltype(format)::value>(w, perm, K, out, dtype, stream);
  });
}

}  // namespace cuda
}  // namespace lowbit
