// Where the engine's memory comes from: results carved out of one allocation while they are
// small, large buffers advised as transparent huge pages, and scratch buffers kept per calling
// thread between calls.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastbirnn {

using at::Tensor;

// ---- large buffers ----------------------------------------------------------------------

// From this size on, glibc serves every allocation with a fresh mmap (its dynamic threshold
// stops at 32 MiB), so the first write to each 4 KiB page of an output or gradient buffer
// faults: 9 % of a (64, 256, 256, 512) forward's time was the kernel zeroing pages.
constexpr int64_t kHugePageAdviceBytes = int64_t(32) << 20;

// at::empty that asks the kernel for transparent huge pages on the 2 MiB-aligned interior of
// a large buffer before anything touches it (what PyTorch's THP_MEM_ALLOC_ENABLE does for
// every allocation): one fault per 2 MiB instead of 512. Only advice: where THP is off or
// unavailable the buffer is the same, just faulted in 4 KiB pages.
inline Tensor empty_buffer(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  if (bytes >= kHugePageAdviceBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + uintptr_t(bytes)) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Uninitialised contiguous tensors of the given shapes. At tiny sizes one at::empty per result
// (a dispatcher round trip plus an allocation each) is most of the op's fixed cost, so small
// sets are carved out of one allocation: each piece is its own tensor (own sizes, version
// counter), only the storage is shared. Large sets keep separate buffers, so a big scratch
// buffer is never kept alive by the small tensors that share its storage.
inline std::vector<Tensor> empty_tensors(const std::vector<std::vector<int64_t>>& shapes,
                                         const at::TensorOptions& options) {
  constexpr int64_t kAlign = 16;      // elements: each piece starts on a 64-byte boundary (fp32)
  constexpr int64_t kShared = 1 << 16;  // elements: above this, separate allocations
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& shape : shapes) {
    offsets.push_back(total);
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    total += (n + kAlign - 1) / kAlign * kAlign;
  }
  std::vector<Tensor> out;
  out.reserve(shapes.size());
  if (total > kShared) {
    for (const auto& shape : shapes) out.push_back(empty_buffer(shape, options));
    return out;
  }
  const Tensor flat = at::empty({total}, options);
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()),
                                                        flat.key_set(), flat.dtype());
    t.unsafeGetTensorImpl()->set_storage_offset(offsets[i]);
    t.unsafeGetTensorImpl()->set_sizes_contiguous(shapes[i]);
    out.push_back(std::move(t));
  }
  return out;
}

// ---- scratch buffers, kept per calling thread ----------------------------------------------

// The buffers a call uses internally and never returns (the inference gates, the backward's
// gate gradients, layer-to-layer activations and gradients). A fresh multi-MiB allocation
// faults in every page on first touch whenever glibc has handed the memory back, which came
// and went with the allocator's state: (32, 128, 128, 128) LSTM inference took 14 ms with no
// faults and 25 ms with 4,700. Each slot keeps its buffer for the next call on the thread.
enum Scratch : int {
  kScratchGates, kScratchGradGates, kScratchGradGatesHidden,
  kScratchLayer0, kScratchLayer1, kScratchGradInput0, kScratchGradInput1, kScratchSlots
};
constexpr int64_t kScratchMinBytes = int64_t(1) << 20;     // below: allocating is cheap
constexpr int64_t kScratchCacheBytes = int64_t(128) << 20;  // kept per thread, all slots

inline std::array<Tensor, kScratchSlots>& scratch_cache() {
  thread_local std::array<Tensor, kScratchSlots> cache;
  return cache;
}

// Frees this thread's kept scratch buffers; returns the bytes freed. (The benchmarks' peak
// memory calls it first, so a step's scratch counts as that step's allocation.)
inline int64_t release_scratch() {
  int64_t bytes = 0;
  for (Tensor& t : scratch_cache()) {
    if (t.defined()) bytes += int64_t(t.nbytes());
    t = Tensor();
  }
  return bytes;
}

// A buffer of at least numel elements for one slot (a fresh one if the slot's buffer is
// still held elsewhere, or if keeping it would pass kScratchCacheBytes).
inline Tensor scratch_buffer(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  std::array<Tensor, kScratchSlots>& cache = scratch_cache();
  const int64_t bytes = numel * int64_t(options.dtype().itemsize());
  if (bytes < kScratchMinBytes) return at::empty({numel}, options);
  Tensor& cached = cache[slot];
  if (cached.defined() && cached.use_count() == 1 && cached.dtype() == options.dtype() &&
      cached.numel() >= numel)
    return cached;
  int64_t kept = 0;
  for (int i = 0; i < kScratchSlots; ++i)
    if (i != slot && cache[i].defined()) kept += int64_t(cache[i].nbytes());
  if (kept + bytes > kScratchCacheBytes || (cached.defined() && cached.use_count() > 1))
    return empty_buffer({numel}, options);
  cached = Tensor();  // free the smaller one first
  cached = empty_buffer({numel}, options);
  return cached;
}

}  // namespace fastbirnn
