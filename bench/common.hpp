// SPDX-License-Identifier: Apache-2.0
// What the benchmark files share: the thread pool, the STREAM-like arrays whose passes give the
// machine's bandwidth, the side-by-side timing of a kernel against read passes, registration.
#pragma once

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace kvcache_bench {

using kvcache::Index;

// Threads for everything multi-threaded here: --threads N, set before the first use of pool(),
// else the machine's cores.
inline Index& bench_threads_option() {
  static Index n = 0;
  return n;
}
inline Index bench_threads() {
  if (bench_threads_option() > 0) return bench_threads_option();
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : Index(n);
}

inline kvcache::thread_pool& pool() {
  static kvcache::thread_pool p(bench_threads());
  return p;
}

// ---------------------------------------------------------------------------------------------
// STREAM triad a = b + s * c on the pool's threads, arrays far beyond the caches. Counted as
// STREAM counts it: 3 arrays of bytes per pass (the write-allocate of `a` is not counted).
struct triad_arrays {
  static constexpr Index n = Index(1) << 26;  // 64 Mi floats: 256 MiB per array
  std::vector<float> a, b, c;
  triad_arrays() : a(std::size_t(n), 0.0f), b(std::size_t(n), 1.0f), c(std::size_t(n), 2.0f) {}
  void run() {
    const Index parts = pool().size();
    pool().parallel_for(parts, [&](Index p, Index) {
      const Index lo = n * p / parts, hi = n * (p + 1) / parts;
      float* __restrict pa = a.data();
      const float* __restrict pb = b.data();
      const float* __restrict pc = c.data();
      for (Index i = lo; i < hi; ++i) pa[i] = pb[i] + 3.0f * pc[i];
    });
  }
  static double bytes() { return 3.0 * double(n) * sizeof(float); }

  // Reads b and c once, as decode attention reads keys and values: the read-only bound. Each
  // thread streams its part of both arrays side by side into 8 independent packet sums, so
  // that neither one address stream nor the latency of one chain of adds bounds it.
  float read() {
    const Index parts = pool().size();
    std::vector<float> partial(std::size_t(parts), 0.0f);
    pool().parallel_for(parts, [&](Index p, Index) {
      const Index lo = n * p / parts, hi = n * (p + 1) / parts;
      partial[std::size_t(p)] = pair_sum<float>::run(b.data() + lo, c.data() + lo, hi - lo);
    });
    float total = 0.0f;
    for (float x : partial) total += x;
    return total;
  }
  template <class T>
  struct pair_sum {
    using packet = typename Eigen::internal::packet_traits<T>::type;
    static constexpr Index w = Eigen::internal::unpacket_traits<packet>::size;
    static T run(const T* x, const T* y, Index len) {
      using namespace Eigen::internal;
      packet s[8];
      for (auto& v : s) v = pset1<packet>(T(0));
      Index i = 0;
      for (; i + 4 * w <= len; i += 4 * w) {
        for (int u = 0; u < 4; ++u) {
          s[u] = padd(s[u], ploadu<packet>(x + i + u * w));
          s[4 + u] = padd(s[4 + u], ploadu<packet>(y + i + u * w));
        }
      }
      for (int u = 1; u < 8; ++u) s[0] = padd(s[0], s[u]);
      T total = predux(s[0]);
      for (; i < len; ++i) total += x[i] + y[i];
      return total;
    }
  };
  static double read_bytes() { return 2.0 * double(n) * sizeof(float); }
};

// The one set of triad arrays (768 MiB), made on first use.
inline triad_arrays& shared_triad() {
  static triad_arrays t;
  return t;
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
  return v[v.size() / 2];
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Times the calls of a kernel and, between them, untimed passes of triad_arrays::read, so that
// the kernel's bytes per second is held against the read bandwidth of the same minutes (this
// machine's bandwidth drifts with its neighbours). A read pass follows a call whenever the
// passes so far took less time than the calls: the first call always, later ones at most about
// as much time as the calls take, however short they are.
class beside_read {
 public:
  template <class F>
  void call(benchmark::State& state, F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double s = seconds_since(t0);
    call_s_.push_back(s);
    call_total_ += s;
    if (read_total_ <= call_total_) {
      state.PauseTiming();
      const auto t1 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(shared_triad().read());
      const double r = seconds_since(t1);
      read_s_.push_back(r);
      read_total_ += r;
      state.ResumeTiming();
    }
  }
  double call_median() const { return median(call_s_); }
  double read_bytes_per_second() const { return triad_arrays::read_bytes() / median(read_s_); }

  // Counters of a kernel that reads `bytes` per call: the read bandwidth beside it (GB/s) and
  // the kernel's bytes per second (median call) as a fraction of it.
  void set_counters(benchmark::State& state, double bytes) const {
    if (call_s_.empty() || read_s_.empty()) return;
    state.counters["read_GBps"] = read_bytes_per_second() / 1e9;
    state.counters["of_read"] = bytes / call_median() / read_bytes_per_second();
  }

 private:
  std::vector<double> call_s_, read_s_;
  double call_total_ = 0, read_total_ = 0;
};

// The fixture held between benchmarks; see held_fixture.
inline std::pair<std::string, std::shared_ptr<void>>& fixture_slot() {
  static std::pair<std::string, std::shared_ptr<void>> slot;
  return slot;
}

// One fixture held between the runs of a benchmark (Google Benchmark calls a benchmark's
// function once per repetition and more while it sizes the iterations): `make()` (returning a
// std::unique_ptr<T>) runs when `key` differs from the key held, after the held fixture is
// freed, so that one large cache at a time lives and each is filled once per benchmark.
template <class T, class Make>
T& held_fixture(const std::string& key, Make make) {
  auto& [held_key, held] = fixture_slot();
  if (held == nullptr || held_key != key) {
    held.reset();
    held_key.clear();
    held = std::shared_ptr<T>(make());
    held_key = key;
  }
  return *static_cast<T*>(held.get());
}

// Registers `fn(state, args...)` under `name`, exactly: a name a person reads in a table.
template <class Fn, class... Args>
benchmark::internal::Benchmark* add(const std::string& name, Fn fn, Args... args) {
  return benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, args...); });
}

// The paged cache's benchmarks (paged_bench.cpp).
void register_paged();
// The cross-attention cache's benchmarks (cross_bench.cpp).
void register_cross();
// Multi-head latent attention against GQA and MHA decode (mla_bench.cpp).
void register_mla();

}  // namespace kvcache_bench
