// Device building blocks of the lowbit matmul kernels (gemv.cu, gemm.cu): dequantization of the
// canonical formats in registers, straight into tensor-core operands, and the PTX instructions used.
//
// Fragment mapping. The kernels compute y^T = W x^T with mma.sync m16n8k16: rows of W are the MMA's
// M dimension and activation rows (tokens) its N dimension. Thread (g, c) of a warp (g = lane / 4,
// c = lane % 4) supplies rows g and g + 8 of a 16-row tile at four k positions per MMA. Which columns
// those k positions stand for is free, as long as the activations use the same ones, so each thread
// owns a contiguous slice of columns of its two rows (what one or a few 128-bit loads bring) and every
// MMA consumes four columns of each thread's slice: no shuffles, no repacking of the canonical layout.
//
// Pair order. An MMA operand register holds two float16 values. Dequantization produces pairs of
// columns 4 apart, per 8 columns (0,4) (1,5) (2,6) (3,7): that is what the float16 magic-number trick
// gives for int4 (nibbles 0 and 4 of a 32-bit word land in the low bits of its two halves) and what
// int3.5 gives with one shift. Activations are read in natural order and put into the same pair
// order with byte permutes (x_pairs). Per 16 columns a thread holds 8 pairs and feeds 4 MMAs: MMA s
// takes pairs 2s (k = 2c, 2c + 1) and 2s + 1 (k = 2c + 8, 2c + 9).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lowbit {
namespace cuda {

constexpr float kStep3 = 15.0f / 7.0f;  // int3.5: the step of the 3-bit codes, in 4-bit steps

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packed bytes of the first `cols` columns of a row (cols a multiple of 16).
__host__ __device__ constexpr int64_t packed_bytes(Format f, int64_t cols) {
  return f == Format::kInt4 ? cols / 2 : cols / 16 * 7;
}

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// ---------------------------------------------------------------------------------------------------
// PTX. The kernels need sm_80 (mma.sync m16n8k16 with float16, cp.async); ops_cuda.cu checks the device,
// and code built for older targets traps instead of failing the build.

// d += a b for one 16x8x16 tile: a 16x16 (row-major fragments), b 16x8 (column-major), float32 d.
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Weights, read exactly once: through the read-only path, without taking L1 from the activations.
// (Not volatile: the callers only pass valid addresses, so the compiler may schedule these freely.)
__device__ __forceinline__ uint4 load_stream_16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream_8(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t load_stream_4(const void* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// Asynchronous global -> shared copies; an invalid source is not read and the destination is zeroed.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 4 : 0));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most n committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------------
// Dequantization. A code q becomes (q - z) * s in float16. First the exact integer q, with the magic
// number 1024 = 0x6400: 0x6400 | q is the float16 1024 + q for q < 16, and 1024 + 16 q when q sits in
// bits 4..7. Then q * s - z * s with one fused multiply-add, where -z * s is carried as a float16 pair
// hi + lo (hi = -z * s rounded, lo = the rest, added in a second step): rounding -z * s to one float16
// would give every weight of a group the same error, up to 2^-11 |z s|, which does not average out
// over the group.

struct GroupParams {
  half2 scale;      // s
  half2 odd_scale;  // s * 15/7, for int3.5's 3-bit codes
  half2 zero_hi;    // -z * s ~ zero_hi + zero_lo
  half2 zero_lo;
};

__device__ __forceinline__ GroupParams group_params(uint16_t scale_bits, uint16_t zero_bits) {
  const __half s = __ushort_as_half(scale_bits);
  const float sf = __half2float(s), zf = __half2float(__ushort_as_half(zero_bits));
  const float zero = -zf * sf;
  const __half hi = __float2half_rn(zero);
  return {__half2half2(s), __float2half2_rn(sf * kStep3), __half2half2(hi),
          __float2half2_rn(zero - __half2float(hi))};
}

__device__ __forceinline__ half2 scale_code(half2 q, half2 scale, const GroupParams& p) {
  return __hadd2(__hfma2(q, scale, p.zero_hi), p.zero_lo);
}

// Scale and zero of group `group` of the row whose entries start at index `row_start` of scales and
// zeros; a zero weight when !ok (padding then contributes nothing). Branch-free, as load_slice.
__device__ __forceinline__ GroupParams load_group_params(const PackedWeight& w, int64_t row_start, bool ok,
                                                         int group) {
  const int64_t i = ok ? row_start + group : 0;
  const unsigned short s = __ldg(reinterpret_cast<const unsigned short*>(w.scales) + i);
  const unsigned short z = __ldg(reinterpret_cast<const unsigned short*>(w.zeros) + i);
  return group_params(ok ? s : 0, ok ? z : 0);
}

constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)

__device__ __forceinline__ half2 codes_low(uint32_t t) {  // codes in bits 0..3 and 16..19 -> exact
  return __hsub2(bit_cast<half2>((t & 0x000f000fu) | kMagic), bit_cast<half2>(kMagic));
}

__device__ __forceinline__ half2 codes_high(uint32_t t, uint32_t mask) {  // codes in bits 4.. and 20..
  const half2 sixteenth = bit_cast<half2>(0x2c002c00u);                  // 1/16
  const half2 minus_64 = bit_cast<half2>(0xd400d400u);                   // (1024 + 16 q) / 16 - 64 = q
  return __hfma2(bit_cast<half2>((t & mask) | kMagic), sixteenth, minus_64);
}

// int4: 8 columns (one little-endian word, column i in bits 4i..4i+3) -> pairs (0,4) (1,5) (2,6) (3,7).
__device__ __forceinline__ void dequant_int4_x8(uint32_t w, const GroupParams& p, half2* out) {
  const uint32_t w8 = w >> 8;
  out[0] = scale_code(codes_low(w), p.scale, p);
  out[1] = scale_code(codes_high(w, 0x00f000f0u), p.scale, p);
  out[2] = scale_code(codes_low(w8), p.scale, p);
  out[3] = scale_code(codes_high(w8, 0x00f000f0u), p.scale, p);
}

// int3.5: one 16-column block -> pairs (0,4) (1,5) (2,6) (3,7) (8,12) (9,13) (10,14) (11,15).
// lo = block bits 0..31 (pairs 0..3 at bits 0, 7, 14, 21), hi = block bits 28..59 (pairs 4..7 likewise).
// Pair p is a | b << 4: a 4-bit code for column 2p, a 3-bit code for column 2p + 1.
__device__ __forceinline__ void dequant_int35_x16(uint32_t lo, uint32_t hi, const GroupParams& p, half2* out) {
  // Pairs p (bits 0..6) and p + 2 (bits 14..20) of u -> bits 0..6 and 16..22: one pair per float16 half.
  const auto spread = [](uint32_t u) { return (u & 0x0000ffffu) | ((u << 2) & 0xffff0000u); };
  const uint32_t t[4] = {spread(lo), spread(lo >> 7), spread(hi), spread(hi >> 7)};  // pairs 0,2 1,3 4,6 5,7
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = scale_code(codes_low(t[i]), p.scale, p);                          // a: even columns
    out[2 * i + 1] = scale_code(codes_high(t[i], 0x00700070u), p.odd_scale, p);  // b: odd columns
  }
}

// Bits [bit, bit + 32) of a little-endian array of words, zero past its end. `bit` is a compile-time
// constant after unrolling, so this is one funnel shift on registers.
template <int kWords>
__device__ __forceinline__ uint32_t bits_at(const uint32_t (&w)[kWords], int bit) {
  const int i = bit / 32, shift = bit % 32;
  const uint32_t lo = w[i], hi = i + 1 < kWords ? w[i + 1] : 0u;
  return shift == 0 ? lo : __funnelshift_r(lo, hi, shift);
}

// One thread's slice of a row: kCols consecutive stored columns (a multiple of 64), packed in kWords
// little-endian words as they lie in memory.
template <Format F, int kCols_>
struct Slice {
  static constexpr int kCols = kCols_;
  static constexpr int kBytes = static_cast<int>(packed_bytes(F, kCols));
  static constexpr int kWords = kBytes / 4;
  static constexpr int kPieces = kCols / 16;  // 16-column pieces, 8 pairs and 4 MMA steps each
  static_assert(kCols % 64 == 0, "a slice is a multiple of 64 columns (whole words for int3.5)");

  // Piece p -> 8 pairs in pair order.
  static __device__ __forceinline__ void dequant(const uint32_t (&w)[kWords], int p, const GroupParams& gp,
                                                 half2 (&out)[8]) {
    if constexpr (F == Format::kInt4) {
      dequant_int4_x8(w[2 * p], gp, out);
      dequant_int4_x8(w[2 * p + 1], gp, out + 4);
    } else {
      dequant_int35_x16(bits_at(w, 56 * p), bits_at(w, 56 * p + 28), gp, out);
    }
  }
};

// Loads a slice from global memory, kVec (16, 8 or 4) bytes at a time: the vector at byte
// `offset` + i * kVec of `row` when it starts before `valid` bytes from `offset`, else zeros. No
// branches: a vector past `valid` reads the row's first bytes instead and is dropped. (Conditional loads
// become branches, and the compiler then no longer issues the slice's loads together, ahead of their
// uses.) Callers keep `valid` a multiple of kVec, or every vector that starts before it within the row
// stride.
template <int kVec, int kWords>
__device__ __forceinline__ void load_slice(const uint8_t* row, int offset, int valid, uint32_t (&w)[kWords]) {
  if constexpr (kVec == 16) {
    static_assert(kWords % 4 == 0, "16-byte loads need a slice of whole 16-byte vectors");
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const bool ok = 16 * i < valid;
      const uint4 v = load_stream_16(row + (ok ? offset + 16 * i : 0));
      w[4 * i] = ok ? v.x : 0u, w[4 * i + 1] = ok ? v.y : 0u, w[4 * i + 2] = ok ? v.z : 0u,
      w[4 * i + 3] = ok ? v.w : 0u;
    }
  } else if constexpr (kVec == 8) {
    static_assert(kWords % 2 == 0, "8-byte loads need a slice of whole 8-byte vectors");
#pragma unroll
    for (int i = 0; i < kWords / 2; ++i) {
      const bool ok = 8 * i < valid;
      const uint2 v = load_stream_8(row + (ok ? offset + 8 * i : 0));
      w[2 * i] = ok ? v.x : 0u, w[2 * i + 1] = ok ? v.y : 0u;
    }
  } else {
    static_assert(kVec == 4, "loads are 16, 8 or 4 bytes wide");
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      const bool ok = 4 * i < valid;
      const uint32_t v = load_stream_4(row + (ok ? offset + 4 * i : 0));
      w[i] = ok ? v : 0u;
    }
  }
}

// Activations: 8 float16 values in natural order (one 16-byte vector) -> 4 pairs in pair order.
__device__ __forceinline__ void x_pairs(const uint4& v, uint32_t* out) {
  out[0] = __byte_perm(v.x, v.z, 0x5410);  // (x0, x4)
  out[1] = __byte_perm(v.x, v.z, 0x7632);  // (x1, x5)
  out[2] = __byte_perm(v.y, v.w, 0x5410);  // (x2, x6)
  out[3] = __byte_perm(v.y, v.w, 0x7632);  // (x3, x7)
}

// The 4 MMA steps of one 16-column piece: rows g and g + 8 (a0, a1) against one token tile (b).
__device__ __forceinline__ void mma_piece(float (&acc)[4], const half2 (&a0)[8], const half2 (&a1)[8],
                                          const uint32_t (&b)[8]) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    mma_16816(acc, bit_cast<uint32_t>(a0[2 * s]), bit_cast<uint32_t>(a1[2 * s]), bit_cast<uint32_t>(a0[2 * s + 1]),
              bit_cast<uint32_t>(a1[2 * s + 1]), b[2 * s], b[2 * s + 1]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Epilogue: y[t, n] = acc * row_scale[t] + bias[n], rounded once to the output type.

__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_as(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ void store_output(const Output& y, const Activations& x, int64_t N, int64_t t,
                                             int64_t n, float acc) {
  float v = x.row_scale ? acc * x.row_scale[t] : acc;
  if (y.bias) v += load_as_float(y.bias, y.dtype, n);
  store_as(y.y, y.dtype, t * N + n, v);
}

}  // namespace cuda
}  // namespace lowbit
