// Device building blocks of the lowbit CUDA kernels (tiled.cu, elementwise.cu): the tensor-core
// instruction, float conversions and the matmul epilogue.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lowbit {
namespace cuda {

constexpr float kStep3 = 15.0f / 7.0f;  // int3.5: the step of the 3-bit codes, in 4-bit steps
constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024): 0x6400 | q is the float16 1024 + q

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls launch(T{}) with T the C++ type of dtype (float, __half or __nv_bfloat16), so that one templated
// launch serves every dtype; returns the launch's error.
template <typename Launch>
cudaError_t for_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
  return cudaGetLastError();
}

// d += a b for one 16x8x16 tile: a 16x16 (row-major fragments), b 16x8 (column-major), float32 d.
// Thread (g, c) of a warp (g = lane / 4, c = lane % 4) holds a0 = A[g][2c..2c+1], a1 = A[g+8][2c..2c+1],
// a2 = A[g][2c+8..2c+9], a3 = A[g+8][2c+8..2c+9], b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g], and
// d = D[g][2c..2c+1], D[g+8][2c..2c+1]. The kernels need sm_80; ops_cuda.cu checks the device, and code
// built for older targets traps instead of failing the build.
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
