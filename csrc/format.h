// The two weight formats of docs/FORMAT.md, as the C++ side names them. No torch headers here:
// the per-ISA kernel files include this.
#pragma once
#include <cstdint>

namespace lowbit {

enum class Format : int { kInt4 = 0, kInt35 = 1 };

// Packed bytes per row of Kp (padded) columns: int4 = 2 codes per byte, int3.5 = 16 codes in 7 bytes.
constexpr int64_t packed_row_bytes(Format f, int64_t Kp) { return f == Format::kInt4 ? Kp / 2 : Kp / 16 * 7; }

}  // namespace lowbit
