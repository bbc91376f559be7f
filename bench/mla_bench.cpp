// SPDX-License-Identifier: Apache-2.0
// Multi-head latent attention: absorbed decode over the latent cache against GQA decode at
// equal bytes per token, and against the MHA that MLA replaces.
#include "common.hpp"

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <memory>
#include <string>

namespace kvcache_bench {
namespace {

using kvcache::row_matrix;
using kvcache::row_vector;

// DeepSeek-V2-Lite's attention (16 heads, kv_lora_rank 512, RoPE 64, heads of 128): 576
// elements a token, one layer.
const kvcache::mla_shape mla(16, 512, 128, 64, 128);
// GQA at the same bytes a token: 16 query heads on 2 kv heads of 144, K and V: 2 x 2 x 144 = 576.
const kvcache::attention_shape gqa_equal(16, 2, 144);
// The MHA that MLA replaces: 16 heads of 128, K and V: 4096 elements a token.
const kvcache::attention_shape mha(16, 16, 128);

// A cache of `ctx` random tokens of one layer, the queries and the outputs of one step.
template <class Format>
struct decode_fixture {
  kvcache::kv_cache<kvcache::contiguous_layout, Format> cache;
  row_matrix<float> w_uk, w_uv;
  row_vector<float> q, out;
  kvcache::attention_workspace<float> ws;
  kvcache::mla_workspace<float> mla_ws;
  decode_fixture(const kvcache::cache_shape& s, Format format) : cache(s, {}, format) {}
};

template <class Format>
Format format_for();
template <>
kvcache::plain_format<float> format_for() { return {}; }
template <>
kvcache::plain_format<Eigen::half> format_for() { return {}; }
template <>
kvcache::plain_format<Eigen::bfloat16> format_for() { return {}; }
template <>
kvcache::quantized_format<8> format_for() { return kvcache::quantized_format<8>(32); }
template <>
kvcache::quantized_format<4> format_for() { return kvcache::quantized_format<4>(32); }

// Fills a cache of shape `s` with `ctx` tokens, a chunk at a time.
template <class Format>
std::unique_ptr<decode_fixture<Format>> make(const kvcache::cache_shape& s, Index ctx) {
  auto f = std::make_unique<decode_fixture<Format>>(s, format_for<Format>());
  f->cache.reserve(ctx);
  const Index chunk = 1024, width = s.kv_width();
  const row_matrix<float> rows = row_matrix<float>::Random(chunk, width);
  for (Index t = 0; t < ctx; t += chunk) {
    const Index n = std::min(chunk, ctx - t);
    if (s.values_in_keys()) {
      f->cache.append(0, rows.topRows(n));
    } else {
      f->cache.append(0, rows.topRows(n), rows.topRows(n));
    }
  }
  return f;
}

// Times `step` beside read passes; counts the cache's bytes read a call and steps a second.
template <class Fixture, class Step>
void time_decode(benchmark::State& state, Fixture& f, Step step, const std::string& label) {
  step();  // warm-up: sizes the workspace
  beside_read side;
  for (auto _ : state) {
    side.call(state, [&] {
      step();
      benchmark::DoNotOptimize(f.out.data());
    });
  }
  const double bytes = double(f.cache.bytes());
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  side.set_counters(state, bytes);
  state.counters["tokens_per_s"] = 1.0 / side.call_median();
  state.counters["bytes_per_token"] = bytes / double(f.cache.size());
  state.SetLabel(label + ", " + std::to_string(pool().size()) + " threads");
}

// MLA decode with absorption: the query projection into latent space, attention over the
// latent rows (each read once, as key and as value) and the value projection.
template <class Format>
void BM_mla_decode(benchmark::State& state, Index ctx, std::string name) {
  auto& f = held_fixture<decode_fixture<Format>>("mla/" + name + "/" + std::to_string(ctx), [&] {
    auto g = make<Format>(mla.cache(1), ctx);
    g->w_uk = row_matrix<float>::Random(mla.n_heads() * mla.qk_nope_dim(), mla.kv_lora_rank());
    g->w_uv = row_matrix<float>::Random(mla.n_heads() * mla.v_head_dim(), mla.kv_lora_rank());
    g->q = row_vector<float>::Random(mla.q_width());
    g->out.resize(mla.out_width());
    return g;
  });
  kvcache::attention_options opt;
  opt.pool = &pool();
  time_decode(state, f, [&] {
    kvcache::mla_decode_attention(mla, f.w_uk, f.w_uv, f.q, f.cache.view(0), f.out, f.mla_ws, opt);
  }, "MLA 16 heads, latent 512 + RoPE 64, " + name);
}

// Plain decode attention of `shape` (GQA at MLA's bytes a token, or MHA).
template <class Format>
void BM_decode(benchmark::State& state, Index ctx, std::string name, kvcache::attention_shape shape,
               std::string what) {
  auto& f = held_fixture<decode_fixture<Format>>(what + "/" + name + "/" + std::to_string(ctx), [&] {
    auto g = make<Format>(kvcache::cache_shape(1, shape), ctx);
    g->q = row_vector<float>::Random(shape.q_width());
    g->out.resize(shape.out_width());
    return g;
  });
  kvcache::attention_options opt;
  opt.pool = &pool();
  time_decode(state, f, [&] {
    kvcache::decode_attention(shape, f.q, f.cache.view(0), f.out, f.ws, opt);
  }, what + ", " + name);
}

}  // namespace

void register_mla() {
  using f32 = kvcache::plain_format<float>;
  using f16 = kvcache::plain_format<Eigen::half>;
  using bf16 = kvcache::plain_format<Eigen::bfloat16>;
  using int8 = kvcache::quantized_format<8>;
  using int4 = kvcache::quantized_format<4>;
  // 131072 tokens: 288 MiB of f32 latent rows, several times the last level cache.
  for (const Index ctx : {2048, 8192, 32768, 131072}) {
    const std::string c = "/" + std::to_string(ctx);
    add("mla_decode/f32" + c, BM_mla_decode<f32>, ctx, std::string("f32"))
        ->Unit(benchmark::kMicrosecond)->UseRealTime();
    add("mla_decode/f16" + c, BM_mla_decode<f16>, ctx, std::string("f16"))
        ->Unit(benchmark::kMicrosecond)->UseRealTime();
    add("mla_decode/int8" + c, BM_mla_decode<int8>, ctx, std::string("int8 g32"))
        ->Unit(benchmark::kMicrosecond)->UseRealTime();
    if (ctx == 131072) {
      add("mla_decode/bf16" + c, BM_mla_decode<bf16>, ctx, std::string("bf16"))
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
      add("mla_decode/int4" + c, BM_mla_decode<int4>, ctx, std::string("int4 g32"))
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
      continue;
    }
    for (const auto& [what, shape] :
         {std::pair<std::string, kvcache::attention_shape>{"gqa_equal_bytes", gqa_equal},
          {"mha_replaced", mha}}) {
      const std::string label =
          what == "mha_replaced" ? "MHA 16 heads x 128" : "GQA 16 q / 2 kv heads x 144";
      add(what + "_decode/f32" + c, BM_decode<f32>, ctx, std::string("f32"), shape, label)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
      add(what + "_decode/f16" + c, BM_decode<f16>, ctx, std::string("f16"), shape, label)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
      add(what + "_decode/int8" + c, BM_decode<int8>, ctx, std::string("int8 g32"), shape, label)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
    }
  }
}

}  // namespace kvcache_bench
