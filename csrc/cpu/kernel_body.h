// The CPU kernels, written once over a small set of per-ISA primitives.
//
// Included by each isa_*.cpp inside its own namespace, after that file defines `struct Isa`:
//   Vec, kWidth, kVecs = 32 / kWidth        float vector, and how many cover one 32-column chunk
//   zero, set1, load, store, add, sub, mul, fma  the obvious float vector operations
//   vec_sum(Vec)                             the sum of a vector's lanes
//   half_to_float(uint16_t), load_halves(const uint16_t*)  one / kWidth float16 values as float32
//   float_to_half(float), store_halves(uint16_t*, Vec)     one / kWidth floats as float16, nearest even
//   Codes, decode<F>(const uint8_t*)         the 32 codes of one chunk, as bytes in the ISA's x-order
//   IntAcc, int_zero()                       integer partial sums of code * x
//   dot_acc(IntAcc, Codes, const int8_t* x)  adds one chunk's products (exact over an activation block)
//   Acc, acc_zero(), scale_add(IntAcc, s, Acc)  float sums of the dot products: Acc += s * (partial sums)
//   kInt8DotSeparate                         true when dot_acc's sums only hold codes up to 15; then
//   dot_acc_int8, scale_add_int8              the same two for int8 codes (0..255), on the same IntAcc
//   acc_fma(Acc a, s, Acc)                   Acc += s * a
//   acc_sum(Acc)                             their total
//   acc_sub(Acc, Vec)                        Acc - Vec (the Vec's lanes on some of the Acc's)
//   widen(Codes, Vec[kVecs])                 the codes as floats, x-order
//   store_bf16(uint16_t*, Vec)               kWidth floats as bfloat16, rounded to nearest even
//   kOrder[format][32]                       the x-order: chunk column held by each lane position
//   kChunksPerStep                           1, or 2 when the ISA also has the two-chunk primitives
//   kInt8MaxRows, kInt8MaxRowsVsBf16         KernelTable::int8_max_rows, int8_max_rows_vs_bf16
//   kBf16Lookup                              true when the ISA also has the table primitives:
//   Bf16Table, bf16_table(const Vec[kVecs])     32 floats as bfloat16, rounded to nearest even
//   load_bf16_table(const uint16_t*)              32 16-bit values (the lane offsets)
//   lookup_bf16(uint16_t*, Codes, table, offsets) the 32 codes of a chunk as table[code + offset]
//   Codes2, decode2<F>, dot_acc2              (used when an activation block spans two chunks):
//                                            the codes of chunks c and c + 1, each in x-order;
//                                            decode2 may read up to 4 bytes past them
//   Grid                                     the float lanes of the grid search (grid_body.h)
#pragma once

constexpr float kStep3 = 15.0f / 7.0f;  // 3-bit step relative to the 4-bit step (docs/FORMAT.md)
// Software prefetch distance on the weight stream; the hardware prefetcher alone left the 2-core
// AVX2 development machine at ~0.8 ms instead of ~0.7 ms for a 4096 x 4096 int4 GEMV.
constexpr int64_t kPrefetchBytes = 4096;

// Groups whose scales the GEMV converts to float32 at a time (a multiple of every ISA's kWidth).
constexpr int64_t kGroupsPerPass = 64;

// count float16 values as float32.
template <typename I>
void load_halves(const uint16_t* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + I::kWidth <= count; i += I::kWidth) I::store(out + i, I::load_halves(h + i));
  for (; i < count; ++i) out[i] = I::half_to_float(h[i]);
}

// One chunk's products of F's codes with int8 activations, and a block's sums scaled into the float sums.
template <Format F, typename I>
typename I::IntAcc dot_codes(typename I::IntAcc acc, const typename I::Codes& q, const int8_t* x) {
  if constexpr (F == Format::kInt8 && I::kInt8DotSeparate) return I::dot_acc_int8(acc, q, x);
  else return I::dot_acc(acc, q, x);
}

template <Format F, typename I>
typename I::Acc scale_add_codes(typename I::IntAcc dot, float s, typename I::Acc acc) {
  if constexpr (F == Format::kInt8 && I::kInt8DotSeparate) return I::scale_add_int8(dot, s, acc);
  else return I::scale_add(dot, s, acc);
}

// F: weight format, MB: activation rows, CX: 32-column chunks per activation block, kPairs: decode two
// chunks per step where the ISA can. (I is Isa, as a template parameter so that ISAs without two-chunk
// primitives compile the branch that uses them away.)
template <Format F, int MB, int CX, bool kPairs, typename I = Isa>
void gemv_rows_m(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  constexpr int64_t kBytes = chunk_bytes(F);
  const QWeight& w = a.w;
  const int64_t n_groups = w.Kp / w.group_size;
  const int64_t n_chunks = w.Kp / kChunk;
  const int64_t chunks_per_group = w.group_size / kChunk;
  const int64_t n_xblocks = n_chunks / CX;
  const int64_t xblocks_per_group = chunks_per_group / CX;

  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* codes = w.codes + n * n_chunks * kBytes;
    typename I::Acc total[MB];
    typename I::Vec zero_term[MB];
    float zero_tail[MB];
    for (int m = 0; m < MB; ++m) {
      total[m] = I::acc_zero();
      zero_term[m] = I::zero();
      zero_tail[m] = 0.0f;
    }
    // Group g adds s * (sum_k q_k x_k - z * sum_k x_k). The groups' scales and zero points are
    // converted a pass of groups at a time, and the zero-point terms summed as vectors there.
    for (int64_t g0 = 0; g0 < n_groups; g0 += kGroupsPerPass) {
      const int64_t count = n_groups - g0 < kGroupsPerPass ? n_groups - g0 : kGroupsPerPass;
      alignas(64) float s[kGroupsPerPass], z[kGroupsPerPass];
      load_halves<I>(w.scales + n * n_groups + g0, count, s);
      load_halves<I>(w.zeros + n * n_groups + g0, count, z);
      int64_t i = 0;
      for (; i + I::kWidth <= count; i += I::kWidth) {
        const typename I::Vec sz = I::mul(I::load(s + i), I::load(z + i));
        for (int m = 0; m < MB; ++m)
          zero_term[m] = I::fma(sz, I::load(a.xsum + m * n_groups + g0 + i), zero_term[m]);
      }
      for (; i < count; ++i)
        for (int m = 0; m < MB; ++m) zero_tail[m] += s[i] * z[i] * a.xsum[m * n_groups + g0 + i];

      for (int64_t g = g0; g < g0 + count; ++g) {
        // The first sum runs on int8 activations in integer arithmetic, one activation block (one
        // activation scale) at a time, into the group's own float sums: the total then takes one
        // dependent addition per group, not one per block.
        typename I::Acc group_total[MB];
        for (int m = 0; m < MB; ++m) group_total[m] = I::acc_zero();
        for (int64_t xb = g * xblocks_per_group; xb < (g + 1) * xblocks_per_group; ++xb) {
          typename I::IntAcc dot[MB];
          for (int m = 0; m < MB; ++m) dot[m] = I::int_zero();
          __builtin_prefetch(codes + xb * CX * kBytes + kPrefetchBytes);  // never faults, even past the end
          if constexpr (kPairs && CX == 2 && I::kChunksPerStep == 2) {
            static_assert(F != Format::kInt8 || !I::kInt8DotSeparate, "dot_acc2 must hold int8 codes' products");
            const int64_t c = xb * CX;
            const typename I::Codes2 q = I::template decode2<F>(codes + c * kBytes);
            for (int m = 0; m < MB; ++m) dot[m] = I::dot_acc2(dot[m], q, a.xq + m * w.Kp + c * kChunk);
          } else {
            for (int cc = 0; cc < CX; ++cc) {
              const int64_t c = xb * CX + cc;
              const typename I::Codes q = I::template decode<F>(codes + c * kBytes);
              for (int m = 0; m < MB; ++m) dot[m] = dot_codes<F, I>(dot[m], q, a.xq + m * w.Kp + c * kChunk);
            }
          }
          for (int m = 0; m < MB; ++m)
            group_total[m] = scale_add_codes<F, I>(dot[m], a.xscale[m * n_xblocks + xb], group_total[m]);
        }
        for (int m = 0; m < MB; ++m) total[m] = I::acc_fma(group_total[m], s[g - g0], total[m]);
      }
    }
    // One reduction per output: the zero-point terms leave the sums as vectors (short rows spend much of their
    // time here).
    const float b = a.bias ? a.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) a.y[m * w.N + n] = I::acc_sum(I::acc_sub(total[m], zero_term[m])) - zero_tail[m] + b;
  }
}

template <Format F, int MB, int CX>
void gemv_rows_m(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  // A two-chunk step may read a few bytes past its chunks (decode2), which only the weight's very last
  // step could take past the end of the buffer: the last row goes one chunk at a time.
  const int64_t paired_end = n_end == a.w.N ? n_end - 1 : n_end;
  gemv_rows_m<F, MB, CX, true>(a, n_begin, paired_end);
  gemv_rows_m<F, MB, CX, false>(a, paired_end, n_end);
}

template <Format F, int CX>
void gemv_rows(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  switch (a.M) {
    case 1: return gemv_rows_m<F, 1, CX>(a, n_begin, n_end);
    case 2: return gemv_rows_m<F, 2, CX>(a, n_begin, n_end);
    case 3: return gemv_rows_m<F, 3, CX>(a, n_begin, n_end);
    case 4: return gemv_rows_m<F, 4, CX>(a, n_begin, n_end);
    case 5: return gemv_rows_m<F, 5, CX>(a, n_begin, n_end);
    case 6: return gemv_rows_m<F, 6, CX>(a, n_begin, n_end);
    case 7: return gemv_rows_m<F, 7, CX>(a, n_begin, n_end);
    case 8: return gemv_rows_m<F, 8, CX>(a, n_begin, n_end);
    default: return;  // the op layer never passes M outside [1, kMaxGemvRows]
  }
}

// The op layer passes xblock = 32 or 64 (kXBlock, or group_size 32).
void gemv(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  visit_format(a.w.format, [&](auto format) {
    constexpr Format F = decltype(format)::value;
    if (a.xblock == 2 * kChunk) gemv_rows<F, 2>(a, n_begin, n_end);
    else gemv_rows<F, 1>(a, n_begin, n_end);
  });
}

inline void store_out(float* p, Isa::Vec v) { Isa::store(p, v); }
inline void store_out(uint16_t* p, Isa::Vec v) { Isa::store_bf16(p, v); }

// Dequantized rows in x-order, as float32 or bfloat16. With kLookup (bfloat16 on ISAs with
// kBf16Lookup, int4 and int3.5), each group's at most 16 + 8 distinct values (int3.5's 3-bit codes take
// entries 16..23) are computed once, exactly as the arithmetic computes every weight, and each code is one
// table lookup: the same tiles, faster.
template <Format F, typename Out, bool kLookup = false, typename I = Isa>
void dequant_rows(const QWeight& w, Out* rows, int64_t n_begin, int64_t n_end) {
  using Vec = typename I::Vec;
  constexpr int V = I::kVecs;
  constexpr int64_t kBytes = chunk_bytes(F);
  const int64_t n_groups = w.Kp / w.group_size;
  const int64_t n_chunks = w.Kp / kChunk;
  const int64_t chunks_per_group = w.group_size / kChunk;
  // w = (q - z) * s for 4-bit codes and (q * 15/7 - z) * s for 3-bit codes (odd columns of int3.5). The
  // vectors hold one chunk's lanes in x-order, or with kLookup the table entries (code i % 16).
  alignas(64) float code[kChunk], step[kChunk];
  alignas(64) uint16_t lane_offset[kChunk];  // table index offset: 16 on the lanes of 3-bit codes
  for (int i = 0; i < kChunk; ++i) {
    const bool three_bit = F == Format::kInt35 && I::kOrder[static_cast<int>(F)][i] % 2;
    lane_offset[i] = three_bit ? 16 : 0;
    code[i] = static_cast<float>(i % 16);
    step[i] = (kLookup ? i >= 16 : three_bit) ? kStep3 : 1.0f;
  }
  for (int64_t n = n_begin; n < n_end; ++n) {
    Out* out = rows + (n - n_begin) * w.Kp;
    const uint8_t* row_codes = w.codes + n * n_chunks * kBytes;
    for (int64_t g = 0; g < n_groups; ++g) {
      const float s = I::half_to_float(w.scales[n * n_groups + g]);
      const Vec vs = I::set1(s);
      const Vec offset = I::set1(-s * I::half_to_float(w.zeros[n * n_groups + g]));
      Vec lane_step[V];
      for (int v = 0; v < V; ++v) lane_step[v] = I::fma(I::load(step + v * I::kWidth), vs, I::zero());
      if constexpr (kLookup) {
        Vec values[V];
        for (int v = 0; v < V; ++v) values[v] = I::fma(I::load(code + v * I::kWidth), lane_step[v], offset);
        const auto table = I::bf16_table(values), offsets = I::load_bf16_table(lane_offset);
        for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
          __builtin_prefetch(row_codes + c * kBytes + kPrefetchBytes);
          I::lookup_bf16(out + c * kChunk, I::template decode<F>(row_codes + c * kBytes), table, offsets);
        }
      } else {
        for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
          Vec q[V];
          I::widen(I::template decode<F>(row_codes + c * kBytes), q);
          for (int v = 0; v < V; ++v)
            store_out(out + c * kChunk + v * I::kWidth, I::fma(q[v], lane_step[v], offset));
        }
      }
    }
  }
}

// int8's 256 codes per group do not fit the 32-entry table: it always takes the arithmetic.
template <bool kLookup, typename Out>
void dequant_to(const QWeight& w, Out* rows, int64_t n_begin, int64_t n_end) {
  visit_format(w.format, [&](auto format) {
    constexpr Format F = decltype(format)::value;
    dequant_rows<F, Out, kLookup && F != Format::kInt8>(w, rows, n_begin, n_end);
  });
}

void dequant(const DequantArgs& a, int64_t n_begin, int64_t n_end) {
  if (a.out_bf16) dequant_to<Isa::kBf16Lookup>(a.w, a.out_bf16, n_begin, n_end);
  else dequant_to<false>(a.w, a.out, n_begin, n_end);
}

// The cache's values as float32: a vector of them, or one.
template <typename I>
typename I::Vec load_cache(const float* p) { return I::load(p); }
template <typename I>
typename I::Vec load_cache(const uint16_t* p) { return I::load_halves(p); }
template <typename I>
float cache_value(const float* p) { return *p; }
template <typename I>
float cache_value(const uint16_t* p) { return I::half_to_float(*p); }

template <typename T>
void attend_cache(const AttendArgs& a, const T* k_cache, const T* v_cache, int64_t item_begin, int64_t item_end) {
  using I = Isa;
  constexpr int W = I::kWidth;
  const int64_t D = a.D, Dv = a.D / W * W;  // vector part, then a scalar tail (head_dim need not be a multiple)
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t r = item / a.H, h = item % a.H, length = a.lengths[r];
    const int64_t cache_row = (a.slots[r] * a.Hkv + h / (a.H / a.Hkv)) * a.S * D;
    const float* q = a.q + item * D;
    const T* keys = k_cache + cache_row;
    const T* values = v_cache + cache_row;
    float* scores = a.scores;
    float top = -__builtin_inff();
    for (int64_t j = 0; j < length; ++j) {
      const T* key = keys + j * D;
      typename I::Vec acc = I::zero();  // positions are independent: no need for several chains
      int64_t d = 0;
      for (; d < Dv; d += W) acc = I::fma(I::load(q + d), load_cache<I>(key + d), acc);
      float dot = I::vec_sum(acc);
      for (; d < D; ++d) dot += q[d] * cache_value<I>(key + d);
      scores[j] = dot * a.scale;
      top = scores[j] > top ? scores[j] : top;
    }
    // A NaN score (from a NaN query or key) fails every comparison: keep it, so that the output is NaN.
    for (int64_t j = 0; j < length; ++j) top = scores[j] != scores[j] ? scores[j] : top;
    float total = 0.0f;
    for (int64_t j = 0; j < length; ++j) {
      scores[j] = __builtin_expf(scores[j] - top);
      total += scores[j];
    }
    const float inv_total = 1.0f / total;
    float* out = a.out + item * D;
    for (int64_t d0 = 0; d0 < Dv; d0 += 4 * W) {  // four vectors of the output per pass: independent chains
      const int nv = Dv - d0 >= 4 * W ? 4 : static_cast<int>((Dv - d0) / W);
      typename I::Vec acc[4] = {I::zero(), I::zero(), I::zero(), I::zero()};
      for (int64_t j = 0; j < length; ++j) {
        const typename I::Vec p = I::set1(scores[j]);
        for (int v = 0; v < nv; ++v) acc[v] = I::fma(p, load_cache<I>(values + j * D + d0 + v * W), acc[v]);
      }
      for (int v = 0; v < nv; ++v) I::store(out + d0 + v * W, I::mul(acc[v], I::set1(inv_total)));
    }
    for (int64_t d = Dv; d < D; ++d) {
      float acc = 0.0f;
      for (int64_t j = 0; j < length; ++j) acc += scores[j] * cache_value<I>(values + j * D + d);
      out[d] = acc * inv_total;
    }
  }
}

void attend(const AttendArgs& a, int64_t item_begin, int64_t item_end) {
  if (a.k_half) attend_cache(a, a.k_half, a.v_half, item_begin, item_end);
  else attend_cache(a, a.k, a.v, item_begin, item_end);
}

// Plain loops over a block, which the compiler vectorizes with each ISA file's own instruction set.
XBlockCodes quantize_block(const float* v, int64_t n, const int32_t* lane_odd, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const float a = __builtin_fabsf(v[i]);
    finite &= a < __builtin_huge_valf();  // false for inf and NaN
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    for (int64_t i = 0; i < n; ++i) q[i] = 0;
    return {__builtin_nanf(""), 0, 0};
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t code[kXBlock];  // codes in a local array: stores through q may alias anything
  int32_t all = 0, odd = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float t = v[i] * inv;  // |t| <= 127; round half away from zero, without branches
    code[i] = static_cast<int32_t>(t + __builtin_copysignf(0.5f, t));
    all += code[i];
    odd += code[i] * lane_odd[i];
  }
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(code[i]);
  return {amax / 127.0f, all, odd};
}

void rope(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  using I = Isa;
  constexpr int W = I::kWidth;
  const int64_t half = d / 2, vector_part = half / W * W;
  int64_t i = 0;
  for (; i < vector_part; i += W) {
    const typename I::Vec a = I::load(x + i), b = I::load(x + i + half);
    I::store(out + i, I::sub(I::mul(a, I::load(cos + i)), I::mul(b, I::load(sin + i))));
    I::store(out + i + half, I::add(I::mul(b, I::load(cos + i + half)), I::mul(a, I::load(sin + i + half))));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

void to_half(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + Isa::kWidth <= n; i += Isa::kWidth) Isa::store_halves(out + i, Isa::load(x + i));
  for (; i < n; ++i) out[i] = Isa::float_to_half(x[i]);
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + __builtin_expf(-gate[i])) * up[i];
}

#include "grid_body.h"

KernelTable make_table(const char* name) {
  KernelTable t{name, {}, Isa::kInt8MaxRows, Isa::kInt8MaxRowsVsBf16, gemv, dequant, attend, rope, to_half,
                silu_mul, quantize_block, mse_grid, nullptr};
  for (int f = 0; f < kFormats; ++f)
    for (int i = 0; i < kChunk; ++i) t.x_order[f][i] = Isa::kOrder[f][i];
  return t;
}
