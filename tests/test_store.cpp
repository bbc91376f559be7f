// SPDX-License-Identifier: Apache-2.0
// Prefix pages beyond the pool: the host-memory and disk tiers, the page values' checks, and a
// paged cache over its tiers (evicted pages offloaded, published pages written through, lookups
// that restore pages bit for bit or, on any fault, leave them to be recomputed).
#include "common.hpp"

#include <kvcache/store/disk_store.hpp>
#include <kvcache/store/page_blob.hpp>
#include <kvcache/store/tiered.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;
namespace fs = std::filesystem;

const cache_shape model(2, 4, 2, 16);  // 2 layers, GQA 4/2, head_dim 16

// What a model would compute for token `t` at position `p` of layer l: the same for every
// sequence that holds the same tokens before it, as a real decoder's keys and values are.
row_matrix<float> kv_rows(Index l, const std::vector<std::int32_t>& tokens, Index from, Index to,
                          int which) {
  row_matrix<float> m(to - from, model.kv_width());
  for (Index i = from; i < to; ++i) {
    for (Index c = 0; c < model.kv_width(); ++c) {
      m(i - from, c) = float(std::sin(0.37 * tokens[std::size_t(i)] + 0.11 * double(i) +
                                      0.7 * double(l) + 0.013 * double(c) + which));
    }
  }
  return m;
}

// Prefills tokens[from..to) of `seq` in every layer.
template <class Cache>
void prefill(Cache& cache, Index seq, const std::vector<std::int32_t>& tokens, Index from, Index to) {
  if (to <= from) return;
  for (Index l = 0; l < cache.n_layers(); ++l) {
    cache.append(seq, l, kv_rows(l, tokens, from, to, 0), kv_rows(l, tokens, from, to, 1));
  }
}

// A prompt of n tokens: `seed` picks them.
std::vector<std::int32_t> prompt(Index n, int seed) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) t[std::size_t(i)] = std::int32_t((i * 7 + seed * 13) % 97);
  return t;
}

// A fresh directory under the test's temporary one, removed at the end.
struct temp_dir {
  fs::path path;
  explicit temp_dir(const std::string& name)
      : path(fs::temp_directory_path() /
             ("kvcache_store_" + name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

struct f32_p8 { using format = plain_format<float>; static format make() { return {}; } };
struct bf16_p8 { using format = plain_format<Eigen::bfloat16>; static format make() { return {}; } };
struct int8_g4_p8 { using format = quantized_format<8>; static format make() { return format(4, 0); } };
struct int4_g8_r2_p8 { using format = quantized_format<4>; static format make() { return format(8, 2); } };

template <class F>
class Tiered : public ::testing::Test {
 public:
  using format = typename F::format;
  using cache_type = paged_kv_cache<format>;
  static constexpr Index page = 8;

  static cache_type make(Index pages) { return cache_type(model, paged_layout{page, pages}, F::make()); }

  // A sequence that computed every token of `tokens` itself, as the reference.
  static void expect_computed(const cache_type& c, Index seq, const std::vector<std::int32_t>& tokens) {
    cache_type ref = make(64);
    const Index r = ref.create();
    prefill(ref, r, tokens, 0, Index(tokens.size()));
    for (Index l = 0; l < model.n_layers(); ++l) {
      ASSERT_EQ(c.position(seq, l), ref.position(r, l));
      EXPECT_EQ(c.keys(seq, l), ref.keys(r, l)) << "layer " << l;
      EXPECT_EQ(c.values(seq, l), ref.values(r, l)) << "layer " << l;
    }
  }
};
using formats = ::testing::Types<f32_p8, bf16_p8, int8_g4_p8, int4_g8_r2_p8>;
struct format_name {
  template <class F>
  static std::string GetName(int) {
    return F::make().name();
  }
};
TYPED_TEST_SUITE(Tiered, formats, format_name);

// One process publishes a prompt through a tier; a second, with a pool of its own, restores
// the prompt's full pages from the tier, prefills only the rest, and holds exactly what
// computing every token gives.
TYPED_TEST(Tiered, ASecondCacheRestoresPublishedPagesBitForBit) {
  memory_store tier(1 << 24);
  const auto tokens = prompt(45, 1);  // 5 full pages + 5 tokens
  {
    auto first = TestFixture::make(16);
    tiered_prefix_cache<typename TestFixture::format> tiers(first, {&tier});
    const Index s = tiers.create(tokens.data(), Index(tokens.size()), "m");
    EXPECT_EQ(first.prefix_hit(s), 0);
    prefill(first, s, tokens, 0, Index(tokens.size()));
    EXPECT_EQ(tiers.publish(s, tokens.data(), Index(tokens.size()), "m"), 5);
    EXPECT_EQ(tiers.stats().offloaded_pages, 5);
    EXPECT_EQ(tier.size(), 5);
  }
  auto second = TestFixture::make(16);
  tiered_prefix_cache<typename TestFixture::format> tiers(second, {&tier});
  const Index s = tiers.create(tokens.data(), Index(tokens.size()), "m");
  EXPECT_EQ(second.prefix_hit(s), 40);
  EXPECT_EQ(tiers.stats().restored_pages, 5);
  EXPECT_EQ(tiers.stats().restored_tokens, 40);
  EXPECT_EQ(tiers.stats().rejected, 0);
  EXPECT_GT(tiers.stats().restored_bytes, 5 * second.page_bytes());
  prefill(second, s, tokens, 40, Index(tokens.size()));
  TestFixture::expect_computed(second, s, tokens);
  // A third prompt sharing the first 3 pages finds them in the pool now, not the tier.
  auto other = tokens;
  other[30] += 1;
  const Index t = tiers.create(other.data(), Index(other.size()), "m");
  EXPECT_EQ(second.prefix_hit(t), 24);
  EXPECT_EQ(tiers.stats().restored_pages, 5);
}

// Pages the pool evicts go to the first tier (write-through off), and come back from it.
TYPED_TEST(Tiered, EvictedPagesAreOffloadedAndComeBack) {
  memory_store tier(1 << 24);
  auto cache = TestFixture::make(6);
  tiered_prefix_cache<typename TestFixture::format> tiers(cache, {&tier}, /*write_through=*/false);
  const auto a = prompt(33, 2);  // 4 full pages (fewer stored in pages with a residual)
  Index s = tiers.create(a.data(), Index(a.size()), "m");
  prefill(cache, s, a, 0, Index(a.size()));
  const Index published = tiers.publish(s, a.data(), Index(a.size()), "m");
  ASSERT_GE(published, 3);
  EXPECT_EQ(tier.size(), 0);
  cache.free(s);  // its published pages cached, the others free
  const auto b = prompt(64, 3);  // prefilled until the pool took back every cached page
  s = tiers.create(b.data(), Index(b.size()), "m");
  Index n = 0;
  while (cache.stats().evictions < published && n < 64) {
    prefill(cache, s, b, n, n + 1);
    ++n;
  }
  EXPECT_EQ(cache.stats().evictions, published);
  EXPECT_EQ(tier.size(), published);
  EXPECT_EQ(tiers.stats().offloaded_pages, published);
  cache.free(s);
  s = tiers.create(a.data(), Index(a.size()), "m");
  EXPECT_EQ(cache.prefix_hit(s), published * 8);
  EXPECT_EQ(tiers.stats().restored_pages, published);
  prefill(cache, s, a, cache.prefix_hit(s), Index(a.size()));
  TestFixture::expect_computed(cache, s, a);
}

// A damaged value is refused, dropped and counted; the pages from it on are recomputed.
TYPED_TEST(Tiered, ADamagedValueIsRefusedAndRecomputed) {
  memory_store tier(1 << 24);
  const auto tokens = prompt(40, 4);
  auto first = TestFixture::make(16);
  tiered_prefix_cache<typename TestFixture::format> put(first, {&tier});
  Index s = put.create(tokens.data(), Index(tokens.size()), "m");
  prefill(first, s, tokens, 0, Index(tokens.size()));
  put.publish(s, tokens.data(), Index(tokens.size()), "m");
  // Damage page 2's value: one byte of its contents, inside a checksummed section.
  const std::string key2 = put.key(first.page_hashes(s)[2]);
  std::string v = *tier.get(key2);
  v[v.size() - 40] = char(v[v.size() - 40] ^ 0x5a);
  tier.reject(key2);
  tier.put(key2, v);
  auto second = TestFixture::make(16);
  tiered_prefix_cache<typename TestFixture::format> tiers(second, {&tier});
  s = tiers.create(tokens.data(), Index(tokens.size()), "m");
  EXPECT_EQ(second.prefix_hit(s), 16);
  EXPECT_EQ(tiers.stats().rejected, 1);
  EXPECT_NE(tiers.stats().last_rejection.find("checksum"), std::string::npos)
      << tiers.stats().last_rejection;
  EXPECT_FALSE(tier.contains(key2));
  prefill(second, s, tokens, 16, Index(tokens.size()));
  TestFixture::expect_computed(second, s, tokens);
}

TEST(Tiered, TruncatedForeignAndMisplacedValuesAreRefused) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  memory_store tier(1 << 24);
  const auto tokens = prompt(24, 5);
  cache_type a(model, paged_layout{8, 8});
  tiered_prefix_cache<plain_format<float>> ta(a, {&tier});
  Index s = ta.create(tokens.data(), 24, "model A");
  prefill(a, s, tokens, 0, 24);
  ta.publish(s, tokens.data(), 24, "model A");
  const auto& ha = a.page_hashes(s);
  ASSERT_EQ(ha.size(), 3u);
  const std::string v0 = *tier.get(ta.key(ha[0]));

  // Model B's key holding model A's value (another model's chain): refused.
  cache_type b(model, paged_layout{8, 8});
  tiered_prefix_cache<plain_format<float>> tb(b, {&tier});
  const page_hash hb0 = chain_hash(prefix_root("model B"), tokens.data(), 8);
  tier.put(tb.key(hb0), v0);
  s = tb.create(tokens.data(), 24, "model B");
  EXPECT_EQ(b.prefix_hit(s), 0);
  EXPECT_EQ(tb.stats().rejected, 1);
  EXPECT_NE(tb.stats().last_rejection.find("parent"), std::string::npos) << tb.stats().last_rejection;
  b.free(s);

  // Truncated: refused.
  tier.put(tb.key(hb0), std::string_view(v0).substr(0, v0.size() / 2));
  s = tb.create(tokens.data(), 24, "model B");
  EXPECT_EQ(b.prefix_hit(s), 0);
  EXPECT_EQ(tb.stats().rejected, 2);
  b.free(s);

  // A bf16 cache finding an f32 value under its key: refused on the format.
  paged_kv_cache<plain_format<Eigen::bfloat16>> c(model, paged_layout{8, 8});
  tiered_prefix_cache<plain_format<Eigen::bfloat16>> tc(c, {&tier});
  tier.put(tc.key(ha[0]), v0);
  s = tc.create(tokens.data(), 24, "model A");
  EXPECT_EQ(c.prefix_hit(s), 0);
  EXPECT_EQ(tc.stats().rejected, 1);
  EXPECT_NE(tc.stats().last_rejection.find("format"), std::string::npos) << tc.stats().last_rejection;
  EXPECT_NE(page_layout_fingerprint(a), page_layout_fingerprint(c));

  // Page 1's value under page 0's key: other tokens, refused.
  cache_type d(model, paged_layout{8, 8});
  tiered_prefix_cache<plain_format<float>> td(d, {&tier});
  tier.reject(ta.key(ha[0]));
  tier.put(ta.key(ha[0]), *tier.get(ta.key(ha[1])));
  s = td.create(tokens.data(), 24, "model A");
  EXPECT_EQ(d.prefix_hit(s), 0);
  EXPECT_EQ(td.stats().rejected, 1);
}

// Every byte of a value is covered: a change anywhere, or a cut at any length, is refused by
// decode_page, never imported.
TEST(Tiered, AnyChangedByteOrCutIsRefused) {
  using cache_type = paged_kv_cache<quantized_format<4>>;
  cache_type a(model, paged_layout{8, 4}, quantized_format<4>(4, 0));
  const auto tokens = prompt(8, 13);
  const Index s = a.create();
  prefill(a, s, tokens, 0, 8);
  a.publish(s, tokens.data(), 8, "m");
  const Index page = a.block_table(s)[0];
  const std::string v = encode_page(a, page);
  const page_hash root = prefix_root("m");
  EXPECT_NO_THROW(decode_page(a, v, root, tokens.data()));
  Index refused = 0, tried = 0;
  for (std::size_t i = 0; i < v.size(); i += 7) {
    std::string bad = v;
    bad[i] = char(bad[i] ^ (1 << (i % 8)));
    ++tried;
    try {
      decode_page(a, bad, root, tokens.data());
    } catch (const io::format_error&) {
      ++refused;
    }
  }
  for (std::size_t n = 0; n < v.size(); n += 13) {
    ++tried;
    try {
      decode_page(a, std::string_view(v).substr(0, n), root, tokens.data());
    } catch (const io::format_error&) {
      ++refused;
    }
  }
  EXPECT_EQ(refused, tried);
  std::string longer = v + "x";
  EXPECT_THROW(decode_page(a, longer, root, tokens.data()), io::format_error);
}

// Tiers are asked in order: the run goes on in the next tier from the first miss.
TEST(Tiered, TheRunContinuesInTheNextTier) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  memory_store fast(1 << 24), slow(1 << 24);
  const auto tokens = prompt(41, 6);  // 5 pages
  cache_type a(model, paged_layout{8, 16});
  {
    Index s = -1;
    {
      tiered_prefix_cache<plain_format<float>> t(a, {&slow});
      s = t.create(tokens.data(), 41, "m");
      prefill(a, s, tokens, 0, 41);
      t.publish(s, tokens.data(), 41, "m");
    }
    // The fast tier holds the first two pages only.
    tiered_prefix_cache<plain_format<float>> f(a, {&fast});
    f.offload({a.block_table(s)[0], a.block_table(s)[1]});
  }
  EXPECT_EQ(fast.size(), 2);
  cache_type b(model, paged_layout{8, 16});
  tiered_prefix_cache<plain_format<float>> t(b, {&fast, &slow});
  const Index s = t.create(tokens.data(), 41, "m");
  EXPECT_EQ(b.prefix_hit(s), 40);
  EXPECT_EQ(fast.counters().hits, 2);
  EXPECT_EQ(slow.counters().hits, 3);
}

// Restoring stops when the pool has no page left for it, and never evicts the prompt's own.
TEST(Tiered, RestoringStopsWhenThePoolIsFull) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  memory_store tier(1 << 24);
  const auto tokens = prompt(49, 7);  // 6 pages
  {
    cache_type a(model, paged_layout{8, 8});
    tiered_prefix_cache<plain_format<float>> t(a, {&tier});
    const Index s = t.create(tokens.data(), 49, "m");
    prefill(a, s, tokens, 0, 49);
    t.publish(s, tokens.data(), 49, "m");
  }
  cache_type b(model, paged_layout{8, 6});
  tiered_prefix_cache<plain_format<float>> t(b, {&tier});
  const Index busy = b.create();
  prefill(b, busy, prompt(16, 8), 0, 16);  // 2 pages in use, 4 left
  const Index s = t.create(tokens.data(), 49, "m");
  EXPECT_EQ(b.prefix_hit(s), 32);
  EXPECT_EQ(t.stats().restored_pages, 4);
  EXPECT_EQ(b.stats().free, 0);
}

// A tier that fails in every way it may (errors, bad_alloc in the eviction handler) answers as
// a miss, and the cache goes on.
class failing_store final : public page_store {
 public:
  std::string name() const override { return "failing"; }
  void put_many(const std::vector<std::string>&, const std::vector<std::string_view>&) override {
    ++c_.errors;
  }
  void get_many(const std::vector<std::string>& keys,
                std::vector<std::optional<std::string>>& out) override {
    out.assign(keys.size(), std::nullopt);
    ++c_.errors;
  }
  void contains_many(const std::vector<std::string>&, std::vector<bool>&) override {
    throw std::bad_alloc();
  }
  void reject(const std::string&) override {}
  store_counters counters() const override { return c_; }
  store_counters c_;
};

TEST(Tiered, AFailingTierIsAMissAndEvictionGoesOn) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  failing_store bad;
  cache_type c(model, paged_layout{8, 4});
  tiered_prefix_cache<plain_format<float>> t(c, {&bad}, /*write_through=*/false);
  const auto a = prompt(33, 9);
  Index s = t.create(a.data(), 33, "m");
  prefill(c, s, a, 0, 32);
  t.publish(s, a.data(), 32, "m");
  c.free(s);
  const auto b = prompt(32, 10);
  s = t.create(b.data(), 32, "m");
  prefill(c, s, b, 0, 32);  // evicts a's 4 pages; the handler's offload fails each time
  EXPECT_EQ(c.stats().evictions, 4);
  EXPECT_EQ(t.stats().errors, 4);
  EXPECT_EQ(t.stats().offloaded_pages, 0);
  Tiered<f32_p8>::expect_computed(c, s, b);
  c.free(s);
  s = t.create(a.data(), 33, "m");
  EXPECT_EQ(c.prefix_hit(s), 0);
  EXPECT_GT(bad.counters().errors, 0);
}

// A tier that fails while publish writes through (here bad_alloc from contains_many) costs the
// write, counted, not the publish: the pages are published and publish returns normally.
TEST(Tiered, AFailingWriteThroughLeavesThePublishDone) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  failing_store bad;
  cache_type c(model, paged_layout{8, 8});
  tiered_prefix_cache<plain_format<float>> t(c, {&bad});
  const auto a = prompt(33, 14);
  const Index s = t.create(a.data(), 33, "m");
  prefill(c, s, a, 0, 33);
  Index published = -1;
  EXPECT_NO_THROW(published = t.publish(s, a.data(), 33, "m"));
  EXPECT_EQ(published, 4);
  EXPECT_EQ(c.pool().n_published(), 4);
  EXPECT_EQ(t.stats().errors, 1);
  EXPECT_EQ(t.stats().offloaded_pages, 0);
}

// An eviction handler that throws: the cache evicts the page anyway (the handler's work lost)
// and the append that needed it goes on; it never ends the process from inside a step that
// cannot be undone.
TEST(Tiered, AThrowingEvictionHandlerDoesNotStopTheCache) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  cache_type c(model, paged_layout{8, 2});
  Index calls = 0;
  c.set_eviction_handler([&](Index) {
    ++calls;
    throw std::runtime_error("offload failed");
  });
  const auto a = prompt(8, 15);
  Index s = c.create();
  prefill(c, s, a, 0, 8);
  c.publish(s, a.data(), 8, "m");
  c.free(s);
  const auto b = prompt(16, 16);
  s = c.create();
  prefill(c, s, b, 0, 16);  // the second page evicts a's cached page
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(c.stats().evictions, 1);
  EXPECT_EQ(c.match_prefix(a.data(), 8, "m"), 0);
  Tiered<f32_p8>::expect_computed(c, s, b);
}

// A cache moved away from under its tiers does not take their eviction handler along: the
// handler is bound to the object it was set on (here the moved-from cache), and the tiers,
// destroyed first, must not leave it behind in the cache moved to.
TEST(Tiered, AMovedCacheDoesNotTakeTheHandlerAlong) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  memory_store tier(1 << 20);
  cache_type a(model, paged_layout{8, 2});
  std::optional<cache_type> b;
  {
    tiered_prefix_cache<plain_format<float>> t(a, {&tier}, /*write_through=*/false);
    b.emplace(std::move(a));
    const auto p = prompt(8, 17);
    Index s = b->create();
    prefill(*b, s, p, 0, 8);
    b->publish(s, p.data(), 8, "m");
    b->free(s);
    s = b->create();
    prefill(*b, s, prompt(16, 18), 0, 16);  // evicts p's page
    EXPECT_EQ(b->stats().evictions, 1);
    EXPECT_EQ(t.stats().errors, 0);
    EXPECT_EQ(tier.size(), 0);
    b->free(s);
  }
  const auto q = prompt(8, 19);
  Index s = b->create();
  prefill(*b, s, q, 0, 8);
  b->publish(s, q.data(), 8, "m");
  b->free(s);
  s = b->create();
  prefill(*b, s, prompt(16, 20), 0, 16);  // evicts q's page: no handler of a dead object runs
  EXPECT_EQ(b->stats().evictions, 2);
}

// offload() of a page that is not published is refused before the tier is asked.
TEST(Tiered, OffloadRefusesAPageThatIsNotPublished) {
  memory_store tier(1 << 20);
  paged_kv_cache<plain_format<float>> c(model, paged_layout{8, 4});
  tiered_prefix_cache<plain_format<float>> t(c, {&tier});
  const auto a = prompt(16, 25);
  const Index s = c.create();
  prefill(c, s, a, 0, 16);
  c.publish(s, a.data(), 8, "m");  // page 0 published, page 1 not
  const auto& table = c.block_table(s);
  EXPECT_THROW(t.offload({table[0], table[1]}), std::out_of_range);
  EXPECT_THROW(t.offload({table[0], 99}), std::out_of_range);
  EXPECT_EQ(tier.size(), 0);
  EXPECT_EQ(t.offload({table[0]}), 1);
  EXPECT_EQ(t.offload({table[0]}), 0);  // held already
}

// One tiered_prefix_cache with tiers over a cache at a time: a second would take the first's
// eviction handler and, when destroyed, leave the cache with none.
TEST(Tiered, ASecondTieredCacheOverTheSameCacheIsRefused) {
  using cache_type = paged_kv_cache<plain_format<float>>;
  memory_store one(1 << 20), two(1 << 20);
  cache_type c(model, paged_layout{8, 2});
  tiered_prefix_cache<plain_format<float>> t(c, {&one}, /*write_through=*/false);
  EXPECT_THROW(tiered_prefix_cache<plain_format<float>>(c, {&two}), std::invalid_argument);
  EXPECT_NO_THROW(tiered_prefix_cache<plain_format<float>>(c, {}));  // no tiers: no handler
  const auto a = prompt(8, 26);
  Index s = c.create();
  prefill(c, s, a, 0, 8);
  c.publish(s, a.data(), 8, "m");
  c.free(s);
  s = c.create();
  prefill(c, s, prompt(16, 27), 0, 16);  // evicts a's page: still offloaded by t
  EXPECT_EQ(one.size(), 1);
  EXPECT_EQ(two.size(), 0);
}

TEST(Tiered, ImportPageChecksItsHashAndChangesNothingWhenRefused) {
  paged_kv_cache<plain_format<float>> c(model, paged_layout{8, 4});
  const auto t = prompt(8, 11);
  const page_hash root = prefix_root("m");
  const page_hash h = chain_hash(root, t.data(), 8);
  const auto fill = [](Index, void* data, std::size_t bytes) { std::memset(data, 0, bytes); };
  EXPECT_THROW(c.import_page(root, root, t.data(), fill), std::invalid_argument);
  EXPECT_THROW(c.import_page(h, root, nullptr, fill), std::invalid_argument);
  EXPECT_EQ(c.stats().free, 4);
  const Index p = c.import_page(h, root, t.data(), fill);
  ASSERT_GE(p, 0);
  EXPECT_EQ(c.stats().cached, 1);
  EXPECT_EQ(c.import_page(h, root, t.data(), fill), -1);  // there already: nothing taken
  const page_hash h2 = chain_hash(h, t.data(), 8);
  EXPECT_THROW(c.import_page(h2, h, t.data(), [](Index, void*, std::size_t) { throw std::runtime_error("x"); }),
               std::runtime_error);
  EXPECT_EQ(c.stats().free, 3);  // the failed import's page went back
  EXPECT_EQ(c.stats().cached, 1);
  EXPECT_EQ(c.match_prefix(t.data(), 8, "m"), 8);
}

// ---- shapes and layouts over tiers -------------------------------------------------------------

// Publishes `tokens` from one cache through a memory tier, restores them into a second one made
// alike, prefills the rest there and checks it holds exactly what a third, computing every
// token, holds. Returns the tokens the second restored.
template <class Format, class Make>
Index restore_and_compare(Make make, const std::vector<std::int32_t>& tokens, Index first_pages,
                          Index second_pages) {
  using cache_type = paged_kv_cache<Format>;
  const Index n = Index(tokens.size());
  const auto fill_with = [](const std::vector<std::int32_t>& tokens, cache_type& c, Index seq,
                            Index from, Index to) {
    if (to <= from) return;
    for (Index l = 0; l < c.n_layers(); ++l) {
      row_matrix<float> k(to - from, c.shape().kv_width()), v(to - from, c.shape().kv_width());
      for (Index i = from; i < to; ++i) {
        for (Index col = 0; col < k.cols(); ++col) {
          k(i - from, col) = float(std::sin(0.37 * tokens[std::size_t(i)] + 0.11 * double(i) +
                                            0.7 * double(l) + 0.013 * double(col)));
          v(i - from, col) = float(std::cos(0.29 * tokens[std::size_t(i)] + 0.05 * double(i) +
                                            0.3 * double(l) + 0.017 * double(col)));
        }
      }
      if (c.shape().values_in_keys()) {
        c.append(seq, l, k);
      } else {
        c.append(seq, l, k, v);
      }
    }
  };
  const auto fill = [&](cache_type& c, Index seq, Index from, Index to) {
    fill_with(tokens, c, seq, from, to);
  };
  memory_store tier(1 << 26);
  {
    cache_type a = make(first_pages);
    tiered_prefix_cache<Format> t(a, {&tier});
    const Index s = t.create(tokens.data(), n, "m");
    for (Index i = 0; i < n; ++i) fill(a, s, i, i + 1);  // one token at a time: a window drops pages
    t.publish(s, tokens.data(), n, "m");
    a.free(s);
    // Whatever the window gave back and the pool still caches goes to the tier too.
    const auto more = prompt(4 * first_pages * a.page_size(), 99);
    const Index other = t.create(more.data(), 1, "x");
    for (Index i = 0; a.stats().cached > 0 && i < Index(more.size()); ++i) {
      fill_with(more, a, other, i, i + 1);
    }
  }
  cache_type b = make(second_pages);
  tiered_prefix_cache<Format> t(b, {&tier});
  const Index s = t.create(tokens.data(), n, "m");
  const Index hit = b.prefix_hit(s);
  EXPECT_EQ(t.stats().rejected, 0);
  fill(b, s, hit, n);
  cache_type r = make(second_pages);
  const Index rs = r.create();
  fill(r, rs, 0, n);
  for (Index l = 0; l < b.n_layers(); ++l) {
    EXPECT_EQ(b.position(s, l), r.position(rs, l));
    EXPECT_EQ(b.keys(s, l), r.keys(rs, l)) << "layer " << l;
    if (!b.shape().values_in_keys()) {
      EXPECT_EQ(b.values(s, l), r.values(rs, l)) << "layer " << l;
    }
  }
  return hit;
}

TEST(TieredShapes, AnMlaCacheRestoresItsLatentPages) {
  using format = quantized_format<8>;
  const cache_shape mla = cache_shape(2, 4, 1, 24).with_values_in_keys(16);
  const auto make = [&](Index pages) { return paged_kv_cache<format>(mla, paged_layout{8, pages}, format(4, 2)); };
  EXPECT_EQ(restore_and_compare<format>(make, prompt(37, 20), 16, 16), 32);
}

TEST(TieredShapes, AWindowWithSinksRestoresItsPromptStart) {
  using format = quantized_format<4>;
  const auto make = [](Index pages) {
    return paged_kv_cache<format>(model, paged_layout{8, pages, 24, 4}, format(8, 2));
  };
  EXPECT_GE(restore_and_compare<format>(make, prompt(61, 21), 12, 16), 8);
}

TEST(TieredShapes, PagesOfOneToken) {
  using format = plain_format<float>;
  const auto make = [](Index pages) { return paged_kv_cache<format>(model, paged_layout{1, pages}); };
  EXPECT_EQ(restore_and_compare<format>(make, prompt(13, 22), 16, 16), 12);
}

TEST(TieredShapes, APoolOfOnePage) {
  using format = plain_format<float>;
  const auto make = [](Index pages) { return paged_kv_cache<format>(model, paged_layout{16, pages}); };
  // The second pool holds one page: the prompt's first page is restored into it; the rest
  // would need more pages, so the prompt is one page and a token.
  EXPECT_EQ(restore_and_compare<format>(make, prompt(17, 23), 4, 2), 16);
  memory_store tier(1 << 20);
  const auto tokens = prompt(17, 23);
  {
    paged_kv_cache<format> two(model, paged_layout{16, 2});
    tiered_prefix_cache<format> t(two, {&tier});
    const Index s = t.create(tokens.data(), 17, "m");
    prefill(two, s, tokens, 0, 17);
    t.publish(s, tokens.data(), 17, "m");
  }
  paged_kv_cache<format> one(model, paged_layout{16, 1});
  tiered_prefix_cache<format> t(one, {&tier});
  const Index s = t.create(tokens.data(), 17, "m");
  EXPECT_EQ(one.prefix_hit(s), 16);
  EXPECT_EQ(one.stats().used, 1);
  EXPECT_THROW(prefill(one, s, tokens, 16, 17), std::length_error);  // no page for token 16
  EXPECT_EQ(one.position(s), 16);
  one.free(s);
  EXPECT_EQ(one.stats().cached, 1);
  const auto other = prompt(17, 24);  // another prompt evicts the page, offloaded (held)
  const Index o = t.create(other.data(), 17, "m");
  EXPECT_EQ(one.prefix_hit(o), 0);
  prefill(one, o, other, 0, 16);
  EXPECT_EQ(one.stats().evictions, 1);
  EXPECT_EQ(tier.size(), 1);
}

// ---- memory_store ------------------------------------------------------------------------------

TEST(MemoryStore, KeepsItsBudgetLeastRecentlyUsedFirst) {
  memory_store m(3 * 104);  // three values of 100 bytes under 4-byte keys
  const std::string v(100, 'x');
  m.put("key0", v);
  m.put("key1", v);
  m.put("key2", v);
  EXPECT_TRUE(m.get("key0"));  // key0 used: key1 is the oldest now
  m.put("key3", v);
  EXPECT_EQ(m.size(), 3);
  EXPECT_LE(m.bytes(), 3 * 104);
  EXPECT_FALSE(m.contains("key1"));
  EXPECT_TRUE(m.contains("key0"));
  EXPECT_EQ(m.counters().evictions, 1);
  m.put("big", std::string(400, 'y'));  // larger than the budget: not stored
  EXPECT_FALSE(m.contains("big"));
  m.put("key0", "other");  // a key is never replaced
  EXPECT_EQ(*m.get("key0"), v);
  EXPECT_THROW(m.put_many({"a", "b"}, {std::string_view("x")}), std::invalid_argument);
  EXPECT_THROW(memory_store(-1), std::invalid_argument);
}

// ---- disk_store --------------------------------------------------------------------------------

TEST(DiskStore, ValuesSurviveARestartAndKeepTheirOrderOfUse) {
  temp_dir dir("restart");
  const std::string a(1000, 'a'), b(1000, 'b'), c(1000, 'c');
  {
    disk_store d(dir.path, 10000);
    d.put("ka", a);
    d.put("kb", std::string("b\0b", 3));
    d.put("kc", c);
    EXPECT_EQ(d.size(), 3);
  }
  {
    disk_store d(dir.path, 10000);
    EXPECT_EQ(d.size(), 3);
    EXPECT_EQ(*d.get("kb"), std::string("b\0b", 3));
    EXPECT_EQ(*d.get("ka"), a);
    EXPECT_FALSE(d.get("kz"));
    EXPECT_EQ(d.counters().hits, 2);
    EXPECT_EQ(d.counters().gets, 3);
  }
  {  // A smaller budget on reopening trims the least recently used: kc was used longest ago.
    disk_store d(dir.path, 1500);
    EXPECT_EQ(d.size(), 2);
    EXPECT_FALSE(d.contains("kc"));
    EXPECT_TRUE(d.contains("ka"));
    EXPECT_FALSE(fs::exists(dir.path / "kc.kvpage"));
  }
}

TEST(DiskStore, AFullBudgetEvictsTheOldestAndSpillsThemToTheNextTier) {
  temp_dir dir("budget");
  memory_store next(1 << 20);
  disk_store d(dir.path, 3000, &next);
  for (int i = 0; i < 6; ++i) d.put("k" + std::to_string(i), std::string(1000, char('0' + i)));
  EXPECT_EQ(d.size(), 3);
  EXPECT_LE(d.bytes(), 3000);
  EXPECT_EQ(d.counters().evictions, 3);
  EXPECT_EQ(next.size(), 3);
  EXPECT_EQ(*next.get("k0"), std::string(1000, '0'));
  EXPECT_TRUE(d.contains("k5"));
  Index files = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) files += e.path().extension() == ".kvpage";
  EXPECT_EQ(files, 3);
  d.put("huge", std::string(5000, 'h'));  // over the whole budget: not stored
  EXPECT_FALSE(d.contains("huge"));
  EXPECT_EQ(d.size(), 3);
}

TEST(DiskStore, SeesWhatAnotherProcessWroteAndRefusesBadKeys) {
  temp_dir dir("shared");
  disk_store one(dir.path, 1 << 20), two(dir.path, 1 << 20);
  one.put("page", "contents");
  EXPECT_TRUE(two.contains("page"));
  EXPECT_EQ(*two.get("page"), "contents");
  EXPECT_EQ(two.size(), 1);
  two.reject("page");
  EXPECT_FALSE(one.get("page"));  // removed by the other: a miss, forgotten
  EXPECT_EQ(one.size(), 0);
  EXPECT_EQ(two.counters().rejected, 1);
  EXPECT_THROW(one.put("../escape", "x"), std::invalid_argument);
  EXPECT_THROW(one.get("a/b"), std::invalid_argument);
  EXPECT_THROW(one.contains(""), std::invalid_argument);
  EXPECT_THROW(disk_store(dir.path, -1), std::invalid_argument);
  std::ofstream(dir.path / "file") << "x";
  EXPECT_THROW(disk_store(dir.path / "file", 10), std::runtime_error);
}

// Junk in the directory: a directory, a zero-byte file, a dangling symlink and a file larger
// than the whole budget, each named like a value, and files of other names. Opening the store
// and asking for each key answers without throwing: a miss, or a value the caller refuses.
TEST(DiskStore, JunkInTheDirectoryIsAMissNeverAThrow) {
  temp_dir dir("junk");
  fs::create_directories(dir.path / "adir.kvpage");
  std::ofstream(dir.path / "empty.kvpage").close();
  fs::create_symlink(dir.path / "nowhere", dir.path / "dangling.kvpage");
  std::ofstream(dir.path / "huge.kvpage") << std::string(5000, 'h');
  std::ofstream(dir.path / "notes.txt") << "not a page";
  disk_store d(dir.path, 4000);
  EXPECT_FALSE(d.contains("adir"));
  std::vector<std::optional<std::string>> got;
  EXPECT_NO_THROW(d.get_many({"adir", "empty", "dangling", "huge", "notes"}, got));
  ASSERT_EQ(got.size(), 5u);
  EXPECT_FALSE(got[0]);
  if (got[1]) {
    EXPECT_EQ(*got[1], "");
  }
  EXPECT_FALSE(got[2]);
  EXPECT_FALSE(got[3]);  // more than the budget: never a value of this store
  EXPECT_FALSE(got[4]);
  EXPECT_LE(d.bytes(), 4000);
  d.put("adir", "x");  // a directory is in the way: an error, not a throw
  EXPECT_FALSE(d.get("adir"));
  EXPECT_TRUE(fs::exists(dir.path / "notes.txt"));
}

// A file another process removed is no longer held: contains says so, and the cache writes
// the page again.
TEST(DiskStore, AFileRemovedByAnotherProcessIsNotHeld) {
  temp_dir dir("removed");
  disk_store d(dir.path, 1 << 20);
  d.put("page", "contents");
  EXPECT_TRUE(d.contains("page"));
  fs::remove(dir.path / "page.kvpage");
  EXPECT_FALSE(d.contains("page"));
  d.put("page", "contents");
  EXPECT_TRUE(fs::exists(dir.path / "page.kvpage"));
  EXPECT_EQ(d.get("page"), std::optional<std::string>("contents"));
  fs::remove(dir.path / "page.kvpage");  // a put alone writes it again too
  d.put("page", "contents");
  EXPECT_TRUE(fs::exists(dir.path / "page.kvpage"));
  EXPECT_EQ(d.size(), 1);
  EXPECT_EQ(d.bytes(), 8);
}

// Files named like values but not by a key (a space, a dot) are not this store's: never
// counted, spilled or removed.
TEST(DiskStore, FilesNotNamedByAKeyAreLeftAlone) {
  temp_dir dir("names"), next_dir("names_next");
  fs::create_directories(dir.path);
  std::ofstream(dir.path / "a b.kvpage") << std::string(1000, 'x');
  std::ofstream(dir.path / "a.b.kvpage") << std::string(1000, 'y');
  disk_store next(next_dir.path, 1 << 20);
  std::optional<disk_store> d;
  EXPECT_NO_THROW(d.emplace(dir.path, 500, &next));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->size(), 0);
  EXPECT_EQ(d->bytes(), 0);
  EXPECT_TRUE(fs::exists(dir.path / "a b.kvpage"));
  EXPECT_TRUE(fs::exists(dir.path / "a.b.kvpage"));
  EXPECT_EQ(next.size(), 0);
}

// Two caches over one directory: a restart of the "process" in the middle, a corrupted file,
// a truncated file; each fault costs recomputation, never a wrong page.
TEST(DiskStore, ACacheRestoresAcrossARestartAndRecomputesDamagedFiles) {
  using cache_type = paged_kv_cache<quantized_format<8>>;
  temp_dir dir("cache");
  const auto tokens = prompt(57, 12);  // 7 pages
  std::vector<std::string> keys;
  {
    disk_store d(dir.path, 1 << 24);
    cache_type a(model, paged_layout{8, 16}, quantized_format<8>(4, 0));
    tiered_prefix_cache<quantized_format<8>> t(a, {&d});
    const Index s = t.create(tokens.data(), 57, "m");
    prefill(a, s, tokens, 0, 57);
    t.publish(s, tokens.data(), 57, "m");
    for (const auto& h : a.page_hashes(s)) keys.push_back(t.key(h));
    EXPECT_EQ(d.counters().puts, 7);
  }
  ASSERT_EQ(keys.size(), 7u);
  {  // A restart: a new store and cache find every page.
    disk_store d(dir.path, 1 << 24);
    cache_type b(model, paged_layout{8, 16}, quantized_format<8>(4, 0));
    tiered_prefix_cache<quantized_format<8>> t(b, {&d});
    const Index s = t.create(tokens.data(), 57, "m");
    EXPECT_EQ(b.prefix_hit(s), 56);
    prefill(b, s, tokens, 56, 57);
    Tiered<int8_g4_p8>::expect_computed(b, s, tokens);
  }
  // Damage page 3's file and truncate page 5's.
  {
    const fs::path p3 = dir.path / (keys[3] + ".kvpage");
    std::fstream f(p3, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(std::streamoff(fs::file_size(p3) / 2));
    f.put('\x7f');
  }
  fs::resize_file(dir.path / (keys[5] + ".kvpage"), 100);
  {
    disk_store d(dir.path, 1 << 24);
    cache_type b(model, paged_layout{8, 16}, quantized_format<8>(4, 0));
    tiered_prefix_cache<quantized_format<8>> t(b, {&d});
    Index s = t.create(tokens.data(), 57, "m");
    EXPECT_EQ(b.prefix_hit(s), 24);
    EXPECT_EQ(t.stats().rejected, 1);
    EXPECT_FALSE(fs::exists(dir.path / (keys[3] + ".kvpage")));
    prefill(b, s, tokens, 24, 57);
    Tiered<int8_g4_p8>::expect_computed(b, s, tokens);
    // Publishing writes the recomputed page 3 again (page 5's truncated file stays until read).
    t.publish(s, tokens.data(), 57, "m");
    EXPECT_TRUE(fs::exists(dir.path / (keys[3] + ".kvpage")));
    b.free(s);
  }
  {
    disk_store d(dir.path, 1 << 24);
    cache_type b(model, paged_layout{8, 16}, quantized_format<8>(4, 0));
    tiered_prefix_cache<quantized_format<8>> t(b, {&d});
    const Index s = t.create(tokens.data(), 57, "m");
    EXPECT_EQ(b.prefix_hit(s), 40);  // page 5 truncated: refused
    EXPECT_EQ(t.stats().rejected, 1);
    EXPECT_NE(t.stats().last_rejection.find(keys[5]), std::string::npos);
    prefill(b, s, tokens, 40, 57);
    Tiered<int8_g4_p8>::expect_computed(b, s, tokens);
  }
}

}  // namespace

namespace {

// Tiers are shared between processes: a lookup or publish without a key naming the model is
// refused before anything changes.
TEST(Tiered, AnEmptyModelKeyIsRefused) {
  kvcache::memory_store tier(1 << 20);
  kvcache::paged_kv_cache<kvcache::plain_format<float>> c(kvcache::cache_shape(1, 2, 1, 8),
                                                          kvcache::paged_layout{4, 4});
  kvcache::tiered_prefix_cache<kvcache::plain_format<float>> t(c, {&tier});
  const std::vector<std::int32_t> tokens(9, 3);
  EXPECT_THROW(t.create(tokens.data(), 9, ""), std::invalid_argument);
  EXPECT_EQ(c.n_sequences(), 0);
  const kvcache::Index s = t.create(tokens.data(), 9, "m");
  EXPECT_THROW(t.publish(s, tokens.data(), 9, ""), std::invalid_argument);
  EXPECT_EQ(tier.size(), 0);
}

}  // namespace

namespace {

// A temporary file of a write that stopped long ago (its process died) is removed on opening;
// a recent one, perhaps another process's write under way, is left.
TEST(DiskStore, StaleTemporaryFilesAreRemovedOnOpening) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("kvcache_store_tmp_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / ".tmp-1-0") << "old";
  std::ofstream(dir / ".tmp-1-1") << "new";
  fs::last_write_time(dir / ".tmp-1-0", fs::file_time_type::clock::now() - std::chrono::hours(2));
  { kvcache::disk_store d(dir, 1 << 20); }
  EXPECT_FALSE(fs::exists(dir / ".tmp-1-0"));
  EXPECT_TRUE(fs::exists(dir / ".tmp-1-1"));
  fs::remove_all(dir);
}

}  // namespace
