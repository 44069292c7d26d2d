// Engine support: a team of workers with a per-step barrier, and a task queue.
//
// A Team of `size` logical workers runs on however many threads at::parallel_for actually
// gives it: each thread runs a contiguous range [first, last) of workers. The barrier counts
// workers, not threads (a thread arrives with the weight of its range) and its counter only
// grows, so it completes whether the runtime gave one thread per worker, fewer, or ran the
// whole range inline (inside another parallel region): it cannot deadlock on a short team.
//
// Waiting: the worker whose arrival completes a step bumps a generation word (park.h) that the
// others read; they never poll the counter every arrival writes. A waiter spins on the word
// (with a pause instruction) for a bounded time, then sleeps on it (a futex) until the last
// arriver wakes it. The spin bound adapts: halved after a sleep that outlasted the longest
// spin (a partner away), raised to twice the wait after a shorter one (a partner that was
// running, just later than the spin), grown slowly after waits that the spin covered, and
// carried from call to call. On an idle machine
// the partners arrive within the spin and nobody sleeps; on an oversubscribed one (other
// processes on the cores) a waiter soon stops spinning and gives its core to the worker it
// waits for, as OpenMP's own barriers do.
//
// Crowded machines: where the OS deschedules workers (more runnable threads than cores), a
// worker waits for a partner's time slice, far longer than its own work for the step. When
// such stalls take a quarter of a team run's time, the next teams run inline on the calling
// thread, which never waits, for a stretch of runs that doubles while the crowding lasts; then
// one team run probes again (Crowding). A partner that is merely slower (more blocks, a big
// step) makes waits no longer than the work, which do not count; nor do stalls in a run whose
// workers were seldom preempted (involuntary context switches, getrusage): a partner held up
// by page faults on fresh memory is slow, not crowded out.
//
// A worker that throws marks the team failed in the same word, which wakes every sleeper; the
// others stop waiting and the first exception reaches the caller (at::parallel_for rethrows
// it). Workers run with the caller's floating-point control (FTZ/DAZ, park.h). Where ATen's
// parallel backend is not OpenMP (its native pool can livelock two callers' teams), or
// FASTBIRNN_TEAM=inline is set when the extension loads, every team runs inline on the
// calling thread (team_mode()). Results never depend on any of this.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>

#if defined(__linux__)
#include <sys/resource.h>
#endif

#include "blas.h"
#include "park.h"

namespace fastbirnn {

// Whether teams run on threads ("openmp") or on the calling thread only ("inline"), decided
// once: inline where ATen's parallel backend is not OpenMP, where this extension was built
// without OpenMP (at::parallel_for is then a plain loop), or where FASTBIRNN_TEAM=inline.
inline const char* team_mode() {
  static const char* const mode = [] {
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
    const char* forced = std::getenv("FASTBIRNN_TEAM");
    return forced && std::strcmp(forced, "inline") == 0 ? "inline" : "openmp";
#else
    return "inline";
#endif
  }();
  return mode;
}

inline bool teams_use_threads() {
  static const bool threads = std::strcmp(team_mode(), "openmp") == 0;
  return threads;
}

// Whether work for `workers` workers runs on the calling thread alone: one worker, teams off
// (team_mode), one thread allowed, or already inside a parallel region.
inline bool runs_inline(int64_t workers) {
  return workers <= 1 || !teams_use_threads() || at::get_num_threads() == 1 ||
         at::in_parallel_region();
}

// How long a waiter spins before it sleeps, adapted (see above) and shared by all teams.
// Plain relaxed reads and writes: a racy update only shifts a heuristic.
struct SpinBudget {
  static constexpr int64_t kMinNs = 2000;    // a partner that is running arrives within this
  static constexpr int64_t kMaxNs = 100000;  // longer than a sleep and wake-up costs
  static std::atomic<int64_t>& shared() {
    static std::atomic<int64_t> ns{kMaxNs};
    return ns;
  }
};

// When teams give way to inline runs. A team run of at least kMinRunNs (summed over its
// threads) whose stalls (waits longer than kStallFactor times the waiter's own work for the
// step, and than kMinStallNs) took more than a quarter of that time, and whose workers were
// preempted at least once per kPreemptionNs of it, was crowded: the next
// `stretch` team runs go inline and the
// stretch doubles (up to kMaxStretch); a calm run resets it. Relaxed atomics: concurrent
// callers may race on a heuristic, never on a result (the worker count cannot change one).
// The calling thread's involuntary context switches so far (the OS took its core while it
// could run), or -1 where the OS does not say.
inline int64_t involuntary_switches() {
#if defined(__linux__) && defined(RUSAGE_THREAD)
  rusage usage;
  if (getrusage(RUSAGE_THREAD, &usage) == 0) return int64_t(usage.ru_nivcsw);
#endif
  return -1;
}

class Crowding {
 public:
  static constexpr int64_t kMinRunNs = 1000000;  // 1 ms: shorter runs are too few steps to judge
  static constexpr int64_t kStallFactor = 2;
  static constexpr int64_t kMinStallNs = 50000;  // a sleep and wake-up take a few microseconds
  static constexpr int64_t kMinStretch = 4;
  static constexpr int64_t kMaxStretch = 256;
  // Crowding preempts a worker at least once per this much of the threads' time (a time slice
  // on a shared core is a few ms); on an idle 2-core VM timers and kernel work preempted the
  // workers of a 0.5-1 s run 7-34 times.
  static constexpr int64_t kPreemptionNs = 10000000;  // 10 ms

  static Crowding& shared() {
    static Crowding crowding;
    return crowding;
  }

  // Whether the next team may run on threads (false: inline, and one run of the stretch used).
  bool allows_threads() {
    int64_t left = inline_left_.load(std::memory_order_relaxed);
    while (left > 0) {
      if (inline_left_.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
        inline_runs_.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
    }
    return true;
  }

  // A team run's time (its threads' together), the part of it spent in stalls, and its
  // workers' involuntary context switches (-1: unknown, taken as some).
  void record(int64_t run_ns, int64_t stalled_ns, int64_t preemptions) {
    if (run_ns < kMinRunNs) return;
    const bool preempted = preemptions < 0 || preemptions * kPreemptionNs >= run_ns;
    if (4 * stalled_ns > run_ns && preempted) {
      const int64_t stretch = stretch_.load(std::memory_order_relaxed);
      inline_left_.store(stretch, std::memory_order_relaxed);
      stretch_.store(std::min(kMaxStretch, 2 * stretch), std::memory_order_relaxed);
    } else {
      stretch_.store(kMinStretch, std::memory_order_relaxed);
    }
  }

  int64_t inline_left() const { return inline_left_.load(std::memory_order_relaxed); }
  int64_t stretch() const { return stretch_.load(std::memory_order_relaxed); }
  // Team runs that went inline because of crowding, since the extension loaded.
  int64_t inline_runs() const { return inline_runs_.load(std::memory_order_relaxed); }
  void reset() {
    inline_left_.store(0, std::memory_order_relaxed);
    stretch_.store(kMinStretch, std::memory_order_relaxed);
  }

 private:
  std::atomic<int64_t> inline_left_{0};
  std::atomic<int64_t> stretch_{kMinStretch};
  std::atomic<int64_t> inline_runs_{0};
};

class Team {
 public:
  class Member {
   public:
    // on_thread: a worker of a parallel run, which counts its preemptions (an inline run has
    // nobody to stall).
    Member(Team& team, int64_t first, int64_t last, bool on_thread = false)
        : team_(team), first_(first), last_(last),
          spin_ns_(SpinBudget::shared().load(std::memory_order_relaxed)),
          start_ns_(now_ns()), step_start_ns_(start_ns_),
          switches_(on_thread ? involuntary_switches() : -1) {}
    ~Member() {
      barriers_met().fetch_add(syncs_, std::memory_order_relaxed);
      SpinBudget::shared().store(spin_ns_, std::memory_order_relaxed);
      const int64_t switches = switches_ < 0 ? -1 : involuntary_switches();
      team_.account(now_ns() - start_ns_, stalled_ns_,
                    switches < 0 ? -1 : switches - switches_);
    }
    // Whether this thread runs logical worker w.
    bool runs(int64_t worker) const { return worker >= first_ && worker < last_; }
    // Whether this thread computes block k of a round-robin assignment of blocks to workers.
    bool owns(int64_t k) const { return runs(k % team_.size_); }
    // Every worker's writes before sync() are visible to every worker after it.
    void sync() {
      ++syncs_;
      const int64_t arrived = now_ns();
      team_.arrive_and_wait(last_ - first_, ++generation_, spin_ns_);
      const int64_t released = now_ns(), waited = released - arrived;
      if (waited > kStallFloor && waited > Crowding::kStallFactor * (arrived - step_start_ns_))
        stalled_ns_ += waited;
      step_start_ns_ = released;
    }
    int64_t first() const { return first_; }
    int64_t last() const { return last_; }
    int64_t team_size() const { return team_.size_; }

   private:
    Team& team_;
    int64_t first_, last_;
    int64_t generation_ = 0;
    int64_t spin_ns_;
    int64_t start_ns_, step_start_ns_, stalled_ns_ = 0;
    int64_t switches_;  // involuntary context switches at the start, or -1 (not counted)
    int64_t syncs_ = 0;
    static constexpr int64_t kStallFloor = Crowding::kMinStallNs;
  };

  explicit Team(int64_t size) : size_(size < 1 ? 1 : size) {}
  int64_t size() const { return size_; }
  // Barriers met (sync() calls, counted per thread) since the extension loaded: for tests.
  static std::atomic<int64_t>& barriers_met() {
    static std::atomic<int64_t> count{0};
    return count;
  }

  // Runs fn(member) on each thread of the team; BLAS is single-threaded inside (see the
  // determinism note in recurrence.h).
  template <typename F>
  void run(const F& fn) {
    if (runs_inline(size_) || !Crowding::shared().allows_threads()) {
      SingleThreadedBlas pin;
      Member all(*this, 0, size_);
      fn(all);
      return;
    }
    const FloatControl caller = FloatControl::current();
    try {
      at::parallel_for(0, size_, 1, [&](int64_t first, int64_t last) {
        FloatControl::Scope control(caller);
        SingleThreadedBlas pin;
        Member member(*this, first, last, /*on_thread=*/true);
        try {
          fn(member);
        } catch (...) {
          fail(std::current_exception());
          throw;
        }
      });
    } catch (...) {
      // The first failure, not a partner's "another worker failed" that may have won the
      // race to at::parallel_for.
      if (first_error_) std::rethrow_exception(first_error_);
      throw;
    }
    Crowding::shared().record(run_ns_.load(std::memory_order_relaxed),
                              stalled_ns_.load(std::memory_order_relaxed),
                              preemptions_.load(std::memory_order_relaxed));
  }

 private:
  // The generation word: the count of completed steps (low bits) and a failure bit.
  static constexpr uint32_t kFailed = 0x80000000u;
  static constexpr uint32_t kCount = 0x7fffffffu;

  // preemptions: the worker's involuntary context switches in this run, or -1 if unknown
  // (which makes the run's count unknown: -1).
  void account(int64_t run_ns, int64_t stalled_ns, int64_t preemptions) {
    run_ns_.fetch_add(run_ns, std::memory_order_relaxed);
    stalled_ns_.fetch_add(stalled_ns, std::memory_order_relaxed);
    if (preemptions < 0)
      preemptions_.store(-1, std::memory_order_relaxed);
    else if (preemptions_.load(std::memory_order_relaxed) >= 0)
      preemptions_.fetch_add(preemptions, std::memory_order_relaxed);
  }

  void fail(std::exception_ptr error) {
    if (!error_taken_.exchange(true)) first_error_ = error;
    released_.update_and_wake([](uint32_t v) { return v | kFailed; });
  }

  [[noreturn]] static void failed() {
    TORCH_CHECK(false, "fastbirnn cpp backend: another worker of the team failed");
    std::abort();  // not reached
  }

  void arrive_and_wait(int64_t weight, int64_t generation, int64_t& spin_ns) {
    const int64_t before = arrived_.fetch_add(weight, std::memory_order_acq_rel);
    if (before + weight == generation * size_) {  // the last to arrive: release this step
      released_.update_and_wake([](uint32_t v) { return (v & kFailed) | ((v + 1) & kCount); });
      return;
    }
    const uint32_t want = uint32_t(generation) & kCount;
    uint32_t seen = released_.load();
    if ((seen & kCount) == want) return;
    // Spin: a pause per read, the clock every 16 reads.
    const int64_t start = now_ns();
    for (int spins = 1;; ++spins) {
      if (seen & kFailed) failed();
      cpu_relax();
      seen = released_.load();
      if ((seen & kCount) == want) {
        spin_ns = std::min<int64_t>(SpinBudget::kMaxNs, spin_ns + SpinBudget::kMinNs / 4);
        return;
      }
      if (spins % 16 == 0 && now_ns() - start >= spin_ns) break;
    }
    // Sleep until the last arriver (or a failing worker) changes the word.
    while ((seen & kCount) != want) {
      if (seen & kFailed) failed();
      released_.sleep_while(seen);
      seen = released_.load();
    }
    // A partner that came within kMaxNs was running: the spin was too short, and the sleep
    // cost a wake-up (tens of microseconds on a VM) that makes this worker the late one at the
    // next step, whose waiter then sleeps too: every step would sleep. Spin that long next
    // time. A longer wait (a descheduled partner): sleeping was right, spin less.
    const int64_t waited = now_ns() - start;
    spin_ns = waited < SpinBudget::kMaxNs
                  ? std::max(spin_ns, std::min<int64_t>(SpinBudget::kMaxNs, 2 * waited))
                  : std::max<int64_t>(SpinBudget::kMinNs, spin_ns / 2);
  }

  int64_t size_;
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) ParkingWord released_;
  alignas(64) std::atomic<int64_t> run_ns_{0};  // the threads' time in this run, summed
  std::atomic<int64_t> stalled_ns_{0};          // of it, stalls (see Crowding)
  std::atomic<int64_t> preemptions_{0};         // workers' involuntary switches (-1: unknown)
  std::atomic<bool> error_taken_{false};
  std::exception_ptr first_error_;
};

// Runs fn(task) for task in [0, n) on up to `threads` threads, each taking the next task
// from a shared counter, so unequal tasks keep every core busy. Tasks write disjoint outputs
// and each is computed the same way whichever thread runs it: results never depend on the
// thread count. List the biggest tasks first.
template <typename F>
void run_task_queue(int64_t n, int64_t threads, const F& fn) {
  threads = std::min<int64_t>(threads, n);
  if (runs_inline(threads)) {
    SingleThreadedBlas pin;
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const FloatControl caller = FloatControl::current();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    FloatControl::Scope control(caller);
    SingleThreadedBlas pin;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace fastbirnn
