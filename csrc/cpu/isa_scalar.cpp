// Portable kernels: plain C++ that builds on any 64-bit CPU (the compiler may still vectorize it).
#include "kernels.h"

namespace lowbit {
namespace cpu {
namespace scalar_isa {

struct Isa {
  using Vec = float;
  static constexpr int kWidth = 1;
  static constexpr int kVecs = kChunk;
  // x-order: even columns 0, 2, ..., 30, then odd columns 1, 3, ..., 31 (int4, int3.5); int8 in order.
  static constexpr int kOrder[kFormats][kChunk] = {
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
       16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}};

  static Vec zero() { return 0.0f; }
  static Vec set1(float v) { return v; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static Vec add(Vec a, Vec b) { return a + b; }
  static Vec sub(Vec a, Vec b) { return a - b; }
  static Vec mul(Vec a, Vec b) { return a * b; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static float vec_sum(Vec v) { return v; }
  // float16 bits of v, rounded to nearest even (subnormals, overflow to infinity, NaN kept NaN).
  static uint16_t float_to_half(float v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u;      // NaN
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;     // rounds to infinity (or is infinity)
    if (magnitude < 0x38800000u) {                           // a float16 subnormal or zero: add 0.5 so that the
      float f;                                               // float adder rounds at float16's last subnormal bit
      __builtin_memcpy(&f, &magnitude, sizeof f);
      f += 0.5f;
      __builtin_memcpy(&magnitude, &f, sizeof f);
      return sign | static_cast<uint16_t>(magnitude - 0x3f000000u);
    }
    magnitude += ((15u - 127u) << 23) + 0xfffu + ((magnitude >> 13) & 1u);  // rebias, round to nearest even
    return sign | static_cast<uint16_t>(magnitude >> 13);
  }
  static void store_halves(uint16_t* p, Vec v) { *p = float_to_half(v); }
  static void store_bf16(uint16_t* p, Vec v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    *p = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  // The grid search's lanes (grid_body.h): arrays of 8 groups, whose loops the compiler vectorizes.
  struct Grid {
    static constexpr int kLanes = 8;
    struct V {
      float v[kLanes];
    };
    struct M {
      bool m[kLanes];
    };
    template <typename F>
    static V each(V a, V b, F f) {
      V r;
      for (int i = 0; i < kLanes; ++i) r.v[i] = f(a.v[i], b.v[i]);
      return r;
    }
    template <typename F>
    static M test(V a, V b, F f) {
      M r;
      for (int i = 0; i < kLanes; ++i) r.m[i] = f(a.v[i], b.v[i]);
      return r;
    }
    static V set1(float x) {
      V r;
      for (int i = 0; i < kLanes; ++i) r.v[i] = x;
      return r;
    }
    static V load(const float* p) {
      V r;
      for (int i = 0; i < kLanes; ++i) r.v[i] = p[i];
      return r;
    }
    static V add(V a, V b) { return each(a, b, [](float x, float y) { return x + y; }); }
    static V sub(V a, V b) { return each(a, b, [](float x, float y) { return x - y; }); }
    static V mul(V a, V b) { return each(a, b, [](float x, float y) { return x * y; }); }
    static V div(V a, V b) { return each(a, b, [](float x, float y) { return x / y; }); }
    static V quotient(V a, V b, V) { return div(a, b); }  // without FMA, the division itself
    static V neg(V a) { return each(a, a, [](float x, float) { return -x; }); }
    static V min(V a, V b) { return each(a, b, [](float x, float y) { return x < y ? x : y; }); }
    static V max(V a, V b) { return each(a, b, [](float x, float y) { return x > y ? x : y; }); }
    // Below 2^23, adding and taking away 2^23 rounds off the fraction (to even on ties); beyond, floats are
    // integers.
    static V round(V a) {
      return each(a, a, [](float x, float) {
        const float m = __builtin_fabsf(x);
        return m < 8388608.0f ? __builtin_copysignf((m + 8388608.0f) - 8388608.0f, x) : x;
      });
    }
    static V fp16(V a) { return each(a, a, [](float x, float) { return half_to_float(float_to_half(x)); }); }
    static void store_halves(uint16_t* p, V a) {
      for (int i = 0; i < kLanes; ++i) p[i] = float_to_half(a.v[i]);
    }
    static M lt(V a, V b) { return test(a, b, [](float x, float y) { return x < y; }); }
    static M gt(V a, V b) { return test(a, b, [](float x, float y) { return x > y; }); }
    static M unordered(V a, V b) { return test(a, b, [](float x, float y) { return x != x || y != y; }); }
    static M both(M a, M b) {
      for (int i = 0; i < kLanes; ++i) a.m[i] = a.m[i] && b.m[i];
      return a;
    }
    static M either(M a, M b) {
      for (int i = 0; i < kLanes; ++i) a.m[i] = a.m[i] || b.m[i];
      return a;
    }
    static M finite(V a) { return test(a, a, [](float x, float) { return __builtin_fabsf(x) < __builtin_inff(); }); }
    static bool all(M a) {
      bool r = true;
      for (int i = 0; i < kLanes; ++i) r = r && a.m[i];
      return r;
    }
    static V select(M m, V a, V b) {
      for (int i = 0; i < kLanes; ++i) a.v[i] = m.m[i] ? a.v[i] : b.v[i];
      return a;
    }
  };
  static constexpr int kChunksPerStep = 1;
  static constexpr bool kBf16Lookup = false;
  // Plain C++ integer dot products are no match for BLAS beyond the decode rows.
  static constexpr int64_t kInt8MaxRows = kMaxGemvRows, kInt8MaxRowsVsBf16 = kMaxGemvRows;

  static float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
      const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
      return sign ? -magnitude : magnitude;
    }
    const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
  }

  static Vec load_halves(const uint16_t* p) { return half_to_float(*p); }

  struct Codes {
    uint8_t v[kChunk];
  };

  template <Format F>
  static Codes decode(const uint8_t* p) {
    Codes q;
    if (F == Format::kInt8) {
      for (int j = 0; j < kChunk; ++j) q.v[j] = p[j];
    } else if (F == Format::kInt4) {
      for (int j = 0; j < 16; ++j) {
        q.v[j] = p[j] & 15;
        q.v[16 + j] = p[j] >> 4;
      }
    } else {
      for (int block = 0; block < 2; ++block) {
        uint64_t bits = 0;  // the block's 56 bits, little-endian
        for (int i = 0; i < 7; ++i) bits |= static_cast<uint64_t>(p[7 * block + i]) << (8 * i);
        for (int pair = 0; pair < 8; ++pair) {
          const unsigned v = static_cast<unsigned>(bits >> (7 * pair)) & 127u;
          q.v[8 * block + pair] = v & 15u;
          q.v[16 + 8 * block + pair] = v >> 4;
        }
      }
    }
    return q;
  }

  using IntAcc = int32_t;  // holds int8 codes' products too
  static constexpr bool kInt8DotSeparate = false;
  static IntAcc int_zero() { return 0; }
  static IntAcc dot_acc(IntAcc acc, const Codes& q, const int8_t* x) {
    for (int i = 0; i < kChunk; ++i) acc += q.v[i] * x[i];
    return acc;
  }
  using Acc = float;
  static Acc acc_zero() { return 0.0f; }
  static Acc scale_add(IntAcc dot, float s, Acc acc) { return static_cast<float>(dot) * s + acc; }
  static Acc acc_fma(Acc a, float s, Acc acc) { return a * s + acc; }
  static float acc_sum(Acc acc) { return acc; }
  static Acc acc_sub(Acc acc, Vec v) { return acc - v; }

  static void widen(const Codes& q, Vec out[kVecs]) {
    for (int i = 0; i < kChunk; ++i) out[i] = q.v[i];
  }
};

#include "kernel_body.h"

}  // namespace scalar_isa

const KernelTable& scalar_kernels() {
  static const KernelTable table = scalar_isa::make_table("scalar");
  return table;
}

}  // namespace cpu
}  // namespace lowbit
