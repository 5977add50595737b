// AVX2 + FMA + F16C primitives (see kernel_body.h). Included inside the namespace of each kernel
// file built with at least -mavx2 -mfma -mf16c: isa_avx2.cpp uses them as they are, isa_avx512_vnni.cpp
// replaces the integer dot product.
#pragma once

// The grid search's lanes (grid_body.h): 8 groups per vector.
struct Avx2Grid {
  static constexpr int kLanes = 8;
  using V = __m256;
  using M = __m256;  // all bits set in the lanes where true
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  // a r, corrected once by its remainder (exact by FMA): div(a, b) wherever the quotient is a normal float, as
  // checked for every float significand a with every float16 significand b (quotients scale with the exponents),
  // and for every float a with b = 15/7. A subnormal quotient, which may be off in its last place, leaves the
  // same code (t = a / s + z is z, or rounds to 0).
  static V quotient(V a, V b, V r) {
    const V q = _mm256_mul_ps(a, r);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, b, a), r, q);
  }
  static V neg(V v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V fp16(V v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
  static void store_halves(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M unordered(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
  static M both(M a, M b) { return _mm256_and_ps(a, b); }
  static M either(M a, M b) { return _mm256_or_ps(a, b); }
  static M finite(V v) { return lt(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), _mm256_set1_ps(__builtin_inff())); }
  static bool all(M m) { return _mm256_movemask_ps(m) == 0xFF; }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
};

struct Avx2Isa {
  using Vec = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kVecs = kChunk / kWidth;
  // int4: even columns, then odd ones. int3.5: evens then odds of each 16-column block. int8: in order.
  static constexpr int kOrder[kFormats][kChunk] = {
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
      {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
       16, 18, 20, 22, 24, 26, 28, 30, 17, 19, 21, 23, 25, 27, 29, 31},
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
       16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}};

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t float_to_half(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
  static void store_halves(uint16_t* p, Vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static Vec load_halves(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // bfloat16 bits of each lane, rounded to nearest even (the dequantized weights are finite), in the
  // low half of its 32-bit lane.
  static __m256i round_bf16(Vec v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  }
  static void store_bf16(uint16_t* p, Vec v) {
    const __m256i rounded = round_bf16(v);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  using Grid = Avx2Grid;
  static constexpr int kChunksPerStep = 1;
  static constexpr bool kBf16Lookup = false;
  // Measured with 4096 x 4096 weights on the AVX-512 development machine: float32 x, these kernels 1.9-4.3x
  // faster than dequantize + float32 BLAS at 16 to 128 rows; bfloat16 x, faster than dequantize +
  // bfloat16 BLAS at 16 rows, slower at 32.
  static constexpr int64_t kInt8MaxRows = INT64_MAX, kInt8MaxRowsVsBf16 = 16;

  using Codes = __m256i;  // 32 codes, one per byte

  template <Format F>
  static Codes decode(const uint8_t* p) {
    if (F == Format::kInt8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (F == Format::kInt4) {
      // The 16 bytes in the low half, the same shifted right by 4 (odd codes) in the high half.
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
      return _mm256_and_si256(both, _mm256_set1_epi8(15));
    }
    const __m256i pairs = int35_pairs(p);
    return _mm256_packus_epi16(_mm256_and_si256(pairs, _mm256_set1_epi16(15)), _mm256_srli_epi16(pairs, 4));
  }

  // The 16 (4-bit, 3-bit) pairs of one int3.5 chunk (two 7-byte blocks) as 16-bit lanes: pairs of
  // block 0 in the low 128 bits, block 1 in the high 128 bits, 7 bits each.
  static __m256i int35_pairs(const uint8_t* p) {
    // Block 1 is loaded from p + 6 so that no byte past the chunk is read; its byte i sits at i + 1.
    const __m128i b0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i b1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 6));
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
    // Pair j starts at bit 7j of its block: byte 7j/8, bit 7j%8. Gather that byte and the next.
    const __m256i gather = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7,
                                            1, 2, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8);
    // Move the pair to bits 9..15 with a multiply (AVX2 has no per-lane 16-bit shift), then down.
    const __m256i to_top = _mm256_setr_epi16(512, 4, 8, 16, 32, 64, 128, 256,
                                             512, 4, 8, 16, 32, 64, 128, 256);
    return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, gather), to_top), 9);
  }

  // int16 partial sums: u8 * s8 pairs give at most 2 * 15 * 127 = 3810 per chunk, so 8 chunks fit.
  using IntAcc = __m256i;
  static IntAcc int_zero() { return _mm256_setzero_si256(); }
  static IntAcc dot_acc(IntAcc acc, Codes q, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(q, xv));
  }
  static Vec to_float(IntAcc acc) { return _mm256_cvtepi32_ps(_mm256_madd_epi16(acc, _mm256_set1_epi16(1))); }

  // int8 codes: a pair of u8 x s8 products reaches 2 * 255 * 127, past int16 (vpmaddubsw would saturate).
  // Codes and activations widened to int16, pairs summed into int32 lanes (vpmaddwd).
  static constexpr bool kInt8DotSeparate = true;
  static IntAcc dot_acc_int8(IntAcc acc, Codes q, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)),
                                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv)));
    const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)),
                                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1)));
    return _mm256_add_epi32(acc, _mm256_add_epi32(lo, hi));
  }

  using Acc = __m256;
  static Acc acc_zero() { return _mm256_setzero_ps(); }
  static Acc scale_add(IntAcc dot, float s, Acc acc) {
    return _mm256_fmadd_ps(to_float(dot), _mm256_set1_ps(s), acc);
  }
  static Acc scale_add_int8(IntAcc dot, float s, Acc acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s), acc);
  }
  static Acc acc_fma(Acc a, float s, Acc acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc); }
  static float vec_sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float acc_sum(Acc v) { return vec_sum(v); }
  static Acc acc_sub(Acc acc, Vec v) { return _mm256_sub_ps(acc, v); }

  static void widen(Codes q, Vec out[kVecs]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
};
