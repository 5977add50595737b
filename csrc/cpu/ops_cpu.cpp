// CPU implementations of the lowbit ops: argument checks, activation layout, threading, and the
// choice between the int8 kernels (GEMV, in blocks of activation rows) and dequantize-then-GEMM; and the
// quantizer's "mse" grid search (grid_body.h), threaded over blocks of groups.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../op_entries.h"
#include "isa.h"
#include "linear.h"
#include "weight_memory.h"

namespace lowbit {
namespace cpu {
namespace {

// Rows of W dequantized per GEMM step: about 4 MiB, so the tile stays in the last-level cache while
// each BLAS call is large enough that repacking the activations for every tile costs little.
constexpr int64_t kGemmTileBytes = int64_t{4} << 20;
constexpr int64_t kGemmMinTileRows = 256;
// Bytes of packed W that the int8 path's blocks of activation rows pass over in turn: well inside L2.
constexpr int64_t kInt8SliceBytes = int64_t{128} << 10;

template <typename T>
float source_value(const T* row, int64_t offset) {
  return offset >= 0 ? static_cast<float>(row[offset]) : 0.0f;
}

}  // namespace

QWeight view_weight(const WeightShape& s, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros) {
  return QWeight{s.format,
                 qweight.data_ptr<uint8_t>(),
                 reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                 reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::Half>()),
                 s.N,
                 s.Kp,
                 s.group_size};
}

void check_perm_values(const char* op, const std::optional<at::Tensor>& perm, int64_t K) {
  if (!perm) return;
  const int32_t* p = perm->data_ptr<int32_t>();
  std::vector<bool> seen(K, false);
  for (int64_t j = 0; j < K; ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < K, op, ": perm[", j, "] = ", p[j], " is outside [0, ", K, ")");
    TORCH_CHECK_VALUE(!seen[p[j]], op, ": perm is not a permutation, ", p[j], " appears twice");
    seen[p[j]] = true;
  }
}

void source_offsets(int64_t K, int64_t Kp, const int32_t* perm, const int* x_order, int64_t stride, int64_t* src) {
  for (int64_t j = 0; j < Kp; ++j) {
    const int64_t col = j / kChunk * kChunk + x_order[j % kChunk];
    src[j] = col < K ? (perm ? perm[col] : col) * stride : -1;
  }
}

template <typename T>
void quantize_x(const KernelTable& kernels, const int* x_order, const QWeight& w, const int64_t* src, const T* x,
                int64_t row_stride, int64_t M, const Int8Buffers& buf) {
  const float odd_scale = w.format == Format::kInt35 ? 15.0f / 7.0f : 1.0f;
  int32_t lane_odd[kXBlock];
  float lane_scale[kXBlock];
  for (int i = 0; i < kXBlock; ++i) {
    lane_odd[i] = x_order[i % kChunk] % 2;
    lane_scale[i] = lane_odd[i] ? odd_scale : 1.0f;
  }
  const int64_t Kp = w.Kp, group_size = w.group_size, n_groups = Kp / group_size, xblock = int8_xblock(w);
  // float32 rows already in the kernels' order (no permutation or padding, columns in order, no 3-bit columns to
  // pre-scale: the decode step's int4 and int8 layers on the interleaved kernels) are quantized where they lie.
  bool in_place = std::is_same_v<T, float> && odd_scale == 1.0f;
  for (int64_t j = 0; in_place && j < Kp; ++j) in_place = src[j] == j;
  at::parallel_for(0, M, rows_per_task(Kp), [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      const T* row = x + m * row_stride;
      for (int64_t b = 0; b < Kp; b += xblock) {
        float gathered[kXBlock];
        const float* v = gathered;
        if constexpr (std::is_same_v<T, float>)
          if (in_place) v = row + b;
        if (v == gathered)
          for (int64_t i = 0; i < xblock; ++i) gathered[i] = source_value(row, src[b + i]) * lane_scale[i];
        const XBlockCodes c = kernels.quantize_block(v, xblock, lane_odd, buf.xq + m * Kp + b);
        // A non-finite block's NaN scale makes every output of the row NaN, as the float product would be NaN or
        // inf there (F.linear), instead of reading the value as 0. The zero-point term uses the sum of the int8
        // activations as they are (odd columns unscaled), so the kernel computes exactly W x' with x' the
        // dequantized activations: no error from the large, nearly cancelling q * x and z * x sums.
        buf.xscale[m * (Kp / xblock) + b / xblock] = c.scale;
        const float block_sum = c.scale * (static_cast<float>(c.all - c.odd) + static_cast<float>(c.odd) / odd_scale);
        float& group_sum = buf.xsum[m * n_groups + b / group_size];
        group_sum = (b % group_size == 0 ? 0.0f : group_sum) + block_sum;
      }
    }
  });
}

template void quantize_x<float>(const KernelTable&, const int*, const QWeight&, const int64_t*, const float*, int64_t, int64_t,
                               const Int8Buffers&);

void int8_gemv(const KernelTable& kernels, const QWeight& w, int64_t M, const float* bias, const Int8Buffers& buf,
               float* y) {
  const int64_t xblock = int8_xblock(w), n_xblocks = w.Kp / xblock, n_groups = w.Kp / w.group_size;
  const int64_t row_bytes = packed_row_bytes(w.format, w.Kp);
  const int64_t slice_rows = std::max<int64_t>(1, kInt8SliceBytes / row_bytes);
  const auto block_args = [&](int64_t m0) {
    return GemvArgs{w, buf.xq + m0 * w.Kp, buf.xscale + m0 * n_xblocks, buf.xsum + m0 * n_groups, bias,
                    y + m0 * w.N, std::min(kMaxGemvRows, M - m0), xblock};
  };
  // Threads get at least 16 KiB of weights each: smaller layers are not worth waking a thread for.
  const int64_t grain = std::max<int64_t>(16, 16384 / row_bytes);
  at::parallel_for(0, w.N, grain, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += slice_rows)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvRows)
        kernels.gemv(block_args(m0), n0, std::min(n_end, n0 + slice_rows));
  });
}

InterleavedWeight interleave(const QWeight& w) {
  constexpr int64_t R = kInterleave;
  const int64_t n_blocks = (w.N + R - 1) / R, n_groups = w.Kp / w.group_size, n_chunks = w.Kp / kChunk;
  const int64_t chunk_bytes_in = chunk_bytes(w.format), block_chunk = interleaved_chunk_bytes(w.format);
  InterleavedWeight out;
  out.codes = zeros_for_streaming({n_blocks * n_chunks * block_chunk + kInterleavedTailBytes}, at::kByte);
  out.scales = zeros_for_streaming({n_blocks, n_groups, R}, at::kHalf);
  out.zeros = zeros_for_streaming({n_blocks, n_groups, R}, at::kHalf);
  uint8_t* codes = out.codes.data_ptr<uint8_t>();
  uint16_t* scales = reinterpret_cast<uint16_t*>(out.scales.data_ptr<at::Half>());
  uint16_t* zeros = reinterpret_cast<uint16_t*>(out.zeros.data_ptr<at::Half>());
  at::parallel_for(0, w.N, R, [&](int64_t n_begin, int64_t n_end) {
    uint8_t q[kChunk];  // one chunk's codes in column order
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t b = n / R, r = n % R;
      for (int64_t g = 0; g < n_groups; ++g) {
        scales[(b * n_groups + g) * R + r] = w.scales[n * n_groups + g];
        zeros[(b * n_groups + g) * R + r] = w.zeros[n * n_groups + g];
      }
      for (int64_t c = 0; c < n_chunks; ++c) {
        const uint8_t* in = w.codes + (n * n_chunks + c) * chunk_bytes_in;
        for (int k = 0; k < kChunk; ++k) q[k] = canonical_code(w.format, in, k);
        uint8_t* o = codes + (b * n_chunks + c) * block_chunk;
        if (w.format == Format::kInt8) {
          for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 4; ++i) o[64 * j + 4 * r + i] = q[4 * j + i];
        } else if (w.format == Format::kInt4) {
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) o[64 * j + 4 * r + i] = q[8 * j + i] | q[8 * j + 4 + i] << 4;
        } else {
          for (int j = 0; j < 2; ++j) {
            const uint8_t* col = q + 16 * j;
            uint8_t* step = o + 112 * j;
            for (int i = 0; i < 4; ++i) step[4 * r + i] = col[2 * i] | col[8 + 2 * i] << 4;
            uint32_t odd = 0;
            for (int i = 0; i < 8; ++i) odd |= static_cast<uint32_t>(col[2 * i + 1]) << (3 * i);
            for (int i = 0; i < 3; ++i) step[64 + 3 * r + i] = static_cast<uint8_t>(odd >> (8 * i));
          }
        }
      }
    }
  });
  out.view = QWeight{w.format, codes, scales, zeros, w.N, w.Kp, w.group_size};
  return out;
}

void interleaved_gemv(const KernelTable& kernels, const QWeight& w, int64_t M, const float* bias,
                      const Int8Buffers& buf, float* y) {
  const int64_t xblock = int8_xblock(w), n_xblocks = w.Kp / xblock, n_groups = w.Kp / w.group_size;
  const int64_t n_blocks = (w.N + kInterleave - 1) / kInterleave;
  const int64_t block_bytes = kInterleave * packed_row_bytes(w.format, w.Kp);
  // Threads get at least 16 KiB of weights each, as in int8_gemv, and pass over them in slices that stay in L2
  // while every block of activation rows runs.
  const int64_t grain = std::max<int64_t>(1, 16384 / block_bytes);
  const int64_t slice = std::max<int64_t>(1, kInt8SliceBytes / block_bytes);
  at::parallel_for(0, n_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b0 = b_begin; b0 < b_end; b0 += slice)
      for (int64_t m0 = 0; m0 < M; m0 += kInterleavedRows)
        kernels.interleaved_gemv(GemvArgs{w, buf.xq + m0 * w.Kp, buf.xscale + m0 * n_xblocks,
                                          buf.xsum + m0 * n_groups, bias, y + m0 * w.N,
                                          std::min(kInterleavedRows, M - m0), xblock},
                                 b0, std::min(b_end, b0 + slice));
  });
}

namespace {

// GEMM input: x rows [M, K] laid out as [M, Kp] in x-order (as quantize_x), converted to Out (float32, or
// bfloat16 rounded to nearest even).
template <typename T, typename Out>
void layout_x(const T* x, int64_t row_stride, int64_t M, const int64_t* src, int64_t Kp, Out* out) {
  at::parallel_for(0, M, 16, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) {
      const T* row = x + m * row_stride;
      Out* o = out + m * Kp;
      for (int64_t j = 0; j < Kp; ++j) o[j] = src[j] >= 0 ? static_cast<Out>(row[src[j]]) : Out(0);
    }
  });
}

// y [M, N] (xg's dtype) = xg [M, Kp] (layout_x, float32 or bfloat16) @ W.T, W dequantized a tile of rows at a
// time into xg's dtype, multiplied by BLAS: the path for many activation rows.
void dequant_gemm(const KernelTable& kernels, const QWeight& w, const at::Tensor& xg, const at::Tensor& y) {
  const bool bf16 = xg.scalar_type() == at::kBFloat16;
  const int64_t tile_rows =
      std::min(w.N, std::max<int64_t>(kGemmMinTileRows, kGemmTileBytes / (w.Kp * xg.element_size())));
  const at::Tensor tile = at::empty({tile_rows, w.Kp}, xg.options());
  for (int64_t n0 = 0; n0 < w.N; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, w.N - n0);
    at::parallel_for(n0, n0 + rows, 4, [&](int64_t n_begin, int64_t n_end) {
      const int64_t offset = (n_begin - n0) * w.Kp;
      kernels.dequant(bf16 ? DequantArgs{w, nullptr, reinterpret_cast<uint16_t*>(tile.data_ptr()) + offset}
                           : DequantArgs{w, tile.data_ptr<float>() + offset, nullptr},
                      n_begin, n_end);
    });
    at::Tensor y_cols = y.narrow(1, n0, rows);
    at::mm_out(y_cols, xg, tile.narrow(0, 0, rows).t());
  }
}

// Per-thread buffers for the activation layout, reused across calls: a decode step (M <= kMaxGemvRows)
// allocates nothing but its output. Larger calls allocate their int8 buffers, so that one long prompt
// does not pin them for the thread's lifetime.
struct Scratch {
  std::vector<int64_t> src;
  std::vector<int8_t> xq;
  std::vector<float> xscale, xsum, y;
};
thread_local Scratch scratch;

// The int8 path's buffers for the op: the scratch up to kMaxGemvRows rows, allocated beyond.
Int8Buffers int8_buffers(int64_t M, const WeightShape& s, int64_t xblock, bool need_y) {
  const int64_t n_xq = M * s.Kp, n_xscale = M * s.Kp / xblock, n_xsum = M * s.n_groups;
  const int64_t n_y = need_y ? M * s.N : 0;
  if (M <= kMaxGemvRows) {
    scratch.xq.resize(n_xq);
    scratch.xscale.resize(n_xscale);
    scratch.xsum.resize(n_xsum);
    scratch.y.resize(n_y);
    return {scratch.xq.data(), scratch.xscale.data(), scratch.xsum.data(), scratch.y.data(), at::Tensor()};
  }
  at::Tensor storage = at::empty({n_xscale + n_xsum + n_y + (n_xq + 3) / 4}, at::kFloat);
  float* f = storage.data_ptr<float>();
  return {reinterpret_cast<int8_t*>(f + n_xscale + n_xsum + n_y), f, f + n_xscale, f + n_xscale + n_xsum, storage};
}


at::Tensor linear_cpu(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                      const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_activation(op, s, x, bias, qweight);
  check_perm_values(op, perm, s.K);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  const at::Tensor x2 = x.reshape({-1, s.K});
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());

  const KernelTable& kernels = active_kernels();
  const QWeight w = view_weight(s, qweight, scales, zeros);
  const int* x_order = kernels.x_order[static_cast<int>(format)];
  scratch.src.resize(s.Kp);
  source_offsets(s.K, s.Kp, perm ? perm->data_ptr<int32_t>() : nullptr, x_order, x2.stride(1), scratch.src.data());
  const at::Tensor bias_f32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias ? bias_f32.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty(out_shape, x.options());

  if (M <= int8_max_rows(x.scalar_type() == at::kBFloat16)) {
    const bool direct = x.scalar_type() == at::kFloat;  // write float32 results straight into out
    const Int8Buffers buf = int8_buffers(M, s, int8_xblock(w), !direct);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowbit_quantize_x", [&] {
      quantize_x<scalar_t>(kernels, x_order, w, scratch.src.data(), x2.data_ptr<scalar_t>(), x2.stride(0), M, buf);
    });
    float* y = direct ? out.data_ptr<float>() : buf.y;
    int8_gemv(kernels, w, M, bias_ptr, buf, y);
    if (!direct) out.view({M, s.N}).copy_(at::from_blob(y, {M, s.N}, at::kFloat));
    return out;
  }

  // Dequantize a tile of rows (in the same x-order as the activations), multiply with BLAS. bfloat16
  // activations multiply in bfloat16 (float32 accumulation, as F.linear does) where the CPU has native
  // bfloat16 dot products.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && native_bf16_gemm();
  const at::Tensor xg = at::empty({M, s.Kp}, x.options().dtype(bf16_gemm ? at::kBFloat16 : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lowbit_layout_x", [&] {
    const scalar_t* x_rows = x2.data_ptr<scalar_t>();
    if (bf16_gemm) layout_x(x_rows, x2.stride(0), M, scratch.src.data(), s.Kp, xg.data_ptr<at::BFloat16>());
    else layout_x(x_rows, x2.stride(0), M, scratch.src.data(), s.Kp, xg.data_ptr<float>());
  });
  // y [M, N] is the output itself when the GEMM runs in x's dtype; each tile's product lands in its
  // columns (BLAS writes strided rows directly).
  const bool direct = xg.scalar_type() == x.scalar_type();
  const at::Tensor y = direct ? out.view({M, s.N}) : at::empty({M, s.N}, xg.options());
  dequant_gemm(kernels, w, xg, y);
  if (bias) y.add_(bias_f32);
  if (!direct) out.view({M, s.N}).copy_(y);
  return out;
}

at::Tensor dequantize_cpu(const char* op, Format format, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, const std::optional<at::Tensor>& perm, int64_t group_size,
                          int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_perm_values(op, perm, s.K);
  const KernelTable& kernels = active_kernels();
  const QWeight w = view_weight(s, qweight, scales, zeros);
  // Kernel rows come in x-order: stored column j sits at chunk_start + inverse_order[j % 32], and
  // stored column j holds logical input feature perm[j]. source[j]: where logical column j is in a row.
  int inverse_order[kChunk];
  for (int i = 0; i < kChunk; ++i) inverse_order[kernels.x_order[static_cast<int>(format)][i]] = i;
  const int32_t* p = perm ? perm->data_ptr<int32_t>() : nullptr;
  std::vector<int64_t> source(s.K);
  for (int64_t j = 0; j < s.K; ++j) source[p ? p[j] : j] = j / kChunk * kChunk + inverse_order[j % kChunk];
  at::Tensor out = at::empty({s.N, s.K}, qweight.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, s.N, 16, [&](int64_t n_begin, int64_t n_end) {
    std::vector<float> row(s.Kp);
    for (int64_t n = n_begin; n < n_end; ++n) {
      kernels.dequant(DequantArgs{w, row.data(), nullptr}, n, n + 1);
      float* dst = o + n * s.K;
      for (int64_t j = 0; j < s.K; ++j) dst[j] = row[source[j]];
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mse_grid_cpu(const at::Tensor& groups, const std::optional<at::Tensor>& weight,
                                                double bits, at::ArrayRef<double> ratios, int64_t refits,
                                                bool integer_zeros) {
  constexpr const char* op = "lowbit.mse_grid";
  TORCH_CHECK_TYPE(groups.scalar_type() == at::kFloat, op, ": groups must be float32, got ", groups.scalar_type());
  TORCH_CHECK_VALUE(groups.dim() >= 1 && groups.size(-1) >= 1, op, ": groups must be [..., L] with L >= 1, got ",
                    groups.sizes());
  TORCH_CHECK_VALUE(bits == 3.5 || (bits == std::floor(bits) && bits >= 2 && bits <= 8), op,
                    ": bits must be 3.5 or an integer 2..8, got ", bits);
  TORCH_CHECK_VALUE(refits >= 0, op, ": refits must not be negative, got ", refits);
  const int64_t L = groups.size(-1), n = groups.numel() / L;
  int64_t P = 1;
  at::Tensor w;
  if (weight) {
    TORCH_CHECK_TYPE(weight->scalar_type() == at::kFloat, op, ": weight must be float32, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->device() == groups.device(), op, ": weight is on ", weight->device(),
                      " but groups is on ", groups.device());
    const int64_t d = weight->dim();
    TORCH_CHECK_VALUE(d >= 1 && d <= groups.dim() && weight->sizes() == groups.sizes().slice(groups.dim() - d), op,
                      ": weight must have the trailing dimensions of groups ", groups.sizes(), ", got ",
                      weight->sizes());
    // Weights of 1 everywhere (quantize_weight's, where no group has padding) leave every product as it is: the
    // kernel skips them.
    if (!at::all(weight->eq(1)).item<bool>()) {
      w = weight->contiguous();
      P = w.numel() / L;
    }
  }
  const at::Tensor x = groups.contiguous();
  const auto out_shape = groups.sizes().slice(0, groups.dim() - 1);
  at::Tensor scales = at::empty(out_shape, groups.options().dtype(at::kHalf));
  at::Tensor zeros = at::empty(out_shape, groups.options().dtype(at::kHalf));
  if (n == 0) return {scales, zeros};
  const std::vector<float> candidates(ratios.begin(), ratios.end());
  const GridArgs args{x.data_ptr<float>(),
                      w.defined() ? w.data_ptr<float>() : nullptr,
                      candidates.data(),
                      reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>()),
                      reinterpret_cast<uint16_t*>(zeros.data_ptr<at::Half>()),
                      n,
                      L,
                      P,
                      static_cast<int64_t>(candidates.size()),
                      refits,
                      bits == 3.5 ? 15.0f : static_cast<float>((1 << static_cast<int>(bits)) - 1),
                      bits == 3.5,
                      integer_zeros};
  const KernelTable& kernels = active_kernels();
  std::atomic<bool> in_range{true};
  // A thread takes at least ~16K columns' worth of blocks.
  const int64_t n_blocks = (n + kGridBlock - 1) / kGridBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kGridBlock * L));
  at::parallel_for(0, n_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> scratch(L * kGridScratchPerColumn);
    if (!kernels.mse_grid(args, b_begin * kGridBlock, std::min(n, b_end * kGridBlock), scratch.data()))
      in_range = false;
  });
  TORCH_CHECK_VALUE(in_range, "w has groups whose range exceeds float16 scales (|w| > ~9e5); cannot quantize");
  return {scales, zeros};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  impl_ops<linear_cpu, dequantize_cpu>(m);
  m.impl("mse_grid", &mse_grid_cpu);
}

}  // namespace cpu
}  // namespace lowbit
