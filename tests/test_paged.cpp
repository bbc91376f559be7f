// SPDX-License-Identifier: Apache-2.0
// The paged cache: pool, sequences, copy-on-write forks, rollback, windows over pages, prefix
// caching, batched attention and running out of pages, against contiguous caches.
#include "common.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;

const cache_shape model(2, 8, 2, 16);  // 2 layers, GQA 8/2, head_dim 16
const attention_shape heads = model.heads();

std::vector<std::int32_t> token_ids(Index n, std::int32_t seed) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) t[static_cast<std::size_t>(i)] = std::int32_t((seed * 7919 + i * 31) % 1000);
  return t;
}

// The keys and values of a sequence: token i of layer l is row i of rows(l, ...).
row_matrix<float> rows(Index l, Index n, unsigned seed) {
  return random_matrix<float>(n, model.kv_width(), seed * 101 + unsigned(l));
}

// ---- pool ------------------------------------------------------------------------------------

TEST(PagePool, AllocatesReleasesAndCounts) {
  page_pool<plain_format<float>> pool(model, 4, 3);
  EXPECT_EQ(pool.stats().free, 3);
  EXPECT_EQ(pool.page_bytes(), 2 * 4 * 2 * 16 * 4 * 2);  // layers x tokens x heads x dim x f32 x K,V
  const Index a = pool.allocate(), b = pool.allocate(), c = pool.allocate();
  EXPECT_EQ(a, 0);
  EXPECT_EQ(b, 1);
  EXPECT_EQ(c, 2);
  EXPECT_EQ(pool.stats().used, 3);
  EXPECT_EQ(pool.stats().used_bytes, 3 * pool.page_bytes());
  EXPECT_THROW(pool.allocate(), std::length_error);
  pool.retain(b);
  EXPECT_EQ(pool.ref_count(b), 2);
  pool.release(b);
  pool.release(b);
  EXPECT_EQ(pool.stats().free, 1);
  EXPECT_EQ(pool.allocate(), b);
  pool.release(c);
  pool.release(b);
  EXPECT_EQ(pool.allocate(c), c);  // a free hint is taken
  EXPECT_EQ(pool.allocate(a), b);  // a hint in use is not: the most recently freed page is
  EXPECT_THROW(pool.release(7), std::out_of_range);
  pool.release(a);
  EXPECT_THROW(pool.release(a), std::out_of_range);
  EXPECT_THROW(pool.retain(a), std::out_of_range);  // free: nothing to retain
}

TEST(PagePool, CachedPagesAreEvictedLeastRecentlyUsedFirst) {
  page_pool<plain_format<float>> pool(model, 2, 3);
  const auto t = token_ids(6, 1);
  const page_hash root = prefix_root();
  std::vector<Index> pages;
  std::vector<page_hash> hashes;
  page_hash parent = root;
  for (Index i = 0; i < 3; ++i) {
    pages.push_back(pool.allocate());
    hashes.push_back(chain_hash(parent, t.data() + 2 * i, 2));
    EXPECT_TRUE(pool.publish(pages.back(), hashes.back(), parent, t.data() + 2 * i));
    parent = hashes.back();
  }
  // Released in the order 1, 0, 2: page 1 is the least recently used.
  pool.release(pages[1]);
  pool.release(pages[0]);
  pool.release(pages[2]);
  EXPECT_EQ(pool.stats().cached, 3);
  EXPECT_EQ(pool.stats().free, 0);
  EXPECT_EQ(pool.available(), 3);
  EXPECT_EQ(pool.find(hashes[1], hashes[0], t.data() + 2), pages[1]);
  EXPECT_EQ(pool.allocate(), pages[1]);  // evicted
  EXPECT_EQ(pool.find(hashes[1], hashes[0], t.data() + 2), -1);
  EXPECT_EQ(pool.stats().evictions, 1);
  pool.retain(pages[0]);  // a prefix hit takes page 0 back from the LRU list
  EXPECT_EQ(pool.allocate(), pages[2]);
  EXPECT_THROW(pool.allocate(), std::length_error);
}

TEST(PagePool, AHitIsCheckedAgainstTheTokens) {
  page_pool<plain_format<float>> pool(model, 2, 2);
  const auto t = token_ids(2, 3);
  const page_hash root = prefix_root();
  const page_hash h = chain_hash(root, t.data(), 2);
  const Index p = pool.allocate();
  ASSERT_TRUE(pool.publish(p, h, root, t.data()));
  EXPECT_EQ(pool.find(h, root, t.data()), p);
  const std::int32_t other[2] = {t[0], t[1] + 1};
  EXPECT_EQ(pool.find(h, root, other), -1);          // a forged collision is refused
  EXPECT_EQ(pool.find(h, prefix_root("x"), t.data()), -1);  // another parent
  EXPECT_FALSE(pool.publish(p, h, root, t.data()));  // published already
}

TEST(PagePool, RefusesBadSizes) {
  EXPECT_THROW((page_pool<plain_format<float>>(model, 0, 4)), std::invalid_argument);
  EXPECT_THROW((page_pool<plain_format<float>>(model, 4, 0)), std::invalid_argument);
  EXPECT_THROW((page_pool<quantized_format<8>>(model, 6, 4, quantized_format<8>(4))),
               std::invalid_argument);
  EXPECT_THROW((page_pool<plain_format<float>>(model, Index(1) << 40, Index(1) << 40)),
               std::length_error);
}

TEST(PrefixHash, ChainsAndSeparatesExtraKeys) {
  const auto t = token_ids(32, 5);
  const page_hash a = chain_hash(prefix_root(), t.data(), 16);
  EXPECT_EQ(a, chain_hash(prefix_root(), t.data(), 16));
  EXPECT_NE(a, chain_hash(prefix_root("model-b"), t.data(), 16));
  EXPECT_NE(chain_hash(a, t.data() + 16, 16), chain_hash(prefix_root(), t.data() + 16, 16));
}

// ---- one sequence against a contiguous cache ---------------------------------------------------

template <class Format>
struct format_case {
  using format = Format;
  Format make;
  Index page_size;
};

template <class F>
class PagedFormats : public ::testing::Test {};

struct f32_p4 { using format = plain_format<float>; static format make() { return {}; } static constexpr Index page = 4; };
struct f64_p3 { using format = plain_format<double>; static format make() { return {}; } static constexpr Index page = 3; };
struct f16_p16 { using format = plain_format<Eigen::half>; static format make() { return {}; } static constexpr Index page = 16; };
struct bf16_p1 { using format = plain_format<Eigen::bfloat16>; static format make() { return {}; } static constexpr Index page = 1; };
struct int8_g4_p8 { using format = quantized_format<8>; static format make() { return format(4, 0); } static constexpr Index page = 8; };
struct int4_g4_r3_p4 { using format = quantized_format<4>; static format make() { return format(4, 3); } static constexpr Index page = 4; };
using formats = ::testing::Types<f32_p4, f64_p3, f16_p16, bf16_p1, int8_g4_p8, int4_g4_r3_p4>;
// Test names: the format's and the page size, e.g. int8_page8.
struct format_page_name {
  template <class F>
  static std::string GetName(int) {
    return F::make().name() + "_page" + std::to_string(F::page);
  }
};
TYPED_TEST_SUITE(PagedFormats, formats, format_page_name);

template <class F>
using contiguous_of = kv_cache<contiguous_layout, typename F::format>;

// Attention of a random query at every layer of `seq` equals that over `ref`, and so do the
// keys and values they hold.
template <class F>
void expect_same(const paged_kv_cache<typename F::format>& paged, Index seq,
                 const contiguous_of<F>& ref, unsigned seed) {
  using T = compute_t<typename F::format::scalar_type>;
  for (Index l = 0; l < model.n_layers(); ++l) {
    ASSERT_EQ(paged.position(seq, l), ref.position(l));
    ASSERT_EQ(paged.size(seq, l), ref.size(l));
    EXPECT_EQ(paged.keys(seq, l), ref.keys(l));
    EXPECT_EQ(paged.values(seq, l), ref.values(l));
    const row_vector<T> q = random_matrix<T>(1, heads.q_width(), seed + unsigned(l));
    row_vector<T> a(heads.q_width()), b(heads.q_width());
    decode_attention(heads, q, paged.view(seq, l), a);
    decode_attention(heads, q, ref.view(l), b);
    EXPECT_LE((a - b).cwiseAbs().maxCoeff(), T(1e-6)) << "layer " << l;
  }
}

TYPED_TEST(PagedFormats, AppendsAsAContiguousCacheDoes) {
  using F = TypeParam;
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  contiguous_of<F> ref(model, {}, F::make());
  const Index seq = paged.create();
  Index n = 0;
  for (const Index chunk : {Index(5), Index(1), Index(1), Index(9), Index(1), Index(3), Index(1)}) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const auto k = rows(l, chunk, unsigned(n) + 1), v = rows(l, chunk, unsigned(n) + 500);
      paged.append(seq, l, k, v);
      ref.append(l, k, v);
    }
    n += chunk;
    expect_same<F>(paged, seq, ref, unsigned(n));
  }
  // At most one partly filled page, and bytes are pages times page bytes.
  EXPECT_EQ(Index(paged.block_table(seq).size()),
            detail::ceil_div(paged.view(seq, 0).size() - paged.view(seq, 0).tail_tokens, F::page));
  EXPECT_EQ(paged.stats().used_bytes, paged.stats().used * paged.pool().page_bytes());
}

TYPED_TEST(PagedFormats, PrefillEqualsTheContiguousPrefill) {
  using F = TypeParam;
  using T = compute_t<typename F::format::scalar_type>;
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  contiguous_of<F> ref(model, {}, F::make());
  const Index seq = paged.create();
  attention_workspace<T> ws;
  for (const Index chunk : {Index(11), Index(7), Index(1)}) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const Index n = paged.position(seq, l);
      const auto k = rows(l, chunk, unsigned(n) + 3), v = rows(l, chunk, unsigned(n) + 700);
      const row_matrix<T> q = random_matrix<T>(chunk, heads.q_width(), unsigned(n) + 9);
      row_matrix<T> a(chunk, heads.q_width()), b(chunk, heads.q_width());
      prefill_attention(heads, q, k.template cast<T>(), v.template cast<T>(), paged, seq, l, a, ws);
      prefill_attention(heads, q, k.template cast<T>(), v.template cast<T>(), ref, l, b, ws);
      EXPECT_LE((a - b).cwiseAbs().maxCoeff(), T(1e-6));
    }
  }
  expect_same<F>(paged, seq, ref, 77);
}

TYPED_TEST(PagedFormats, ForksShareAndCopyOnWrite) {
  using F = TypeParam;
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  contiguous_of<F> ref_a(model, {}, F::make());
  const Index a = paged.create();
  const Index n0 = F::page * 2 + F::page / 2 + 3;  // ends in a partly filled page
  for (Index l = 0; l < model.n_layers(); ++l) {
    paged.append(a, l, rows(l, n0, 1), rows(l, n0, 2));
    ref_a.append(l, rows(l, n0, 1), rows(l, n0, 2));
  }
  const Index used = paged.stats().used;
  const Index b = paged.fork(a);
  contiguous_of<F> ref_b = ref_a;
  EXPECT_EQ(paged.stats().used, used);  // a fork takes no page
  EXPECT_EQ(paged.block_table(a), paged.block_table(b));
  for (Index step = 0; step < 6; ++step) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      paged.append(a, l, rows(l, 1, 10 + unsigned(step)), rows(l, 1, 20 + unsigned(step)));
      ref_a.append(l, rows(l, 1, 10 + unsigned(step)), rows(l, 1, 20 + unsigned(step)));
      paged.append(b, l, rows(l, 1, 30 + unsigned(step)), rows(l, 1, 40 + unsigned(step)));
      ref_b.append(l, rows(l, 1, 30 + unsigned(step)), rows(l, 1, 40 + unsigned(step)));
    }
  }
  expect_same<F>(paged, a, ref_a, 5);
  expect_same<F>(paged, b, ref_b, 6);
  // The full pages before the fork point are still shared.
  const Index shared = std::min(n0 - (F::make().residual() + F::make().unit_tokens() - 1), n0) / F::page;
  for (Index i = 0; i < std::max<Index>(0, shared); ++i) {
    EXPECT_EQ(paged.block_table(a)[std::size_t(i)], paged.block_table(b)[std::size_t(i)]);
  }
  paged.free(a);
  expect_same<F>(paged, b, ref_b, 7);
  paged.free(b);
  EXPECT_EQ(paged.stats().used, 0);
}

TYPED_TEST(PagedFormats, CropIsExactOrRefused) {
  using F = TypeParam;
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  const Index seq = paged.create();
  const Index n = 5 * F::page + 2;
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, n, 1), rows(l, n, 2));
  const Index unit = F::make().unit_tokens();
  const Index keep = (n / 2) / unit * unit;  // a unit boundary
  paged.crop(seq, keep);
  contiguous_of<F> ref(model, {}, F::make());
  for (Index l = 0; l < model.n_layers(); ++l) {
    ref.append(l, rows(l, n, 1).topRows(keep), rows(l, n, 2).topRows(keep));
  }
  EXPECT_EQ(paged.position(seq), keep);
  EXPECT_EQ(Index(paged.block_table(seq).size()), detail::ceil_div(keep, F::page));
  for (Index l = 0; l < model.n_layers(); ++l) {
    paged.append(seq, l, rows(l, 3, 9), rows(l, 3, 10));
    ref.append(l, rows(l, 3, 9), rows(l, 3, 10));
  }
  // The quantized tail keeps fewer tokens exact after a crop than after straight appends, so
  // the two caches can differ in which tokens are quantized; compare shapes, and values for
  // plain formats.
  if constexpr (F::format::lossless) {
    expect_same<F>(paged, seq, ref, 3);
  }
  EXPECT_THROW(paged.crop(seq, paged.position(seq) + 1), std::out_of_range);
  EXPECT_THROW(paged.crop(seq, -1), std::out_of_range);
  paged.rollback(seq, paged.position(seq));
  EXPECT_EQ(paged.position(seq), 0);
  EXPECT_EQ(paged.stats().used, 0);
  // And it starts again from position 0 on fresh pages.
  contiguous_of<F> again(model, {}, F::make());
  for (Index l = 0; l < model.n_layers(); ++l) {
    paged.append(seq, l, rows(l, F::page + 1, 5), rows(l, F::page + 1, 6));
    again.append(l, rows(l, F::page + 1, 5), rows(l, F::page + 1, 6));
  }
  expect_same<F>(paged, seq, again, 4);
}

TEST(PagedCache, PagesOfASequenceLieInOrderWhenTheyCan) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 16});
  const Index a = paged.create(), b = paged.create();
  for (Index t = 0; t < 12; t += 4) {  // a and b grow in turn: their pages interleave
    paged.append(a, 0, rows(0, 4, 1), rows(0, 4, 2));
    paged.append(b, 0, rows(0, 4, 3), rows(0, 4, 4));
  }
  EXPECT_EQ(paged.block_table(a), (std::vector<Index>{0, 2, 4}));
  paged.free(a);
  paged.free(b);
  // Freed pages come back in order, and a sequence takes the page after its last when free.
  const Index c = paged.create();
  paged.append(c, 0, rows(0, 24, 1), rows(0, 24, 2));
  EXPECT_EQ(paged.block_table(c), (std::vector<Index>{1, 2, 3, 4, 5, 6}));
}

// ---- prefix caching ------------------------------------------------------------------------

TEST(PagedPrefix, ANewSequenceAdoptsTheCachedPagesOfItsPrompt) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 32});
  const auto prompt = token_ids(18, 1);  // 4 full pages and 2 tokens
  const Index a = paged.create(prompt.data(), Index(prompt.size()));
  EXPECT_EQ(paged.prefix_hit(a), 0);
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 18, 1), rows(l, 18, 2));
  EXPECT_EQ(paged.publish(a, prompt.data(), 18), 4);
  EXPECT_EQ(paged.publish(a, prompt.data(), 18), 0);  // published already
  EXPECT_EQ(paged.match_prefix(prompt.data(), 18), 16);
  EXPECT_EQ(paged.match_prefix(prompt.data(), 18, "another model"), 0);
  auto other = prompt;
  other[9] += 1;  // the third page differs
  EXPECT_EQ(paged.match_prefix(other.data(), 18), 8);

  const Index used = paged.stats().used;
  const Index b = paged.create(prompt.data(), 18);
  EXPECT_EQ(paged.prefix_hit(b), 16);
  EXPECT_EQ(paged.position(b), 16);
  EXPECT_EQ(paged.stats().used, used);  // adopted, not copied
  for (Index l = 0; l < model.n_layers(); ++l) {
    EXPECT_EQ(paged.keys(b, l), paged.keys(a, l).topRows(16));
    paged.append(b, l, rows(l, 18, 1).bottomRows(2), rows(l, 18, 2).bottomRows(2));
    EXPECT_EQ(paged.keys(b, l), paged.keys(a, l));
    EXPECT_EQ(paged.values(b, l), paged.values(a, l));
  }
  // A prompt that is exactly the cached pages leaves its last token to compute.
  const Index c = paged.create(prompt.data(), 16);
  EXPECT_EQ(paged.prefix_hit(c), 12);
}

TEST(PagedPrefix, UnreferencedPagesStayCachedUntilThePoolNeedsThem) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 6});
  const auto prompt = token_ids(17, 2);
  const Index a = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 17, 1), rows(l, 17, 2));
  paged.publish(a, prompt.data(), 17);
  paged.free(a);
  EXPECT_EQ(paged.stats().cached, 4);
  EXPECT_EQ(paged.stats().free, 2);
  EXPECT_EQ(paged.match_prefix(prompt.data(), 17), 16);
  // A sequence of 12 tokens takes the 2 free pages, then evicts the least recently used cached
  // one. A freed sequence gives its pages back newest first, so the prompt's last page goes
  // first (as in vLLM): the rest of the prefix still hits.
  const Index b = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(b, l, rows(l, 12, 3), rows(l, 12, 4));
  EXPECT_EQ(paged.stats().evictions, 1);
  EXPECT_EQ(paged.match_prefix(prompt.data(), 17), 12);
  EXPECT_EQ(paged.stats().cached, 3);
}

// ---- windows over pages --------------------------------------------------------------------

TEST(PagedWindow, GivesBackPagesOutOfTheWindowAndAttendsAsARingDoes) {
  using T = float;
  const Index window = 10, sinks = 3, P = 4;
  paged_kv_cache<plain_format<float>> paged(model, {P, 16, window, sinks});
  kv_cache<ring_layout, plain_format<float>> ring(model, {window, sinks, 0});
  const Index seq = paged.create();
  for (Index t = 0; t < 60; ++t) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const auto k = rows(l, 1, 100 + unsigned(t)), v = rows(l, 1, 300 + unsigned(t));
      paged.append(seq, l, k, v);
      ring.append(l, k, v);
      const row_vector<T> q = random_matrix<T>(1, heads.q_width(), unsigned(t));
      row_vector<T> a(heads.q_width()), b(heads.q_width());
      decode_attention(heads, q, paged.view(seq, l), a);
      decode_attention(heads, q, ring.view(l), b);
      ASSERT_LE((a - b).cwiseAbs().maxCoeff(), 1e-6) << "token " << t << " layer " << l;
    }
    // The sink page, the window's pages, and one partly filled: never more.
    EXPECT_LE(Index(paged.block_table(seq).size()), 1 + detail::ceil_div(window, P) + 1);
  }
  EXPECT_EQ(paged.block_table(seq).size() + std::size_t(paged.stats().free), 16u);
  EXPECT_THROW(paged.crop(seq, 40), std::out_of_range);  // those tokens are gone
  paged.rollback(seq, 2);
  EXPECT_EQ(paged.position(seq), 58);
}

// ---- batched attention -----------------------------------------------------------------------

class PagedBatch : public ::testing::TestWithParam<Index> {};  // threads

TEST_P(PagedBatch, EqualsOneSequenceAtATimeOnContiguousCaches) {
  using T = float;
  thread_pool pool(GetParam());
  attention_options opt;
  opt.pool = GetParam() > 1 ? &pool : nullptr;
  paged_kv_cache<plain_format<float>> paged(model, {16, 256});
  const std::vector<Index> lengths = {1, 17, 300, 64, 5, 1000};
  std::vector<Index> seqs;
  std::vector<kv_cache<contiguous_layout, plain_format<float>>> refs;
  // Pages of different sequences interleave: append a token at a time, round robin.
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    seqs.push_back(paged.create());
    refs.emplace_back(model);
  }
  const Index longest = *std::max_element(lengths.begin(), lengths.end());
  for (Index t = 0; t < longest; t += 50) {
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      const Index n = std::min<Index>(50, lengths[s] - t);
      if (n <= 0) continue;
      for (Index l = 0; l < model.n_layers(); ++l) {
        const auto k = rows(l, n, unsigned(s * 1000 + t)), v = rows(l, n, unsigned(s * 1000 + t + 7));
        paged.append(seqs[s], l, k, v);
        refs[s].append(l, k, v);
      }
    }
  }
  const Index B = Index(seqs.size());
  paged_batch<plain_format<float>> batch;
  attention_workspace<T> ws, ws1;
  for (Index l = 0; l < model.n_layers(); ++l) {
    paged.batch(seqs, l, batch);
    ASSERT_EQ(batch.size(), B);
    EXPECT_EQ(batch.indptr.back(), Index(batch.indices.size()));
    // Batched decode.
    const row_matrix<T> q = random_matrix<T>(B, heads.q_width(), 11 + unsigned(l));
    row_matrix<T> out(B, heads.q_width());
    batch_decode_attention(heads, q, batch, out, ws, opt);
    for (Index b = 0; b < B; ++b) {
      row_vector<T> expect(heads.q_width());
      decode_attention(heads, q.row(b), refs[std::size_t(b)].view(l), expect, ws1);
      EXPECT_LE((out.row(b) - expect).cwiseAbs().maxCoeff(), 1e-6) << "sequence " << b;
    }
    // A mixed batch: sequences 1 and 3 attend a chunk of their newest tokens, the others one.
    const std::vector<Index> qo = {0, 1, 18, 19, 59, 60, 61};
    const row_matrix<T> qm = random_matrix<T>(qo.back(), heads.q_width(), 21 + unsigned(l));
    row_matrix<T> om(qo.back(), heads.q_width());
    batch_attention(heads, qm, qo, batch, om, ws, opt);
    for (Index b = 0; b < B; ++b) {
      const Index r0 = qo[std::size_t(b)], m = qo[std::size_t(b) + 1] - r0;
      const auto& ref = refs[std::size_t(b)];
      row_matrix<T> expect(m, heads.q_width());
      causal_attention(heads, qm.middleRows(r0, m), ref.view(l), ref.position(l) - m, expect, ws1);
      EXPECT_LE((om.middleRows(r0, m) - expect).cwiseAbs().maxCoeff(), 1e-6) << "sequence " << b;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, PagedBatch, ::testing::Values(Index(1), Index(3)));

// Quantized pages of a head_dim and group the register kernels take (64 and 16), gathered into
// tiles of several pages, each page asking ahead for the next: batched decode and a mixed
// batch of one or two query rows a sequence (the causal mask within the gathered pages) equal
// the plain reference over each sequence's dequantized keys and values.
template <int Bits>
void expect_quantized_batch_equals_reference(Index threads) {
  using T = float;
  using format = quantized_format<Bits>;
  const cache_shape shape(1, 8, 2, 64);
  const attention_shape gqa = shape.heads();
  thread_pool pool(threads);
  attention_options opt;
  opt.pool = threads > 1 ? &pool : nullptr;
  paged_kv_cache<format> paged(shape, {16, 512}, format(16));
  const std::vector<Index> lengths = {1, 17, 300, 64, 5, 1000};  // 64: pages only, no tail
  std::vector<Index> seqs;
  for (std::size_t s = 0; s < lengths.size(); ++s) seqs.push_back(paged.create());
  // Round robin, 16 tokens (a page) at a time: every sequence's pages lie between others'.
  const Index longest = *std::max_element(lengths.begin(), lengths.end());
  for (Index t = 0; t < longest; t += 16) {
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      const Index n = std::min<Index>(16, lengths[s] - t);
      if (n <= 0) continue;
      const unsigned seed = unsigned(s * 5000 + t);
      paged.append(seqs[s], 0, random_matrix<float>(n, shape.kv_width(), seed + 1),
                   random_matrix<float>(n, shape.kv_width(), seed + 2));
    }
  }
  const Index B = Index(seqs.size());
  paged_batch<format> batch;
  paged.batch(seqs, 0, batch);
  attention_workspace<T> ws;
  const auto reference = [&](Index b, const row_matrix<T>& q) {
    const Index seq = seqs[std::size_t(b)];
    return reference_attention<double>(gqa, q.cast<double>(),
                                       paged.keys(seq, 0).template cast<double>(),
                                       paged.values(seq, 0).template cast<double>());
  };
  const row_matrix<T> q = random_matrix<T>(B, gqa.q_width(), 31);
  row_matrix<T> out(B, gqa.q_width());
  batch_decode_attention(gqa, q, batch, out, ws, opt);
  for (Index b = 0; b < B; ++b) {
    const row_matrix<T> qb = q.row(b);
    EXPECT_LE((out.row(b).template cast<double>() - reference(b, qb)).cwiseAbs().maxCoeff(), 2e-5)
        << "int" << Bits << ", sequence " << b;
  }
  const std::vector<Index> qo = {0, 1, 3, 5, 7, 8, 10};
  const row_matrix<T> qm = random_matrix<T>(qo.back(), gqa.q_width(), 41);
  row_matrix<T> om(qo.back(), gqa.q_width());
  batch_attention(gqa, qm, qo, batch, om, ws, opt);
  for (Index b = 0; b < B; ++b) {
    const Index r0 = qo[std::size_t(b)], m = qo[std::size_t(b) + 1] - r0;
    const row_matrix<T> qb = qm.middleRows(r0, m);
    const row_matrix<double> got = om.middleRows(r0, m).template cast<double>();
    EXPECT_LE((got - reference(b, qb)).cwiseAbs().maxCoeff(), 2e-5)
        << "int" << Bits << ", sequence " << b;
  }
}

TEST_P(PagedBatch, QuantizedPagesEqualTheReference) {
  expect_quantized_batch_equals_reference<8>(GetParam());
  expect_quantized_batch_equals_reference<4>(GetParam());
}

TEST(PagedBatchErrors, RefusesWhatDoesNotFit) {
  using T = float;
  paged_kv_cache<plain_format<float>> paged(model, {4, 8});
  const Index a = paged.create(), empty = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 3, 1), rows(l, 3, 2));
  paged_batch<plain_format<float>> batch;
  EXPECT_THROW(paged.batch({a, 99}, 0, batch), std::out_of_range);
  EXPECT_EQ(batch.size(), 0);
  EXPECT_THROW(paged.batch({a}, 2, batch), std::out_of_range);
  paged.batch({a, empty}, 0, batch);
  attention_workspace<T> ws;
  row_matrix<T> q = random_matrix<T>(2, heads.q_width(), 1), out(2, heads.q_width());
  EXPECT_THROW(batch_decode_attention(heads, q, batch, out, ws), std::invalid_argument);
  const std::vector<Index> qo = {0, 2, 2};
  batch_attention(heads, q, qo, batch, out, ws);  // the empty sequence has no query: fine
  EXPECT_THROW(batch_attention(heads, q, std::vector<Index>{0, 1}, batch, out, ws),
               std::invalid_argument);
  EXPECT_THROW(batch_attention(heads, q, std::vector<Index>{0, 2, 1}, batch, out, ws),
               std::invalid_argument);
  row_matrix<T> q4 = random_matrix<T>(4, heads.q_width(), 1), o4(4, heads.q_width());
  EXPECT_THROW(batch_attention(heads, q4, std::vector<Index>{0, 4, 4}, batch, o4, ws),
               std::out_of_range);  // 4 queries, 3 positions
}

// ---- running out of pages ------------------------------------------------------------------

// Everything observable of a sequence and the pool.
template <class Cache>
std::vector<Index> snapshot(const Cache& c, const std::vector<Index>& seqs) {
  std::vector<Index> s = {c.stats().used, c.stats().free, c.stats().cached, c.n_sequences()};
  for (const Index q : seqs) {
    for (Index l = 0; l < c.n_layers(); ++l) s.push_back(c.position(q, l));
    for (const Index p : c.block_table(q)) s.push_back(p);
  }
  return s;
}

TEST(PagedExhaustion, EveryOperationThatNeedsPagesRefusesAndChangesNothing) {
  using T = float;
  paged_kv_cache<plain_format<float>> paged(model, {4, 3});
  const Index a = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 10, 1), rows(l, 10, 2));
  EXPECT_EQ(paged.stats().free, 0);  // 3 pages, the last half full
  const Index b = paged.fork(a);     // forks take no page
  const auto before = snapshot(paged, {a, b});
  const auto keys_a = paged.keys(a, 0);

  // An append that crosses into a new page.
  EXPECT_THROW(paged.append(a, 0, rows(0, 3, 5), rows(0, 3, 6)), std::length_error);
  EXPECT_EQ(snapshot(paged, {a, b}), before);
  // An append into the shared, partly filled page: copy-on-write needs a page.
  EXPECT_EQ(paged.pages_needed(a, 1), 1);
  EXPECT_THROW(paged.append(a, 0, rows(0, 1, 5), rows(0, 1, 6)), std::length_error);
  EXPECT_EQ(snapshot(paged, {a, b}), before);
  // A prefill.
  attention_workspace<T> ws;
  const row_matrix<T> q = random_matrix<T>(5, heads.q_width(), 3);
  row_matrix<T> out(5, heads.q_width());
  EXPECT_THROW(prefill_attention(heads, q, rows(0, 5, 7), rows(0, 5, 8), paged, b, 0, out, ws),
               std::length_error);
  EXPECT_EQ(snapshot(paged, {a, b}), before);
  EXPECT_EQ(paged.keys(a, 0), keys_a);
  // Preempting b frees nothing (a holds the pages) until b is freed and a crops.
  paged.free(b);
  paged.append(a, 0, rows(0, 1, 5), rows(0, 1, 6));  // a alone holds its last page now
  paged.crop(a, 4);
  paged.append(a, 0, rows(0, 3, 5), rows(0, 3, 6));
  EXPECT_EQ(paged.position(a, 0), 7);
}

TEST(PagedExhaustion, AdoptionTakesNoPageAndCachedPagesAreAvailable) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 4});
  const auto prompt = token_ids(9, 4);
  const Index a = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 9, 1), rows(l, 9, 2));
  paged.publish(a, prompt.data(), 9);
  const Index b = paged.create(prompt.data(), 9);
  EXPECT_EQ(paged.prefix_hit(b), 8);
  EXPECT_EQ(paged.stats().used, 3);
  paged.free(a);
  paged.free(b);
  EXPECT_EQ(paged.pool().available(), 4);
}

TEST(PagedCache, RefusesAWindowShorterThanAPageOrTheTail) {
  EXPECT_THROW((paged_kv_cache<plain_format<float>>(model, {16, 8, 8, 0})), std::invalid_argument);
  EXPECT_THROW((paged_kv_cache<quantized_format<8>>(model, {4, 8, 6, 0}, quantized_format<8>(4, 3))),
               std::invalid_argument);
  EXPECT_THROW((paged_kv_cache<plain_format<float>>(model, {16, 8, 32, 32})), std::invalid_argument);
  EXPECT_NO_THROW((paged_kv_cache<plain_format<float>>(model, {16, 8, 16, 4})));
}

TEST(PagedCache, MovedFromHoldsNothing) {
  paged_kv_cache<plain_format<float>> a(model, {4, 4});
  const Index s = a.create();
  a.append(s, 0, rows(0, 5, 1), rows(0, 5, 2));
  paged_kv_cache<plain_format<float>> b(std::move(a));
  EXPECT_EQ(b.position(s, 0), 5);
  EXPECT_EQ(a.n_sequences(), 0);  // NOLINT(bugprone-use-after-move): defined, and tested
  EXPECT_FALSE(a.contains(s));
  EXPECT_EQ(a.stats().total, 0);
  const Index t = a.create();  // needs no page
  EXPECT_THROW(a.append(t, 0, rows(0, 1, 1), rows(0, 1, 2)), std::length_error);
}

}  // namespace
