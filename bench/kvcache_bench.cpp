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
#include <cstdio>
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

template <class Format>
void BM_decode_attention(benchmark::State& state, Index ctx, Index n_heads, Index n_kv) {
  const Index d = 128;
  const kvcache::attention_shape shape(n_heads, n_kv, d);
  auto layer = make_layer<Format>(n_kv, d, ctx);
  for (Index t = 0; t < ctx; t += 4096) {
    const Index n = std::min<Index>(4096, ctx - t);
    layer.append(0, row_matrix<float>::Random(n, n_kv * d), row_matrix<float>::Random(n, n_kv * d));
  }
  kvcache::attention_workspace<float> ws;
  kvcache::attention_options opt;
  opt.pool = &pool();
  const kvcache::row_vector<float> q = kvcache::row_vector<float>::Random(shape.q_width());
  kvcache::row_vector<float> out(shape.q_width());
  // Where the cache is far beyond the caches (ctx >= 8192), a triad pass runs between timed
  // calls and the fraction compares medians of both, measured side by side: this machine's
  // bandwidth drifts with its neighbours, so a figure measured minutes apart misleads.
  const bool side_by_side = ctx >= 8192;
  std::vector<double> call_s, triad_s;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    kvcache::decode_attention(shape, q, layer.view(0), out, ws, opt);
    benchmark::DoNotOptimize(out.data());
    call_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (side_by_side) {
      state.PauseTiming();
      const auto t1 = std::chrono::steady_clock::now();
      shared_triad().run();
      triad_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
      state.ResumeTiming();
    }
  }
  auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  const double triad_bw = side_by_side ? triad_arrays::bytes() / median(triad_s) : g_triad_bytes_per_s;
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(layer.bytes()));
  state.counters["threads"] = double(pool().size());
  // K and V bytes read per second as a fraction of the triad bandwidth.
  state.counters["of_triad"] = double(layer.bytes()) / median(call_s) / triad_bw;
  state.counters["triad_GBps"] = triad_bw / 1e9;
  state.SetLabel(std::to_string(n_heads) + " q / " + std::to_string(n_kv) + " kv heads x 128, " +
                 format_label<Format>() + ", " + std::to_string(pool().size()) +
                 " threads");
}

// Causal attention over a whole prompt of ctx tokens, written to an empty layer.
void BM_prefill_attention(benchmark::State& state, Index ctx) {
  const kvcache::attention_shape shape(32, 8, 128);
  const row_matrix<float> q = row_matrix<float>::Random(ctx, shape.q_width());
  const row_matrix<float> k = row_matrix<float>::Random(ctx, shape.kv_width());
  kvcache::kv_layer<float> layer(shape.n_kv_heads(), shape.head_dim());
  row_matrix<float> out(ctx, shape.q_width());
  kvcache::attention_workspace<float> ws;
  kvcache::attention_options opt;
  opt.pool = &pool();
  for (auto _ : state) {
    layer.clear();
    kvcache::prefill_attention(shape, q, k, k, layer, out, ws, opt);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * ctx);
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
    for (Index ctx : {512, 2048, 8192, 32768}) {
      add("decode_attention/" + std::string(name) + "/" + to_string(ctx), fn, ctx, Index(32), Index(8))
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
    }
  }
  for (Index ctx : {512, 2048, 8192}) {
    add("decode_attention_mha/f32/" + to_string(ctx), BM_decode_attention<kvcache::plain_format<float>>, ctx, Index(32),
        Index(32))->Unit(benchmark::kMicrosecond)->UseRealTime();
  }
  for (Index ctx : {512, 1024, 2048, 4096}) {
    add("prefill_attention/" + to_string(ctx), BM_prefill_attention, ctx)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  register_paged();
  register_cross();
  register_mla();
}

}  // namespace

int main(int argc, char** argv) {
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
