// AVX-512 kernels: the AVX2 kernels with 512-bit integer dot products (vpdpbusd: u8 x s8, four products
// summed into each int32 lane) over two 32-column chunks per step, and int3.5 codes unpacked with byte
// permutes (VBMI) and per-lane shifts instead of shuffles and multiplies.
// Compiled with -mavx512f -mavx512vl -mavx512bw -mavx512vbmi -mavx512vnni (and the AVX2 set); called only
// when the CPU has them.
#include <immintrin.h>

#include "kernels.h"

namespace lowbit {
namespace cpu {
namespace avx512_vnni_isa {

#include "avx2_isa.h"

// int3.5 unpacking: 16-bit lane L holds pair L % 8 of block L / 8 (blocks of 7 bytes, pair p at bits
// [7p, 7p + 7) of the block): the two bytes that contain its first bit, shifted right by that bit.
struct Int35Lanes {
  uint8_t gather[64];  // byte indices for vpermb, two per 16-bit lane
  uint16_t shift[32];  // right shift per 16-bit lane
};
constexpr Int35Lanes int35_lanes() {
  Int35Lanes t{};
  for (int lane = 0; lane < 32; ++lane) {
    const int first_bit = 56 * (lane / 8) + 7 * (lane % 8);
    t.gather[2 * lane] = static_cast<uint8_t>(first_bit / 8);
    t.gather[2 * lane + 1] = static_cast<uint8_t>(first_bit / 8 + 1);  // may lie past the pair's bits
    t.shift[lane] = static_cast<uint16_t>(first_bit % 8);
  }
  return t;
}
alignas(64) constexpr Int35Lanes kInt35 = int35_lanes();
// int4, two chunks: 128-bit lanes (chunk 0 bytes, the same, chunk 1 bytes, the same); the second copy
// of each is shifted right by 4, so each chunk's codes come out even columns first, as on AVX2.
alignas(64) constexpr uint16_t kInt4Shift[32] = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4,
                                                 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4};

struct Isa : Avx2Isa {
  // int4 as on AVX2 (evens, then odds); int3.5 in natural column order: lane 2p is pair p's 4-bit
  // code, lane 2p + 1 its 3-bit code.
  static constexpr int kOrder[2][kChunk] = {
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
       16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}};
  static constexpr int kChunksPerStep = 2;

  // Pairs in 16-bit lanes (the 7-bit value at the bottom) -> codes in bytes: the low byte keeps the
  // 4-bit code, the high byte takes the 3-bit code (bits 4..6, moved up by 4).
  static __m256i int35_codes(__m256i pairs) {
    const __m256i both = _mm256_mask_blend_epi8(0xAAAAAAAAu, pairs, _mm256_slli_epi16(pairs, 4));
    return _mm256_and_si256(both, _mm256_set1_epi16(0x070F));
  }

  template <Format F>
  static Codes decode(const uint8_t* p) {
    if (F == Format::kInt4) return Avx2Isa::decode<F>(p);
    const __m256i bytes = _mm256_maskz_loadu_epi8(0x3FFFu, p);  // the chunk's 14 bytes, nothing past them
    const __m256i gather = _mm256_load_si256(reinterpret_cast<const __m256i*>(kInt35.gather));
    const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(kInt35.shift));
    return int35_codes(_mm256_srlv_epi16(_mm256_permutexvar_epi8(gather, bytes), shift));
  }

  using Codes2 = __m512i;  // the codes of two consecutive chunks, each in x-order
  template <Format F>
  static Codes2 decode2(const uint8_t* p) {
    if (F == Format::kInt4) {
      const __m512i both = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512i copies = _mm512_shuffle_i64x2(both, both, 0x50);  // 128-bit lanes 0, 0, 1, 1
      return _mm512_and_si512(_mm512_srlv_epi16(copies, _mm512_load_si512(kInt4Shift)), _mm512_set1_epi8(15));
    }
    // The two chunks' 28 bytes and 4 more, which never reach a code (a masked load is slower).
    const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i gathered = _mm512_permutexvar_epi8(_mm512_load_si512(kInt35.gather), bytes);
    const __m512i pairs = _mm512_srlv_epi16(gathered, _mm512_load_si512(kInt35.shift));
    const __m512i both = _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAull, pairs, _mm512_slli_epi16(pairs, 4));
    return _mm512_and_si512(both, _mm512_set1_epi16(0x070F));
  }

  using IntAcc = __m512i;  // int32 partial sums; single chunks use the low half
  static IntAcc int_zero() { return _mm512_setzero_si512(); }
  static IntAcc dot_acc(IntAcc acc, Codes q, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_dpbusd_epi32(acc, _mm512_zextsi256_si512(q), _mm512_zextsi256_si512(xv));
  }
  static IntAcc dot_acc2(IntAcc acc, Codes2 q, const int8_t* x) {
    return _mm512_dpbusd_epi32(acc, q, _mm512_loadu_si512(x));
  }
  static Vec to_float(IntAcc acc) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1)));
  }
};

#include "kernel_body.h"

}  // namespace avx512_vnni_isa

const KernelTable& avx512_vnni_kernels() {
  static const KernelTable table = avx512_vnni_isa::make_table("avx512_vnni");
  return table;
}

}  // namespace cpu
}  // namespace lowbit
