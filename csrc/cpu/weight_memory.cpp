#include "weight_memory.h"

#include <algorithm>
#include <memory>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lowbit {
namespace cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Pages are backed as they are first written, so a mapping's unused tail costs address space only.
constexpr size_t kSlabBytes = size_t{64} << 20;
constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// One mapping aligned to 2 MiB. Tensors carved from it share it; the last one freed unmaps it.
struct Slab {
  char* base = nullptr;
  size_t size = 0, used = 0;

  explicit Slab(size_t bytes) : size(bytes) {
    // Map one huge page more and trim both ends, for an aligned start.
    void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "lowbit: could not map ", size, " bytes for repacked weights");
    const uintptr_t first = reinterpret_cast<uintptr_t>(raw), start = round_up(first, kHugePage);
    if (start > first) munmap(raw, start - first);
    if (first + kHugePage > start) munmap(reinterpret_cast<void*>(start + size), first + kHugePage - start);
    base = reinterpret_cast<char*>(start);
    madvise(base, size, MADV_HUGEPAGE);  // advice only: ignored where transparent huge pages are off
  }
  ~Slab() { munmap(base, size); }
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;
};

std::mutex slab_mutex;
std::weak_ptr<Slab> current_slab;  // where new tensors go, while any tensor holds it

}  // namespace

at::Tensor zeros_for_streaming(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = round_up(static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype), kAlign);
  if (bytes == 0) return at::zeros(sizes, dtype);
  std::shared_ptr<Slab> slab;
  size_t offset = 0;
  {
    std::lock_guard<std::mutex> lock(slab_mutex);
    slab = current_slab.lock();
    if (!slab || slab->size - slab->used < bytes) {
      slab = std::make_shared<Slab>(std::max(kSlabBytes, round_up(bytes, kHugePage)));
      current_slab = slab;
    }
    offset = slab->used;
    slab->used += bytes;  // never reused: fresh mapped memory reads as zeros
  }
  return at::from_blob(slab->base + offset, sizes, [slab](void*) {}, at::TensorOptions().dtype(dtype));
}

#else

at::Tensor zeros_for_streaming(at::IntArrayRef sizes, at::ScalarType dtype) { return at::zeros(sizes, dtype); }

#endif

}  // namespace cpu
}  // namespace lowbit
