// Matmul and dequantization on the CUDA tile layout (python/lowbit/tiled.py, docs/FORMAT.md).
//
// tiled_matmul, for up to kMaxTiledRows activation rows: y^T = W x^T on mma.m16n8k16, weight rows as the
// MMA's M dimension and tokens as N (kTokenTiles tiles of 8). A warp owns one 16-row tile and a
// contiguous range of 128-column units of K, which it streams: every lane reads its bytes of a unit
// with one or two 16-byte loads per 512-byte plane (the layout is made for this), the loads of the next
// kStepUnits units in flight while the current ones are dequantized and multiplied. The weight stream
// is read with an L2 evict-first policy, so it does not push the activations out of L2.
//
// Arithmetic: a code q becomes the exact float16 q (magic number 0x6400 and one subtraction or fused
// multiply-add), then q - z (int3.5's 3-bit codes: q * 15/7 - z) in one fused multiply-add, rounded
// once to float16, the value float16 weights hold anyway. The MMAs of one group accumulate in float32
// and are multiplied by the group's scale once, in float32: no float16 product z * s is formed, so no
// rounding error is shared by a whole group. Partial sums of the warps that split K for the same tile
// are added through shared memory in a fixed order: the result does not depend on timing.
#include <algorithm>
#include <cstdlib>

#include "device.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
// Units loaded together; the next step's loads overlap this step's math. (4 measured no faster on an
// H200 and slower at M = 16: benchmarks/README.md.)
constexpr int kStepUnits = 2;

template <Format F>
struct UnitWords {
  static constexpr int kWords = F == Format::kInt4 ? 8 : 7;  // 32 or 28 bytes per lane and unit
};

// Weight stream: read once, not kept in L1, first to leave L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}

__device__ __forceinline__ uint4 load_weight_16(const void* p, uint64_t policy) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(policy));
  return v;
}

__device__ __forceinline__ uint2 load_weight_8(const void* p, uint64_t policy) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;\n"
      : "=r"(v.x), "=r"(v.y)
      : "l"(p), "l"(policy));
  return v;
}

__device__ __forceinline__ uint32_t load_weight_4(const void* p, uint64_t policy) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;\n" : "=r"(v) : "l"(p), "l"(policy));
  return v;
}

// One lane's words of one unit, as the layout places them.
template <Format F>
__device__ __forceinline__ void load_unit(const uint8_t* unit, int lane, uint64_t policy,
                                          uint32_t (&w)[UnitWords<F>::kWords]) {
  const uint4 a = load_weight_16(unit + 16 * lane, policy);
  w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
  if constexpr (F == Format::kInt4) {
    const uint4 b = load_weight_16(unit + 512 + 16 * lane, policy);
    w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else {
    const uint2 b = load_weight_8(unit + 512 + 8 * lane, policy);
    w[4] = b.x, w[5] = b.y;
    w[6] = load_weight_4(unit + 768 + 4 * lane, policy);
  }
}

// The nibble word of MMA step s (compile-time after unrolling): nibbles (0,4) (1,5) (2,6) (3,7) are the
// operand pairs a0 (row g), a1 (row g + 8), a2 (row g), a3 (row g + 8).
template <Format F>
__device__ __forceinline__ uint32_t step_word(const uint32_t (&w)[UnitWords<F>::kWords], int s) {
  if constexpr (F == Format::kInt4) {
    return w[s];
  } else {
    // s = 4 J + 2 h + b. The 3-bit codes of steps (4 J + b, 4 J + 2 + b) side by side, one per
    // 16-bit half: their low 2 bits from 2-bit word J, bit 2 from the 1-bit word.
    const int J = s / 4, h = (s / 2) % 2, b = s % 2;
    const int shift = 2 - 2 * J - b;  // moves bit 2 J + b of each nibble to bit 2
    const uint32_t one = shift >= 0 ? w[6] << shift : w[6] >> -shift;
    const uint32_t three = ((w[4 + J] >> (2 * b)) & 0x33333333u) | (one & 0x44444444u);
    // Low half: the 4-bit codes of step s (nibble word s / 2, half b); high half: its 3-bit codes.
    const uint32_t selector = (2 * b) | (2 * b + 1) << 4 | (4 + 2 * h) << 8 | (5 + 2 * h) << 12;
    return __byte_perm(w[s / 2], three, selector);
  }
}

// Scale and zero of rows g and g + 8 for one group.
struct TileParams {
  uint32_t scales;  // half2 (s_g, s_g+8)
  uint32_t zeros;   // half2 (z_g, z_g+8)
};

template <int kTokenTiles>
struct Accumulators {
  float v[kTokenTiles][4];  // rows (g, g, g + 8, g + 8) x tokens 8 t + (2 c, 2 c + 1, 2 c, 2 c + 1)
};

// Activations of one MMA step for token tile t: columns col .. col + 3 of token 8 t + g (b0, b1).
struct XRows {
  const uint16_t* x;
  int64_t row_stride;
  int M, cols;
};

__device__ __forceinline__ uint2 load_x(const XRows& xr, int token, int col) {
  const bool ok = token < xr.M && col < xr.cols;
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(xr.x + (ok ? token * xr.row_stride + col : 0)));
  return ok ? v : make_uint2(0u, 0u);
}

// Dequantize the 8 MMA steps of one unit and multiply them with kTokenTiles token tiles. Groups of
// kGroup columns: a group of 32 or 64 ends inside the unit; one of 128 or 256 at the unit's end at the
// latest (a group of 256 split over two units is scaled in two halves, which adds up to the same sum).
template <Format F, int kGroup, int kTokenTiles>
__device__ __forceinline__ void compute_unit(const uint32_t (&w)[UnitWords<F>::kWords],
                                             const TileParams (&params)[kGroup >= 128 ? 1 : 128 / kGroup],
                                             const XRows& xr, int col0, int g, int c, Accumulators<kTokenTiles>& out) {
  constexpr int kStepsPerGroup = kGroup >= 128 ? 8 : kGroup / 16;
  const half2 mult = F == Format::kInt4 ? __floats2half2_rn(1.f, 1.f) : __floats2half2_rn(1.f, kStep3);
  const half2 magic = bit_cast<half2>(kMagic);
  const half2 sixteenth = bit_cast<half2>(0x2c002c00u), minus_64 = bit_cast<half2>(0xd400d400u);
#pragma unroll
  for (int p = 0; p < 8 / kStepsPerGroup; ++p) {
    const half2 z = bit_cast<half2>(params[p].zeros);
    const half2 neg_z0 = __hneg2(__low2half2(z)), neg_z1 = __hneg2(__high2half2(z));
    float acc[kTokenTiles][4] = {};
#pragma unroll
    for (int ss = 0; ss < kStepsPerGroup; ++ss) {
      const int s = p * kStepsPerGroup + ss;
      const uint32_t v = step_word<F>(w, s), v8 = v >> 8;
      // Exact codes: 0x6400 | q is 1024 + q; with q in bits 4..7, 1024 + 16 q.
      const half2 q0 = __hsub2(bit_cast<half2>((v & 0x000f000fu) | kMagic), magic);
      const half2 q1 = __hfma2(bit_cast<half2>((v & 0x00f000f0u) | kMagic), sixteenth, minus_64);
      const half2 q2 = __hsub2(bit_cast<half2>((v8 & 0x000f000fu) | kMagic), magic);
      const half2 q3 = __hfma2(bit_cast<half2>((v8 & 0x00f000f0u) | kMagic), sixteenth, minus_64);
      const uint32_t a0 = bit_cast<uint32_t>(__hfma2(q0, mult, neg_z0));
      const uint32_t a1 = bit_cast<uint32_t>(__hfma2(q1, mult, neg_z1));
      const uint32_t a2 = bit_cast<uint32_t>(__hfma2(q2, mult, neg_z0));
      const uint32_t a3 = bit_cast<uint32_t>(__hfma2(q3, mult, neg_z1));
      const int col = col0 + 16 * s + 4 * c;
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t) {
        const uint2 b = load_x(xr, 8 * t + g, col);
        mma_16816(acc[t], a0, a1, a2, a3, b.x, b.y);
      }
    }
    const float2 s = __half22float2(bit_cast<half2>(params[p].scales));
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
      out.v[t][0] = fmaf(s.x, acc[t][0], out.v[t][0]);
      out.v[t][1] = fmaf(s.x, acc[t][1], out.v[t][1]);
      out.v[t][2] = fmaf(s.y, acc[t][2], out.v[t][2]);
      out.v[t][3] = fmaf(s.y, acc[t][3], out.v[t][3]);
    }
  }
}

// Block: kWarps warps = (kWarps / k_warps) row tiles x k_warps contiguous shares of the units.
template <Format F, int kGroup, int kTokenTiles>
__global__ void __launch_bounds__(kThreads) tiled_matmul_kernel(const TiledWeight w, const Activations x,
                                                                const Output y, const int k_warps) {
  constexpr int kWords = UnitWords<F>::kWords;
  constexpr int kParams = kGroup >= 128 ? 1 : 128 / kGroup;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const int k_part = warp % k_warps;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * (kWarps / k_warps) + warp / k_warps;
  const bool has_tile = tile < w.n_tiles;
  const int n_units = static_cast<int>(w.n_units);
  const int u_begin = has_tile ? static_cast<int>(static_cast<int64_t>(n_units) * k_part / k_warps) : 0;
  const int u_end = has_tile ? static_cast<int>(static_cast<int64_t>(n_units) * (k_part + 1) / k_warps) : 0;
  const uint8_t* units = w.codes + (has_tile ? tile : 0) * w.n_units * w.unit_bytes;
  const int64_t params_row = (has_tile ? tile : 0) * w.n_groups;
  const uint64_t policy = evict_first_policy();
  const XRows xr{x.x, x.row_stride, static_cast<int>(x.M), static_cast<int>(x.cols)};

  struct Step {
    uint32_t w[kStepUnits][kWords];
    TileParams p[kStepUnits][kParams];
  };
  const auto load_step = [&](int u0, Step& st) {
#pragma unroll
    for (int i = 0; i < kStepUnits; ++i) {
      const int u = min(u0 + i, u_end - 1);  // past the range: reload the last unit (not computed)
      load_unit<F>(units + static_cast<int64_t>(u) * w.unit_bytes, lane, policy, st.w[i]);
#pragma unroll
      for (int p = 0; p < kParams; ++p) {
        const int64_t group = params_row + (static_cast<int64_t>(u) * 128 + p * kGroup) / kGroup;
        st.p[i][p].scales = __ldg(reinterpret_cast<const unsigned int*>(w.scales + group * 16) + g);
        st.p[i][p].zeros = __ldg(reinterpret_cast<const unsigned int*>(w.zeros + group * 16) + g);
      }
    }
  };

  Accumulators<kTokenTiles> acc{};
  if (u_begin < u_end) {
    Step cur, next;
    load_step(u_begin, cur);
    for (int u = u_begin;; u += kStepUnits) {
      const bool more = u + kStepUnits < u_end;
      if (more) load_step(u + kStepUnits, next);
#pragma unroll
      for (int i = 0; i < kStepUnits; ++i) {
        if (u + i < u_end) compute_unit<F, kGroup, kTokenTiles>(cur.w[i], cur.p[i], xr, (u + i) * 128, g, c, acc);
      }
      if (!more) break;
      cur = next;
    }
  }

  // The shares of one tile are warps (warp / k_warps) * k_warps + 0 .. k_warps - 1; share 0 adds them.
  __shared__ float partial[kWarps][kTokenTiles * 4][32];
  if (k_warps > 1) {
    if (k_part != 0) {
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) partial[warp][4 * t + e][lane] = acc.v[t][e];
      }
    }
    __syncthreads();
    if (k_part == 0) {
      for (int k = 1; k < k_warps; ++k) {
#pragma unroll
        for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc.v[t][e] += partial[warp + k][4 * t + e][lane];
        }
      }
    }
  }
  if (k_part == 0 && has_tile) {
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t token = 8 * t + 2 * c + e % 2, row = 16 * tile + g + (e < 2 ? 0 : 8);
        if (row < w.N && token < x.M) store_output(y, x, w.N, token, row, acc.v[t][e]);
      }
    }
  }
}

template <Format F, int kGroup, int kTokenTiles>
cudaError_t launch_matmul(const TiledWeight& w, const Activations& x, const Output& y, const TiledPlan& plan,
                          cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(w.n_tiles, kWarps / plan.k_warps));
  tiled_matmul_kernel<F, kGroup, kTokenTiles><<<blocks, kThreads, 0, stream>>>(w, x, y, plan.k_warps);
  return cudaGetLastError();
}

template <Format F, int kGroup>
cudaError_t dispatch_tokens(const TiledWeight& w, const Activations& x, const Output& y, const TiledPlan& plan,
                            cudaStream_t stream) {
  switch (plan.token_tiles) {
    case 1: return launch_matmul<F, kGroup, 1>(w, x, y, plan, stream);
    case 2: return launch_matmul<F, kGroup, 2>(w, x, y, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <Format F>
cudaError_t dispatch_group(const TiledWeight& w, const Activations& x, const Output& y, const TiledPlan& plan,
                           cudaStream_t stream) {
  switch (w.group_size) {
    case 32: return dispatch_tokens<F, 32>(w, x, y, plan, stream);
    case 64: return dispatch_tokens<F, 64>(w, x, y, plan, stream);
    case 128: return dispatch_tokens<F, 128>(w, x, y, plan, stream);
    case 256: return dispatch_tokens<F, 256>(w, x, y, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

// One thread per (tile, unit, lane): its 64 codes (rows g, g + 8; 4 columns of each of the 8 steps),
// in float32 exactly as lowbit.formats.dequantize: c = q (times 15/7 on int3.5's odd columns),
// w = (c - z) * s, each step rounded.
template <Format F, typename T>
__global__ void tiled_dequantize_kernel(const TiledWeight w, const int32_t* perm, const int64_t K, T* out) {
  const int64_t total = w.n_tiles * w.n_units * 32;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(i % 32);
    const int64_t unit = i / 32, tile = unit / w.n_units, u = unit % w.n_units;
    const int g = lane / 4, c = lane % 4;
    alignas(16) uint32_t words[UnitWords<F>::kWords];
    const uint8_t* base = w.codes + unit * w.unit_bytes;
    // Plain loads: any alignment of the unit is fine here.
#pragma unroll
    for (int k = 0; k < 4; ++k) words[k] = *reinterpret_cast<const uint32_t*>(base + 16 * lane + 4 * k);
    if constexpr (F == Format::kInt4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) words[4 + k] = *reinterpret_cast<const uint32_t*>(base + 512 + 16 * lane + 4 * k);
    } else {
      words[4] = *reinterpret_cast<const uint32_t*>(base + 512 + 8 * lane);
      words[5] = *reinterpret_cast<const uint32_t*>(base + 516 + 8 * lane);
      words[6] = *reinterpret_cast<const uint32_t*>(base + 768 + 4 * lane);
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t v = step_word<F>(words, s);
      const int64_t col0 = u * 128 + 16 * s + 4 * c;
      const int64_t group = tile * w.n_groups + col0 / w.group_size;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t row = 16 * tile + g + 8 * j;
        if (row >= w.N) continue;
        const float sc = __half2float(__ushort_as_half(w.scales[group * 16 + 2 * g + j]));
        const float z = __half2float(__ushort_as_half(w.zeros[group * 16 + 2 * g + j]));
        T values[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Nibble of (row half j, column e): j + 2 (e / 2) + 4 (e % 2).
          const uint32_t q = (v >> (4 * (j + 2 * (e / 2) + 4 * (e % 2)))) & 15u;
          float code = static_cast<float>(q);
          if (F == Format::kInt35 && e % 2 == 1) code = __fmul_rn(code, kStep3);
          values[e] = from_float<T>(__fmul_rn(__fsub_rn(code, z), sc));
        }
        T* dst = out + row * K;
        if (!perm && K % 4 == 0 && col0 + 4 <= K) {  // one store of 4 values: whole 32-byte sectors per warp
          if constexpr (sizeof(T) == 4) {
            *reinterpret_cast<float4*>(dst + col0) = *reinterpret_cast<const float4*>(values);
          } else {
            *reinterpret_cast<uint2*>(dst + col0) = *reinterpret_cast<const uint2*>(values);
          }
          continue;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t col = col0 + e;
          const int64_t target = col < K ? (perm ? perm[col] : col) : -1;
          if (target >= 0 && target < K) dst[target] = values[e];
        }
      }
    }
  }
}

template <Format F>
cudaError_t launch_dequantize(const TiledWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                              cudaStream_t stream) {
  const int64_t work = w.n_tiles * w.n_units * 32;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(work, 256), 1 << 20));
  return for_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    tiled_dequantize_kernel<F, T><<<blocks, 256, 0, stream>>>(w, perm, K, static_cast<T*>(out));
  });
}

}  // namespace

TiledPlan plan_tiled(const TiledWeight& w, int64_t M, int num_sms) {
  TiledPlan plan{};
  plan.token_tiles = M <= 8 ? 1 : 2;
  // Split K over the warps of a block until there are about 32 warps per SM, keeping at least 2 steps
  // of units per warp (the H200 sweep in benchmarks/README.md: 28672 x 8192 at M = 1 ran in 61 us with
  // 4 warps per tile, 70 us with 2). For tuning, LOWBIT_CUDA_TILED_K_WARPS (1, 2, 4 or 8) overrides.
  int k_warps = 1;
  while (k_warps < kWarps && w.n_tiles * k_warps < 32LL * num_sms && w.n_units >= 2LL * kStepUnits * (2 * k_warps)) {
    k_warps *= 2;
  }
  if (const char* env = std::getenv("LOWBIT_CUDA_TILED_K_WARPS")) {
    const int v = std::atoi(env);
    if (v == 1 || v == 2 || v == 4 || v == 8) k_warps = v;
  }
  plan.k_warps = k_warps;
  return plan;
}

cudaError_t tiled_matmul(const TiledWeight& w, const Activations& x, const Output& y, const TiledPlan& plan,
                         cudaStream_t stream) {
  if (x.M < 1 || x.M > 8 * plan.token_tiles || w.n_tiles < 1) return cudaErrorInvalidValue;
  if (plan.k_warps < 1 || plan.k_warps > kWarps || kWarps % plan.k_warps != 0) return cudaErrorInvalidValue;
  if (w.format == Format::kInt8) return cudaErrorInvalidValue;  // int8 has no tile layout
  return w.format == Format::kInt4 ? dispatch_group<Format::kInt4>(w, x, y, plan, stream)
                                   : dispatch_group<Format::kInt35>(w, x, y, plan, stream);
}

cudaError_t tiled_dequantize(const TiledWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                             cudaStream_t stream) {
  if (w.N < 1 || K < 1) return cudaSuccess;
  if (w.format == Format::kInt8) return cudaErrorInvalidValue;
  return w.format == Format::kInt4 ? launch_dequantize<Format::kInt4>(w, perm, K, out, dtype, stream)
                                   : launch_dequantize<Format::kInt35>(w, perm, K, out, dtype, stream);
}

}  // namespace cuda
}  // namespace lowbit
