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

struct Isa : Avx2Isa {
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

}  // namespace avx512_vnni_isa

const KernelTable& avx512_vnni_kernels() {
  static const KernelTable table = avx512_vnni_isa::make_table("avx512_vnni");
  return table;
}

}  // namespace cpu
}  // namespace lowbit
