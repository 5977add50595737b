// AVX-512 kernels: the AVX2 kernels with 512-bit integer dot products (vpdpbusd: u8 x s8, four products
// summed into each int32 lane, int8 codes as they are) over two 32-column chunks per step, and int3.5 codes
// unpacked with byte permutes and bit-field selects (VBMI: vpermb, vpmultishiftqb) instead of shuffles and
// multiplies.
// Compiled with -mavx512f -mavx512vl -mavx512bw -mavx512vbmi -mavx512vnni (and the AVX2 set); called only
// when the CPU has them.
#include <immintrin.h>

#include "kernels.h"

namespace lowbit {
namespace cpu {
namespace avx512_vnni_isa {

#include "avx2_isa.h"

// int3.5 unpacking: vpermb copies each 7-byte block into two 64-bit lanes, then vpmultishiftqb picks
// each code's bits: pair p of a block sits at bits [7p, 7p + 7), its 4-bit code at 7p and its 3-bit code
// at 7p + 4. The first lane of a block gives its eight 4-bit codes, the second its eight 3-bit codes:
// the same x-order as on AVX2 (per 16 columns, evens then odds).
struct Int35Lanes {
  uint8_t gather[64];  // source byte of each output byte: block b's bytes 7b .. 7b + 7, into lanes 2b, 2b + 1
  uint8_t offset[64];  // first bit of each code within its lane
  uint8_t mask[64];    // 15 for 4-bit codes, 7 for 3-bit codes
};
constexpr Int35Lanes int35_lanes() {
  Int35Lanes t{};
  for (int lane = 0; lane < 8; ++lane) {
    const bool odd = lane % 2;
    for (int i = 0; i < 8; ++i) {
      t.gather[8 * lane + i] = static_cast<uint8_t>(7 * (lane / 2) + i);  // the 8th byte is never used
      t.offset[8 * lane + i] = static_cast<uint8_t>(7 * i + (odd ? 4 : 0));
      t.mask[8 * lane + i] = odd ? 7 : 15;
    }
  }
  return t;
}
alignas(64) constexpr Int35Lanes kInt35 = int35_lanes();
// int4, two chunks: 128-bit lanes (chunk 0 bytes, the same, chunk 1 bytes, the same); the second copy
// of each is shifted right by 4, so each chunk's codes come out even columns first, as on AVX2.
alignas(64) constexpr uint16_t kInt4Shift[32] = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4,
                                                 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4};

// Word 2i of two concatenated registers, i = 0..31: the low half of each 32-bit lane.
alignas(64) constexpr uint16_t kEvenWords[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};

// The grid search's lanes (grid_body.h): 16 groups per vector.
struct Avx512Grid {
  static constexpr int kLanes = 16;
  using V = __m512;
  using M = __mmask16;
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V quotient(V a, V b, V r) {  // as Avx2Grid's
    const V q = _mm512_mul_ps(a, r);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, b, a), r, q);
  }
  static V neg(V v) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
  }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V round(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m256i halves(V v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V fp16(V v) { return _mm512_cvtph_ps(halves(v)); }
  static void store_halves(uint16_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), halves(v)); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M unordered(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
  static M both(M a, M b) { return a & b; }
  static M either(M a, M b) { return a | b; }
  static M finite(V v) { return lt(_mm512_abs_ps(v), _mm512_set1_ps(__builtin_inff())); }
  static bool all(M m) { return m == 0xFFFF; }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
};

struct Isa : Avx2Isa {
  using Grid = Avx512Grid;
  // bfloat16 tiles by table lookup (vpermw: 32 entries of 16 bits, indexed by code + lane offset).
  static constexpr bool kBf16Lookup = true;
  using Bf16Table = __m512i;
  static Bf16Table load_bf16_table(const uint16_t* p) { return _mm512_loadu_si512(p); }
  // Built in registers: through memory, the 64-byte reload of narrower stores stalls on store forwarding.
  static Bf16Table bf16_table(const Vec v[kVecs]) {
    const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(v[0])), round_bf16(v[1]), 1);
    const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(round_bf16(v[2])), round_bf16(v[3]), 1);
    return _mm512_permutex2var_epi16(lo, _mm512_load_si512(kEvenWords), hi);
  }
  static void lookup_bf16(uint16_t* out, Codes q, Bf16Table table, Bf16Table offsets) {
    const __m512i index = _mm512_or_si512(_mm512_cvtepu8_epi16(q), offsets);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(index, table));
  }

  static constexpr int kChunksPerStep = 2;
  // Measured as on AVX2 (avx2_isa.h): float32 x, 2.7-3.8x faster at 16 to 128 rows; bfloat16 x, faster
  // than dequantize + bfloat16 BLAS at 32 rows (2.6 vs 3.2 ms), slower at 64 (5.2 vs 4.0 ms).
  static constexpr int64_t kInt8MaxRowsVsBf16 = 32;

  template <Format F>
  static Codes decode(const uint8_t* p) {
    if (F != Format::kInt35) return Avx2Isa::decode<F>(p);
    const __m256i bytes = _mm256_maskz_loadu_epi8(0x3FFFu, p);  // the chunk's 14 bytes, nothing past them
    const __m256i blocks = _mm256_permutexvar_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(kInt35.gather)),
                                                   bytes);
    const __m256i offset = _mm256_load_si256(reinterpret_cast<const __m256i*>(kInt35.offset));
    return _mm256_and_si256(_mm256_multishift_epi64_epi8(offset, blocks),
                            _mm256_load_si256(reinterpret_cast<const __m256i*>(kInt35.mask)));
  }

  using Codes2 = __m512i;  // the codes of two consecutive chunks, each in x-order
  template <Format F>
  static Codes2 decode2(const uint8_t* p) {
    if (F == Format::kInt8) return _mm512_loadu_si512(p);  // the two chunks' 64 codes
    // 32 bytes: int4's two chunks, or int3.5's 28 bytes and 4 more that never reach a code (the
    // kernel body keeps this read inside the weight; a masked load is slower).
    const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    if (F == Format::kInt4) {
      const __m512i copies = _mm512_shuffle_i64x2(bytes, bytes, 0x50);  // 128-bit lanes 0, 0, 1, 1
      return _mm512_and_si512(_mm512_srlv_epi16(copies, _mm512_load_si512(kInt4Shift)), _mm512_set1_epi8(15));
    }
    const __m512i blocks = _mm512_permutexvar_epi8(_mm512_load_si512(kInt35.gather), bytes);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kInt35.offset), blocks),
                            _mm512_load_si512(kInt35.mask));
  }

  using IntAcc = __m512i;  // int32 partial sums (u8 x s8 products of int8 codes too); single chunks: low half
  static constexpr bool kInt8DotSeparate = false;
  static IntAcc int_zero() { return _mm512_setzero_si512(); }
  static IntAcc dot_acc(IntAcc acc, Codes q, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_dpbusd_epi32(acc, _mm512_zextsi256_si512(q), _mm512_zextsi256_si512(xv));
  }
  static IntAcc dot_acc2(IntAcc acc, Codes2 q, const int8_t* x) {
    return _mm512_dpbusd_epi32(acc, q, _mm512_loadu_si512(x));
  }
  using Acc = __m512;  // float sums in 16 lanes, reduced once per output
  static Acc acc_zero() { return _mm512_setzero_ps(); }
  static Acc scale_add(IntAcc dot, float s, Acc acc) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s), acc);
  }
  static Acc acc_fma(Acc a, float s, Acc acc) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), acc); }
  static float acc_sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
  static Acc acc_sub(Acc acc, Vec v) { return _mm512_sub_ps(acc, _mm512_zextps256_ps512(v)); }
};

#include "kernel_body.h"

// The GEMV over the interleaved layout (kernels.h): each 32-bit lane of a dot product is one row of the block,
// x's four columns broadcast to every lane, so one block's 16 outputs come out as one vector.

// Within int3.5's 48 bytes of 3-bit codes (rows r at byte 3r), 64-bit lane q gathers rows 2q and 2q + 1; its
// bytes then pick 3-bit fields: row 2q + k / 4, odd column k % 4 (first half) or 4 + k % 4 (second half).
struct Int35OddLanes {
  uint8_t gather[64];
  uint8_t first[64], second[64];
};
constexpr Int35OddLanes int35_odd_lanes() {
  Int35OddLanes t{};
  for (int q = 0; q < 8; ++q)
    for (int k = 0; k < 8; ++k) {
      t.gather[8 * q + k] = static_cast<uint8_t>(6 * q + (k < 6 ? k : 5));
      t.first[8 * q + k] = static_cast<uint8_t>(24 * (k / 4) + 3 * (k % 4));
      t.second[8 * q + k] = static_cast<uint8_t>(24 * (k / 4) + 3 * (4 + k % 4));
    }
  return t;
}
alignas(64) constexpr Int35OddLanes kInt35Odd = int35_odd_lanes();

// Four int8 activations, broadcast to every lane.
inline __m512i x4(const int8_t* x) {
  int32_t v;
  __builtin_memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

// Integer accumulators per activation row: two chains each for up to three rows (a dot product's latency is
// several cycles), one for four or more (the rows' chains interleave; registers are needed for eight rows).
template <int MB>
constexpr int kAccs = MB >= 4 ? 1 : 2;

// One block's chunk at p against MB activation rows (row m at x + m * stride): adds into acc[m].
template <Format F, int MB>
inline void interleaved_chunk(const uint8_t* p, const int8_t* x, int64_t stride, __m512i (&acc)[MB][kAccs<MB>]) {
  constexpr int second = kAccs<MB> - 1;
  const __m512i low4 = _mm512_set1_epi8(15);
  if constexpr (F == Format::kInt8) {
    for (int j = 0; j < 8; ++j) {
      __builtin_prefetch(p + 64 * j + kPrefetchBytes);
      const __m512i q = _mm512_loadu_si512(p + 64 * j);
      for (int m = 0; m < MB; ++m)
        acc[m][j % kAccs<MB>] = _mm512_dpbusd_epi32(acc[m][j % kAccs<MB>], q, x4(x + m * stride + 4 * j));
    }
  } else if constexpr (F == Format::kInt4) {
    for (int j = 0; j < 4; ++j) {
      __builtin_prefetch(p + 64 * j + kPrefetchBytes);
      const __m512i v = _mm512_loadu_si512(p + 64 * j);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], lo, x4(x + m * stride + 8 * j));
        acc[m][second] = _mm512_dpbusd_epi32(acc[m][second], hi, x4(x + m * stride + 8 * j + 4));
      }
    }
  } else {
    const __m512i low3 = _mm512_set1_epi8(7);
    for (int j = 0; j < 2; ++j) {
      const uint8_t* step = p + 112 * j;
      __builtin_prefetch(step + kPrefetchBytes);
      __builtin_prefetch(step + 64 + kPrefetchBytes);
      const __m512i v = _mm512_loadu_si512(step);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512i odd = _mm512_permutexvar_epi8(_mm512_load_si512(kInt35Odd.gather), _mm512_loadu_si512(step + 64));
      const __m512i first = _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kInt35Odd.first), odd), low3);
      const __m512i second_odd =
          _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kInt35Odd.second), odd), low3);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = x + m * stride + 16 * j;
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], lo, x4(xm));
        acc[m][second] = _mm512_dpbusd_epi32(acc[m][second], hi, x4(xm + 4));
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], first, x4(xm + 8));
        acc[m][second] = _mm512_dpbusd_epi32(acc[m][second], second_odd, x4(xm + 12));
      }
    }
  }
}

template <Format F, int MB>
void interleaved_rows(const GemvArgs& a, int64_t b_begin, int64_t b_end) {
  const QWeight& w = a.w;
  const int64_t n_groups = w.Kp / w.group_size, n_chunks = w.Kp / kChunk, n_xblocks = w.Kp / a.xblock;
  const int64_t chunks_per_xblock = a.xblock / kChunk, xblocks_per_group = w.group_size / a.xblock;
  constexpr int64_t kBlockChunk = interleaved_chunk_bytes(F);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint8_t* codes = w.codes + b * n_chunks * kBlockChunk;
    __m512 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
    // Group g adds s * (sum_k q_k x_k - z * sum_k x_k), for the block's 16 rows at once.
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t offset = (b * n_groups + g) * kInterleave;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales + offset)));
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zeros + offset)));
      const __m512 sz = _mm512_mul_ps(s, z);
      __m512 group_total[MB];
      for (int m = 0; m < MB; ++m) group_total[m] = _mm512_setzero_ps();
      for (int64_t xb = g * xblocks_per_group; xb < (g + 1) * xblocks_per_group; ++xb) {
        __m512i acc[MB][kAccs<MB>];
        for (int m = 0; m < MB; ++m)
          for (int i = 0; i < kAccs<MB>; ++i) acc[m][i] = _mm512_setzero_si512();
        for (int64_t c = xb * chunks_per_xblock; c < (xb + 1) * chunks_per_xblock; ++c)
          interleaved_chunk<F, MB>(codes + c * kBlockChunk, a.xq + c * kChunk, w.Kp, acc);
        for (int m = 0; m < MB; ++m) {
          const __m512i sum = kAccs<MB> == 1 ? acc[m][0] : _mm512_add_epi32(acc[m][0], acc[m][kAccs<MB> - 1]);
          group_total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.xscale[m * n_xblocks + xb]),
                                           group_total[m]);
        }
      }
      for (int m = 0; m < MB; ++m) {
        total[m] = _mm512_fmadd_ps(group_total[m], s, total[m]);
        total[m] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a.xsum[m * n_groups + g]), total[m]);
      }
    }
    const int64_t n0 = b * kInterleave;
    const __mmask16 valid = n0 + kInterleave <= w.N ? 0xFFFF : static_cast<__mmask16>((1u << (w.N - n0)) - 1);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(valid, a.bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(a.y + m * w.N + n0, valid, _mm512_add_ps(total[m], bias));
  }
}

template <Format F>
void interleaved_rows(const GemvArgs& a, int64_t b_begin, int64_t b_end) {
  switch (a.M) {
    case 1: return interleaved_rows<F, 1>(a, b_begin, b_end);
    case 2: return interleaved_rows<F, 2>(a, b_begin, b_end);
    case 3: return interleaved_rows<F, 3>(a, b_begin, b_end);
    case 4: return interleaved_rows<F, 4>(a, b_begin, b_end);
    case 5: return interleaved_rows<F, 5>(a, b_begin, b_end);
    case 6: return interleaved_rows<F, 6>(a, b_begin, b_end);
    case 7: return interleaved_rows<F, 7>(a, b_begin, b_end);
    case 8: return interleaved_rows<F, 8>(a, b_begin, b_end);
    default: return;  // the op layer never passes M outside [1, kInterleavedRows]
  }
}

void interleaved_gemv(const GemvArgs& a, int64_t b_begin, int64_t b_end) {
  visit_format(a.w.format, [&](auto format) { interleaved_rows<decltype(format)::value>(a, b_begin, b_end); });
}

// Attention with 16-float vectors: a query's dot products with 16 keys are reduced together (a transposing
// sum tree, ~3 operations per key instead of a full reduction each), and softmax's exponentials are vectors.

// r[j] = the sum of v[j]'s lanes, j = 0..15.
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 w[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] in positions 0 and 2, v[2i + 1] in 1 and 3
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: v[4i] .. v[4i + 3], one position each
    const __m512d x = _mm512_castps_pd(w[2 * i]), y = _mm512_castps_pd(w[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 128-bit lane L of the result: the four lanes of u[L] added.
  const __m512 p = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x88), _mm512_shuffle_f32x4(p, q, 0xDD));
}

// e^x: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by its Taylor polynomial to degree 7 (relative error < 1e-8 before
// rounding), times 2^n. NaN stays NaN; x is clamped to [-88, 88] (e^-88 ~ 6e-39 stands for 0, e^88 ~ 2e38 for inf:
// softmax's shifted scores are <= 0, and silu's quotient is the same either way).
inline __m512 exp_vector(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-88.0f), x));  // second operands pass NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
  constexpr float kTaylor[7] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : kTaylor) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

void silu_mul_vectors(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i < 16 ? static_cast<__mmask16>((1u << (n - i)) - 1) : 0xFFFF;
    const __m512 g = _mm512_maskz_loadu_ps(valid, gate + i);
    const __m512 e = exp_vector(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out + i, valid, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(valid, up + i)));
  }
}

// Consecutive items of one row whose heads share a key/value head (grouped-query attention) run together, a
// block of 16 keys at a time: the block is read from memory once, then from L1 for the other heads. V: vectors of
// 16 floats per head, a compile-time constant so that the 16 dot products and the output stay in registers (with a
// run-time V they lived on the stack, and each dot product was one chain of dependent FMAs).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

template <int V, typename T>
void attend_heads(const AttendArgs& a, const T* k_cache, const T* v_cache, int64_t item_begin, int64_t item_end) {
  constexpr int64_t kMaxRun = 16;
  constexpr int64_t D = 16 * V;
  const int64_t group = a.H / a.Hkv;
  for (int64_t first = item_begin; first < item_end;) {
    const int64_t r = first / a.H, g = first % a.H / group, length = a.lengths[r];
    const int64_t group_end = r * a.H + (g + 1) * group, last = item_end < group_end ? item_end : group_end;
    const int64_t run = last - first < kMaxRun ? last - first : kMaxRun;  // items first .. first + run - 1
    const int64_t cache_row = (a.slots[r] * a.Hkv + g) * a.S * D;
    const T* keys = k_cache + cache_row;
    const T* values = v_cache + cache_row;
    float top[kMaxRun], total[kMaxRun];
    bool nan[kMaxRun];  // a NaN score (from a NaN query or key) makes the output NaN
    for (int64_t i = 0; i < run; ++i) top[i] = -__builtin_inff(), nan[i] = false;
    for (int64_t j0 = 0; j0 < length; j0 += 16) {
      const int count = length - j0 < 16 ? static_cast<int>(length - j0) : 16;
      const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
      for (int64_t i = 0; i < run; ++i) {
        const float* q = a.q + (first + i) * D;
        __m512 dot[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          dot[j] = _mm512_setzero_ps();
          if (j < count)
#pragma GCC unroll 16
            for (int v = 0; v < V; ++v)
              dot[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + v * 16), load16(keys + (j0 + j) * D + v * 16), dot[j]);
        }
        const __m512 s = _mm512_mul_ps(sum16(dot), _mm512_set1_ps(a.scale));
        _mm512_mask_storeu_ps(a.scores + i * length + j0, valid, s);
        const float block_top = _mm512_mask_reduce_max_ps(valid, s);
        top[i] = block_top > top[i] ? block_top : top[i];
        nan[i] |= _mm512_mask_cmp_ps_mask(valid, s, s, _CMP_UNORD_Q) != 0;
      }
    }
    for (int64_t i = 0; i < run; ++i) {
      float* scores = a.scores + i * length;
      const __m512 shift = _mm512_set1_ps(nan[i] ? __builtin_nanf("") : top[i]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j0 = 0; j0 < length; j0 += 16) {
        const __mmask16 valid = length - j0 < 16 ? static_cast<__mmask16>((1u << (length - j0)) - 1) : 0xFFFF;
        const __m512 e = exp_vector(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + j0), shift));
        _mm512_mask_storeu_ps(scores + j0, valid, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(valid, e));
      }
      total[i] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t j0 = 0; j0 < length; j0 += 16) {
      const int64_t j1 = length - j0 < 16 ? length : j0 + 16;
      for (int64_t i = 0; i < run; ++i) {
        const float* scores = a.scores + i * length;
        float* out = a.out + (first + i) * D;
        __m512 acc[V];
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) acc[v] = j0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out + v * 16);
        for (int64_t j = j0; j < j1; ++j) {
          const __m512 p = _mm512_set1_ps(scores[j]);
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(p, load16(values + j * D + v * 16), acc[v]);
        }
        const __m512 scale = _mm512_set1_ps(j1 == length ? 1.0f / total[i] : 1.0f);
#pragma GCC unroll 16
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + v * 16, _mm512_mul_ps(acc[v], scale));
      }
    }
    first += run;
  }
}

template <int V>
void attend_heads(const AttendArgs& a, int64_t item_begin, int64_t item_end) {
  if (a.k_half) attend_heads<V>(a, a.k_half, a.v_half, item_begin, item_end);
  else attend_heads<V>(a, a.k, a.v, item_begin, item_end);
}

// The head sizes of the LLaMA family (64: SmolLM2, TinyLlama; 128: LLaMA-2/3) and a few more; others run the 8-float
// kernel.
void attend_vectors(const AttendArgs& a, int64_t item_begin, int64_t item_end) {
  switch (a.D) {
    case 32: return attend_heads<2>(a, item_begin, item_end);
    case 64: return attend_heads<4>(a, item_begin, item_end);
    case 80: return attend_heads<5>(a, item_begin, item_end);
    case 96: return attend_heads<6>(a, item_begin, item_end);
    case 128: return attend_heads<8>(a, item_begin, item_end);
    case 256: return attend_heads<16>(a, item_begin, item_end);
    default: return attend(a, item_begin, item_end);
  }
}

}  // namespace avx512_vnni_isa

const KernelTable& avx512_vnni_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx512_vnni_isa::make_table("avx512_vnni");
    t.interleaved_gemv = avx512_vnni_isa::interleaved_gemv;
    t.attend = avx512_vnni_isa::attend_vectors;
    t.silu_mul = avx512_vnni_isa::silu_mul_vectors;
    return t;
  }();
  return table;
}

}  // namespace cpu
}  // namespace lowbit
