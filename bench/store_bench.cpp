// SPDX-License-Identifier: Apache-2.0
// store_bench: bringing a prompt's prefix pages back from each tier (host memory, a directory,
// Redis) against recomputing them (the prefill of those tokens through the model), per page and
// per token, and the prompt length from which restoring is the faster. Two models: the demo's
// (dim 256, 4 layers, 2 kv heads of 32: 32 KiB a page of 16 tokens) and a larger one (dim 1024,
// 8 layers, 2 kv heads of 128: 256 KiB a page) whose prefill costs more per byte of cache.
//
// The Redis tier runs when the program was built with hiredis: against KVCACHE_BENCH_REDIS
// (redis://HOST:PORT) when set, else a redis-server of its own on a free loopback port.
#include "serve/batched.hpp"

#include <kvcache/store/disk_store.hpp>
#include <kvcache/store/tiered.hpp>
#ifdef KVCACHE_HAVE_REDIS
#include <kvcache/store/redis_store.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#endif

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using kvcache::Index;
using format = kvcache::plain_format<float>;
constexpr Index page_size = 16;

struct model_spec {
  const char* name;
  tiny::config cfg;
};

tiny::config small_model() {
  tiny::config c;  // dim 256, hidden 768, 4 layers, 8 q / 2 kv heads
  c.vocab_size = 512;
  c.seq_len = 4096;
  return c;
}
tiny::config large_model() {
  tiny::config c;
  c.dim = 1024;
  c.hidden_dim = 2816;
  c.n_layers = 8;
  c.n_heads = 8;
  c.n_kv_heads = 2;
  c.vocab_size = 512;
  c.seq_len = 4096;
  return c;
}

const tiny::weights& weights_of(bool large) {
  static const tiny::weights small = tiny::random_weights(small_model(), 42);
  static std::unique_ptr<tiny::weights> big;
  if (!large) return small;
  if (!big) big = std::make_unique<tiny::weights>(tiny::random_weights(large_model(), 42));
  return *big;
}
const tiny::config& config_of(bool large) {
  static const tiny::config s = small_model(), l = large_model();
  return large ? l : s;
}

std::vector<std::int32_t> prompt(Index n) {
  std::mt19937 gen(11);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = std::int32_t(gen() % 512);
  return t;
}

// ---- the tiers ------------------------------------------------------------------------------

#ifdef KVCACHE_HAVE_REDIS
// A redis-server of the benchmark's own, stopped at exit.
class own_redis {
 public:
  own_redis() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    port_ = ntohs(a.sin_port);
    pid_ = ::fork();
    if (pid_ == 0) {
      const int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      const std::string port = std::to_string(port_);
      ::execlp("redis-server", "redis-server", "--port", port.c_str(), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--loglevel", "warning",
               static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    for (int i = 0; i < 100 && !up(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ~own_redis() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  bool up() const {
    int status = 0;
    if (pid_ <= 0 || ::waitpid(pid_, &status, WNOHANG) == pid_) return false;
    kvcache::redis_store probe(kvcache::redis_options::from_url(url()));
    probe.put("kvcache-probe", "1");
    return probe.counters().errors == 0;
  }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }

 private:
  int port_ = 0;
  pid_t pid_ = -1;
};

std::string redis_url() {
  if (const char* env = std::getenv("KVCACHE_BENCH_REDIS")) return env;
  static own_redis server;
  return server.up() ? server.url() : std::string();
}
#endif

std::filesystem::path disk_dir() {
  static const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("kvcache_store_bench_" + std::to_string(::getpid()));
  return dir;
}

std::unique_ptr<kvcache::page_store> make_tier(const std::string& tier) {
  if (tier == "memory") return std::make_unique<kvcache::memory_store>(Index(1) << 32);
  if (tier == "disk") return std::make_unique<kvcache::disk_store>(disk_dir() / "pages", Index(1) << 34);
#ifdef KVCACHE_HAVE_REDIS
  if (tier == "redis") {
    const std::string url = redis_url();
    if (!url.empty()) return std::make_unique<kvcache::redis_store>(url);
  }
#endif
  return nullptr;
}

// ---- the benchmarks -------------------------------------------------------------------------

std::string model_label(bool large) {
  const tiny::config& c = config_of(large);
  return std::string(large ? "large" : "small") + " model (dim " + std::to_string(c.dim) + ", " +
         std::to_string(c.n_layers) + " layers, " + std::to_string(c.n_kv_heads) + " kv heads of " +
         std::to_string(c.head_dim()) + ")";
}

void per_token(benchmark::State& state, Index tokens) {
  state.counters["tokens"] = double(tokens);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pages_per_s"] = benchmark::Counter(
      double(tokens / page_size), benchmark::Counter::kIsIterationInvariantRate);
}

// Recomputing a prompt's first `n` tokens: their prefill through the model, in one step (the
// rows of a chunk in one forward pass), into a fresh sequence of a paged cache.
void BM_recompute(benchmark::State& state, bool large, Index n) {
  const tiny::config& cfg = config_of(large);
  serve::paged_cache cache(cfg.cache(), kvcache::paged_layout{page_size, n / page_size + 2});
  serve::batched_decoder model(cfg, weights_of(large), n, 1, nullptr);
  const auto tokens = prompt(n);
  serve::step s;
  s.reserve(1, n);
  for (auto _ : state) {
    const Index seq = cache.create();
    s.clear();
    s.add(seq, 0, tokens.data(), n, true);
    model.forward(cache, s);
    benchmark::DoNotOptimize(model.logits().data());
    state.PauseTiming();
    cache.free(seq);
    state.ResumeTiming();
  }
  per_token(state, n);
  state.SetLabel(model_label(large));
}

// Restoring the same `n` tokens' pages from a tier into a fresh pool: tiered_prefix_cache's
// create of the prompt (one batched get, each value checked, copied into the pool).
void BM_restore(benchmark::State& state, const std::string& tier_name, bool large, Index n) {
  const tiny::config& cfg = config_of(large);
  auto tier = make_tier(tier_name);
  if (!tier) {
    state.SkipWithError(("no " + tier_name + " tier in this build or on this machine").c_str());
    return;
  }
  const auto tokens = prompt(n + 1);
  const std::string key = model_label(large);
  {  // publish the pages once: prefill, then write through
    serve::paged_cache cache(cfg.cache(), kvcache::paged_layout{page_size, n / page_size + 2});
    serve::batched_decoder model(cfg, weights_of(large), n, 1, nullptr);
    kvcache::tiered_prefix_cache<format> tiers(cache, {tier.get()});
    const Index seq = cache.create();
    serve::step s;
    s.reserve(1, n);
    s.clear();
    s.add(seq, 0, tokens.data(), n, true);
    model.forward(cache, s);
    tiers.publish(seq, tokens.data(), n, key);
  }
  Index restored = 0, bytes = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto cache = std::make_unique<serve::paged_cache>(
        cfg.cache(), kvcache::paged_layout{page_size, n / page_size + 2});
    auto tiers = std::make_unique<kvcache::tiered_prefix_cache<format>>(
        *cache, std::vector<kvcache::page_store*>{tier.get()});
    state.ResumeTiming();
    const Index seq = tiers->create(tokens.data(), n + 1, key);
    benchmark::DoNotOptimize(seq);
    state.PauseTiming();
    restored = cache->prefix_hit(seq);
    bytes = tiers->stats().restored_bytes;
    tiers.reset();
    cache.reset();
    state.ResumeTiming();
  }
  if (restored != n) {
    state.SkipWithError(("restored " + std::to_string(restored) + " of " + std::to_string(n) +
                         " tokens")
                            .c_str());
    return;
  }
  per_token(state, n);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * bytes);
  state.SetLabel(tier_name + ", " + model_label(large));
}

const std::vector<Index> small_lengths = {16, 64, 256, 1024, 2048};
const std::vector<Index> large_lengths = {16, 64, 256, 1024};

void register_all() {
  for (const bool large : {false, true}) {
    const char* m = large ? "large" : "small";
    for (const Index n : large ? large_lengths : small_lengths) {
      benchmark::RegisterBenchmark(
          ("store/recompute/" + std::string(m) + "/" + std::to_string(n)).c_str(),
          [=](benchmark::State& s) { BM_recompute(s, large, n); })
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
      for (const char* tier : {"memory", "disk", "redis"}) {
        benchmark::RegisterBenchmark(
            ("store/restore/" + std::string(tier) + "/" + m + "/" + std::to_string(n)).c_str(),
            [=](benchmark::State& s) { BM_restore(s, tier, large, n); })
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      }
    }
  }
}

// Collects each run's time per token, to print the break-even lengths after the table.
class breakeven_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      // The median of repetitions when there are some, else the one run.
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (r.error_occurred || (r.run_type == Run::RT_Aggregate && !median)) continue;
      const auto it = r.counters.find("tokens");
      if (it == r.counters.end()) continue;
      std::string name = r.benchmark_name();
      const std::string suffix = "/real_time";
      if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        name.resize(name.size() - suffix.size());
      }
      if (median) {
        times_[name] = r.GetAdjustedRealTime();  // microseconds a prompt
        medians_[name] = true;
      } else if (!medians_[name]) {
        times_[name] = r.GetAdjustedRealTime();
      }
    }
  }
  // For each model: the time per page and per token of recomputing and of restoring from each
  // tier at each length, restore / recompute, and the shortest length at which restoring wins.
  void summary() const {
    std::printf("\nper page of %td tokens (us), restore / recompute; restoring wins below 1\n",
                page_size);
    for (const char* m : {"small", "large"}) {
      const auto& lengths = std::string(m) == "large" ? large_lengths : small_lengths;
      for (const char* what : {"recompute", "memory", "disk", "redis"}) {
        std::string line;
        Index first_win = -1;
        for (const Index n : lengths) {
          const auto rc = times_.find("store/recompute/" + std::string(m) + "/" + std::to_string(n));
          const auto rs = std::string(what) == "recompute"
                              ? rc
                              : times_.find("store/restore/" + std::string(what) + "/" + m + "/" +
                                            std::to_string(n));
          if (rc == times_.end() || rs == times_.end()) continue;
          const double ratio = rs->second / rc->second;
          char buf[96];
          std::snprintf(buf, sizeof(buf), "  %5td: %8.1f", n, rs->second / double(n / page_size));
          line += buf;
          if (rs != rc) {
            std::snprintf(buf, sizeof(buf), " (%.3f)", ratio);
            line += buf;
          }
          if (ratio < 1 && first_win < 0) first_win = n;
        }
        if (line.empty()) continue;
        std::printf("  %-5s %-9s%s", m, what, line.c_str());
        if (std::string(what) != "recompute") {
          std::printf("   break-even: %s", first_win < 0 ? "not within these lengths"
                                        : first_win == lengths.front()
                                            ? "at or below the shortest"
                                            : ("at most " + std::to_string(first_win) + " tokens").c_str());
        }
        std::printf("\n");
      }
    }
  }

 private:
  std::map<std::string, double> times_;
  std::map<std::string, bool> medians_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  breakeven_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.summary();
  std::error_code ec;
  std::filesystem::remove_all(disk_dir(), ec);
  benchmark::Shutdown();
  return 0;
}
