// Prefill (M > 8 activation rows): a tiled tensor-core GEMM on the canonical layout.
//
// A block computes a tile of y^T (kRows weight rows x kTokens tokens) over a range of K, in stages of
// 256 columns. The packed weight rows and the activation rows of each stage are copied to shared memory
// with cp.async, kStages deep, so the copies of later stages run under the math of the current one.
// Each warp then reads the packed slices of its rows (64 columns of rows g and g + 8 per thread, the
// fragment mapping of device.cuh), dequantizes them in registers and multiplies them with its tokens'
// activations, read from shared memory in pair order. Weights cross global memory once per token tile
// as packed bytes and are dequantized once per warp that uses them.
//
// When the output tiles are too few to fill the GPU (small M, few rows), K is split across blocks:
// each writes float32 partial sums to a workspace, and a second kernel adds them up in a fixed order
// (no atomics: the result does not depend on timing) and applies row scale, bias and output type.
#include <algorithm>
#include <atomic>
#include <tuple>

#include "device.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kStageCols = 256;                // columns per pipeline stage: 4 threads x 64
constexpr int kStages = 3;                     // stages in flight
constexpr int kXRowBytes = 2 * kStageCols;     // one token's activations per stage
constexpr int kSliceCols = kStageCols / 4;     // per thread and row

// Warp grid kWR x kWN; a warp computes kMT 16-row tiles x kNT 8-token tiles.
template <int kWR_, int kWN_, int kMT_, int kNT_>
struct Tile {
  static constexpr int kWR = kWR_, kWN = kWN_, kMT = kMT_, kNT = kNT_;
  static constexpr int kThreads = 32 * kWR * kWN;
  static constexpr int kRows = 16 * kMT * kWR;
  static constexpr int kTokens = 8 * kNT * kWN;
};
using NarrowTile = Tile<8, 1, 1, 2>;  // 128 rows x 16 tokens: M <= 16, weight-bandwidth bound
using WideTile = Tile<4, 2, 2, 4>;    // 128 rows x 64 tokens: each warp 32 rows x 32 tokens

template <Format F>
struct StageLayout {
  static constexpr int kWBytes = static_cast<int>(packed_bytes(F, kStageCols));  // per row: 128 or 112
  // Shared-memory row pitch. int4 rows get 16 bytes of padding so that the 8 lanes of a quarter-warp
  // (rows g, g + 1 x slices c = 0..3, 32 bytes apart) hit different banks; int3.5's 112-byte rows already
  // do (word 28 g + 7 c + i is distinct mod 32 over the warp).
  static constexpr int kWPitch = F == Format::kInt4 ? kWBytes + 16 : kWBytes;
};

template <class T, Format F>
__host__ __device__ constexpr int stage_bytes() {
  return T::kRows * StageLayout<F>::kWPitch + T::kTokens * kXRowBytes;
}

template <class T, Format F>
__host__ __device__ constexpr int smem_bytes() {
  return kStages * stage_bytes<T, F>();
}

// Activation tile: 16-byte chunk q (8 columns) of token row t is stored at chunk x_chunk(t, q). The
// 8 lanes of a quarter-warp read one chunk each, of tokens t, t + 1 (t even) and slices c = 0..3
// (chunks 8c + k, for one k): XOR-ing the low 3 bits with c and t's parity spreads them over all 8 bank
// groups of the 128-byte row segment.
__device__ __forceinline__ int x_chunk(int t, int q) { return q ^ ((((q >> 3) & 3) << 1) | (t & 1)); }

template <class T, Format F, int kVec>
__global__ void __launch_bounds__(T::kThreads) gemm_kernel(const PackedWeight w, const Activations x,
                                                           const Output y, float* workspace,
                                                           const int stages_per_split) {
  using S = Slice<F, kSliceCols>;
  using L = StageLayout<F>;
  constexpr int kWTileBytes = T::kRows * L::kWPitch;
  constexpr int kStageBytes = stage_bytes<T, F>();
  constexpr int kVecsPerRow = L::kWBytes / kVec;
  static_assert(L::kWBytes % kVec == 0, "a stage of a row is whole vectors");
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const int wr = warp / T::kWN, wn = warp % T::kWN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * T::kRows;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T::kTokens;
  const int n_stages = static_cast<int>(ceil_div(w.Kp, kStageCols));
  const int s_begin = blockIdx.z * stages_per_split;
  const int n_local = min(stages_per_split, n_stages - s_begin);  // >= 1 (plan_gemm)
  const int row_bytes = static_cast<int>(w.row_bytes), x_cols = static_cast<int>(x.cols);
  const int group_shift = __ffs(static_cast<int>(w.group_size)) - 1;

  // Copies stage `stage` (global index) into buffer `buf`; rows, columns and tokens past the end are
  // zero-filled without being read.
  const auto load_stage = [&](int stage, int buf) {
    uint8_t* wt = smem + buf * kStageBytes;
    uint8_t* xt = wt + kWTileBytes;
    const int byte0 = stage * L::kWBytes;
    for (int i = threadIdx.x; i < T::kRows * kVecsPerRow; i += T::kThreads) {
      const int r = i / kVecsPerRow, v = i % kVecsPerRow;
      const int64_t row = n0 + r;
      const int offset = byte0 + v * kVec;
      const bool valid = row < w.N && offset < row_bytes;
      const uint8_t* src = valid ? w.codes + row * w.row_stride + offset : w.codes;
      if constexpr (kVec == 16) {
        cp_async_16(wt + r * L::kWPitch + v * 16, src, valid);
      } else {
        cp_async_4(wt + r * L::kWPitch + v * 4, src, valid);
      }
    }
    for (int i = threadIdx.x; i < T::kTokens * (kXRowBytes / 16); i += T::kThreads) {
      const int t = i / (kXRowBytes / 16), q = i % (kXRowBytes / 16);
      const int64_t token = t0 + t;
      const int col = stage * kStageCols + 8 * q;
      const bool valid = token < x.M && col < x_cols;
      const uint16_t* src = valid ? x.x + token * x.row_stride + col : x.x;
      cp_async_16(xt + t * kXRowBytes + 16 * x_chunk(t, q), src, valid);
    }
  };

  // Raw scale and zero (s | z << 16) of this thread's rows [tile i][row g, g + 8] for the two 32-column
  // chunks [h] of its slice; loaded one stage ahead, into registers.
  const auto load_params = [&](int stage, uint32_t (&out)[T::kMT][2][2]) {
#pragma unroll
    for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t row = n0 + wr * T::kMT * 16 + 16 * i + 8 * j + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int group = (stage * kStageCols + kSliceCols * c + 32 * h) >> group_shift;
          const bool ok = row < w.N && group < w.n_groups;
          const int64_t k = ok ? row * w.n_groups + group : 0;
          const uint32_t s = __ldg(reinterpret_cast<const unsigned short*>(w.scales) + k);
          const uint32_t z = __ldg(reinterpret_cast<const unsigned short*>(w.zeros) + k);
          out[i][j][h] = ok ? s | z << 16 : 0u;
        }
      }
    }
  };

  float acc[T::kMT][T::kNT][4] = {};

  const auto compute = [&](int buf, const uint32_t (&params)[T::kMT][2][2]) {
    const uint8_t* wt = smem + buf * kStageBytes;
    const uint8_t* xt = wt + kWTileBytes;
    uint32_t slice[T::kMT][2][S::kWords];
#pragma unroll
    for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint8_t* p = wt + (wr * T::kMT * 16 + 16 * i + 8 * j + g) * L::kWPitch + c * S::kBytes;
        if constexpr (F == Format::kInt4) {  // 32 bytes at a 16-byte aligned offset
#pragma unroll
          for (int v = 0; v < S::kWords / 4; ++v) {
            const uint4 q = reinterpret_cast<const uint4*>(p)[v];
            slice[i][j][4 * v] = q.x, slice[i][j][4 * v + 1] = q.y, slice[i][j][4 * v + 2] = q.z,
                        slice[i][j][4 * v + 3] = q.w;
          }
        } else {  // 28 bytes at a 4-byte aligned offset
#pragma unroll
          for (int v = 0; v < S::kWords; ++v) slice[i][j][v] = reinterpret_cast<const uint32_t*>(p)[v];
        }
      }
    }
    GroupParams gp[T::kMT][2];
#pragma unroll
    for (int p = 0; p < S::kPieces; ++p) {
      if (p % 2 == 0) {  // a new 32-column chunk (a group is at least 32 columns)
#pragma unroll
        for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const uint32_t sz = params[i][j][p / 2];
            gp[i][j] = group_params(static_cast<uint16_t>(sz), static_cast<uint16_t>(sz >> 16));
          }
        }
      }
      uint32_t b[T::kNT][8];
#pragma unroll
      for (int n = 0; n < T::kNT; ++n) {
        const int t = wn * T::kNT * 8 + 8 * n + g;
        const int q = 8 * c + 2 * p;  // the piece's two chunks: columns 64 c + 16 p ..
        const uint8_t* row = xt + t * kXRowBytes;
        x_pairs(*reinterpret_cast<const uint4*>(row + 16 * x_chunk(t, q)), b[n]);
        x_pairs(*reinterpret_cast<const uint4*>(row + 16 * x_chunk(t, q + 1)), b[n] + 4);
      }
#pragma unroll
      for (int i = 0; i < T::kMT; ++i) {
        half2 a0[8], a1[8];
        S::dequant(slice[i][0], p, gp[i][0], a0);
        S::dequant(slice[i][1], p, gp[i][1], a1);
#pragma unroll
        for (int n = 0; n < T::kNT; ++n) mma_piece(acc[i][n], a0, a1, b[n]);
      }
    }
  };

  // The pipeline: stages it + 1 .. it + kStages - 1 are in flight while stage it is computed.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_local) load_stage(s_begin + s, s);
    cp_async_commit();
  }
  uint32_t params[T::kMT][2][2], next_params[T::kMT][2][2] = {};
  load_params(s_begin, params);
  for (int it = 0; it < n_local; ++it) {
    cp_async_wait<kStages - 2>();  // stage it has landed (for this thread's copies) ...
    __syncthreads();                // ... and for everyone's; buffer (it - 1) % kStages is free again
    const int ahead = it + kStages - 1;
    if (ahead < n_local) load_stage(s_begin + ahead, ahead % kStages);
    cp_async_commit();
    if (it + 1 < n_local) load_params(s_begin + it + 1, next_params);
    compute(it % kStages, params);
#pragma unroll
    for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) params[i][j][0] = next_params[i][j][0], params[i][j][1] = next_params[i][j][1];
    }
  }
  cp_async_wait<0>();

  // acc[i][n] = rows (g, g, g + 8, g + 8) x tokens (2c, 2c + 1, 2c, 2c + 1) of tile (i, n).
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
    for (int n = 0; n < T::kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = n0 + wr * T::kMT * 16 + 16 * i + g + 8 * (e / 2);
        const int64_t token = t0 + wn * T::kNT * 8 + 8 * n + 2 * c + e % 2;
        if (row < w.N && token < x.M) {
          if (split) {
            workspace[(blockIdx.z * x.M + token) * w.N + row] = acc[i][n][e];
          } else {
            store_output(y, x, w.N, token, row, acc[i][n][e]);
          }
        }
      }
    }
  }
}

// y = sum over splits of the workspace, in split order, then row scale, bias and output type.
__global__ void reduce_splits_kernel(const float* workspace, const int splits, const Activations x, const Output y,
                                     const int64_t N) {
  const int64_t total = x.M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += workspace[z * total + i];
    store_output(y, x, N, i / N, i % N, v);
  }
}

// The kernel for a tile shape and the weight's format and load width.
template <class T, Format F, int kVec>
struct Kernel {
  using Tile = T;
  static constexpr int kSmem = smem_bytes<T, F>();

  // Blocks that fit on one SM of the current device, 0 when the tile's shared memory does not. Computed
  // once per device, with the kernel's shared-memory limit raised there (every launch needs it): no
  // driver calls on later launches, which may be inside CUDA graph capture.
  static int resident_blocks() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cache[kMaxDevices] = {};  // blocks + 1, 0 = not yet known
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
    int known = cache[device].load(std::memory_order_relaxed);
    if (known == 0) {
      const void* fn = reinterpret_cast<const void*>(&gemm_kernel<T, F, kVec>);
      int optin = 0, blocks = 0;
      if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
          kSmem <= optin &&
          cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) == cudaSuccess &&
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, T::kThreads, kSmem) == cudaSuccess) {
        known = blocks + 1;
      } else {
        cudaGetLastError();  // a refused attribute is an answer ("does not fit"), not an error to report later
        known = 1;
      }
      cache[device].store(known, std::memory_order_relaxed);
    }
    return known - 1;
  }

  static void launch(dim3 grid, cudaStream_t stream, const PackedWeight& w, const Activations& x, const Output& y,
                     float* workspace, int stages_per_split) {
    gemm_kernel<T, F, kVec><<<grid, T::kThreads, kSmem, stream>>>(w, x, y, workspace, stages_per_split);
  }
};

template <class T, class Fn>
auto with_format(const PackedWeight& w, Fn&& fn) {
  if (w.format == Format::kInt4) return fn(Kernel<T, Format::kInt4, 16>{});
  if (w.vector_bytes == 16) return fn(Kernel<T, Format::kInt35, 16>{});
  return fn(Kernel<T, Format::kInt35, 4>{});
}

template <class Fn>
auto with_kernel(int config, const PackedWeight& w, Fn&& fn) {
  return config == 0 ? with_format<NarrowTile>(w, fn) : with_format<WideTile>(w, fn);
}

bool supported(const PackedWeight& w) { return w.vector_bytes >= (w.format == Format::kInt4 ? 16 : 4); }

}  // namespace

GemmPlan plan_gemm(const PackedWeight& w, int64_t M, int num_sms) {
  // The caller takes the dense path (config -1) for a load width the kernels lack, tiles too big for
  // this GPU's shared memory, or more token tiles than a grid has rows.
  GemmPlan plan{-1, 1, 0, 0};
  if (!supported(w)) return plan;
  const int config = M <= NarrowTile::kTokens ? 0 : 1;
  const auto [rows, tokens, blocks_per_sm] = with_kernel(config, w, [](auto kernel) {
    using K = decltype(kernel);
    return std::tuple<int, int, int>{K::Tile::kRows, K::Tile::kTokens, K::resident_blocks()};
  });
  if (blocks_per_sm < 1 || ceil_div(M, tokens) > 65535) return plan;
  plan.config = config;
  // Split K only when the output tiles fill less than one wave of resident blocks, into as many
  // splits as fill it, each still at least 2 stages long.
  const int64_t n_stages = ceil_div(w.Kp, kStageCols);
  const int64_t tiles = ceil_div(w.N, rows) * ceil_div(M, tokens);
  const int64_t resident = static_cast<int64_t>(num_sms) * blocks_per_sm;
  int64_t splits = 1;
  if (tiles < resident) splits = std::max<int64_t>(1, std::min<int64_t>({resident / tiles, n_stages / 2, 16}));
  plan.stages_per_split = ceil_div(n_stages, splits);
  plan.splits = static_cast<int>(ceil_div(n_stages, plan.stages_per_split));  // no empty split
  plan.workspace_floats = plan.splits > 1 ? plan.splits * M * w.N : 0;
  return plan;
}

cudaError_t gemm(const PackedWeight& w, const Activations& x, const Output& y, const GemmPlan& plan,
                 float* workspace, cudaStream_t stream) {
  if (plan.config < 0 || !supported(w) || x.M < 1 || w.N < 1 || (plan.splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t err = with_kernel(plan.config, w, [&](auto kernel) {
    using K = decltype(kernel);
    using T = typename K::Tile;
    if (K::resident_blocks() < 1) return cudaErrorInvalidConfiguration;  // also sets the smem limit
    const dim3 grid(static_cast<unsigned>(ceil_div(w.N, T::kRows)), static_cast<unsigned>(ceil_div(x.M, T::kTokens)),
                    static_cast<unsigned>(plan.splits));
    K::launch(grid, stream, w, x, y, workspace, static_cast<int>(plan.stages_per_split));
    return cudaGetLastError();
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t total = x.M * w.N;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 1 << 16));
  reduce_splits_kernel<<<blocks, 256, 0, stream>>>(workspace, plan.splits, x, y, w.N);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowbit
