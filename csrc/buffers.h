// Where the engine's memory comes from: results carved out of one allocation while they are
// small, large buffers advised as transparent huge pages, and scratch buffers kept per calling
// thread between calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
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

// Whether the hypervisor takes the guest's free memory back: a virtio balloon that reports
// free pages (VIRTIO_BALLOON_F_REPORTING, feature bit 5; sysfs lists a device's features as one
// '0' or '1' per bit), as Firecracker VMs have. The guest then hands its free 2 MiB blocks to
// the host, a huge page is faulted into such a block, and that fault costs a host fault too.
// On such a 2-core VM (benchmarks/results/cpu/huge_pages_*.json) the advice made the median
// training step 1-12 % faster, but single steps took up to 2.5x the median (1.4x without) and
// the mean step was 7 % slower for the LSTM at B 64 T 250 H 512 uni and the GRU at B 128
// T 128 H 512 bi, 4 % faster for the Elman cell at (64, 256, 256, 512) (one shape per process;
// with all three in one process the means were within 2 %): there the steadier 4 KiB faults
// are the default.
inline bool hypervisor_reclaims_free_pages() {
#if defined(__linux__)
  std::error_code error;
  for (const auto& device : std::filesystem::directory_iterator(
           "/sys/bus/virtio/drivers/virtio_balloon", error)) {
    std::ifstream features(device.path() / "features");
    std::string bits;
    if (features >> bits && bits.size() > 5 && bits[5] == '1') return true;
  }
#endif
  return false;
}

// Whether to give that advice, decided once at load: FASTBIRNN_HUGE_PAGES=1 or 0 says so;
// unset, everywhere but where the hypervisor reclaims free pages. Any other value is an error
// (raised when fastbirnn's cpp backend loads), not a silent default.
struct HugePageAdvice {
  bool on = true;
  std::string error;
};

inline HugePageAdvice read_huge_page_advice() {
  HugePageAdvice advice;
  const char* raw = std::getenv("FASTBIRNN_HUGE_PAGES");
  const std::string value = raw ? raw : "";
  if (value == "1") return advice;
  if (value == "0") {
    advice.on = false;
  } else {
    advice.on = !hypervisor_reclaims_free_pages();
    if (!value.empty())
      advice.error = "FASTBIRNN_HUGE_PAGES=" + value +
                     " is not '1' or '0' (unset: advise huge pages unless the hypervisor "
                     "reclaims free memory)";
  }
  return advice;
}

inline const HugePageAdvice kHugePageAdvice = read_huge_page_advice();
inline const bool kAdviseHugePages = kHugePageAdvice.on;

constexpr int64_t kScratchProcessBytes = int64_t(256) << 20;  // kept by all threads: default

// The scratch cap: FASTBIRNN_SCRATCH_MIB, read at load, or the default.
inline int64_t scratch_limit_from_environment() {
  const char* mib = std::getenv("FASTBIRNN_SCRATCH_MIB");
  if (mib == nullptr || *mib == '\0') return kScratchProcessBytes;
  char* end = nullptr;
  const long long value = std::strtoll(mib, &end, 10);
  TORCH_CHECK(*end == '\0' && value >= 0,
              "fastbirnn: FASTBIRNN_SCRATCH_MIB must be a whole number of MiB >= 0, got '",
              mib, "'");
  return int64_t(value) << 20;
}

// ---- results, recycled --------------------------------------------------------------------

// A large result (an output, a gradient) goes back to this pool once its last user drops it,
// instead of to glibc, and a later call's result of about its size takes it, its pages still
// mapped. glibc hands such memory back to the kernel (its own mmap above the dynamic
// threshold, or a trim of the heap's top) or not depending on the process's history: a
// training step of the 2-layer (1, 30, 300, 256) BiLSTM faulted in 1,800-3,700 fresh pages
// (its 10.5 MB of weight gradients, zeroed by the kernel, then written) in a process that
// ran nothing else, and none where nn.LSTM had run before. Idle blocks are kept up to the
// scratch limit (ScratchCaches::set_limit), the longest idle freed first; a block is taken for
// a result of at most its size and more than four fifths of it.
constexpr int64_t kRecycledMinBytes = int64_t(128) << 10;  // glibc's first mmap threshold

class RecycledResults final : public c10::Allocator {
 public:
  // Leaked on purpose: results may be dropped after static destruction.
  static RecycledResults& instance() {
    static RecycledResults* pool = new RecycledResults;
    return *pool;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, c10::Device(c10::DeviceType::CPU)};  // (a resize_ to 0)
    Block* block = take(bytes);
    if (block == nullptr) block = new Block{c10::alloc_cpu(bytes), bytes};
    return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees the idle blocks; returns their bytes.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t freed = idle_bytes_;
    trim(0);
    return freed;
  }
  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }
  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim(limit_);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if ((*it)->bytes >= bytes && (*it)->bytes / 5 * 4 < bytes &&
          (best == idle_.end() || (*it)->bytes < (*best)->bytes))
        best = it;
    if (best == idle_.end()) return nullptr;
    Block* block = *best;
    idle_.erase(best);
    idle_bytes_ -= int64_t(block->bytes);
    return block;
  }

  static void give_back(void* context) {
    Block* block = static_cast<Block*>(context);
    RecycledResults& pool = instance();
    std::lock_guard<std::mutex> lock(pool.mutex_);
    pool.idle_.push_back(block);
    pool.idle_bytes_ += int64_t(block->bytes);
    pool.trim(pool.limit_);
  }

  void trim(int64_t bytes) {  // (the mutex held)
    while (idle_bytes_ > bytes) {
      Block* oldest = idle_.front();
      idle_.pop_front();
      idle_bytes_ -= int64_t(oldest->bytes);
      c10::free_cpu(oldest->data);
      delete oldest;
    }
  }

  std::mutex mutex_;
  std::deque<Block*> idle_;  // longest idle first
  int64_t idle_bytes_ = 0;
  int64_t limit_ = scratch_limit_from_environment();
};

// An uninitialised CPU tensor whose memory comes from (and goes back to) RecycledResults.
inline Tensor recycled_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::detail::empty_generic(shape, &RecycledResults::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// at::empty that asks the kernel for transparent huge pages on the 2 MiB-aligned interior of
// a large buffer before anything touches it (what PyTorch's THP_MEM_ALLOC_ENABLE does for
// every allocation): one fault per 2 MiB instead of 512. Only advice: where THP is off or
// unavailable the buffer is the same, just faulted in 4 KiB pages. A `result` (returned to the
// caller) takes recycled memory from kRecycledMinBytes on (RecycledResults); the engine's own
// buffers do not (the scratch caches keep theirs, and free them to meet their cap).
inline Tensor empty_buffer(at::IntArrayRef shape, const at::TensorOptions& options,
                           bool result = false) {
  const int64_t bytes = c10::multiply_integers(shape) * int64_t(options.dtype().itemsize());
  Tensor t = result && bytes >= kRecycledMinBytes ? recycled_empty(shape, options)
                                                  : at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (kAdviseHugePages && bytes >= kHugePageAdviceBytes) {
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
    for (const auto& shape : shapes)
      out.push_back(empty_buffer(shape, options, /*result=*/true));
    return out;
  }
  const Tensor flat = empty_buffer({total}, options, /*result=*/true);
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()),
                                                        flat.key_set(), flat.dtype());
    t.unsafeGetTensorImpl()->set_storage_offset(offsets[i]);
    t.unsafeGetTensorImpl()->set_sizes_contiguous(shapes[i]);
    out.push_back(std::move(t));
  }
  return out;
}

// ---- scratch buffers, kept per calling thread, capped process-wide -----------------------

// The buffers a call uses internally and never returns (the inference gates, the backward's
// gate gradients, layer-to-layer activations and gradients). A fresh multi-MiB allocation
// faults in every page on first touch whenever glibc has handed the memory back, which came
// and went with the allocator's state: (32, 128, 128, 128) LSTM inference took 14 ms with no
// faults and 25 ms with 4,700. Each slot keeps its buffer for the next call on the thread.
//
// All threads together keep at most the process-wide cap (default kScratchProcessBytes). A
// buffer that does not fit beside the calling thread's others first frees that thread's idle
// slots, least recently used first (else, after a call of another shape, its old buffers kept
// the new one out and every call faulted its pages in again); to fit past the cap, the caches
// of the threads that called least recently are freed next (a server calling from 64 threads
// would otherwise keep 64 sets); a buffer that still does not fit is not kept.
enum Scratch : int {
  kScratchGates, kScratchGradGates, kScratchGradGatesHidden,
  kScratchLayer0, kScratchLayer1, kScratchGradInput0, kScratchGradInput1,
  kScratchPackedHidden, kScratchPackedInput,  // the forward's packed W_hh blocks and W_ih^T
  // A bf16 call's fp32 working copies (its input, its output before the result's conversion
  // and again in backward, the output gradient) and its bf16 product operands (the input's
  // bits, the gate gradients' bits, the weight gradients' operands in row pairs).
  kScratchWideInput, kScratchWideOutput, kScratchWideGradOutput,
  kScratchBf16Input, kScratchBf16Grads, kScratchBf16GradsHidden, kScratchBf16GradPairs,
  kScratchBf16GradPairsHidden, kScratchBf16InputPairs, kScratchBf16StatePairs,
  // What a forward keeps for its backward (intermediate layers' outputs, a gated cell's gates
  // and saved values): held by the autograd graph until the backward is done, so a slot is
  // busy while its graph lives (the next forward before that gets fresh memory) and idle for
  // the next training step after.
  kScratchKeptOutputs, kScratchKeptGates, kScratchKeptSaved,
  kScratchSlots
};
constexpr int64_t kScratchMinBytes = int64_t(1) << 20;          // below: allocating is cheap

class ScratchCaches {
 public:
  // Leaked on purpose: threads (and their caches' destructors) may outlive static destruction.
  static ScratchCaches& instance() {
    static ScratchCaches* caches = new ScratchCaches;
    return *caches;
  }

  // A buffer of at least numel elements for one slot of the calling thread.
  Tensor buffer(Scratch slot, int64_t numel, const at::TensorOptions& options) {
    const int64_t bytes = numel * int64_t(options.dtype().itemsize());
    if (bytes < kScratchMinBytes) return at::empty({numel}, options);
    PerThread& self = this_thread();  // registers itself: before taking the lock
    std::lock_guard<std::mutex> lock(mutex_);
    self.last_use = self.used[slot] = ++clock_;
    Tensor& cached = self.slots[slot];
    if (cached.defined() && !idle(cached))  // still held by an earlier result
      return empty_buffer({numel}, options);
    if (cached.defined() && cached.dtype() == options.dtype() && cached.numel() >= numel)
      return cached;
    drop(self, cached);  // the smaller one first
    if (!fit_in_thread(bytes, self) || !make_room(bytes, &self))
      return empty_buffer({numel}, options);
    cached = empty_buffer({numel}, options);
    self.bytes += int64_t(cached.nbytes());
    kept_ += int64_t(cached.nbytes());
    return cached;
  }

  // Frees the calling thread's buffers; returns the bytes freed.
  int64_t release_this_thread() {
    PerThread& self = this_thread();
    std::lock_guard<std::mutex> lock(mutex_);
    return release(self);
  }

  int64_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_;
  }

  // Sets the process-wide cap (bytes, >= 0), freeing least recently used caches to meet it;
  // returns the previous cap.
  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "fastbirnn: the scratch limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t previous = limit_;
    limit_ = bytes;
    make_room(0, nullptr);
    RecycledResults::instance().set_limit(bytes);
    return previous;
  }

 private:
  struct PerThread {
    std::array<Tensor, kScratchSlots> slots;  // all below: guarded by the caches' mutex
    std::array<uint64_t, kScratchSlots> used{};  // when each slot was last asked for
    int64_t bytes = 0;
    uint64_t last_use = 0;
    PerThread() { instance().add(this); }
    ~PerThread() { instance().remove(this); }
  };

  // Whether nothing but the slot holds a kept buffer: neither the slot's tensor (handed out
  // as is) nor a view of its memory. The counts are relaxed loads; the acquire fence orders
  // the last user's accesses (whichever thread dropped it, with its releasing decrement)
  // before this thread writes the buffer again.
  static bool idle(const Tensor& kept) {
    const bool unused = kept.use_count() == 1 && kept.storage().use_count() == 1;
    if (unused) std::atomic_thread_fence(std::memory_order_acquire);
    return unused;
  }

  static PerThread& this_thread() {
    thread_local PerThread caches;
    return caches;
  }

  void add(PerThread* t) {
    std::lock_guard<std::mutex> lock(mutex_);
    threads_.push_back(t);
  }
  void remove(PerThread* t) {
    std::lock_guard<std::mutex> lock(mutex_);
    release(*t);
    threads_.erase(std::remove(threads_.begin(), threads_.end(), t), threads_.end());
  }

  void drop(PerThread& t, Tensor& slot) {  // one of t's buffers
    if (!slot.defined()) return;
    t.bytes -= int64_t(slot.nbytes());
    kept_ -= int64_t(slot.nbytes());
    slot = Tensor();
  }
  int64_t release(PerThread& t) {
    const int64_t freed = t.bytes;
    for (Tensor& slot : t.slots) drop(t, slot);
    return freed;
  }

  // Frees t's idle slots, least recently used first, until `bytes` more fit in its share;
  // whether they do. (A slot still held by an earlier result is in use, not idle.)
  bool fit_in_thread(int64_t bytes, PerThread& t) {
    if (bytes > limit_) return false;
    while (t.bytes + bytes > limit_) {
      int oldest = -1;
      for (int i = 0; i < kScratchSlots; ++i)
        if (t.slots[i].defined() && idle(t.slots[i]) &&
            (oldest < 0 || t.used[i] < t.used[oldest]))
          oldest = i;
      if (oldest < 0) return false;
      drop(t, t.slots[oldest]);
    }
    return true;
  }

  // Frees the least recently used other threads' caches until `bytes` more fit under the
  // cap; whether they do. (A buffer still in use elsewhere stays alive with its user.)
  bool make_room(int64_t bytes, const PerThread* keep) {
    while (kept_ + bytes > limit_) {
      PerThread* oldest = nullptr;
      for (PerThread* t : threads_)
        if (t != keep && t->bytes > 0 && (!oldest || t->last_use < oldest->last_use)) oldest = t;
      if (oldest == nullptr) return false;
      release(*oldest);
    }
    return true;
  }

  std::mutex mutex_;
  std::vector<PerThread*> threads_;
  int64_t kept_ = 0;
  int64_t limit_ = scratch_limit_from_environment();
  uint64_t clock_ = 0;
};

inline Tensor scratch_buffer(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  return ScratchCaches::instance().buffer(slot, numel, options);
}

// A slot's buffer shaped as `shape` (its first elements), uninitialised.
inline Tensor scratch_tensor(Scratch slot, at::IntArrayRef shape,
                             const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(shape);
  return scratch_buffer(slot, numel, options).narrow(0, 0, numel).view(shape);
}

// Frees this thread's kept scratch buffers and every idle recycled block; returns the bytes
// freed. (The benchmarks' peak memory calls it first, so a step's scratch and results count as
// that step's allocation.)
inline int64_t release_scratch() {
  return ScratchCaches::instance().release_this_thread() + RecycledResults::instance().release();
}

}  // namespace fastbirnn
