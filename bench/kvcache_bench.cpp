// SPDX-License-Identifier: Apache-2.0
// kvcache_bench: what the KV cache buys (cached against uncached decoding), what it costs
// (append against concat), and how close decode attention runs to the memory bandwidth.
#include "common.hpp"
#include "tiny_decoder/forward.hpp"
#include "tiny_decoder/generate.hpp"

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using kvcache::Index;
using kvcache::row_matrix;
using namespace kvcache_bench;

double g_triad_bytes_per_s = 0;  // median of a few passes, measured before any benchmark

double measure_triad() {
  triad_arrays& t = shared_triad();
  t.run();
  std::vector<double> s;
  for (int i = 0; i < 9; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    t.run();
    s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(s.begin(), s.end());
  return triad_arrays::bytes() / s[s.size() / 2];
}

// The read-only bandwidth (triad_arrays::read), median of a few passes.
double measure_read() {
  triad_arrays& t = shared_triad();
  std::vector<double> s;
  for (int i = 0; i < 9; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(t.read());
    s.push_back(seconds_since(t0));
  }
  return triad_arrays::read_bytes() / median(s);
}

void BM_triad(benchmark::State& state) {
  triad_arrays& t = shared_triad();
  for (auto _ : state) {
    t.run();
    benchmark::DoNotOptimize(t.a.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(triad_arrays::bytes()));
  state.counters["threads"] = double(pool().size());
  state.SetLabel("a = b + 3c, 3 x 256 MiB, " + std::to_string(pool().size()) + " threads");
}

void BM_read(benchmark::State& state) {
  triad_arrays& t = shared_triad();
  for (auto _ : state) benchmark::DoNotOptimize(t.read());
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(triad_arrays::read_bytes()));
  state.counters["threads"] = double(pool().size());
  state.SetLabel("sum of b and c, 2 x 256 MiB, " + std::to_string(pool().size()) + " threads");
}

// ---------------------------------------------------------------------------------------------
// The tiny decoder (the demo's default model) producing one more token at context ctx.
tiny::config decoder_config(Index seq_len) {
  tiny::config c;  // dim 256, 4 layers, 8 query heads on 2 kv heads, vocab 512
  c.seq_len = seq_len;
  return c;
}

const tiny::weights& decoder_weights() {
  static const tiny::weights w = tiny::random_weights(decoder_config(1), 42);
  return w;
}

std::vector<int> some_tokens(Index n) {
  std::vector<int> t;
  std::mt19937 gen(7);
  for (Index i = 0; i < n; ++i) t.push_back(int(gen() % 512));
  return t;
}

std::string decoder_label(Index threads) {
  return "dim 256, 4 layers, 8 q / 2 kv heads, f32 cache, " + std::to_string(threads) +
         " attention thread" + (threads == 1 ? "" : "s");
}

void BM_decode_step_cached(benchmark::State& state, Index ctx) {
  tiny::decoder<> dec(decoder_config(ctx + 1), decoder_weights(), 1);
  dec.forward_cached(some_tokens(ctx));
  for (auto _ : state) {
    benchmark::DoNotOptimize(dec.forward_cached(5).data());
    state.PauseTiming();
    dec.crop(ctx);  // O(1): the next iteration sees the same context again
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(decoder_label(1));
}

void BM_decode_step_uncached(benchmark::State& state, Index ctx) {
  tiny::decoder<> dec(decoder_config(ctx + 1), decoder_weights(), 1);
  auto seq = some_tokens(ctx + 1);
  for (auto _ : state) benchmark::DoNotOptimize(dec.forward_uncached(seq).data());
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(decoder_label(1));
}

template <tiny::mode Mode>
void BM_generate(benchmark::State& state, Index n) {
  const Index prompt_len = 16;
  tiny::decoder<> dec(decoder_config(prompt_len + n), decoder_weights(), 1);
  const auto prompt = some_tokens(prompt_len);
  for (auto _ : state) {
    auto r = tiny::generate(dec, prompt, n, Mode, tiny::sampler());
    benchmark::DoNotOptimize(r.tokens.data());
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetLabel("prompt 16 + " + std::to_string(n) + " tokens, " + decoder_label(1));
}

// A whole decode step of the tiny decoder on its own pool of `threads` threads: the default
// model (dim 256, ~3.4 MB of weights, in cache) or a larger one whose weights are far beyond
// the caches (dim 1024, hidden 2816, 8 layers, ~360 MB). A step reads every weight and every
// cached key and value once: of_read holds those bytes per second against read passes beside.
tiny::config step_config(bool large) {
  tiny::config c;
  if (large) {
    c.dim = 1024;
    c.hidden_dim = 2816;
    c.n_layers = 8;
  }
  c.seq_len = 2048 + 1;
  return c;
}

const tiny::weights& step_weights(bool large) {
  static const tiny::weights small_w = tiny::random_weights(step_config(false), 42);
  if (!large) return small_w;
  static const tiny::weights large_w = tiny::random_weights(step_config(true), 42);
  return large_w;
}

// Bytes a decode step reads: every projection and the classifier (one embedding row aside),
// and the K and V of ctx tokens in every layer (f32).
double step_bytes(const tiny::config& c, const tiny::weights& w, Index ctx) {
  double floats = double(w.classifier.size());
  for (const auto& l : w.layers) {
    floats += double(l.wq.size() + l.wk.size() + l.wv.size() + l.wo.size() + l.w1.size() +
                     l.w2.size() + l.w3.size());
  }
  floats += 2.0 * double(c.n_layers) * double(ctx) * double(c.kv_dim());
  return floats * sizeof(float);
}

struct step_fixture {
  step_fixture(const tiny::config& c, const tiny::weights& w, Index threads) : dec(c, w, threads) {}
  tiny::decoder<> dec;
};

void BM_decoder_step(benchmark::State& state, bool large, Index threads, Index ctx) {
  const tiny::config c = step_config(large);
  const tiny::weights& w = step_weights(large);
  auto& f = held_fixture<step_fixture>(
      "decoder_step/" + std::to_string(large) + "/" + std::to_string(threads) + "/" +
          std::to_string(ctx),
      [&] {
        auto g = std::make_unique<step_fixture>(c, w, threads);
        g->dec.forward_cached(some_tokens(ctx));
        return g;
      });
  f.dec.crop(ctx);
  benchmark::DoNotOptimize(f.dec.forward_cached(5).data());  // warm-up
  beside_read side;
  for (auto _ : state) {
    f.dec.crop(ctx);  // O(1): every step sees the same context
    side.call(state, [&] { benchmark::DoNotOptimize(f.dec.forward_cached(5).data()); });
  }
  const double bytes = step_bytes(c, w, ctx);
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  side.set_counters(state, bytes);
  state.counters["tokens_per_s"] = 1.0 / side.call_median();
  state.counters["threads"] = double(threads);
  state.SetLabel("dim " + std::to_string(c.dim) + ", hidden " + std::to_string(c.hidden_dim) +
                 ", " + std::to_string(c.n_layers) + " layers, 8 q / 2 kv heads, " +
                 std::to_string(int(bytes / 1e6)) + " MB a step, " + std::to_string(threads) +
                 " thread" + (threads == 1 ? "" : "s"));
}

// ---------------------------------------------------------------------------------------------
// One layer's cache of 8 kv heads x 128 holding ctx tokens, and one more token added to it.
constexpr Index append_heads = 8, append_dim = 128;

void BM_append(benchmark::State& state, Index ctx) {
  kvcache::kv_layer<float> layer(append_heads, append_dim);
  layer.reserve(ctx + 1);
  layer.append(row_matrix<float>::Random(ctx, append_heads * append_dim),
               row_matrix<float>::Random(ctx, append_heads * append_dim));
  const row_matrix<float> k = row_matrix<float>::Random(1, append_heads * append_dim);
  for (auto _ : state) {
    layer.append(k, k);
    benchmark::DoNotOptimize(layer.keys(0).data());
    layer.crop(ctx);  // O(1), keeps the capacity
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("in place, 8 kv heads x 128, f32");
}

void BM_concat(benchmark::State& state, Index ctx) {
  kvcache::kv_layer<float> layer(append_heads, append_dim);
  layer.append(row_matrix<float>::Random(ctx, append_heads * append_dim),
               row_matrix<float>::Random(ctx, append_heads * append_dim));
  const row_matrix<float> k = row_matrix<float>::Random(1, append_heads * append_dim);
  for (auto _ : state) {
    auto grown = layer.concatenated(k, k);  // torch.cat: a new tensor of old + new
    benchmark::DoNotOptimize(grown.keys(0).data());
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("torch.cat copy, 8 kv heads x 128, f32");
}

// ---------------------------------------------------------------------------------------------
// One layer's decode attention: a token's query heads over ctx cached tokens.
template <class Format>
std::string format_label() {
  if constexpr (std::is_same_v<Format, kvcache::quantized_format<8>>) {
    return "int8 (group 32, fp16 scale + zero)";
  } else if constexpr (std::is_same_v<Format, kvcache::quantized_format<4>>) {
    return "int4 (group 32, fp16 scale + zero)";
  } else {
    return kvcache::scalar_traits<typename Format::scalar_type>::name;
  }
}

// One contiguous layer of ctx tokens in `Format` (plain_format<Scalar> or quantized_format<Bits>).
template <class Format>
using bench_layer = kvcache::kv_cache<kvcache::contiguous_layout, Format>;

template <class Format>
bench_layer<Format> make_layer(Index n_kv, Index d, Index ctx) {
  bench_layer<Format> layer(kvcache::cache_shape(1, n_kv, n_kv, d));
  layer.reserve(ctx);
  return layer;
}

// One layer of ctx tokens in Format, filled from 4096 random tokens taken again and again
// (which values they hold does not change the time), with the query and output of one step.
template <class Format>
struct decode_fixture {
  decode_fixture(Index n_kv, Index d, Index ctx) : layer(make_layer<Format>(n_kv, d, ctx)) {}
  bench_layer<Format> layer;
  kvcache::row_vector<float> q, out;
  kvcache::attention_workspace<float> ws;
};

template <class Format>
void BM_decode_attention(benchmark::State& state, Index ctx, Index n_heads, Index n_kv) {
  const Index d = 128;
  const kvcache::attention_shape shape(n_heads, n_kv, d);
  auto& f = held_fixture<decode_fixture<Format>>(
      "decode_attention/" + format_label<Format>() + "/" + std::to_string(ctx) + "/" +
          std::to_string(n_heads) + "/" + std::to_string(n_kv),
      [&] {
        auto g = std::make_unique<decode_fixture<Format>>(n_kv, d, ctx);
        const Index chunk = 4096;
        const row_matrix<float> k = row_matrix<float>::Random(chunk, n_kv * d);
        const row_matrix<float> v = row_matrix<float>::Random(chunk, n_kv * d);
        for (Index t = 0; t < ctx; t += chunk) {
          const Index n = std::min<Index>(chunk, ctx - t);
          g->layer.append(0, k.topRows(n), v.topRows(n));
        }
        g->q = kvcache::row_vector<float>::Random(shape.q_width());
        g->out.resize(shape.q_width());
        return g;
      });
  kvcache::attention_options opt;
  opt.pool = &pool();
  kvcache::decode_attention(shape, f.q, f.layer.view(0), f.out, f.ws, opt);  // warm-up
  // Read passes run between timed calls and of_read compares medians of both, measured side by
  // side: this machine's bandwidth drifts with its neighbours, so a figure measured minutes
  // apart misleads. Below a few times the last level cache the fraction can exceed 1.
  beside_read side;
  for (auto _ : state) {
    side.call(state, [&] {
      kvcache::decode_attention(shape, f.q, f.layer.view(0), f.out, f.ws, opt);
      benchmark::DoNotOptimize(f.out.data());
    });
  }
  const double bytes = double(f.layer.bytes());
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  side.set_counters(state, bytes);
  state.counters["threads"] = double(pool().size());
  state.SetLabel(std::to_string(n_heads) + " q / " + std::to_string(n_kv) + " kv heads x 128, " +
                 format_label<Format>() + ", " + std::to_string(pool().size()) + " threads");
}

// The machine's peak rate of fused multiply-adds on the pool's threads: each thread runs
// independent chains of packet FMAs (enough to cover the FMA latency on every port), nothing
// read from memory. Counted as 2 FLOP per lane per FMA.
template <class T>
struct fma_peak_of {
  // Independent chains: enough to cover the FMA latency on both pipes, few enough that they and
  // the two operands stay in registers (16 vector registers without AVX-512: 16 chains spilled).
  static constexpr int chains = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 16 : 12;
  static constexpr Index steps = Index(1) << 17;
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;

  // The fastest of `passes` passes, in seconds. A single pass of about 0.3 ms also times the
  // pool's threads waking up, which a pass right after a call that left them asleep pays.
  static double best_pass_seconds(int passes = 4) {
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < passes; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(run());
      best = std::min(best, seconds_since(t0));
    }
    return best;
  }
  static double flops_per_pass() {
    return 2.0 * double(width) * chains * double(steps) * double(pool().size());
  }
  // One pass on every thread; returns a sum so that nothing is optimized away.
  static T run() {
    using namespace Eigen::internal;
    std::vector<T> sums(std::size_t(pool().size()), T(0));
    pool().parallel_for(pool().size(), [&](Index w, Index) {
      packet acc[chains];
      for (int c = 0; c < chains; ++c) acc[c] = pset1<packet>(T(c) * T(1e-3));
      packet a = pset1<packet>(T(0.999)), b = pset1<packet>(T(1e-4));
      benchmark::DoNotOptimize(a);
      benchmark::DoNotOptimize(b);
      for (Index i = 0; i < steps; ++i) {
        for (int c = 0; c < chains; ++c) acc[c] = pmadd(acc[c], a, b);
      }
      packet total = acc[0];
      for (int c = 1; c < chains; ++c) total = padd(total, acc[c]);
      sums[std::size_t(w)] = predux(total);
    });
    T s = T(0);
    for (T x : sums) s += x;
    return s;
  }
};
using fma_peak = fma_peak_of<float>;

void BM_fma_peak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(fma_peak::run());
  state.counters["GFLOPs"] = benchmark::Counter(fma_peak::flops_per_pass() * 1e-9 * double(state.iterations()),
                                                benchmark::Counter::kIsRate);
  state.counters["threads"] = double(pool().size());
  state.SetLabel(std::to_string(fma_peak::chains) + " chains of " + std::to_string(fma_peak::width) +
                 "-float FMAs a thread, " + std::to_string(pool().size()) + " threads");
}

// The ceiling prefill's tiles put on it: on every thread, the two products of one tile of the
// kernel's general path, S = Q K^T and O += S V, for 128 rows x 128 keys x head_dim 128, with
// no softmax, mask or item overhead: as prefill runs them (tile_kernel, the keys packed each
// time), or as Eigen's general matrix product runs them. of_fma holds their FLOP rate against
// the fastest of the fma_peak passes run between the calls.
void BM_prefill_tile_products(benchmark::State& state, bool eigen) {
  const Index rows = 128, keys = 128, d = 128, reps = 64;
  struct operands {
    row_matrix<float> q, k, v, s, o, kt;
  };
  std::vector<operands> per(std::size_t(pool().size()));
  for (auto& x : per) {
    x.q = row_matrix<float>::Random(rows, d);
    x.k = row_matrix<float>::Random(keys, d);
    x.v = row_matrix<float>::Random(keys, d);
    x.s.resize(rows, keys);
    x.o = row_matrix<float>::Zero(rows, d);
  }
  std::vector<double> call_s, fma_s;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    pool().parallel_for(pool().size(), [&](Index w, Index) {
      operands& x = per[std::size_t(w)];
      using tiles = kvcache::detail::tile_kernel<float>;
      const kvcache::detail::row_run<float> k{x.k.data(), keys, d}, v{x.v.data(), keys, d};
      for (Index r = 0; r < reps; ++r) {
        if (eigen) {
          x.s.noalias() = x.q * x.k.transpose();
          x.o.noalias() += x.s * x.v;
        } else {
          tiles::scores(x.q.data(), d, rows, &k, 1, d, x.s.data(), keys, x.kt);
          tiles::accumulate(x.s.data(), keys, rows, &v, 1, d, x.o.data(), d);
        }
      }
    });
    benchmark::DoNotOptimize(per[0].o.data());
    call_s.push_back(seconds_since(t0));
    state.PauseTiming();
    fma_s.push_back(fma_peak::best_pass_seconds());
    state.ResumeTiming();
  }
  const double flops = 4.0 * double(rows * keys * d) * double(reps) * double(pool().size());
  const double peak = fma_peak::flops_per_pass() / median(fma_s);
  state.counters["GFLOPs"] = flops / median(call_s) / 1e9;
  state.counters["peak_GFLOPs"] = peak / 1e9;
  state.counters["of_fma"] = flops / median(call_s) / peak;
  state.counters["threads"] = double(pool().size());
  state.SetLabel(std::string("S = Q K^T, O += S V, 128 x 128 x 128 f32, ") +
                 (eigen ? "Eigen" : "tile_kernel") + ", " +
                 std::to_string(pool().size()) + " threads");
}

// Causal attention over a whole prompt of ctx tokens, written to an empty layer. FLOP counts
// only what the causal mask leaves, 4 * head_dim per (query head, query, visible key) pair
// (the scores and the weighted sum), and of_fma holds that rate against the fastest of the
// fma_peak passes run between the calls.
void BM_prefill_attention(benchmark::State& state, Index ctx) {
  const kvcache::attention_shape shape(32, 8, 128);
  const row_matrix<float> q = row_matrix<float>::Random(ctx, shape.q_width());
  const row_matrix<float> k = row_matrix<float>::Random(ctx, shape.kv_width());
  kvcache::kv_layer<float> layer(shape.n_kv_heads(), shape.head_dim());
  row_matrix<float> out(ctx, shape.q_width());
  kvcache::attention_workspace<float> ws;
  kvcache::attention_options opt;
  opt.pool = &pool();
  // One call before timing, as an engine's reused output, cache and workspace have seen: the
  // first write to each page of out and of the layer faults (96 MiB at 4096 tokens), and at
  // one or two iterations a repetition those faults would be timed.
  kvcache::prefill_attention(shape, q, k, k, layer, out, ws, opt);
  std::vector<double> call_s, fma_s;
  for (auto _ : state) {
    layer.clear();
    const auto t0 = std::chrono::steady_clock::now();
    kvcache::prefill_attention(shape, q, k, k, layer, out, ws, opt);
    benchmark::DoNotOptimize(out.data());
    call_s.push_back(seconds_since(t0));
    state.PauseTiming();
    fma_s.push_back(fma_peak::best_pass_seconds());
    state.ResumeTiming();
  }
  const double flops = 4.0 * double(shape.head_dim()) * double(shape.n_heads()) * double(ctx) *
                       double(ctx + 1) / 2.0;
  const double peak = fma_peak::flops_per_pass() / median(fma_s);
  state.SetItemsProcessed(state.iterations() * ctx);
  state.counters["GFLOPs"] = flops / median(call_s) / 1e9;
  state.counters["peak_GFLOPs"] = peak / 1e9;
  state.counters["of_fma"] = flops / median(call_s) / peak;
  state.counters["threads"] = double(pool().size());
  state.SetLabel("32 q / 8 kv heads x 128, f32, causal, " + std::to_string(pool().size()) +
                 " threads");
}

void register_all() {
  using std::to_string;
  // Multi-threaded benchmarks are timed by the wall clock (Google Benchmark then appends
  // "/real_time" to their names); the others run on the calling thread alone.
  add("triad", BM_triad)->Unit(benchmark::kMillisecond)->UseRealTime();
  add("read", BM_read)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (Index ctx : {64, 128, 256, 512, 1024, 2048, 4096}) {
    add("decode_step/cached/" + to_string(ctx), BM_decode_step_cached, ctx)->Unit(benchmark::kMicrosecond);
  }
  for (Index ctx : {64, 128, 256, 512, 1024, 2048, 4096}) {
    add("decode_step/uncached/" + to_string(ctx), BM_decode_step_uncached, ctx)->Unit(benchmark::kMicrosecond);
  }
  for (const bool large : {false, true}) {
    for (const Index threads : {Index(1), pool().size()}) {
      for (const Index ctx : {256, 1000, 2000}) {
        add(std::string("decoder_step/") + (large ? "large" : "default") + "/t" +
                to_string(threads) + "/" + to_string(ctx),
            BM_decoder_step, large, threads, ctx)
            ->Unit(benchmark::kMicrosecond)->UseRealTime();
      }
      if (pool().size() == 1) break;
    }
  }
  for (Index n : {32, 128, 512}) {
    add("generate/cached/" + to_string(n), BM_generate<tiny::mode::cached>, n)->Unit(benchmark::kMillisecond);
    add("generate/uncached/" + to_string(n), BM_generate<tiny::mode::uncached>, n)->Unit(benchmark::kMillisecond);
  }
  for (Index ctx : {256, 1024, 4096, 16384}) {
    add("append/" + to_string(ctx), BM_append, ctx)->Unit(benchmark::kMicrosecond);
  }
  for (Index ctx : {256, 1024, 4096, 16384}) {
    add("concat/" + to_string(ctx), BM_concat, ctx)->Unit(benchmark::kMicrosecond);
  }
  const std::pair<const char*, void (*)(benchmark::State&, Index, Index, Index)> dtypes[] = {
      {"f32", BM_decode_attention<kvcache::plain_format<float>>},
      {"f16", BM_decode_attention<kvcache::plain_format<Eigen::half>>},
      {"bf16", BM_decode_attention<kvcache::plain_format<Eigen::bfloat16>>},
      {"int8", BM_decode_attention<kvcache::quantized_format<8>>},
      {"int4", BM_decode_attention<kvcache::quantized_format<4>>}};
  for (const auto& [name, fn] : dtypes) {
    for (Index ctx : {512, 2048, 8192, 32768, 131072}) {
      add("decode_attention/" + std::string(name) + "/" + to_string(ctx), fn, ctx, Index(32), Index(8))
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
    }
  }
  for (Index ctx : {512, 2048, 8192}) {
    add("decode_attention_mha/f32/" + to_string(ctx), BM_decode_attention<kvcache::plain_format<float>>, ctx, Index(32),
        Index(32))->Unit(benchmark::kMicrosecond)->UseRealTime();
  }
  add("fma_peak", BM_fma_peak)->Unit(benchmark::kMillisecond)->UseRealTime();
  add("prefill_tile_products", BM_prefill_tile_products, false)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  add("prefill_tile_products/eigen", BM_prefill_tile_products, true)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  for (Index ctx : {512, 1024, 2048, 4096}) {
    add("prefill_attention/" + to_string(ctx), BM_prefill_attention, ctx)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  register_paged();
  register_cross();
  register_mla();
}

}  // namespace

// Takes --threads N (or --threads=N) out of argv: the threads of the pool every multi-threaded
// benchmark runs on. Returns false, after a message, for a bad value.
bool take_threads_option(int& argc, char** argv) {
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    std::string value;
    if (arg == "--threads" && i + 1 < argc) {
      value = argv[++i];
    } else if (arg.rfind("--threads=", 0) == 0) {
      value = arg.substr(10);
    } else {
      argv[out++] = argv[i];
      continue;
    }
    char* end = nullptr;
    const long n = std::strtol(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || n < 1 || n > kvcache::thread_pool::max_threads) {
      std::fprintf(stderr, "kvcache_bench: --threads takes 1..%td, got '%s'\n",
                   kvcache::thread_pool::max_threads, value.c_str());
      return false;
    }
    bench_threads_option() = Index(n);
  }
  argc = out;
  argv[argc] = nullptr;
  return true;
}

int main(int argc, char** argv) {
  if (!take_threads_option(argc, argv)) return 1;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  g_triad_bytes_per_s = measure_triad();
  benchmark::AddCustomContext("triad_bytes_per_second", std::to_string(g_triad_bytes_per_s));
  const double read_bytes_per_s = measure_read();
  benchmark::AddCustomContext("read_bytes_per_second", std::to_string(read_bytes_per_s));
  benchmark::AddCustomContext("threads", std::to_string(pool().size()));
  std::fprintf(stderr, "triad bandwidth: %.2f GB/s, read: %.2f GB/s, on %td threads\n",
               g_triad_bytes_per_s / 1e9, read_bytes_per_s / 1e9, pool().size());
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
