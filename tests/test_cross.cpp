// SPDX-License-Identifier: Apache-2.0
// Tests of cross_attention_cache and cross_attention: every format, MHA, GQA and MQA, encoder
// lengths from 1 to beyond a tile, one or many decoder queries, against a double reference
// without a causal mask; refusals that change nothing; bytes; no way to append.
#include "common.hpp"

#include <kvcache/cache/cross.hpp>

#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;

struct f64 {
  using type = plain_format<double>;
  static type make() { return {}; }
  static constexpr const char* name = "f64";
};
struct f32 {
  using type = plain_format<float>;
  static type make() { return {}; }
  static constexpr const char* name = "f32";
};
struct f16 {
  using type = plain_format<Eigen::half>;
  static type make() { return {}; }
  static constexpr const char* name = "f16";
};
struct bf16 {
  using type = plain_format<Eigen::bfloat16>;
  static type make() { return {}; }
  static constexpr const char* name = "bf16";
};
struct int8_g16 {
  using type = quantized_format<8>;
  static type make() { return type(16, 0); }
  static constexpr const char* name = "int8_g16";
};
struct int8_g32_r8 {
  using type = quantized_format<8>;
  static type make() { return type(32, 8); }
  static constexpr const char* name = "int8_g32_r8";
};
struct int4_g16_r16 {
  using type = quantized_format<4>;
  static type make() { return type(16, 16); }
  static constexpr const char* name = "int4_g16_r16";
};

struct format_name {
  template <class F>
  static std::string GetName(int) {
    return F::name;
  }
};

template <class F>
class CrossTest : public ::testing::Test {
 protected:
  using format = typename F::type;
  using cache = cross_attention_cache<format>;
  using T = typename cache::compute_type;

  static cache make(const cache_shape& s, Index capacity) { return cache(s, capacity, F::make()); }

  // Only the arithmetic differs from the double oracle when both read the keys and values as
  // the cache stores them: common.hpp's kernel tolerance (float or double arithmetic).
  static double tolerance() { return kernel_tolerance<T>(); }
};

using formats = ::testing::Types<f64, f32, f16, bf16, int8_g16, int8_g32_r8, int4_g16_r16>;
TYPED_TEST_SUITE(CrossTest, formats, format_name);

const attention_shape shapes[] = {attention_shape(4, 4, 16), attention_shape(8, 2, 24),
                                  attention_shape(4, 1, 40), attention_shape(6, 2, 7)};

std::string shape_name(const attention_shape& s) {
  return std::to_string(s.n_heads()) + "q/" + std::to_string(s.n_kv_heads()) + "kv x " +
         std::to_string(s.head_dim());
}

// The oracle: attention in double of every query row over every encoder token that layer l of
// `c` holds (as it reads them back), without a causal mask.
template <class Cache>
row_matrix<double> oracle(const attention_shape& s, const Cache& c, Index l,
                          const row_matrix<double>& q) {
  attention_mask everything;
  everything.causal = false;
  return reference_attention<double>(s, q, c.keys(l).template cast<double>(),
                                     c.values(l).template cast<double>(), everything);
}

// Everything observable about a cross cache, to prove a throwing call changed nothing.
template <class Cache>
struct snapshot {
  Index size, bytes, capacity_bytes;
  std::vector<Index> sizes;
  std::vector<row_matrix<typename Cache::compute_type>> keys, values;
  explicit snapshot(const Cache& c)
      : size(c.size()), bytes(c.bytes()), capacity_bytes(c.capacity_bytes()) {
    for (Index l = 0; l < c.n_layers(); ++l) {
      sizes.push_back(c.size(l));
      keys.push_back(c.keys(l));
      values.push_back(c.values(l));
    }
  }
  bool operator==(const snapshot& o) const {
    return size == o.size && bytes == o.bytes && capacity_bytes == o.capacity_bytes &&
           sizes == o.sizes && keys == o.keys && values == o.values;
  }
};

// Runs f, which must throw exactly E with `part` in its message.
template <class E, class F>
void expect_throw_with(F&& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one containing \"" << part << "\"";
  } catch (const E& e) {
    EXPECT_TRUE(typeid(e) == typeid(E)) << "thrown " << typeid(e).name() << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// Every shape, encoder lengths 1, odd and beyond a tile of 128, 1 to 40 decoder queries, on one
// thread and on two with short tiles (split-K over runs of encoder tokens, merged): each output
// equals the double reference over what the layer holds, with no causal mask.
TYPED_TEST(CrossTest, MatchesTheReferenceWithoutACausalMask) {
  using T = typename TestFixture::T;
  thread_pool pool(2);
  attention_options threaded;
  threaded.pool = &pool;
  threaded.tile_tokens = 16;
  for (const auto& s : shapes) {
    for (const Index m : {Index(1), Index(37), Index(300)}) {
      SCOPED_TRACE(shape_name(s) + ", " + std::to_string(m) + " encoder tokens");
      auto c = TestFixture::make(cache_shape(2, s), 300);
      for (Index l = 0; l < 2; ++l) {
        c.fill(l, random_matrix<float>(m, s.kv_width(), unsigned(10 + l)),
               random_matrix<float>(m, s.kv_width(), unsigned(20 + l)));
      }
      ASSERT_EQ(c.size(), m);
      attention_workspace<T> ws;
      for (const Index n : {Index(1), Index(2), Index(5), Index(40)}) {
        const auto q = random_matrix<double>(n, s.q_width(), unsigned(30 + n));
        const row_matrix<T> qt = q.cast<T>();
        for (Index l = 0; l < 2; ++l) {
          const row_matrix<double> want = oracle(s, c, l, qt.template cast<double>());
          for (const attention_options& opt : {attention_options{}, threaded}) {
            SCOPED_TRACE(std::to_string(n) + " queries, layer " + std::to_string(l) +
                         (opt.pool != nullptr ? ", 2 threads, tiles of 16" : ""));
            row_matrix<T> out(n, s.q_width());
            cross_attention(s, qt, c, l, out, ws, opt);
            EXPECT_LT((out.template cast<double>() - want).cwiseAbs().maxCoeff(),
                      TestFixture::tolerance());
          }
        }
      }
    }
  }
}

// A query sees encoder tokens whatever its position: the first of 5 queries over 300 tokens
// differs from what a causal mask would give it, and equals the decode of that query alone.
TYPED_TEST(CrossTest, EveryQuerySeesEveryEncoderToken) {
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 24);
  auto c = TestFixture::make(cache_shape(1, s), 300);
  c.fill(0, random_matrix<float>(300, s.kv_width(), 1), random_matrix<float>(300, s.kv_width(), 2));
  const row_matrix<T> q = random_matrix<double>(5, s.q_width(), 3).cast<T>();
  row_matrix<T> chunk(5, s.q_width());
  attention_workspace<T> ws;
  cross_attention(s, q, c, 0, chunk, ws);
  attention_mask causal;  // query i at position 295 + i
  const row_matrix<double> masked =
      reference_attention<double>(s, q.template cast<double>(), c.keys(0).template cast<double>(),
                                  c.values(0).template cast<double>(), causal);
  EXPECT_GT((chunk.template cast<double>() - masked).row(0).cwiseAbs().maxCoeff(), 1e-3);
  for (Index i = 0; i < 5; ++i) {
    row_matrix<T> one(1, s.q_width());
    cross_attention(s, q.row(i), c, 0, one, ws);
    EXPECT_LT((one.row(0) - chunk.row(i)).template cast<double>().cwiseAbs().maxCoeff(),
              TestFixture::tolerance());
    // decode_attention reads the view the same way.
    row_vector<T> decoded(s.q_width());
    decode_attention(s, q.row(i), c.view(0), decoded, ws);
    EXPECT_EQ(decoded, one.row(0));
  }
  // More decoder queries than encoder tokens: no position limits them.
  auto short_source = TestFixture::make(cache_shape(1, s), 4);
  short_source.fill(0, random_matrix<float>(3, s.kv_width(), 4),
                    random_matrix<float>(3, s.kv_width(), 5));
  row_matrix<T> out(5, s.q_width());
  cross_attention(s, q, short_source, 0, out, ws);
  EXPECT_LT((out.template cast<double>() - oracle(s, short_source, 0, q.template cast<double>()))
                .cwiseAbs()
                .maxCoeff(),
            TestFixture::tolerance());
}

// With plain storage, against the reference over the unrounded inputs: the storage's rounding
// (common.hpp's storage tolerance) is all that differs.
TYPED_TEST(CrossTest, PlainStorageMatchesTheUnroundedInputs) {
  using format = typename TestFixture::format;
  if constexpr (format::lossless) {
    using T = typename TestFixture::T;
    using Scalar = typename format::scalar_type;
    const attention_shape s(8, 2, 24);
    const auto k = random_matrix<float>(200, s.kv_width(), 6);
    const auto v = random_matrix<float>(200, s.kv_width(), 7);
    auto c = TestFixture::make(cache_shape(1, s), 256);
    c.fill(0, k, v);
    const auto q = random_matrix<float>(3, s.q_width(), 8);
    row_matrix<T> out(3, s.q_width());
    attention_workspace<T> ws;
    cross_attention(s, q.cast<T>(), c, 0, out, ws);
    attention_mask everything;
    everything.causal = false;
    const row_matrix<double> want = reference_attention<double>(
        s, q.cast<double>(), k.cast<double>(), v.cast<double>(), everything);
    EXPECT_LT((out.template cast<double>() - want).cwiseAbs().maxCoeff(),
              storage_tolerance<Scalar>());
  }
}

// clear() starts a new encoder input of another length in the same memory.
TYPED_TEST(CrossTest, ClearThenANewEncoderInput) {
  using T = typename TestFixture::T;
  const attention_shape s(4, 1, 40);
  auto c = TestFixture::make(cache_shape(3, s), 64);
  for (Index l = 0; l < 3; ++l) {
    EXPECT_FALSE(c.filled(l));
    c.fill(l, random_matrix<float>(64, s.kv_width(), unsigned(l)),
           random_matrix<float>(64, s.kv_width(), unsigned(l + 5)));
    EXPECT_TRUE(c.filled(l));
    EXPECT_EQ(c.filled(), l == 2);
  }
  const Index cap = c.capacity_bytes();
  c.clear();
  EXPECT_EQ(c.size(), 0);
  EXPECT_EQ(c.bytes(), 0);
  EXPECT_EQ(c.capacity_bytes(), cap);
  EXPECT_FALSE(c.filled());
  for (Index l = 0; l < 3; ++l) EXPECT_FALSE(c.filled(l));
  for (Index l = 0; l < 3; ++l) {
    c.fill(l, random_matrix<float>(9, s.kv_width(), unsigned(l + 40)),
           random_matrix<float>(9, s.kv_width(), unsigned(l + 50)));
  }
  EXPECT_EQ(c.size(), 9);
  EXPECT_EQ(c.capacity_bytes(), cap) << "refilled in the memory allocated when built";
  const auto q = random_matrix<double>(2, s.q_width(), 9);
  row_matrix<T> out(2, s.q_width());
  attention_workspace<T> ws;
  cross_attention(s, q.cast<T>(), c, 2, out, ws);
  EXPECT_LT((out.template cast<double>() - oracle(s, c, 2, q.cast<T>().template cast<double>()))
                .cwiseAbs()
                .maxCoeff(),
            TestFixture::tolerance());
}

// bytes() counts what the filled layers hold, as the memory formulas do; capacity_bytes() is
// allocated once.
TYPED_TEST(CrossTest, BytesEqualTheFormula) {
  using format = typename TestFixture::format;
  const Index L = 3, H = 2, d = 24;
  const attention_shape s(8, H, d);
  for (const Index m : {Index(1), Index(37), Index(300)}) {
    SCOPED_TRACE(std::to_string(m) + " encoder tokens");
    auto c = TestFixture::make(cache_shape(L, s), 300);
    EXPECT_EQ(c.bytes(), 0);
    const Index allocated = c.capacity_bytes();
    EXPECT_GT(allocated, 0);
    for (Index l = 0; l < L; ++l) {
      c.fill(l, random_matrix<float>(m, s.kv_width(), 1), random_matrix<float>(m, s.kv_width(), 2));
      const Index filled = l + 1;
      if constexpr (format::lossless) {
        using Scalar = typename format::scalar_type;
        EXPECT_EQ(c.bytes(), kv_cache_bytes(1, m, filled, H, d, Index(sizeof(Scalar))));
        EXPECT_EQ(c.bytes(), filled * m * 2 * H * d * Index(sizeof(Scalar)));
      } else {
        // Whole groups quantized (none within the residual), the rest in the float tail.
        const Index g = c.format().group_size(), R = c.format().residual();
        const Index Q = m >= R + g ? (m - R) / g * g : 0;
        EXPECT_EQ(c.bytes(), kv_cache_bytes(1, Q, filled, H, d, c.format().dtype()) +
                                 filled * (m - Q) * 2 * Index(sizeof(float)) * H * d);
      }
      EXPECT_EQ(c.capacity_bytes(), allocated);
      EXPECT_LE(c.bytes(), c.capacity_bytes());
    }
  }
}

// fill takes what a model computes: the product of the encoder's output by W_k^T (evaluated
// once), a block of a larger buffer, another expression (of another scalar type for plain
// storage).
TYPED_TEST(CrossTest, FillTakesExpressions) {
  const attention_shape s(8, 2, 24);
  const auto encoded = random_matrix<float>(45, 32, 1);
  const auto wk = random_matrix<float>(s.kv_width(), 32, 2);
  const auto wv = random_matrix<float>(s.kv_width(), 32, 3);
  // What fill evaluates the products to (the same product code, so the same rounding).
  const auto k = (encoded * wk.transpose()).eval();
  const auto v = (encoded * wv.transpose()).eval();
  auto evaluated = TestFixture::make(cache_shape(3, s), 64);
  evaluated.fill(0, k, v);
  auto products = TestFixture::make(cache_shape(3, s), 64);
  products.fill(0, encoded * wk.transpose(), encoded * wv.transpose());
  row_matrix<float> buffer = random_matrix<float>(64, 2 * s.kv_width(), 4);
  buffer.topLeftCorner(45, s.kv_width()) = k;
  buffer.topRightCorner(45, s.kv_width()) = v;
  products.fill(1, buffer.topLeftCorner(45, s.kv_width()), buffer.topRightCorner(45, s.kv_width()));
  if constexpr (TestFixture::format::lossless) {
    products.fill(2, k.cast<double>(), v.cast<double>());
  } else {  // quantized formats are written from float rows
    products.fill(2, k * 1.0f, v * 1.0f);
  }
  for (Index l = 0; l < 3; ++l) {
    EXPECT_EQ(products.keys(l), evaluated.keys(0)) << "layer " << l;
    EXPECT_EQ(products.values(l), evaluated.values(0)) << "layer " << l;
  }
}

// Every refused fill names what is wrong and leaves every layer as it was.
TYPED_TEST(CrossTest, RefusedFillsChangeNothing) {
  using cache = typename TestFixture::cache;
  const attention_shape s(8, 2, 24);
  auto c = TestFixture::make(cache_shape(3, s), 50);
  const auto k = random_matrix<float>(40, s.kv_width(), 1);
  const auto v = random_matrix<float>(40, s.kv_width(), 2);
  c.fill(1, k, v);
  const snapshot<cache> before(c);
  const auto unchanged = [&] { EXPECT_TRUE(snapshot<cache>(c) == before); };

  expect_throw_with<std::out_of_range>([&] { c.fill(3, k, v); },
                                       "fill: layer 3 out of range [0, 3)");
  unchanged();
  expect_throw_with<std::out_of_range>([&] { c.fill(-1, k, v); }, "fill: layer -1 out of range");
  unchanged();
  const auto wide = random_matrix<float>(40, s.kv_width() + 1, 3);
  expect_throw_with<std::invalid_argument>(
      [&] { c.fill(0, wide, v); }, "fill: k has 49 columns, expected n_kv_heads*head_dim = 48");
  unchanged();
  expect_throw_with<std::invalid_argument>(
      [&] { c.fill(0, k, wide); }, "fill: v has 49 columns, expected n_kv_heads*head_dim = 48");
  unchanged();
  expect_throw_with<std::invalid_argument>([&] { c.fill(0, k, v.topRows(39)); },
                                           "fill: k has 40 rows (tokens) but v has 39");
  unchanged();
  expect_throw_with<std::invalid_argument>([&] { c.fill(0, k.topRows(0), v.topRows(0)); },
                                           "fill: k and v hold no encoder token");
  unchanged();
  const auto many = random_matrix<float>(51, s.kv_width(), 4);
  expect_throw_with<std::length_error>([&] { c.fill(0, many, many); },
                                       "fill: 51 encoder tokens exceed capacity = 50");
  unchanged();
  // Filling a filled layer again (appending to it) is refused until clear().
  expect_throw_with<std::logic_error>(
      [&] { c.fill(1, k, v); },
      "fill: layer 1 is filled already with 40 encoder tokens; clear() before filling it");
  unchanged();
  expect_throw_with<std::logic_error>([&] { c.fill(1, k.topRows(1), v.topRows(1)); },
                                      "fill: layer 1 is filled already");
  unchanged();
  expect_throw_with<std::invalid_argument>(
      [&] { c.fill(2, k.topRows(30), v.topRows(30)); },
      "fill: 30 encoder tokens for layer 2 but the filled layers hold 40");
  unchanged();
  // The other layers still take the same encoder length.
  c.fill(0, k, v);
  c.fill(2, k, v);
  EXPECT_TRUE(c.filled());
  EXPECT_EQ(c.keys(0), c.keys(1));
}

// Refused attention calls name what is wrong; the cache is read-only to them.
TYPED_TEST(CrossTest, RefusedAttention) {
  using cache = typename TestFixture::cache;
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 24);
  auto c = TestFixture::make(cache_shape(2, s), 20);
  c.fill(0, random_matrix<float>(20, s.kv_width(), 1), random_matrix<float>(20, s.kv_width(), 2));
  const snapshot<cache> before(c);
  attention_workspace<T> ws;
  const row_matrix<T> q = row_matrix<T>::Zero(3, s.q_width());
  row_matrix<T> out(3, s.q_width());
  expect_throw_with<std::logic_error>([&] { cross_attention(s, q, c, 1, out, ws); },
                                      "cross_attention: layer 1 is not filled");
  expect_throw_with<std::logic_error>(
      [&] { cross_attention(s, q.topRows(1), c, 1, out.topRows(1), ws); },
      "cross_attention: layer 1 is not filled");
  expect_throw_with<std::out_of_range>([&] { cross_attention(s, q, c, 2, out, ws); },
                                       "cross_attention: layer 2 out of range [0, 2)");
  const row_matrix<T> narrow = row_matrix<T>::Zero(3, s.q_width() - 1);
  expect_throw_with<std::invalid_argument>([&] { cross_attention(s, narrow, c, 0, out, ws); },
                                           "cross_attention: q has 191 columns");
  row_matrix<T> short_out(2, s.q_width());
  expect_throw_with<std::invalid_argument>([&] { cross_attention(s, q, c, 0, short_out, ws); },
                                           "cross_attention: out is 2 x 192, expected 3 x 192");
  expect_throw_with<std::invalid_argument>(
      [&] { cross_attention(attention_shape(8, 4, 24), q, c, 0, out, ws); },
      "cross_attention: cache has 2 kv heads of dim 24, expected 4 of dim 24");
  attention_options bad;
  bad.tile_tokens = 0;
  expect_throw_with<std::invalid_argument>([&] { cross_attention(s, q, c, 0, out, ws, bad); },
                                           "cross_attention: tile_tokens must be > 0");
  EXPECT_TRUE(snapshot<cache>(c) == before);
  // No queries: nothing to do.
  row_matrix<T> none(0, s.q_width());
  cross_attention(s, q.topRows(0), c, 0, none, ws);
}

// The constructor refuses a capacity below 1 and sizes that overflow.
TYPED_TEST(CrossTest, RefusedCapacities) {
  const cache_shape s(2, 8, 2, 24);
  expect_throw_with<std::invalid_argument>(
      [&] { TestFixture::make(s, 0); },
      "cross_attention_cache: capacity (encoder tokens per layer) must be >= 1, got 0");
  EXPECT_THROW(TestFixture::make(s, -5), std::invalid_argument);
  EXPECT_THROW(TestFixture::make(s, Index(1) << 61), std::length_error);
}

// A moved-from cache has no layers, holds nothing and refuses fills by layer.
TYPED_TEST(CrossTest, MovedFromIsEmpty) {
  const attention_shape s(4, 4, 16);
  auto a = TestFixture::make(cache_shape(2, s), 8);
  a.fill(0, random_matrix<float>(8, s.kv_width(), 1), random_matrix<float>(8, s.kv_width(), 2));
  auto b = std::move(a);
  EXPECT_EQ(b.size(), 8);
  EXPECT_TRUE(b.filled(0));
  // NOLINTBEGIN(bugprone-use-after-move): a moved-from cache is specified to be empty.
  EXPECT_EQ(a.n_layers(), 0);
  EXPECT_EQ(a.size(), 0);
  EXPECT_EQ(a.bytes(), 0);
  EXPECT_FALSE(a.filled());
  EXPECT_THROW(a.fill(0, random_matrix<float>(8, s.kv_width(), 1),
                      random_matrix<float>(8, s.kv_width(), 2)),
               std::out_of_range);
  // NOLINTEND(bugprone-use-after-move)
  auto c = b;  // a copy continues independently
  c.clear();
  EXPECT_TRUE(b.filled(0));
  EXPECT_FALSE(c.filled(0));
}

// Nothing can be appended to a cross cache: it has no append, prefill, crop or shift, and the
// kv_cache underneath is handed out read-only.
template <class C, class = void>
struct can_append : std::false_type {};
template <class C>
struct can_append<C, std::void_t<decltype(std::declval<C&>().append(
                         Index(0), std::declval<const row_matrix<float>&>(),
                         std::declval<const row_matrix<float>&>()))>> : std::true_type {};
template <class C, class = void>
struct can_crop : std::false_type {};
template <class C>
struct can_crop<C, std::void_t<decltype(std::declval<C&>().crop(Index(0)))>> : std::true_type {};
template <class C, class = void>
struct can_prefill : std::false_type {};
template <class C>
struct can_prefill<C, std::void_t<decltype(prefill_attention(
                          std::declval<const attention_shape&>(),
                          std::declval<const row_matrix<float>&>(),
                          std::declval<const row_matrix<float>&>(),
                          std::declval<const row_matrix<float>&>(), std::declval<C&>(), Index(0),
                          std::declval<row_matrix<float>&>(),
                          std::declval<attention_workspace<float>&>()))>> : std::true_type {};

TEST(CrossCache, HasNoWayToAppend) {
  using cross = cross_attention_cache<plain_format<float>>;
  static_assert(!can_append<cross>::value, "a cross cache has no append");
  static_assert(!can_crop<cross>::value, "a cross cache has no crop");
  static_assert(!can_prefill<cross>::value, "prefill cannot write to a cross cache");
  using storage = std::remove_reference_t<decltype(std::declval<cross&>().cache())>;
  static_assert(std::is_const_v<storage>, "the kv_cache underneath is read-only");
  static_assert(!can_append<storage>::value, "nor through the kv_cache underneath");
  static_assert(!can_prefill<storage>::value, "nor prefill through it");
  // The checks can tell: a kv_cache can do all of these.
  using writable = kv_cache<fixed_layout, plain_format<float>>;
  static_assert(can_append<writable>::value && can_crop<writable>::value &&
                can_prefill<writable>::value, "the detectors detect");
  SUCCEED();
}

// A decoder's cross-attention over one row per step reads a view that stays put: the view's
// mask is not causal, its blocks are the fixed layout's single run (or the quantized format's
// run and tail), and its positions are 0..size-1.
TEST(CrossCache, ViewIsNotCausal) {
  const attention_shape s(8, 2, 24);
  cross_attention_cache<plain_format<float>> c(cache_shape(1, s), 100);
  EXPECT_EQ(c.view(0).size(), 0);
  c.fill(0, random_matrix<float>(70, s.kv_width(), 1), random_matrix<float>(70, s.kv_width(), 2));
  const auto w = c.view(0);
  EXPECT_FALSE(w.mask().causal);
  EXPECT_EQ(w.mask().window, 0);
  EXPECT_EQ(w.size(), 70);
  EXPECT_EQ(w.n_blocks(), 1);
  EXPECT_EQ(w.position(0), 0);
  EXPECT_EQ(w.end_position(), 70);
  EXPECT_TRUE(c.cache().view(0).mask().causal) << "the kv_cache underneath keeps its own mask";
  EXPECT_THROW(c.view(1), std::out_of_range);
}

// The workspace is shared by the two paths and by calls of different sizes, and a busy one is
// refused.
TEST(CrossCache, BusyWorkspaceIsRefused) {
  const attention_shape s(8, 2, 24);
  cross_attention_cache<plain_format<float>> c(cache_shape(1, s), 10);
  c.fill(0, random_matrix<float>(10, s.kv_width(), 1), random_matrix<float>(10, s.kv_width(), 2));
  attention_workspace<float> ws;
  const attention_workspace<float>::guard held(ws, "test");
  row_matrix<float> q = row_matrix<float>::Zero(2, s.q_width()), out(2, s.q_width());
  expect_throw_with<std::logic_error>([&] { cross_attention(s, q, c, 0, out, ws); },
                                      "cross_attention: this attention_workspace is in use");
  expect_throw_with<std::logic_error>(
      [&] { cross_attention(s, q.topRows(1), c, 0, out.topRows(1), ws); },
      "decode_attention: this attention_workspace is in use");
}

}  // namespace
