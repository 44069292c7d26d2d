// Engine support: a team of workers with a spinning per-step barrier, and a task queue.
//
// A Team of `size` logical workers runs on however many threads at::parallel_for actually
// gives it: each thread runs a contiguous range [first, last) of workers. The barrier counts
// workers, not threads (a thread arrives with the weight of its range) and its counter only
// grows, so it completes whether the runtime gave one thread per worker, fewer, or ran the
// whole range inline (inside another parallel region): it cannot deadlock on a short team.
//
// Waiting spins (with a pause instruction) for a bounded count, then yields the core on each
// retry, so on an oversubscribed machine a waiting worker never starves the one it waits for.
// No OS sleep on the hot path. A worker that throws marks the team failed; the others stop
// waiting and the first exception reaches the caller (at::parallel_for rethrows it).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#include "blas.h"

namespace fastbirnn {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

class Team {
 public:
  class Member {
   public:
    Member(Team& team, int64_t first, int64_t last) : team_(team), first_(first), last_(last) {}
    // Whether this thread runs logical worker w.
    bool runs(int64_t worker) const { return worker >= first_ && worker < last_; }
    // Whether this thread computes block k of a round-robin assignment of blocks to workers.
    bool owns(int64_t k) const { return runs(k % team_.size_); }
    // Every worker's writes before sync() are visible to every worker after it.
    void sync() { team_.arrive_and_wait(last_ - first_, ++generation_); }
    int64_t first() const { return first_; }
    int64_t last() const { return last_; }

   private:
    Team& team_;
    int64_t first_, last_;
    int64_t generation_ = 0;
  };

  explicit Team(int64_t size) : size_(size < 1 ? 1 : size) {}
  int64_t size() const { return size_; }

  // Runs fn(member) on each thread of the team; BLAS is single-threaded inside (see the
  // determinism note in recurrence.h).
  template <typename F>
  void run(const F& fn) {
    if (size_ == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
      SingleThreadedBlas pin;
      Member all(*this, 0, size_);
      fn(all);
      return;
    }
    at::parallel_for(0, size_, 1, [&](int64_t first, int64_t last) {
      SingleThreadedBlas pin;
      Member member(*this, first, last);
      try {
        fn(member);
      } catch (...) {
        failed_.store(true, std::memory_order_release);
        throw;
      }
    });
  }

 private:
  void arrive_and_wait(int64_t weight, int64_t generation) {
    arrived_.fetch_add(weight, std::memory_order_acq_rel);
    const int64_t target = generation * size_;
    int spins = 0;
    while (arrived_.load(std::memory_order_acquire) < target) {
      if (failed_.load(std::memory_order_relaxed))
        TORCH_CHECK(false, "fastbirnn cpp backend: another worker of the team failed");
      if (spins < kSpins) {
        ++spins;
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

  static constexpr int kSpins = 1024;  // ~5-20 µs of pause instructions, then yield
  int64_t size_;
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<bool> failed_{false};
};

// Runs fn(task) for task in [0, n) on up to `threads` threads, each taking the next task
// from a shared counter, so unequal tasks keep every core busy. Tasks write disjoint outputs
// and each is computed the same way whichever thread runs it: results never depend on the
// thread count. List the biggest tasks first.
template <typename F>
void run_task_queue(int64_t n, int64_t threads, const F& fn) {
  threads = std::min<int64_t>(threads, n);
  if (threads <= 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    SingleThreadedBlas pin;
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    SingleThreadedBlas pin;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace fastbirnn
