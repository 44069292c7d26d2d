// What the team (team.h) needs from the platform: a pause instruction for spinning, a 32-bit
// word threads can sleep on until another thread changes it, and the caller's floating-point
// control (FTZ/DAZ) carried into worker threads.
//
// Sleeping: std::atomic::wait / notify_all where the standard library has them (C++20; a
// futex on Linux), else the Linux futex syscall itself, else a condition variable.
// FASTBIRNN_PARK_IMPL (1: atomic wait, 2: futex, 3: condition variable) forces one, so every
// implementation can be built and tested on one machine.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#if !defined(FASTBIRNN_PARK_IMPL)
#if defined(__cpp_lib_atomic_wait)
#define FASTBIRNN_PARK_IMPL 1
#elif defined(__linux__)
#define FASTBIRNN_PARK_IMPL 2
#else
#define FASTBIRNN_PARK_IMPL 3
#endif
#endif

#if FASTBIRNN_PARK_IMPL == 2
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#elif FASTBIRNN_PARK_IMPL == 3
#include <condition_variable>
#include <mutex>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FASTBIRNN_HAS_MXCSR 1
#endif

namespace fastbirnn {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A 32-bit word that threads can sleep on until it changes. Writers change it with an RMW
// and wake the sleepers; a sleeper may also wake spuriously, so it re-reads the word.
// Sleepers count themselves, so a writer makes no system call while nobody sleeps. The word
// and the count are sequentially consistent, so a writer either sees a sleeper or the sleeper
// sees the new value before it sleeps (the kernel re-checks the value as it puts it to sleep).
class ParkingWord {
 public:
  uint32_t load() const { return word_.load(std::memory_order_acquire); }

  // Sets the word to f(old) (atomically) and wakes every sleeper.
  template <typename F>
  void update_and_wake(const F& f) {
    uint32_t v = word_.load(std::memory_order_relaxed);
    while (!word_.compare_exchange_weak(v, f(v), std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
    }
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
  }

  // Sleeps while the word holds `seen` (may return early; the caller re-checks).
  void sleep_while(uint32_t seen) {
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    if (word_.load(std::memory_order_seq_cst) == seen) block(seen);
    sleepers_.fetch_sub(1, std::memory_order_release);
  }

 private:
#if FASTBIRNN_PARK_IMPL == 1
  void block(uint32_t seen) { word_.wait(seen, std::memory_order_acquire); }
  void wake_all() { word_.notify_all(); }
#elif FASTBIRNN_PARK_IMPL == 2
  static_assert(sizeof(std::atomic<uint32_t>) == 4, "the futex is a 32-bit word");
  void block(uint32_t seen) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word_), FUTEX_WAIT_PRIVATE, seen, nullptr,
            nullptr, 0);
  }
  void wake_all() {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word_), FUTEX_WAKE_PRIVATE, INT_MAX,
            nullptr, nullptr, 0);
  }
#else
  void block(uint32_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return word_.load(std::memory_order_acquire) != seen; });
  }
  void wake_all() {
    { std::lock_guard<std::mutex> lock(mutex_); }  // a sleeper is in wait() or not yet checked
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
#endif
  std::atomic<uint32_t> word_{0};
  std::atomic<int32_t> sleepers_{0};
};

// Makes a worker thread compute with the caller's floating-point control for its scope: on
// x86 the MXCSR's control bits (FTZ, DAZ, rounding, exception masks), which
// torch.set_flush_denormal sets in the calling thread only. Its status flags stay the
// worker's own.
class FloatControl {
 public:
  // The calling thread's control.
  static FloatControl current() {
    FloatControl c;
#ifdef FASTBIRNN_HAS_MXCSR
    c.csr_ = _mm_getcsr() & ~kStatus;
#endif
    return c;
  }

  // Applies `caller`'s control in this thread until destroyed.
  class Scope {
   public:
    explicit Scope(const FloatControl& caller) {
#ifdef FASTBIRNN_HAS_MXCSR
      const uint32_t mine = _mm_getcsr();
      if ((mine & ~kStatus) != caller.csr_) {
        saved_ = mine & ~kStatus;
        changed_ = true;
        _mm_setcsr((mine & kStatus) | caller.csr_);
      }
#else
      (void)caller;
#endif
    }
    ~Scope() {
#ifdef FASTBIRNN_HAS_MXCSR
      if (changed_) _mm_setcsr((_mm_getcsr() & kStatus) | saved_);
#endif
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    uint32_t saved_ = 0;
    bool changed_ = false;
  };

 private:
  static constexpr uint32_t kStatus = 0x3f;  // MXCSR's sticky exception flags
  uint32_t csr_ = 0;
};

}  // namespace fastbirnn
