// SPDX-License-Identifier: Apache-2.0
// The paged cache's benchmarks: batched decode attention over interleaved block tables, paged
// against contiguous decode of one sequence, and what pages, forks and prefix hashing cost.
#include "common.hpp"

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace kvcache_bench {
namespace {

using kvcache::row_matrix;
using f32 = kvcache::plain_format<float>;
using paged_cache = kvcache::paged_kv_cache<f32>;

// The shape of the decode_attention benchmarks: 32 query heads on 8 kv heads of 128, one layer.
constexpr Index n_heads = 32, n_kv = 8, head_dim = 128;
const kvcache::attention_shape decode_heads(n_heads, n_kv, head_dim);
constexpr double token_bytes = 2.0 * n_kv * head_dim * sizeof(float);  // K and V: 8 KiB

kvcache::cache_shape one_layer() { return kvcache::cache_shape(1, n_heads, n_kv, head_dim); }

// Keys and values appended by every benchmark, 4096 random tokens taken again and again
// (which values they hold does not change the time).
constexpr Index source_tokens = 4096;
const row_matrix<float>& source(bool values) {
  static const row_matrix<float> k = row_matrix<float>::Random(source_tokens, n_kv * head_dim);
  static const row_matrix<float> v = row_matrix<float>::Random(source_tokens, n_kv * head_dim);
  return values ? v : k;
}

// Appends n tokens to `seq`, source rows t, t + 1, ... (modulo source_tokens).
template <class Cache>
void append_source(Cache& cache, Index seq, Index t, Index n) {
  while (n > 0) {
    const Index at = t % source_tokens, piece = std::min(n, source_tokens - at);
    cache.append(seq, 0, source(false).middleRows(at, piece), source(true).middleRows(at, piece));
    t += piece;
    n -= piece;
  }
}

std::string threads_label() {
  return std::to_string(pool().size()) + " thread" + (pool().size() == 1 ? "" : "s");
}

// ---------------------------------------------------------------------------------------------
// Batched decode: B sequences of ctx tokens each, one query token each, one call.
template <class Format = f32>
struct batch_fixture {
  explicit batch_fixture(kvcache::paged_kv_cache<Format> c) : cache(std::move(c)) {}
  kvcache::paged_kv_cache<Format> cache;
  std::vector<Index> seqs;
  kvcache::paged_batch<Format> batch;
  row_matrix<float> q, out;
  kvcache::attention_workspace<float> ws;
};

// The formats of the batched decode benchmarks: their name, a page size they take (a multiple
// of a quantized format's group) and the bytes of K and V a token of one layer reads.
template <class Format>
struct paged_format;
template <class Scalar>
struct paged_format<kvcache::plain_format<Scalar>> {
  static kvcache::plain_format<Scalar> make() { return {}; }
  static std::string name() { return kvcache::scalar_traits<Scalar>::name; }
  static constexpr Index page_size = 16;
  static double token_bytes() { return 2.0 * n_kv * head_dim * sizeof(Scalar); }
};
template <int Bits>
struct paged_format<kvcache::quantized_format<Bits>> {
  static kvcache::quantized_format<Bits> make() { return kvcache::quantized_format<Bits>(32); }
  static std::string name() { return Bits == 8 ? "int8" : "int4"; }
  static constexpr Index page_size = 32;
  // Codes of keys and values, an fp16 scale and zero per 32 tokens of a key channel and per 32
  // channels of a value.
  static double token_bytes() {
    return double(n_kv) * (2.0 * head_dim * Bits / 8 + 2.0 * 2 * head_dim / 32 + 2.0 * 2 * head_dim / 32);
  }
};

// The sequences are filled as a server decoding them in lockstep fills them: round robin, a
// chunk of `chunk` tokens each in turn, so that each sequence's pages are spread through the
// pool, one sequence's page between every B - 1 others' (chunk = page_size).
template <class Format = f32>
std::unique_ptr<batch_fixture<Format>> make_batch(Index B, Index ctx, Index page_size, Index chunk) {
  kvcache::paged_layout layout;
  layout.page_size = page_size;
  layout.n_pages = B * kvcache::detail::ceil_div(ctx, page_size);
  auto f = std::make_unique<batch_fixture<Format>>(
      kvcache::paged_kv_cache<Format>(one_layer(), layout, paged_format<Format>::make()));
  for (Index b = 0; b < B; ++b) f->seqs.push_back(f->cache.create());
  for (Index t = 0; t < ctx; t += chunk) {
    for (const Index s : f->seqs) append_source(f->cache, s, t, std::min(chunk, ctx - t));
  }
  f->cache.batch(f->seqs, 0, f->batch);
  f->q = row_matrix<float>::Random(B, decode_heads.q_width());
  f->out.resize(B, decode_heads.q_width());
  return f;
}

// `chunk` tokens per sequence in turn as the cache is filled (page_size: lockstep decoding).
template <class Format = f32>
void BM_paged_decode(benchmark::State& state, Index B, Index ctx, Index chunk) {
  using fmt = paged_format<Format>;
  constexpr Index page_size = fmt::page_size;
  auto& f = held_fixture<batch_fixture<Format>>(
      "paged_decode/" + fmt::name() + "/" + std::to_string(B) + "/" + std::to_string(ctx) + "/" +
          std::to_string(chunk),
      [&] { return make_batch<Format>(B, ctx, page_size, std::max(chunk, page_size)); });
  kvcache::attention_options opt;
  opt.pool = &pool();
  kvcache::batch_decode_attention(decode_heads, f.q, f.batch, f.out, f.ws, opt);  // warm-up
  beside_read side;
  for (auto _ : state) {
    side.call(state, [&] {
      kvcache::batch_decode_attention(decode_heads, f.q, f.batch, f.out, f.ws, opt);
      benchmark::DoNotOptimize(f.out.data());
    });
  }
  const double bytes = double(B) * double(ctx) * fmt::token_bytes();
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  side.set_counters(state, bytes);
  state.counters["threads"] = double(pool().size());
  const std::string fill = B == 1          ? ""
                           : chunk >= ctx  ? ", each sequence's pages in a run"
                           : chunk == page_size
                               ? ", pages interleaved"
                               : ", interleaved by " + std::to_string(chunk / page_size) + " pages";
  state.SetLabel("32 q / 8 kv heads x 128, " + fmt::name() + ", page " + std::to_string(page_size) +
                 ", " + std::to_string(B) + " sequence" +
                 (B == 1 ? "" : "s") + fill + ", " + threads_label());
}

// ---------------------------------------------------------------------------------------------
// One sequence: paged (batched decode of a batch of 1) against the contiguous kv_cache's
// decode_attention, the same keys and values, called in turn in the same loop.
struct single_fixture {
  single_fixture(paged_cache c, Index ctx)
      : contiguous(kvcache::cache_shape(1, n_kv, n_kv, head_dim)), paged(std::move(c)) {
    contiguous.reserve(ctx);
  }
  kvcache::kv_cache<kvcache::contiguous_layout, f32> contiguous;
  paged_cache paged;
  kvcache::paged_batch<f32> batch;
  row_matrix<float> q, out;
  kvcache::row_vector<float> out_contiguous;
  kvcache::attention_workspace<float> ws_paged, ws_contiguous;
};

// With `shuffled`, the sequence takes the pool's pages scattered (a pool after hours of
// serving): every page is taken by a one-page sequence, and a random half of those are freed in
// random order, so the free pages are holes between pages in use and the page after a
// sequence's last is taken half the time; else in the order of their addresses (a fresh pool).
std::unique_ptr<single_fixture> make_single(Index ctx, Index page_size, bool shuffled) {
  kvcache::paged_layout layout;
  layout.page_size = page_size;
  layout.n_pages = kvcache::detail::ceil_div(ctx, page_size) * (shuffled ? 2 : 1);
  auto f = std::make_unique<single_fixture>(paged_cache(one_layer(), layout), ctx);
  if (shuffled) {
    std::vector<Index> fillers;
    for (Index p = 0; p < layout.n_pages; ++p) {
      fillers.push_back(f->paged.create());
      append_source(f->paged, fillers.back(), 0, 1);
    }
    std::shuffle(fillers.begin(), fillers.end(), std::mt19937(1));
    for (std::size_t i = 0; i < fillers.size() / 2; ++i) f->paged.free(fillers[i]);
  }
  const Index seq = f->paged.create();
  append_source(f->paged, seq, 0, ctx);
  for (Index t = 0; t < ctx; t += source_tokens) {
    const Index n = std::min(source_tokens, ctx - t);
    f->contiguous.append(0, source(false).topRows(n), source(true).topRows(n));
  }
  f->paged.batch({seq}, 0, f->batch);
  f->q = row_matrix<float>::Random(1, decode_heads.q_width());
  f->out.resize(1, decode_heads.q_width());
  f->out_contiguous.resize(decode_heads.q_width());
  return f;
}

void BM_paged_vs_contiguous(benchmark::State& state, Index page_size, bool shuffled, Index ctx) {
  auto& f = held_fixture<single_fixture>(
      "paged_vs_contiguous/" + std::to_string(page_size) + (shuffled ? "s/" : "/") +
          std::to_string(ctx),
      [&] { return make_single(ctx, page_size, shuffled); });
  kvcache::attention_options opt;
  opt.pool = &pool();
  const kvcache::row_vector<float> q = f.q.row(0);
  auto paged = [&] {
    kvcache::batch_decode_attention(decode_heads, f.q, f.batch, f.out, f.ws_paged, opt);
    benchmark::DoNotOptimize(f.out.data());
  };
  auto contiguous = [&] {
    kvcache::decode_attention(decode_heads, q, f.contiguous.view(0), f.out_contiguous,
                              f.ws_contiguous, opt);
    benchmark::DoNotOptimize(f.out_contiguous.data());
  };
  paged();  // warm-up
  contiguous();
  // Each iteration times both; which goes first alternates, so that neither always finds the
  // other's leftovers in the caches.
  std::vector<double> paged_s, contiguous_s;
  bool paged_first = true;
  for (auto _ : state) {
    for (int turn = 0; turn < 2; ++turn) {
      const bool run_paged = (turn == 0) == paged_first;
      if (!run_paged) state.PauseTiming();
      const auto t0 = std::chrono::steady_clock::now();
      if (run_paged) {
        paged();
      } else {
        contiguous();
      }
      (run_paged ? paged_s : contiguous_s).push_back(seconds_since(t0));
      if (!run_paged) state.ResumeTiming();
    }
    paged_first = !paged_first;
  }
  const double bytes = double(ctx) * token_bytes;
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(bytes));
  // Paged speed as a fraction of contiguous, from the medians of the calls side by side.
  state.counters["x_contiguous"] = median(contiguous_s) / median(paged_s);
  state.counters["contiguous_GBps"] = bytes / median(contiguous_s) / 1e9;
  state.counters["threads"] = double(pool().size());
  // Runs of consecutive page ids in the block table: 1 in address order.
  Index runs = f.batch.indices.empty() ? 0 : 1;
  for (std::size_t i = 1; i < f.batch.indices.size(); ++i) {
    if (f.batch.indices[i] != f.batch.indices[i - 1] + 1) ++runs;
  }
  state.counters["page_runs"] = double(runs);
  state.SetLabel("batch of 1 against kv_cache decode_attention, page " +
                 std::to_string(page_size) + (shuffled ? ", pages shuffled" : "") +
                 ", 32 q / 8 kv heads x 128, f32, " + threads_label());
}

// ---------------------------------------------------------------------------------------------
// Pages: allocation and release, appends that do or do not take a page, forks.
constexpr Index small_ctx = 4096;

void BM_page_pool(benchmark::State& state) {
  kvcache::page_pool<f32> pages(one_layer(), 16, 64);
  for (auto _ : state) {
    const Index p = pages.allocate();
    benchmark::DoNotOptimize(p);
    pages.release(p);
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("allocate + release of one page");
}

// A sequence of 4096 tokens (+1 when `new_page` is false), one more token appended, and the
// sequence cropped back (O(1); releases the page the append took, if it took one).
void BM_paged_append(benchmark::State& state, bool new_page) {
  kvcache::paged_layout layout;
  layout.page_size = 16;
  layout.n_pages = small_ctx / 16 + 1;
  paged_cache cache(one_layer(), layout);
  const Index seq = cache.create();
  append_source(cache, seq, 0, small_ctx);
  if (!new_page) append_source(cache, seq, 0, 1);
  const Index at = cache.position(seq);
  const row_matrix<float> k = source(false).topRows(1), v = source(true).topRows(1);
  for (auto _ : state) {
    cache.append(seq, 0, k, v);
    benchmark::ClobberMemory();
    cache.crop(seq, at);
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(std::string(new_page ? "into a new page" : "within a page") +
                 " + crop back, 8 kv heads x 128, f32, page 16");
}

// Fork of a sequence of 4096 tokens (256 pages shared, none copied); the fork is freed after
// the clock stops (its time is the free_ns counter).
void BM_paged_fork(benchmark::State& state) {
  kvcache::paged_layout layout;
  layout.page_size = 16;
  layout.n_pages = small_ctx / 16;
  paged_cache cache(one_layer(), layout);
  const Index seq = cache.create();
  append_source(cache, seq, 0, small_ctx);
  std::vector<double> free_s;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const Index child = cache.fork(seq);
    state.SetIterationTime(seconds_since(t0));
    benchmark::DoNotOptimize(child);
    const auto t1 = std::chrono::steady_clock::now();
    cache.free(child);
    free_s.push_back(seconds_since(t1));
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["free_ns"] = median(free_s) * 1e9;
  state.SetLabel("4096 tokens, 256 pages of 16 shared, one layer, f32");
}

// ---------------------------------------------------------------------------------------------
// Prefix caching: the chained hashes of a 4096-token prompt's pages, the lookup of a prompt
// whose every page is cached, and a sequence created on it.
std::vector<std::int32_t> prompt_tokens() {
  std::vector<std::int32_t> t(static_cast<std::size_t>(small_ctx));
  std::mt19937 gen(11);
  for (auto& x : t) x = std::int32_t(gen() % 128256);  // Llama 3's vocabulary
  return t;
}

void set_per_token(benchmark::State& state, Index tokens) {
  state.SetItemsProcessed(int64_t(state.iterations()) * int64_t(tokens));
  // Seconds per token (the table shows it as ns).
  state.counters["per_token"] = benchmark::Counter(
      double(state.iterations()) * double(tokens),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void BM_chain_hash(benchmark::State& state) {
  const auto tokens = prompt_tokens();
  const Index P = 16;
  const kvcache::page_hash root = kvcache::prefix_root();
  for (auto _ : state) {
    kvcache::page_hash h = root;
    for (Index i = 0; i + P <= small_ctx; i += P) h = kvcache::chain_hash(h, tokens.data() + i, P);
    benchmark::DoNotOptimize(h);
  }
  set_per_token(state, small_ctx);
  state.SetLabel("XXH3-128 chained over 256 pages of 16 tokens");
}

// A cache whose pages hold the prompt, published, and then, with `keep` false, freed (its
// pages stay cached for prefix hits).
struct prefix_fixture {
  explicit prefix_fixture(bool keep) : cache(one_layer(), layout()), tokens(prompt_tokens()) {
    const Index seq = cache.create();
    append_source(cache, seq, 0, small_ctx);
    cache.publish(seq, tokens.data(), small_ctx);
    if (!keep) cache.free(seq);
  }
  static kvcache::paged_layout layout() {
    kvcache::paged_layout l;
    l.page_size = 16;
    l.n_pages = small_ctx / 16 + 1;
    return l;
  }
  paged_cache cache;
  std::vector<std::int32_t> tokens;
};

void BM_match_prefix(benchmark::State& state) {
  const prefix_fixture f(true);
  for (auto _ : state) {
    const Index hit = f.cache.match_prefix(f.tokens.data(), small_ctx);
    benchmark::DoNotOptimize(hit);
    if (hit != small_ctx) {
      state.SkipWithError("the prompt's pages are not all found");
      break;
    }
  }
  set_per_token(state, small_ctx);
  state.SetLabel("every page of 16 found and checked, one layer, f32");
}

// create(tokens) on a prompt whose pages are cached but held by no sequence: 255 pages adopted
// (the last token is left to compute), then the sequence freed, its pages cached again.
void BM_create_hit(benchmark::State& state) {
  prefix_fixture f(false);
  for (auto _ : state) {
    const Index seq = f.cache.create(f.tokens.data(), small_ctx);
    if (f.cache.prefix_hit(seq) != small_ctx - 16) {
      state.SkipWithError("the prompt's pages are not all adopted");
      break;
    }
    f.cache.free(seq);
  }
  set_per_token(state, small_ctx);
  state.SetLabel("255 cached pages of 16 adopted, + free, one layer, f32");
}

}  // namespace

void register_paged() {
  using std::to_string;
  // Batched decode over B sequences of ctx tokens each, up to about 4 GiB of K and V.
  for (Index B : {1, 4, 16, 64}) {
    for (Index ctx : {512, 2048, 8192, 32768}) {
      if (double(B) * double(ctx) * token_bytes > 4.0 * (1 << 30)) continue;
      add("paged_decode/f32/b" + to_string(B) + "/" + to_string(ctx), BM_paged_decode<>, B, ctx,
          Index(16))->Unit(benchmark::kMicrosecond)->UseRealTime();
    }
  }
  // The formats side by side at batch 16, 8192 tokens each (1 GiB of K and V in f32).
  add("paged_decode/f16/b16/8192", BM_paged_decode<kvcache::plain_format<Eigen::half>>, Index(16),
      Index(8192), Index(16))->Unit(benchmark::kMicrosecond)->UseRealTime();
  add("paged_decode/bf16/b16/8192", BM_paged_decode<kvcache::plain_format<Eigen::bfloat16>>,
      Index(16), Index(8192), Index(16))->Unit(benchmark::kMicrosecond)->UseRealTime();
  add("paged_decode/int8/b16/8192", BM_paged_decode<kvcache::quantized_format<8>>, Index(16),
      Index(8192), Index(32))->Unit(benchmark::kMicrosecond)->UseRealTime();
  add("paged_decode/int4/b16/8192", BM_paged_decode<kvcache::quantized_format<4>>, Index(16),
      Index(8192), Index(32))->Unit(benchmark::kMicrosecond)->UseRealTime();
  // The same batch filled three ways: a page per sequence in turn (lockstep decoding), four
  // pages, or each sequence whole (its pages one run, as if prefilled alone).
  for (Index chunk : {16, 64, 2048}) {
    add("paged_decode_fill/f32/b16/2048/chunk" + to_string(chunk), BM_paged_decode<>, Index(16),
        Index(2048), chunk)->Unit(benchmark::kMicrosecond)->UseRealTime();
  }
  for (Index ctx : {8192, 32768}) {
    for (Index page_size : {16, 64}) {
      for (bool shuffled : {false, true}) {
        add("paged_vs_contiguous/f32/p" + to_string(page_size) + (shuffled ? "_shuffled/" : "/") +
                to_string(ctx),
            BM_paged_vs_contiguous, page_size, shuffled, ctx)
            ->Unit(benchmark::kMicrosecond)->UseRealTime();
      }
    }
  }
  add("paged_pool/allocate_release", BM_page_pool);
  add("paged_append/f32/within_page", BM_paged_append, false);
  add("paged_append/f32/new_page", BM_paged_append, true);
  add("paged_fork/4096", BM_paged_fork)->UseManualTime();
  add("prefix/chain_hash/4096", BM_chain_hash)->Unit(benchmark::kMicrosecond);
  add("prefix/match_prefix/4096", BM_match_prefix)->Unit(benchmark::kMicrosecond);
  add("prefix/create_hit/4096", BM_create_hit)->Unit(benchmark::kMicrosecond);
}

}  // namespace kvcache_bench
