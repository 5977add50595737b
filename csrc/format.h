// The three weight formats of docs/FORMAT.md, as the C++ side names them. No torch headers here:
// the per-ISA kernel files include this.
#pragma once
#include <cstdint>

// Also callable from CUDA device code (csrc/cuda).
#if defined(__CUDACC__)
#define LOWBIT_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_HOST_DEVICE
#endif

namespace lowbit {

enum class Format : int { kInt4 = 0, kInt35 = 1, kInt8 = 2 };
constexpr int kFormats = 3;

// Packed bytes per row of Kp (padded) columns: int4 = 2 codes per byte, int3.5 = 16 codes in 7 bytes,
// int8 = one code per byte.
LOWBIT_HOST_DEVICE constexpr int64_t packed_row_bytes(Format f, int64_t Kp) {
  return f == Format::kInt4 ? Kp / 2 : f == Format::kInt35 ? Kp / 16 * 7 : Kp;
}

// The code of column k of a canonical row (or of a chunk of it: k counted from the chunk's first column).
LOWBIT_HOST_DEVICE inline uint8_t canonical_code(Format f, const uint8_t* row, int64_t k) {
  if (f == Format::kInt8) return row[k];
  if (f == Format::kInt4) return k % 2 ? row[k / 2] >> 4 : row[k / 2] & 15;
  const uint8_t* block = row + k / 16 * 7;  // int3.5: 16 columns in 7 bytes, pair p at bits [7p, 7p + 7)
  uint64_t bits = 0;
  for (int i = 0; i < 7; ++i) bits |= static_cast<uint64_t>(block[i]) << (8 * i);
  const int p = static_cast<int>(k % 16) / 2;
  return k % 2 ? (bits >> (7 * p + 4)) & 7 : (bits >> (7 * p)) & 15;
}

// The format as a type, so that a generic lambda can instantiate a template per format.
template <Format F>
struct FormatConstant {
  static constexpr Format value = F;
};

// fn(FormatConstant<f>{}): one templated body, dispatched on a runtime format.
template <typename Fn>
decltype(auto) visit_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::kInt4: return fn(FormatConstant<Format::kInt4>{});
    case Format::kInt35: return fn(FormatConstant<Format::kInt35>{});
    default: return fn(FormatConstant<Format::kInt8>{});
  }
}

}  // namespace lowbit
