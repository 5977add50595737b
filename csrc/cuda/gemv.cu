// Decode (M <= 8 activation rows): a tensor-core GEMV that streams the weight once.
//
// A warp owns a 16-row tile of W and a share of its K range, which it walks one unit at a time: each
// thread loads one slice (device.cuh) of rows g and g + 8 per unit, and the loads of the next unit are
// issued before the current one is dequantized and multiplied. The tokens are the MMA's N dimension, so
// M <= 8 costs about as much as M = 1. The warps of a block split K for the same row tiles and add their
// partial sums through shared memory; every output is written once, in a fixed order: the result does
// not depend on timing.
//
// Measured on an H100 (M = 1): more warps in flight beat longer per-warp streams. int4 with 128-column
// slices ran 4096 x 4096 in 9.1 us at one unit per warp, 11.6 us at two and 19.2 us at four; 64-column
// slices (two 16-byte loads per row) ran it in 8.5 us. int3.5 slices of 128 columns (seven 8-byte loads)
// ran 11008 x 4096 in 26.5 us against 31.0 us with 256 columns (seven 16-byte loads, one unit per warp).
#include "device.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

constexpr int kUnitsPerWarp = 2;  // at least, when K allows: the next unit's loads overlap this one's math

// 16 activations of one token, columns col..col+15, in pair order; zero past `cols` or without a token.
// Branch-free like load_slice: `row` is always a valid row.
__device__ __forceinline__ void load_x_piece(const uint16_t* row, bool has_row, int cols, int col,
                                             uint32_t (&b)[8]) {
  const bool ok0 = has_row && col < cols, ok1 = has_row && col + 8 < cols;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const uint4 v0 = __ldg(reinterpret_cast<const uint4*>(row + (ok0 ? col : 0)));
  const uint4 v1 = __ldg(reinterpret_cast<const uint4*>(row + (ok1 ? col + 8 : 0)));
  x_pairs(ok0 ? v0 : zero, b);
  x_pairs(ok1 ? v1 : zero, b + 4);
}

// Block: kWarps warps = (kWarps / k_warps) row tiles x k_warps shares of K.
// Slice: kSliceCols columns per thread and row, loaded kVec bytes at a time; units of 4 slices.
template <Format F, int kSliceCols, int kVec, int kGroup>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const PackedWeight w, const Activations x, const Output y,
                                                        const int k_warps) {
  using S = Slice<F, kSliceCols>;
  constexpr int kUnitCols = 4 * kSliceCols;
  static_assert(kSliceCols % kGroup == 0 || kGroup % kSliceCols == 0, "groups and slices nest");

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const int k_part = warp % k_warps;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * (kWarps / k_warps) + warp / k_warps;
  const int64_t r0 = 16 * tile + g, r1 = r0 + 8;
  const bool ok0 = r0 < w.N, ok1 = r1 < w.N;
  // Rows past N read row 0 and are dropped (no branches in the loads, see load_slice).
  const uint8_t* row0 = w.codes + (ok0 ? r0 : 0) * w.row_stride;
  const uint8_t* row1 = w.codes + (ok1 ? r1 : 0) * w.row_stride;
  const int64_t params0 = r0 * w.n_groups, params1 = r1 * w.n_groups;
  const bool has_x = g < x.M;  // this thread's MMA column is token g
  const uint16_t* x_row = x.x + (has_x ? g : 0) * x.row_stride;
  // Offsets within a row fit in 32 bits (K < 2^31).
  const int row_bytes = static_cast<int>(w.row_bytes), x_cols = static_cast<int>(x.cols);
  const int n_units = static_cast<int>(ceil_div(w.Kp, kUnitCols));

  const auto load_unit = [&](int unit, uint32_t (&w0)[S::kWords], uint32_t (&w1)[S::kWords]) {
    const int byte0 = static_cast<int>(packed_bytes(F, unit * kUnitCols + c * kSliceCols));
    load_slice<kVec>(row0, byte0, ok0 ? row_bytes - byte0 : 0, w0);
    load_slice<kVec>(row1, byte0, ok1 ? row_bytes - byte0 : 0, w1);
  };

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // rows (g, g, g + 8, g + 8) x tokens (2c, 2c + 1, 2c, 2c + 1)
  const auto compute_unit = [&](int unit, const uint32_t (&w0)[S::kWords], const uint32_t (&w1)[S::kWords]) {
    const int col0 = unit * kUnitCols + c * kSliceCols;  // this thread's first stored column
    GroupParams gp0, gp1;
#pragma unroll
    for (int p = 0; p < S::kPieces; ++p) {
      const int col = col0 + 16 * p;
      if ((16 * p) % kGroup == 0) {  // p == 0, or a group boundary inside the slice (compile time)
        const int group = col / kGroup;
        const bool in_k = group < w.n_groups;
        gp0 = load_group_params(w, params0, ok0 && in_k, group);
        gp1 = load_group_params(w, params1, ok1 && in_k, group);
      }
      half2 a0[8], a1[8];
      S::dequant(w0, p, gp0, a0);
      S::dequant(w1, p, gp1, a1);
      uint32_t b[8];
      load_x_piece(x_row, has_x, x_cols, col, b);
      mma_piece(acc, a0, a1, b);
    }
  };

  // Software pipeline over this warp's units (k_part, k_part + k_warps, ...): the next unit's loads are
  // in flight while the current one is computed. The branches are uniform across the warp.
  int unit = k_part;
  if (unit < n_units) {
    uint32_t w0[S::kWords], w1[S::kWords];
    load_unit(unit, w0, w1);
    for (;;) {
      const int next = unit + k_warps;
      if (next >= n_units) {
        compute_unit(unit, w0, w1);
        break;
      }
      uint32_t v0[S::kWords], v1[S::kWords];
      load_unit(next, v0, v1);
      compute_unit(unit, w0, w1);
#pragma unroll
      for (int i = 0; i < S::kWords; ++i) w0[i] = v0[i], w1[i] = v1[i];
      unit = next;
    }
  }

  // The shares of K of one row tile are warps tile_in_block * k_warps + 0 .. k_warps - 1.
  __shared__ float partial[kWarps][4][32];
  if (k_warps > 1) {
    if (k_part != 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) partial[warp][e][lane] = acc[e];
    }
    __syncthreads();
    if (k_part == 0) {
      for (int k = 1; k < k_warps; ++k) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[e] += partial[warp + k][e][lane];
      }
    }
  }
  if (k_part == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t t = 2 * c + e % 2;
      const bool ok = e < 2 ? ok0 : ok1;
      if (ok && t < x.M) store_output(y, x, w.N, t, e < 2 ? r0 : r1, acc[e]);
    }
  }
}

template <Format F, int kSliceCols, int kVec>
cudaError_t launch(const PackedWeight& w, const Activations& x, const Output& y, cudaStream_t stream) {
  // As many warps per row tile (up to 8) as leave each warp kUnitsPerWarp units or more.
  const int64_t n_units = ceil_div(w.Kp, 4 * kSliceCols);
  int k_warps = 1;
  while (k_warps < kWarps && 2 * k_warps * kUnitsPerWarp <= n_units) k_warps *= 2;
  const auto blocks = static_cast<unsigned>(ceil_div(ceil_div(w.N, 16), kWarps / k_warps));
  switch (w.group_size) {
    case 32: gemv_kernel<F, kSliceCols, kVec, 32><<<blocks, kThreads, 0, stream>>>(w, x, y, k_warps); break;
    case 64: gemv_kernel<F, kSliceCols, kVec, 64><<<blocks, kThreads, 0, stream>>>(w, x, y, k_warps); break;
    case 128: gemv_kernel<F, kSliceCols, kVec, 128><<<blocks, kThreads, 0, stream>>>(w, x, y, k_warps); break;
    case 256: gemv_kernel<F, kSliceCols, kVec, 256><<<blocks, kThreads, 0, stream>>>(w, x, y, k_warps); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gemv(const PackedWeight& w, const Activations& x, const Output& y, cudaStream_t stream) {
  if (x.M < 1 || x.M > kMaxGemvRows || w.N < 1) return cudaErrorInvalidValue;
  // Slices: int4 64 columns (2 x 16 bytes); int3.5 128 columns (7 x 8 bytes), or 64 columns (7 x 4 bytes)
  // for rows that are only 4-byte aligned.
  if (w.format == Format::kInt4) {
    return w.vector_bytes >= 16 ? launch<Format::kInt4, 64, 16>(w, x, y, stream) : cudaErrorInvalidValue;
  }
  if (w.vector_bytes >= 8) return launch<Format::kInt35, 128, 8>(w, x, y, stream);
  if (w.vector_bytes >= 4) return launch<Format::kInt35, 64, 4>(w, x, y, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lowbit
