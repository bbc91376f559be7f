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
/// call costs a wake-up, not a thread start. One pool serves one caller at a time.
class thread_pool {
 public:
  /// Most threads a pool runs: far more than the cores attention can use, and few enough that
  /// starting them is quick.
  static constexpr Index max_threads = 1024;

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
    job_ = {&f, [](void* ctx, Index item, Index worker) { (*static_cast<Fn*>(ctx))(item, worker); },
            n_items};
    next_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = n_threads_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    run_items(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
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
    }
  }

  void worker_loop(Index worker) {
    unsigned long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_items(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  Index n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  job job_;
  std::atomic<Index> next_{0};
  Index busy_ = 0;
  unsigned long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace kvcache
