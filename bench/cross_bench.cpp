// SPDX-License-Identifier: Apache-2.0
// The cross-attention cache's benchmarks: one decoder token's cross-attention over a layer's
// cached encoder keys and values, against projecting them from the encoder's output again at
// every step and then attending.
#include "common.hpp"

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace kvcache_bench {
namespace {

using kvcache::row_matrix;

// Whisper large's decoder (Radford et al., 2022): d_model 1280, 20 heads of 64, no grouping;
// its encoder gives 1500 tokens for 30 s of audio. One layer.
constexpr Index d_model = 1280, n_heads = 20, dim = 64, kv_width = n_heads * dim;
const kvcache::attention_shape whisper_heads(n_heads, n_heads, dim);

std::string threads_label() {
  return std::to_string(pool().size()) + " thread" + (pool().size() == 1 ? "" : "s");
}

template <class Format>
Format make_format() {
  if constexpr (std::is_same_v<Format, kvcache::quantized_format<8>> ||
                std::is_same_v<Format, kvcache::quantized_format<4>>) {
    return Format(32, 0);
  } else {
    return Format();
  }
}

// ---------------------------------------------------------------------------------------------
// Cached: the layer's keys and values of `tokens` encoder tokens, filled once.
template <class Format>
struct cached_fixture {
  explicit cached_fixture(Index tokens)
      : cache(kvcache::cache_shape(1, whisper_heads), tokens, make_format<Format>()),
        q(row_matrix<float>::Random(1, whisper_heads.q_width())),
        out(1, whisper_heads.q_width()) {
    cache.fill(0, row_matrix<float>::Random(tokens, kv_width),
               row_matrix<float>::Random(tokens, kv_width));
  }
  kvcache::cross_attention_cache<Format> cache;
  row_matrix<float> q, out;
  kvcache::attention_workspace<float> ws;
};

template <class Format>
void BM_cross_cached(benchmark::State& state, std::string format_name, Index tokens) {
  auto& f = held_fixture<cached_fixture<Format>>(
      "cross_cached/" + format_name + "/" + std::to_string(tokens),
      [&] { return std::make_unique<cached_fixture<Format>>(tokens); });
  kvcache::attention_options opt;
  opt.pool = &pool();
  kvcache::cross_attention(whisper_heads, f.q, f.cache, 0, f.out, f.ws, opt);  // warm-up
  beside_read side;
  for (auto _ : state) {
    side.call(state, [&] {
      kvcache::cross_attention(whisper_heads, f.q, f.cache, 0, f.out, f.ws, opt);
      benchmark::DoNotOptimize(f.out.data());
    });
  }
  const double bytes = double(f.cache.bytes());
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  state.SetItemsProcessed(state.iterations());
  side.set_counters(state, bytes);
  state.counters["threads"] = double(pool().size());
  state.SetLabel("20 heads x 64 (Whisper large), one layer, " + format_name +
                 " cross cache, " + threads_label());
}

// ---------------------------------------------------------------------------------------------
// Recomputed: at every step K = E W_k^T and V = E W_v^T from the encoder's output E
// (`tokens x d_model`), the rows split over the pool's threads, then decode attention over
// them where they lie (token rows of n_heads * head_dim, each head a strided block).
struct projected_view {
  using scalar_type = float;
  using block_type = kvcache::kv_block<float>;
  const float* keys = nullptr;    // [token][kv_head * head_dim]
  const float* values = nullptr;  // same layout
  Index tokens = 0;

  Index n_kv_heads() const noexcept { return n_heads; }
  Index head_dim() const noexcept { return dim; }
  Index value_dim() const noexcept { return dim; }
  bool values_in_keys() const noexcept { return false; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return tokens > 0 ? 1 : 0; }
  block_type block(Index h, Index /*i*/) const noexcept {
    return {keys + h * dim, values + h * dim, tokens, kv_width};
  }
  Index position(Index /*i*/) const noexcept { return 0; }
  Index end_position() const noexcept { return tokens; }
  kvcache::attention_mask mask() const noexcept {
    kvcache::attention_mask m;
    m.causal = false;
    return m;
  }
};

struct recompute_fixture {
  explicit recompute_fixture(Index tokens)
      : encoded(row_matrix<float>::Random(tokens, d_model)),
        wk(row_matrix<float>::Random(kv_width, d_model) * (1.0f / 36.0f)),
        wv(row_matrix<float>::Random(kv_width, d_model) * (1.0f / 36.0f)), k(tokens, kv_width),
        v(tokens, kv_width), q(row_matrix<float>::Random(1, whisper_heads.q_width())),
        out(1, whisper_heads.q_width()) {}
  row_matrix<float> encoded;  // [token][d_model] the encoder's output
  row_matrix<float> wk, wv;   // [kv_width][d_model]
  row_matrix<float> k, v;     // [token][kv_width] this step's projections
  row_matrix<float> q, out;
  kvcache::attention_workspace<float> ws;

  void step(const kvcache::attention_options& opt) {
    const Index n = encoded.rows(), parts = pool().size();
    pool().parallel_for(parts, [&](Index p, Index) {
      const Index lo = n * p / parts, hi = n * (p + 1) / parts;
      k.middleRows(lo, hi - lo).noalias() = encoded.middleRows(lo, hi - lo) * wk.transpose();
      v.middleRows(lo, hi - lo).noalias() = encoded.middleRows(lo, hi - lo) * wv.transpose();
    });
    const projected_view view{k.data(), v.data(), n};
    kvcache::decode_attention(whisper_heads, q.row(0), view, out.row(0), ws, opt);
  }
};

void BM_cross_recompute(benchmark::State& state, Index tokens) {
  auto& f = held_fixture<recompute_fixture>(
      "cross_recompute/" + std::to_string(tokens),
      [&] { return std::make_unique<recompute_fixture>(tokens); });
  kvcache::attention_options opt;
  opt.pool = &pool();
  f.step(opt);  // warm-up
  for (auto _ : state) {
    f.step(opt);
    benchmark::DoNotOptimize(f.out.data());
  }
  // Two products of tokens x d_model by d_model x kv_width, a multiply and an add each.
  const double flops = 2.0 * 2.0 * double(tokens) * double(d_model) * double(kv_width);
  state.SetItemsProcessed(state.iterations());
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  // What a step reads before it attends: the encoder's output and the two weight matrices.
  const Index read = (tokens * d_model + 2 * kv_width * d_model) * Index(sizeof(float));
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(read));
  state.counters["threads"] = double(pool().size());
  state.SetLabel("20 heads x 64 (Whisper large), d_model 1280, one layer, K and V projected "
                 "from the encoder output every step, f32, " + threads_label());
}

}  // namespace

void register_cross() {
  using std::to_string;
  const Index lengths[] = {256, 1500, 4096};
  for (const Index n : lengths) {
    add("cross_attention/recompute/f32/" + to_string(n), BM_cross_recompute, n)
        ->Unit(benchmark::kMicrosecond)->UseRealTime();
  }
  using fn = void (*)(benchmark::State&, std::string, Index);
  const std::pair<const char*, fn> formats[] = {
      {"f32", BM_cross_cached<kvcache::plain_format<float>>},
      {"f16", BM_cross_cached<kvcache::plain_format<Eigen::half>>},
      {"bf16", BM_cross_cached<kvcache::plain_format<Eigen::bfloat16>>},
      {"int8", BM_cross_cached<kvcache::quantized_format<8>>},
      {"int4", BM_cross_cached<kvcache::quantized_format<4>>}};
  for (const auto& [name, f] : formats) {
    for (const Index n : lengths) {
      add("cross_attention/cached/" + std::string(name) + "/" + to_string(n), f,
          std::string(name), n)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
    }
  }
}

}  // namespace kvcache_bench
