// SPDX-License-Identifier: Apache-2.0
// Every layout with every format, for MHA, GQA and MQA: decode and prefill against a double
// reference over what the cache holds, rollback, context shift, save and load.
#include "common.hpp"

#include <kvcache/io/cache_file.hpp>

#include <algorithm>
#include <sstream>

namespace {

using namespace kvcache;
using namespace kvcache::test;

// One composition: a layout and a format, and how to build them.
template <class Layout, class Format>
struct kind {
  using cache = kv_cache<Layout, Format>;
  Layout layout;
  Format format;
};

struct f64 { using type = plain_format<double>; static type make() { return {}; } };
struct f32 { using type = plain_format<float>; static type make() { return {}; } };
struct f16 { using type = plain_format<Eigen::half>; static type make() { return {}; } };
struct bf16 { using type = plain_format<Eigen::bfloat16>; static type make() { return {}; } };
struct int8_g16 { using type = quantized_format<8>; static type make() { return type(16, 0); } };
struct int8_g32_r8 { using type = quantized_format<8>; static type make() { return type(32, 8); } };
struct int4_g16_r16 { using type = quantized_format<4>; static type make() { return type(16, 16); } };

struct contiguous { using type = contiguous_layout; static type make() { return {}; } };
struct fixed300 { using type = fixed_layout; static type make() { return {300}; } };
struct ring { using type = ring_layout; static type make() { return {40, 4, 8}; } };

template <class L, class F>
struct combo {
  using cache = kv_cache<typename L::type, typename F::type>;
  static cache make(const cache_shape& s) { return cache(s, L::make(), F::make()); }
  static constexpr bool lossy = !F::type::lossless;
  static constexpr bool is_f64 = std::is_same_v<typename F::type, plain_format<double>>;
};

template <class T>
class CacheOps : public ::testing::Test {};

using combos = ::testing::Types<
    combo<contiguous, f64>, combo<contiguous, f32>, combo<contiguous, f16>, combo<contiguous, bf16>,
    combo<contiguous, int8_g16>, combo<contiguous, int8_g32_r8>, combo<contiguous, int4_g16_r16>,
    combo<fixed300, f64>, combo<fixed300, f32>, combo<fixed300, f16>, combo<fixed300, bf16>,
    combo<fixed300, int8_g16>, combo<fixed300, int8_g32_r8>, combo<fixed300, int4_g16_r16>,
    combo<ring, f64>, combo<ring, f32>, combo<ring, f16>, combo<ring, bf16>, combo<ring, int8_g16>,
    combo<ring, int8_g32_r8>, combo<ring, int4_g16_r16>>;
TYPED_TEST_SUITE(CacheOps, combos);

const attention_shape shapes[] = {attention_shape(4, 4, 16), attention_shape(8, 2, 24),
                                  attention_shape(4, 1, 40)};

// Attention in double of one query row `q` at position p over the tokens a cache layer holds
// (`keys`, `values` as it reads them, at `positions`), through `mask`.
row_vector<double> reference_over(const attention_shape& s, const row_vector<double>& q,
                                  const row_matrix<double>& keys, const row_matrix<double>& values,
                                  const std::vector<Index>& positions, Index p,
                                  const attention_mask& mask) {
  const Index d = s.head_dim(), G = s.group_size();
  row_vector<double> out(s.q_width());
  for (Index hq = 0; hq < s.n_heads(); ++hq) {
    const Index h = hq / G;
    std::vector<double> score;
    std::vector<Index> seen;
    for (std::size_t t = 0; t < positions.size(); ++t) {
      const Index kp = positions[t];
      const bool visible = kp <= p && (mask.window == 0 || kp > p - mask.window || kp < mask.sinks);
      if (!visible) continue;
      score.push_back(q.segment(hq * d, d).dot(keys.row(Index(t)).segment(h * d, d)) /
                      std::sqrt(double(d)));
      seen.push_back(Index(t));
    }
    const double m = *std::max_element(score.begin(), score.end());
    double l = 0;
    row_vector<double> o = row_vector<double>::Zero(d);
    for (std::size_t i = 0; i < seen.size(); ++i) {
      const double w = std::exp(score[i] - m);
      l += w;
      o += w * values.row(seen[i]).segment(h * d, d);
    }
    out.segment(hq * d, d) = o / l;
  }
  return out;
}

template <class Cache>
double tolerance() {
  return std::is_same_v<typename Cache::compute_type, double> ? 1e-10 : 2e-4;
}

template <class Cache>
row_matrix<double> held(const Cache& c, Index l, bool keys) {
  return (keys ? c.keys(l) : c.values(l)).template cast<double>();
}

// Prefill of a 37-token prompt in two chunks, then 70 decode steps: every output equals the
// double reference over what the cache holds at that step, with the layout's mask.
TYPED_TEST(CacheOps, PrefillAndDecodeMatchTheReference) {
  using T = typename TypeParam::cache::compute_type;
  for (const auto& s : shapes) {
    SCOPED_TRACE(std::to_string(s.n_heads()) + "/" + std::to_string(s.n_kv_heads()) + "x" +
                 std::to_string(s.head_dim()));
    auto cache = TypeParam::make(cache_shape(2, s));
    attention_workspace<T> ws;
    thread_pool pool(2);
    attention_options opt;
    opt.pool = &pool;
    opt.tile_tokens = 16;
    const Index n = 107;
    const auto q = random_matrix<double>(n, s.q_width(), 1);
    const auto k = random_matrix<float>(n, s.kv_width(), 2),
               v = random_matrix<float>(n, s.kv_width(), 3);
    Index at = 0;
    for (const Index chunk : {Index(30), Index(7)}) {
      row_matrix<T> out(chunk, s.q_width());
      prefill_attention(s, q.middleRows(at, chunk).template cast<T>(), k.middleRows(at, chunk),
                        v.middleRows(at, chunk), cache, 1, out, ws, opt);
      // The last query of the chunk sees the cache as it is now.
      const auto want = reference_over(s, q.row(at + chunk - 1), held(cache, 1, true),
                                       held(cache, 1, false), cache.positions(1), at + chunk - 1,
                                       cache.view(1).mask());
      EXPECT_LT((out.row(chunk - 1).template cast<double>() - want).cwiseAbs().maxCoeff(),
                tolerance<typename TypeParam::cache>()) << "prefill chunk at " << at;
      at += chunk;
    }
    for (; at < n; ++at) {
      cache.append(1, k.row(at), v.row(at));
      // Every token the mask lets the newest position see is held, whatever the layout keeps.
      const attention_mask mask = cache.view(1).mask();
      const std::vector<Index> positions = cache.positions(1);
      for (Index p = 0; p <= at; ++p) {
        const bool visible = mask.window == 0 || p > at - mask.window || p < mask.sinks;
        if (visible) {
          ASSERT_TRUE(std::binary_search(positions.begin(), positions.end(), p))
              << "position " << p << " missing at " << at;
        }
      }
      row_vector<T> out(s.q_width());
      decode_attention(s, q.row(at).template cast<T>(), cache.view(1), out, ws, opt);
      const auto want = reference_over(s, q.row(at), held(cache, 1, true), held(cache, 1, false),
                                       cache.positions(1), at, cache.view(1).mask());
      ASSERT_LT((out.template cast<double>() - want).cwiseAbs().maxCoeff(),
                tolerance<typename TypeParam::cache>()) << "decode at " << at;
    }
    EXPECT_EQ(cache.position(1), n);
    EXPECT_EQ(cache.size(0), 0);
  }
}

// Append n, roll back k, append k others: the same as a cache that never saw the rolled-back
// tokens, or refused with std::out_of_range and nothing changed.
TYPED_TEST(CacheOps, RollbackIsExactOrRefused) {
  const attention_shape s(4, 2, 16);
  const auto k = random_matrix<float>(200, s.kv_width(), 4), v = random_matrix<float>(200, s.kv_width(), 5);
  const auto k2 = random_matrix<float>(20, s.kv_width(), 6), v2 = random_matrix<float>(20, s.kv_width(), 7);
  Index exact = 0;
  for (const Index n : {Index(1), Index(15), Index(16), Index(33), Index(47), Index(48), Index(60),
                        Index(150)}) {
    for (const Index back : {Index(0), Index(1), Index(3), Index(8), Index(9), Index(16)}) {
      if (back > n) continue;
      SCOPED_TRACE("n=" + std::to_string(n) + " back=" + std::to_string(back));
      auto cache = TypeParam::make(cache_shape(1, s));
      for (Index t = 0; t < n; ++t) cache.append(0, k.row(t), v.row(t));
      const auto before_k = held(cache, 0, true);
      try {
        cache.rollback(back);
      } catch (const std::out_of_range& e) {
        EXPECT_NE(std::string(e.what()).find("not exact"), std::string::npos) << e.what();
        EXPECT_EQ(held(cache, 0, true), before_k);
        EXPECT_EQ(cache.position(0), n);
        continue;
      }
      ++exact;
      const Index more = std::min<Index>(back + 2, 20);
      cache.append(0, k2.topRows(more), v2.topRows(more));
      auto straight = TypeParam::make(cache_shape(1, s));
      for (Index t = 0; t < n - back; ++t) straight.append(0, k.row(t), v.row(t));
      straight.append(0, k2.topRows(more), v2.topRows(more));
      EXPECT_EQ(cache.positions(0), straight.positions(0));
      EXPECT_EQ(held(cache, 0, true), held(straight, 0, true));
      EXPECT_EQ(held(cache, 0, false), held(straight, 0, false));
      EXPECT_EQ(cache.bytes(), straight.bytes());
    }
  }
  EXPECT_GT(exact, 20) << "most rollbacks within the margin are exact";
  {
    // Back into the sinks after the ring evicted tokens: the sinks that remain are kept.
    auto ring = TypeParam::make(cache_shape(1, s));
    for (Index t = 0; t < 150; ++t) ring.append(0, k.row(t), v.row(t));
    if (ring.plan().evicts && !TypeParam::lossy) {
      ring.crop(2);
      auto two = TypeParam::make(cache_shape(1, s));
      two.append(0, k.topRows(2), v.topRows(2));
      EXPECT_EQ(ring.positions(0), (std::vector<Index>{0, 1}));
      EXPECT_EQ(held(ring, 0, true), held(two, 0, true));
      EXPECT_EQ(held(ring, 0, false), held(two, 0, false));
    }
  }
  auto cache = TypeParam::make(cache_shape(1, s));
  cache.append(0, k.topRows(5), v.topRows(5));
  EXPECT_THROW(cache.crop(6), std::out_of_range);
  EXPECT_THROW(cache.rollback(-1), std::out_of_range);
}

// Context shift: dropping positions [first, last) and re-rotating the later keys equals
// appending the kept tokens at their new positions from the start.
TYPED_TEST(CacheOps, ContextShiftEqualsRecomputation) {
  const attention_shape s(4, 2, 16);
  const rope r(16);
  const Index n = 120;
  const auto k = random_matrix<float>(n, s.kv_width(), 8), v = random_matrix<float>(n, s.kv_width(), 9);
  for (const auto& [first, last] : {std::pair<Index, Index>{10, 30}, {4, 5}, {100, 120},
                                    {60, 110}, {50, 50}}) {
    SCOPED_TRACE("shift [" + std::to_string(first) + ", " + std::to_string(last) + ")");
    auto cache = TypeParam::make(cache_shape(2, s));
    row_matrix<float> rotated = k;
    r.apply(rotated, 0);
    for (Index l = 0; l < 2; ++l) cache.append(l, rotated, v);
    try {
      cache.shift(first, last, r);
    } catch (const std::out_of_range& e) {
      // Only a ring refuses: it cannot give back tokens it evicted.
      EXPECT_EQ(cache.layout().name, std::string("ring")) << e.what();
      EXPECT_EQ(cache.position(1), n);
      continue;
    }
    // The same tokens, appended at their new positions.
    row_matrix<float> kept_k(n - (last - first), s.kv_width()), kept_v(kept_k.rows(), s.kv_width());
    kept_k << k.topRows(first), k.bottomRows(n - last);
    kept_v << v.topRows(first), v.bottomRows(n - last);
    r.apply(kept_k, 0);
    auto want = TypeParam::make(cache_shape(2, s));
    for (Index l = 0; l < 2; ++l) want.append(l, kept_k, kept_v);
    EXPECT_EQ(cache.position(0), want.position(0));
    if (cache.layout().name == std::string("ring")) {
      // A ring holds what it kept, the recomputed one what it never evicted: the newest
      // query sees the same tokens through the window.
      const attention_shape heads(4, 2, 16);
      attention_workspace<typename TypeParam::cache::compute_type> ws;
      using C = typename TypeParam::cache::compute_type;
      const row_vector<C> q = random_matrix<float>(1, heads.q_width(), 13).template cast<C>();
      row_vector<typename TypeParam::cache::compute_type> a(heads.q_width()), b(heads.q_width());
      decode_attention(heads, q, cache.view(1), a, ws);
      decode_attention(heads, q, want.view(1), b, ws);
      EXPECT_LT((a - b).cwiseAbs().maxCoeff(), TypeParam::lossy ? 0.3 : 2e-2);
      continue;
    }
    EXPECT_EQ(cache.positions(1), want.positions(1));
    const double tol = TypeParam::lossy ? 0.3 : TypeParam::is_f64 ? 1e-5
                       : std::is_same_v<typename TypeParam::cache::scalar_type, float> ? 1e-5 : 2e-2;
    EXPECT_LT((held(cache, 1, true) - held(want, 1, true)).cwiseAbs().maxCoeff(), tol);
    EXPECT_LT((held(cache, 1, false) - held(want, 1, false)).cwiseAbs().maxCoeff(),
              TypeParam::lossy ? 0.3 : 1e-12 + (TypeParam::is_f64 ? 0 : 2e-2));
  }
  auto cache = TypeParam::make(cache_shape(1, s));
  cache.append(0, k.topRows(20), v.topRows(20));
  EXPECT_THROW(cache.shift(5, 21, r), std::out_of_range);
  EXPECT_THROW(cache.shift(6, 5, r), std::out_of_range);
  EXPECT_THROW(cache.shift(5, 6, rope(8)), std::invalid_argument);
}

// Save, then load into a fresh cache of the same kind: bit-identical contents, and both go on
// identically; damaged files and files of another kind are refused, the cache unchanged.
TYPED_TEST(CacheOps, SaveAndLoadRoundTrip) {
  using T = typename TypeParam::cache::compute_type;
  const attention_shape s(8, 2, 24);
  const auto k = random_matrix<float>(90, s.kv_width(), 10), v = random_matrix<float>(90, s.kv_width(), 11);
  {
    // A cache that never held a token (a growing one has allocated nothing yet).
    const auto empty = TypeParam::make(cache_shape(3, s));
    std::stringstream file;
    io::save(empty, file, "empty.kv");
    auto loaded = TypeParam::make(cache_shape(3, s));
    loaded.append(1, k.topRows(3), v.topRows(3));
    io::load(loaded, file, "empty.kv");
    EXPECT_EQ(loaded.size(1), 0);
    EXPECT_EQ(loaded.position(1), 0);
  }
  auto cache = TypeParam::make(cache_shape(3, s));
  for (Index l = 0; l < 3; ++l) cache.append(l, k.topRows(70 + l), v.topRows(70 + l));
  std::stringstream file;
  io::save(cache, file, "test.kv");
  const std::string bytes = file.str();

  auto loaded = TypeParam::make(cache_shape(3, s));
  std::istringstream in(bytes);
  io::load(loaded, in, "test.kv");
  for (Index l = 0; l < 3; ++l) {
    EXPECT_EQ(loaded.positions(l), cache.positions(l));
    EXPECT_EQ(held(loaded, l, true), held(cache, l, true));
    EXPECT_EQ(held(loaded, l, false), held(cache, l, false));
  }
  EXPECT_EQ(loaded.bytes(), cache.bytes());
  cache.append(2, k.bottomRows(5), v.bottomRows(5));
  loaded.append(2, k.bottomRows(5), v.bottomRows(5));
  attention_workspace<T> ws;
  row_vector<T> a(s.q_width()), b(s.q_width());
  const row_vector<T> q = random_matrix<float>(1, s.q_width(), 12).template cast<T>();
  decode_attention(s, q, cache.view(2), a, ws);
  decode_attention(s, q, loaded.view(2), b, ws);
  // The loaded ring may split its blocks elsewhere: equal up to the order of the sums.
  const double order_tol = std::is_same_v<T, double> ? 1e-13 : 1e-6;
  EXPECT_LT((a - b).cwiseAbs().maxCoeff(), order_tol);

  // Truncated anywhere, or a byte flipped: refused, and the target keeps what it had.
  auto target = TypeParam::make(cache_shape(3, s));
  target.append(0, k.topRows(3), v.topRows(3));
  const auto target_keys = held(target, 0, true);
  for (std::size_t cut = 0; cut < bytes.size(); cut += 1 + bytes.size() / 97) {
    std::istringstream part(bytes.substr(0, cut));
    EXPECT_THROW(io::load(target, part, "cut.kv"), io::format_error) << "cut at " << cut;
  }
  for (std::size_t at = 0; at < bytes.size(); at += 1 + bytes.size() / 61) {
    std::string bad = bytes;
    bad[at] = char(bad[at] ^ 0x10);
    std::istringstream part(bad);
    EXPECT_THROW(io::load(target, part, "flipped.kv"), io::format_error) << "byte " << at;
  }
  EXPECT_EQ(held(target, 0, true), target_keys);
  EXPECT_EQ(target.position(0), 3);

  // Another shape is named in the message.
  auto other = TypeParam::make(cache_shape(3, attention_shape(8, 4, 24)));
  std::istringstream again(bytes);
  try {
    io::load(other, again, "test.kv");
    ADD_FAILURE() << "loaded into another shape";
  } catch (const io::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("n_kv_heads"), std::string::npos) << e.what();
  }
}

// A moved-from cache is valid and empty.
TYPED_TEST(CacheOps, MovedFromIsEmpty) {
  const attention_shape s(4, 2, 16);
  auto cache = TypeParam::make(cache_shape(2, s));
  cache.append(0, random_matrix<float>(5, s.kv_width(), 1), random_matrix<float>(5, s.kv_width(), 2));
  auto moved = std::move(cache);
  EXPECT_EQ(cache.n_layers(), 0);  // NOLINT(bugprone-use-after-move): the documented state
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.bytes(), 0);
  EXPECT_THROW(cache.append(0, random_matrix<float>(1, s.kv_width(), 1), random_matrix<float>(1, s.kv_width(), 2)),
               std::out_of_range);
  EXPECT_EQ(moved.size(0), 5);
}

}  // namespace
