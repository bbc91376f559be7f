// SPDX-License-Identifier: Apache-2.0
// Tests of the thread pool attention runs on.
#include <kvcache/thread_pool.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace kvcache {
namespace {

TEST(ThreadPool, RunsEveryItemOnceOnValidWorkers) {
  for (Index threads : {1, 2, 4}) {
    thread_pool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (int round = 0; round < 50; ++round) {
      const Index n = 1 + round * 7;
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<bool> bad_worker{false};
      pool.parallel_for(n, [&](Index i, Index w) {
        hits[static_cast<std::size_t>(i)].fetch_add(1);
        if (w < 0 || w >= threads) bad_worker = true;
      });
      for (auto& h : hits) EXPECT_EQ(h.load(), 1);
      EXPECT_FALSE(bad_worker.load());
    }
  }
}

TEST(ThreadPool, RethrowsAfterAllItemsFinish) {
  thread_pool pool(2);
  std::atomic<int> done{0};
  EXPECT_THROW(pool.parallel_for(100,
                                 [&](Index i, Index) {
                                   done.fetch_add(1);
                                   if (i == 50) throw std::runtime_error("item 50");
                                 }),
               std::runtime_error);
  EXPECT_EQ(done.load(), 100);
  pool.parallel_for(3, [&](Index, Index) { done.fetch_add(1); });  // still usable
  EXPECT_EQ(done.load(), 103);
}

TEST(ThreadPool, BadSize) {
  EXPECT_THROW(thread_pool(0), std::invalid_argument);
  EXPECT_THROW(thread_pool(-1), std::invalid_argument);
}

// INT64_MAX threads failed in vector::reserve; 10^8 started threads for minutes.
TEST(ThreadPool, SizeAboveTheCapIsRefusedAtOnce) {
  static_assert(thread_pool::max_threads == 1024);
  for (const Index n : {thread_pool::max_threads + 1, Index(100000000),
                        std::numeric_limits<Index>::max()}) {
    try {
      thread_pool pool(n);
      FAIL() << "expected std::invalid_argument for " << n;
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::to_string(n)), std::string::npos) << what;
      EXPECT_NE(what.find("max_threads = 1024"), std::string::npos) << what;
    }
  }
}

// Many short calls back to back, as a decode step makes them: workers that wake late, find
// the items taken or arrive during the next call must neither run an item twice, nor touch a
// finished call's function, nor hold a call up.
TEST(ThreadPool, ManyShortCallsRunEachItemOnce) {
  for (Index threads : {2, 3}) {
    thread_pool pool(threads);
    std::vector<std::atomic<int>> hits(4);
    for (int call = 0; call < 5000; ++call) {
      const Index n = 1 + call % 4;
      for (auto& h : hits) h.store(0);
      pool.parallel_for(n, [&](Index i, Index) { hits[static_cast<std::size_t>(i)].fetch_add(1); });
      for (Index i = 0; i < 4; ++i) {
        ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), i < n ? 1 : 0) << "call " << call;
      }
    }
  }
}

// A call whose worker is busy with a long item still returns only when that item is done, and
// an item that a slow worker never reaches is run by the caller.
TEST(ThreadPool, WaitsForStartedItemsOnly) {
  thread_pool pool(2);
  std::atomic<int> done{0};
  pool.parallel_for(8, [&](Index i, Index) {
    if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    done.fetch_add(1);
  });
  EXPECT_EQ(done.load(), 8);
}

}  // namespace
}  // namespace kvcache
