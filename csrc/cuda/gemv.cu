// Decode (M <= 8 activation rows): a tensor-core GEMV that streams the weight once.
//
// A warp owns a 16-row tile of W and a share of its K range. Per unit of work, each thread loads one
// slice (device.cuh) of rows g and g + 8 with 128-bit loads (int3.5 rows that are not 16-byte aligned:
// 32-bit loads), dequantizes it in registers and multiplies it with the activation rows through
// mma.sync: the tokens are the MMA's N dimension, so M <= 8 costs about as much as M = 1. The warps of a
// block split K for the same row tiles and add their partial sums through shared memory, so there are
// enough loads in flight whether W is tall (11008 x 4096: 688 blocks of 8 warps, one unit each) or wide
// (4096 x 11008: 256 blocks of 8 warps, up to 3 units each), and every output is written once, in a
// fixed order: the result does not depend on timing.
#include "device.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

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
  // Rows past N read row 0 and are dropped (no branches in the loop, see load_slice).
  const uint8_t* row0 = w.codes + (ok0 ? r0 : 0) * w.row_stride;
  const uint8_t* row1 = w.codes + (ok1 ? r1 : 0) * w.row_stride;
  const int64_t params0 = r0 * w.n_groups, params1 = r1 * w.n_groups;
  const bool has_x = g < x.M;  // this thread's MMA column is token g
  const uint16_t* x_row = x.x + (has_x ? g : 0) * x.row_stride;
  // Offsets within a row fit in 32 bits (K < 2^31).
  const int row_bytes = static_cast<int>(w.row_bytes), x_cols = static_cast<int>(x.cols);
  const int n_units = static_cast<int>(ceil_div(w.Kp, kUnitCols));

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // rows (g, g, g + 8, g + 8) x tokens (2c, 2c + 1, 2c, 2c + 1)
  for (int unit = k_part; unit < n_units; unit += k_warps) {
    const int col0 = unit * kUnitCols + c * kSliceCols;  // this thread's first stored column
    const int byte0 = static_cast<int>(packed_bytes(F, col0));
    uint32_t w0[S::kWords], w1[S::kWords];
    load_slice<kVec>(row0, byte0, ok0 ? row_bytes - byte0 : 0, w0);
    load_slice<kVec>(row1, byte0, ok1 ? row_bytes - byte0 : 0, w1);
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
    const int64_t t = 2 * c;
    if (t < x.M) {
      if (ok0) store_output(y, x, w.N, t, r0, acc[0]);
      if (ok1) store_output(y, x, w.N, t, r1, acc[2]);
    }
    if (t + 1 < x.M) {
      if (ok0) store_output(y, x, w.N, t + 1, r0, acc[1]);
      if (ok1) store_output(y, x, w.N, t + 1, r1, acc[3]);
    }
  }
}

template <Format F, int kSliceCols, int kVec>
cudaError_t launch(const PackedWeight& w, const Activations& x, const Output& y, cudaStream_t stream) {
  // As many warps per row tile as there are units to share (up to 8): K=4096 int4 has 8 units of 512
  // columns, int3.5 4 units of 1024 columns (two row tiles per block then).
  const int64_t n_units = ceil_div(w.Kp, 4 * kSliceCols);
  int k_warps = 1;
  while (k_warps < kWarps && 2 * k_warps <= n_units) k_warps *= 2;
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
  // Slices: int4 128 columns (4 x 16 bytes), int3.5 256 columns (7 x 16 bytes) or, for rows that are
  // only 4-byte aligned, 64 columns (7 x 4 bytes).
  if (w.format == Format::kInt4) {
    return w.vector_bytes == 16 ? launch<Format::kInt4, 128, 16>(w, x, y, stream) : cudaErrorInvalidValue;
  }
  if (w.vector_bytes == 16) return launch<Format::kInt35, 256, 16>(w, x, y, stream);
  if (w.vector_bytes == 4) return launch<Format::kInt35, 64, 4>(w, x, y, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lowbit
