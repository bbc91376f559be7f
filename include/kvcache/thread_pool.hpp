// SPDX-License-Identifier: Apache-2.0
// A small persistent thread pool: attention's knob for running on more than one core.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {

/// `n_threads` workers, the calling thread being one of them, that run the items of a
/// parallel_for. Threads are started once, in the constructor, and wait between calls, so a
/// call costs a wake-up, not a thread start. Workers take items as they come and the caller
/// takes them too, so a call never waits for a worker that took no item: a worker the system
/// has preempted (a machine shared with other work) delays nothing it has not started. A
/// worker that finishes a call watches for the next one for `spin_rounds` pause instructions (a
/// few microseconds) before it sleeps, and so does the caller for the items still running: a
/// decode step makes dozens of calls a few microseconds apart, and a sleeping thread takes
/// longer than that to wake. One pool serves one caller at a time.
class thread_pool {
 public:
  /// Most threads a pool runs: far more than the cores attention can use, and few enough that
  /// starting them is quick.
  static constexpr Index max_threads = 1024;

  /// How long a thread watches for work (a worker) or for the items still running (the
  /// caller) before it sleeps, in pause instructions.
  static constexpr int spin_rounds = 1 << 11;

  /// Throws std::invalid_argument for n_threads < 1 or above max_threads. When a thread cannot
  /// be started, stops those already running and rethrows (std::system_error).
  explicit thread_pool(Index n_threads = 1) : n_threads_(n_threads) {
    if (n_threads < 1 || n_threads > max_threads) {
      detail::fail<std::invalid_argument>("thread_pool: n_threads must be in 1..max_threads = ",
                                          max_threads, ", got ", n_threads);
    }
    try {
      threads_.reserve(static_cast<std::size_t>(n_threads - 1));
      for (Index w = 1; w < n_threads; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
    } catch (...) {
      stop_and_join();  // a joinable std::thread left to its destructor would terminate
      throw;
    }
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() { stop_and_join(); }

  /// Threads in the pool, the caller included.
  Index size() const noexcept { return n_threads_; }

  /// Runs `f(item, worker)` for every item in [0, n_items), spread over the workers, and
  /// returns when all are done. `worker` is in [0, size()) and no two items run on the same
  /// worker at once, so per-worker scratch needs no locking. The first exception thrown by
  /// `f` is rethrown here after every item has finished.
  template <class F>
  void parallel_for(Index n_items, F&& f) {
    if (n_items <= 0) return;
    if (n_threads_ == 1 || n_items == 1) {
      for (Index i = 0; i < n_items; ++i) f(i, Index(0));
      return;
    }
    using Fn = std::remove_reference_t<F>;
    // No worker is inside a call here (the last call waited for them), so the job is written
    // before any worker can read it: workers read it only after seeing open_ (acquire).
    job_ = {&f, [](void* ctx, Index item, Index worker) { (*static_cast<Fn*>(ctx))(item, worker); },
            n_items};
    next_.store(0, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_items(0);
    // Every item finished, then no worker inside: a worker that comes in later sees open_
    // false and leaves without touching the job (open_ and inside_ are seq_cst: of the
    // caller's store-then-load and a worker's increment-then-load, one sees the other's write).
    const auto all_done = [this, n_items] {
      return finished_.load(std::memory_order_acquire) == n_items;
    };
    wait_for(all_done);
    open_.store(false, std::memory_order_seq_cst);
    wait_for([this] { return inside_.load(std::memory_order_seq_cst) == 0; });
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true, std::memory_order_relaxed);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // A hint to the core that this thread spins (x86's pause); nothing elsewhere.
  static void pause() noexcept {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_ia32_pause();
#endif
  }

  // Spins, then sleeps on done_, until pred() holds; workers notify done_ as they finish items
  // and leave calls.
  template <class Pred>
  void wait_for(Pred pred) {
    for (int i = 0; i < spin_rounds; ++i) {
      if (pred()) return;
      pause();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, pred);
  }

  struct job {
    void* ctx = nullptr;
    void (*call)(void*, Index, Index) = nullptr;
    Index n_items = 0;
  };

  void run_items(Index worker) {
    for (Index i = next_.fetch_add(1, std::memory_order_relaxed); i < job_.n_items;
         i = next_.fetch_add(1, std::memory_order_relaxed)) {
      try {
        job_.call(job_.ctx, i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void worker_loop(Index worker) {
    unsigned long seen = 0;
    for (;;) {
      for (int i = 0; i < spin_rounds && generation_.load(std::memory_order_acquire) == seen &&
                      !stop_.load(std::memory_order_relaxed);
           ++i) {
        pause();
      }
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          return stop_.load(std::memory_order_relaxed) ||
                 generation_.load(std::memory_order_acquire) != seen;
        });
        if (stop_.load(std::memory_order_relaxed)) return;
        seen = generation_.load(std::memory_order_acquire);
      }
      inside_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) run_items(worker);
      inside_.fetch_sub(1, std::memory_order_seq_cst);
      // The caller may sleep on done_ for the items or for this worker's leaving.
      std::lock_guard<std::mutex> lock(mutex_);
      done_.notify_one();
    }
  }

  Index n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  job job_;
  std::atomic<Index> next_{0};                // the next item to take
  std::atomic<Index> finished_{0};            // items finished in the current call
  std::atomic<Index> inside_{0};              // workers between entering and leaving a call
  std::atomic<bool> open_{false};             // a call is taking items
  std::atomic<unsigned long> generation_{0};  // calls so far; written under mutex_
  std::atomic<bool> stop_{false};             // written under mutex_
  std::exception_ptr error_;
};

}  // namespace kvcache
