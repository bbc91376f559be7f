// SPDX-License-Identifier: Apache-2.0
// Tests of sliding_window_cache: held tokens, wrap-around, constant memory, bad input, and
// decode and prefill on it against the reference with a sliding-window (and sinks) mask.
#include "common.hpp"

#include <kvcache/cache/sliding_window.hpp>

#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace kvcache::test {
namespace {

template <class Scalar>
class SlidingWindowTest : public ::testing::Test {
 protected:
  using T = compute_t<Scalar>;
  attention_workspace<T> ws_;
};
TYPED_TEST_SUITE(SlidingWindowTest, storage_types, scalar_name);

// The held keys (or values) of a view, oldest first, as `size x n_kv_heads*head_dim`
// doubles: the blocks of each head read one after the other.
template <class Scalar>
row_matrix<double> read_back(const cache_view<plain_format<Scalar>>& view, bool keys) {
  const Index d = view.head_dim();
  row_matrix<double> out(view.size(), view.n_kv_heads() * d);
  for (Index h = 0; h < view.n_kv_heads(); ++h) {
    Index row = 0;
    for (Index b = 0; b < view.n_blocks(); ++b) {
      const auto blk = view.block(h, b).stored;
      EXPECT_GT(blk.tokens, 0) << "empty block " << b;
      EXPECT_LE(row + blk.tokens, view.size());
      for (Index t = 0; t < blk.tokens && row < view.size(); ++t, ++row) {
        for (Index x = 0; x < d; ++x) {
          out(row, h * d + x) = double((keys ? blk.keys : blk.values)[t * blk.stride + x]);
        }
      }
    }
    EXPECT_EQ(row, view.size()) << "blocks of head " << h;
  }
  return out;
}

// The positions a layer holds after `position` tokens: the sinks and the last `window`.
std::vector<Index> held_positions(Index position, Index window, Index sinks) {
  std::vector<Index> out;
  for (Index p = 0; p < position; ++p) {
    if (p < sinks || p >= position - window) out.push_back(p);
  }
  return out;
}

row_matrix<double> rows_at(const row_matrix<double>& m, const std::vector<Index>& rows) {
  row_matrix<double> out(Index(rows.size()), m.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) out.row(Index(i)) = m.row(rows[i]);
  return out;
}

// Everything observable about a cache, to prove a throwing call changed nothing.
template <class Scalar>
struct snapshot {
  std::vector<Index> positions, sizes;
  std::vector<row_matrix<double>> keys, values;
  Index bytes;
  explicit snapshot(const sliding_window_cache<Scalar>& c) : bytes(c.bytes()) {
    for (Index l = 0; l < c.n_layers(); ++l) {
      positions.push_back(c.position(l));
      sizes.push_back(c.size(l));
      keys.push_back(read_back(c.view(l), true));
      values.push_back(read_back(c.view(l), false));
    }
  }
  bool operator==(const snapshot& o) const {
    return positions == o.positions && sizes == o.sizes && keys == o.keys &&
           values == o.values && bytes == o.bytes;
  }
};

// The largest absolute difference of two matrices; NaN if either holds one, so that a NaN
// fails every tolerance instead of slipping through a max.
template <class A, class B>
double max_error(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return double((a.template cast<double>() - b.template cast<double>())
                    .cwiseAbs()
                    .template maxCoeff<Eigen::PropagateNaN>());
}

template <class F>
void expect_message(F&& call, const char* part) {
  try {
    call();
    ADD_FAILURE() << "no exception";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

attention_mask window_mask(Index window, Index sinks) {
  attention_mask mask;
  mask.causal = true;
  mask.q_pos0 = -1;
  mask.window = window;
  mask.sinks = sinks;
  return mask;
}

// Appends `n` tokens one at a time and decodes after each; returns the largest difference
// from the oracle over every token ever appended with the sliding-window mask.
template <class Scalar>
double decode_run_error(const attention_shape& s, Index window, Index sinks, Index n,
                        const attention_options& opt, unsigned seed,
                        attention_workspace<compute_t<Scalar>>& ws) {
  using T = compute_t<Scalar>;
  const auto q = random_matrix(n, s.q_width(), seed);
  const auto k = random_matrix(n, s.kv_width(), seed + 1);
  const auto v = random_matrix(n, s.kv_width(), seed + 2);
  const auto ks = stored<Scalar>(k), vs = stored<Scalar>(v);
  sliding_window_cache<Scalar> cache(cache_shape(1, s), window, sinks);
  row_vector<T> out(s.q_width());
  double worst = 0;
  for (Index p = 0; p < n; ++p) {
    EXPECT_EQ(cache.position(0), p);
    cache.append(0, k.row(p), v.row(p));
    EXPECT_EQ(cache.size(0), std::min(p + 1, sinks + window));
    decode_attention(s, q.row(p).template cast<T>(), cache.view(0), out, ws, opt);
    const auto want = reference_attention<double>(s, q.row(p), ks.topRows(p + 1),
                                                  vs.topRows(p + 1), window_mask(window, sinks));
    const double error = max_error(out, want);
    if (!(error <= worst)) worst = error;  // NaN sticks
  }
  return worst;
}

TYPED_TEST(SlidingWindowTest, StartsEmptyWithEverythingAllocated) {
  const cache_shape shape(3, 8, 2, 5);
  sliding_window_cache<TypeParam> cache(shape, 16, 4);
  EXPECT_EQ(cache.window(), 16);
  EXPECT_EQ(cache.sinks(), 4);
  EXPECT_EQ(cache.capacity(), 20);
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.bytes(), 0);
  EXPECT_EQ(cache.capacity_bytes(), kv_cache_bytes(1, 20, 3, 2, 5, sizeof(TypeParam)));
  for (Index l = 0; l < 3; ++l) {
    EXPECT_EQ(cache.position(l), 0);
    EXPECT_EQ(cache.size(l), 0);
    EXPECT_EQ(cache.view(l).n_blocks(), 0);
    EXPECT_EQ(cache.view(l).size(), 0);
  }
}

// After every append the view holds exactly the sinks and the last `window` tokens, oldest
// first, in as many blocks as the ring's state needs.
TYPED_TEST(SlidingWindowTest, ViewHoldsTheSinksAndTheWindowOldestFirst) {
  const Index H = 2, d = 3, n = 90;
  const auto k = random_matrix(n, H * d, 1), v = random_matrix(n, H * d, 2);
  const auto ks = stored<TypeParam>(k), vs = stored<TypeParam>(v);
  const std::pair<Index, Index> configs[] = {{16, 0}, {16, 4}, {1, 0}, {5, 4}, {100, 0}, {100, 7}};
  for (const auto& [window, sinks] : configs) {
    SCOPED_TRACE("window=" + std::to_string(window) + " sinks=" + std::to_string(sinks));
    sliding_window_cache<TypeParam> cache(cache_shape(1, 4, H, d), window, sinks);
    for (Index p = 0; p < n; ++p) {
      cache.append(0, k.row(p), v.row(p));
      const auto held = held_positions(p + 1, window, sinks);
      const auto view = cache.view(0);
      ASSERT_EQ(view.size(), Index(held.size())) << "position " << p + 1;
      EXPECT_EQ(read_back(view, true), rows_at(ks, held)) << "position " << p + 1;
      EXPECT_EQ(read_back(view, false), rows_at(vs, held)) << "position " << p + 1;
      EXPECT_LE(view.n_blocks(), 3);
    }
  }
}

// The block structure at the wrap-around points: one block until the ring first wraps, and
// again whenever its oldest token is back in its first slot; otherwise the sinks and the
// ring's two parts.
TYPED_TEST(SlidingWindowTest, BlocksAtTheWrapAroundPoints) {
  const Index W = 16;
  const auto k = random_matrix(200, 4, 1), v = random_matrix(200, 4, 2);
  for (const Index S : {0, 4}) {
    SCOPED_TRACE("sinks=" + std::to_string(S));
    sliding_window_cache<TypeParam> cache(cache_shape(1, 2, 2, 2), W, S);
    const Index wrapped_blocks = S > 0 ? 3 : 2;
    for (Index p = 1; p <= 200; ++p) {
      cache.append(0, k.row(p - 1), v.row(p - 1));
      const auto view = cache.view(0);
      const bool aligned = p <= S + W || (p - S) % W == 0;
      // Blocks carry positions: the sinks stand apart from the ring once a token was evicted.
      const Index aligned_blocks = p <= S + W || S == 0 ? 1 : 2;
      EXPECT_EQ(view.n_blocks(), aligned ? aligned_blocks : wrapped_blocks) << "position " << p;
      if (p == S + W || p == S + W + 1 || p % W == 0 || (p - S) % W == 1) {
        EXPECT_EQ(view.size(), std::min(p, S + W)) << "position " << p;
        if (!aligned) {
          const Index next = (p - S) % W;  // ring slot of the oldest token and the next write
          const Index base = S > 0 ? 1 : 0;
          EXPECT_EQ(view.block(1, base).tokens, W - next);
          EXPECT_EQ(view.block(1, base + 1).tokens, next);
          if (S > 0) {
            EXPECT_EQ(view.block(1, 0).tokens, S);
          }
        }
      }
    }
  }
}

TYPED_TEST(SlidingWindowTest, DecodeEqualsWindowedReferenceOverAllTokens) {
  const attention_shape s(4, 2, 32);
  struct run_case {
    Index window, sinks, n;
  };
  const run_case cases[] = {{16, 0, 300}, {16, 4, 300}, {1, 0, 60}, {100, 0, 80}, {100, 4, 140},
                            {2, 1, 40}};
  unsigned seed = 30;
  for (const auto& c : cases) {
    SCOPED_TRACE("window=" + std::to_string(c.window) + " sinks=" + std::to_string(c.sinks));
    EXPECT_LT(decode_run_error<TypeParam>(s, c.window, c.sinks, c.n, {}, seed += 3, this->ws_),
              kernel_tolerance<TypeParam>());
  }
}

TYPED_TEST(SlidingWindowTest, DecodeOnEveryShape) {
  unsigned seed = 60;
  for (const auto& c : shape_cases) {
    SCOPED_TRACE(c.name);
    const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
    EXPECT_LT(decode_run_error<TypeParam>(s, 8, 3, 40, {}, seed += 3, this->ws_),
              kernel_tolerance<TypeParam>());
    EXPECT_LT(decode_run_error<TypeParam>(s, 8, 0, 30, {}, seed += 3, this->ws_),
              kernel_tolerance<TypeParam>());
  }
}

// Split-K over two threads, with runs and tiles shorter than the blocks, so runs start and
// end inside blocks and cross from one to the next.
TYPED_TEST(SlidingWindowTest, DecodeSplitKAcrossBlocksOnTwoThreads) {
  thread_pool two(2);
  const attention_shape gqa(8, 2, 16), mqa(4, 1, 7);
  unsigned seed = 90;
  for (const Index split : {0, 1, 3, 5, 64}) {
    for (const Index tile : {1, 4, 128}) {
      SCOPED_TRACE("split=" + std::to_string(split) + " tile=" + std::to_string(tile));
      attention_options opt;
      opt.pool = &two;
      opt.split_tokens = split;
      opt.tile_tokens = tile;
      EXPECT_LT(decode_run_error<TypeParam>(gqa, 16, 4, 60, opt, seed += 3, this->ws_),
                kernel_tolerance<TypeParam>());
      EXPECT_LT(decode_run_error<TypeParam>(mqa, 10, 0, 35, opt, seed += 3, this->ws_),
                kernel_tolerance<TypeParam>());
    }
  }
}

// Chunks of every size, longer than the window too, leave the cache as one token at a time.
TYPED_TEST(SlidingWindowTest, ManyAtOnceEqualsOneAtATime) {
  const Index H = 2, d = 5, W = 16;
  const Index chunks[] = {1, 3, 2, 15, 16, 17, 1, 40, 5, 100, 16, 2, 33};
  Index n = 0;
  for (Index c : chunks) n += c;
  const auto k = random_matrix(n, H * d, 1), v = random_matrix(n, H * d, 2);
  for (const Index S : {0, 4, 15}) {
    SCOPED_TRACE("sinks=" + std::to_string(S));
    sliding_window_cache<TypeParam> bulk(cache_shape(1, 2, H, d), W, S),
        single(cache_shape(1, 2, H, d), W, S);
    Index at = 0;
    for (Index c : chunks) {
      bulk.append(0, k.middleRows(at, c), v.middleRows(at, c));
      for (Index t = at; t < at + c; ++t) single.append(0, k.row(t), v.row(t));
      at += c;
      ASSERT_EQ(bulk.position(0), at);
      EXPECT_EQ(bulk.size(0), single.size(0));
      EXPECT_EQ(read_back(bulk.view(0), true), read_back(single.view(0), true)) << "at " << at;
      EXPECT_EQ(read_back(bulk.view(0), false), read_back(single.view(0), false)) << "at " << at;
      EXPECT_EQ(read_back(bulk.view(0), true),
                rows_at(stored<TypeParam>(k), held_positions(at, W, S)));
    }
  }
  // From an empty layer, a chunk many windows long.
  sliding_window_cache<TypeParam> cache(cache_shape(1, 2, H, d), 7, 2);
  cache.append(0, k, v);
  EXPECT_EQ(read_back(cache.view(0), false),
            rows_at(stored<TypeParam>(v), held_positions(n, 7, 2)));
  cache.append(0, k.topRows(0), v.topRows(0));  // no tokens: nothing changes
  EXPECT_EQ(cache.position(0), n);
}

TYPED_TEST(SlidingWindowTest, MemoryIsConstantOnceFull) {
  const cache_shape shape(2, 8, 2, 16);
  sliding_window_cache<TypeParam> cache(shape, 128, 4);
  const Index capacity_bytes = cache.capacity_bytes();
  EXPECT_EQ(capacity_bytes, kv_cache_bytes(1, 132, 2, 2, 16, sizeof(TypeParam)));
  const auto keys0 = cache.view(0).storage->keys.data(), values1 = cache.view(1).storage->values.data();
  const auto k = random_matrix(64, 32, 1), v = random_matrix(64, 32, 2);
  auto run_to = [&](Index n) {
    while (cache.position(0) < n) {
      for (Index l = 0; l < 2; ++l) cache.append(l, k, v);
    }
  };
  run_to(64);
  EXPECT_EQ(cache.bytes(), kv_cache_bytes(1, 64, 2, 2, 16, sizeof(TypeParam)));
  run_to(256);
  const Index full = cache.bytes();
  EXPECT_EQ(full, capacity_bytes);
  EXPECT_EQ(full, 2 * 2 * 132 * 32 * Index(sizeof(TypeParam)));
  run_to(2048);
  EXPECT_EQ(cache.position(0), 2048);
  EXPECT_EQ(cache.size(0), 132);
  EXPECT_EQ(cache.bytes(), full);
  EXPECT_EQ(cache.capacity_bytes(), capacity_bytes);
  EXPECT_EQ(cache.view(0).storage->keys.data(), keys0);
  EXPECT_EQ(cache.view(1).storage->values.data(), values1);

  cache.clear();
  EXPECT_EQ(cache.position(1), 0);
  EXPECT_EQ(cache.bytes(), 0);
  EXPECT_EQ(cache.capacity_bytes(), capacity_bytes);
}

TYPED_TEST(SlidingWindowTest, LayersAreIndependentAndCopiesDeep) {
  sliding_window_cache<TypeParam> cache(cache_shape(2, 4, 2, 3), 4, 1);
  const auto k = random_matrix(10, 6, 1), v = random_matrix(10, 6, 2);
  cache.append(0, k, v);
  cache.append(1, k.topRows(2), v.topRows(2));
  EXPECT_EQ(cache.position(0), 10);
  EXPECT_EQ(cache.position(1), 2);
  EXPECT_EQ(cache.size(0), 5);
  EXPECT_EQ(cache.size(1), 2);
  EXPECT_EQ(cache.size(), 2);
  EXPECT_EQ(cache.bytes(), kv_cache_bytes(1, 7, 1, 2, 3, sizeof(TypeParam)));

  const snapshot<TypeParam> before(cache);
  sliding_window_cache<TypeParam> copy(cache);
  EXPECT_TRUE(snapshot<TypeParam>(copy) == before);
  EXPECT_NE(copy.view(0).storage->keys.data(), cache.view(0).storage->keys.data());
  copy.append(0, k.topRows(3), v.topRows(3));
  copy.append(1, k, v);
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);
  cache = copy;
  EXPECT_TRUE(snapshot<TypeParam>(cache) == snapshot<TypeParam>(copy));
  sliding_window_cache<TypeParam> moved(std::move(copy));
  EXPECT_TRUE(snapshot<TypeParam>(moved) == snapshot<TypeParam>(cache));

  // After clear, the same tokens give the same cache as a fresh one.
  cache.clear();
  sliding_window_cache<TypeParam> fresh(cache_shape(2, 4, 2, 3), 4, 1);
  for (Index l = 0; l < 2; ++l) {
    cache.append(l, k.topRows(7), v.topRows(7));
    fresh.append(l, k.topRows(7), v.topRows(7));
  }
  EXPECT_TRUE(snapshot<TypeParam>(cache) == snapshot<TypeParam>(fresh));
}

TYPED_TEST(SlidingWindowTest, SinksAtLeastTheWindowAndBadSizesAreRefused) {
  const cache_shape shape(1, 4, 2, 8);
  using cache_t = sliding_window_cache<TypeParam>;
  EXPECT_THROW(cache_t(shape, 4, 4), std::invalid_argument);
  EXPECT_THROW(cache_t(shape, 4, 5), std::invalid_argument);
  expect_message([&] { cache_t(shape, 4, 4); },
                 "sliding_window_cache: sinks = 4 must be less than window = 4");
  EXPECT_THROW(cache_t(shape, 0), std::invalid_argument);
  EXPECT_THROW(cache_t(shape, -2), std::invalid_argument);
  expect_message([&] { cache_t(shape, 0); }, "sliding_window_cache: window must be >= 1, got 0");
  EXPECT_THROW(cache_t(shape, 4, -1), std::invalid_argument);
  expect_message([&] { cache_t(shape, 4, -1); }, "sliding_window_cache: sinks must be >= 0, got -1");
  EXPECT_THROW(cache_t(shape, std::numeric_limits<Index>::max() / 4, 1), std::length_error);
  EXPECT_NO_THROW(cache_t(shape, 4, 3));
  EXPECT_NO_THROW(cache_t(shape, 1, 0));
}

TYPED_TEST(SlidingWindowTest, BadInputThrowsAndChangesNothing) {
  sliding_window_cache<TypeParam> cache(cache_shape(2, 4, 2, 4), 5, 2);
  cache.append(0, random_matrix(9, 8, 1), random_matrix(9, 8, 2));  // wrapped
  cache.append(1, random_matrix(3, 8, 3), random_matrix(3, 8, 4));
  const snapshot<TypeParam> before(cache);
  const auto ok = random_matrix(1, 8, 5), narrow = random_matrix(1, 7, 6);

  EXPECT_THROW(cache.append(0, narrow, ok), std::invalid_argument);
  expect_message([&] { cache.append(0, narrow, ok); },
                 "append: k has 7 columns, expected n_kv_heads*head_dim = 8");
  EXPECT_THROW(cache.append(0, ok, narrow), std::invalid_argument);
  expect_message([&] { cache.append(1, ok, narrow); },
                 "append: v has 7 columns, expected n_kv_heads*head_dim = 8");
  EXPECT_THROW(cache.append(0, ok, random_matrix(2, 8, 7)), std::invalid_argument);
  expect_message([&] { cache.append(0, ok, random_matrix(2, 8, 7)); },
                 "append: k has 1 rows (tokens) but v has 2");
  EXPECT_THROW(cache.append(2, ok, ok), std::out_of_range);
  EXPECT_THROW(cache.append(-1, ok, ok), std::out_of_range);
  expect_message([&] { cache.append(2, ok, ok); }, "append: layer 2 out of range [0, 2)");
  EXPECT_THROW((void)cache.view(2), std::out_of_range);
  EXPECT_THROW((void)cache.position(-1), std::out_of_range);
  EXPECT_THROW((void)cache.size(2), std::out_of_range);
  expect_message([&] { (void)cache.view(3); }, "view: layer 3 out of range [0, 2)");
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);
}

// Prefill of a prompt in chunks (shorter and longer than the window, across the point where
// the layer fills) and then decode steps, against the oracle over every token.
TYPED_TEST(SlidingWindowTest, PrefillInChunksThenDecode) {
  using T = typename TestFixture::T;
  thread_pool two(2);
  const attention_shape s(8, 2, 16);
  const Index n = 130, W = 16;
  const auto q = random_matrix(n, s.q_width(), 1);
  const auto k = random_matrix(n, s.kv_width(), 2);
  const auto v = random_matrix(n, s.kv_width(), 3);
  const auto ks = stored<TypeParam>(k), vs = stored<TypeParam>(v);
  const std::vector<std::vector<Index>> plans = {
      {130},                    // one chunk many windows long
      {19, 1, 1, 40, 69},       // fills exactly, then single tokens, then long chunks
      {5, 30, 3, 1, 1, 90},     // a chunk that crosses the point where the layer fills
      {20, 21, 89},
  };
  for (const Index S : {0, 4}) {
    for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &two}) {
      for (const auto& plan : plans) {
        SCOPED_TRACE("sinks=" + std::to_string(S) + " threads=" + (pool ? "2" : "1") +
                     " first chunk=" + std::to_string(plan.front()));
        attention_options opt;
        opt.pool = pool;
        opt.tile_tokens = pool ? 4 : 128;
        opt.split_tokens = pool ? 6 : 0;
        sliding_window_cache<TypeParam> cache(cache_shape(1, s), W, S);
        row_matrix<T> out(n, s.q_width());
        Index at = 0;
        for (const Index len : plan) {
          row_matrix<T> chunk_out(len, s.q_width());
          prefill_attention(s, q.middleRows(at, len).template cast<T>(), k.middleRows(at, len),
                            v.middleRows(at, len), cache, 0, chunk_out, this->ws_, opt);
          out.middleRows(at, len) = chunk_out;
          at += len;
          EXPECT_EQ(cache.position(0), at);
        }
        ASSERT_EQ(at, n);
        EXPECT_EQ(read_back(cache.view(0), true), rows_at(ks, held_positions(n, W, S)));
        attention_mask mask = window_mask(W, S);
        const auto want = reference_attention<double>(s, q, ks, vs, mask);
        EXPECT_LT(max_error(out, want),
                  kernel_tolerance<TypeParam>());
        // The oracle on the unrounded inputs, within the storage rounding.
        EXPECT_LT(max_error(out, reference_attention<double>(s, q, k, v, mask)),
                  storage_tolerance<TypeParam>());
      }
    }
  }
}

// Prefill with one token gives what a decode step gives; with none it changes nothing.
TYPED_TEST(SlidingWindowTest, PrefillOfOneTokenMatchesDecode) {
  using T = typename TestFixture::T;
  const attention_shape s(6, 2, 7);
  const Index n = 30;
  const auto q = random_matrix(n, s.q_width(), 4);
  const auto k = random_matrix(n, s.kv_width(), 5);
  const auto v = random_matrix(n, s.kv_width(), 6);
  sliding_window_cache<TypeParam> a(cache_shape(1, s), 8, 2), b(cache_shape(1, s), 8, 2);
  for (Index t = 0; t < n; ++t) {
    row_matrix<T> out_a(1, s.q_width());
    row_vector<T> out_b(s.q_width());
    prefill_attention(s, q.row(t).template cast<T>(), k.row(t), v.row(t), a, 0, out_a, this->ws_);
    b.append(0, k.row(t), v.row(t));
    decode_attention(s, q.row(t).template cast<T>(), b.view(0), out_b, this->ws_);
    EXPECT_LT(max_error(out_a.row(0), out_b), kernel_tolerance<TypeParam>())
        << "token " << t;
  }
  const snapshot<TypeParam> before(a);
  row_matrix<T> none(0, s.q_width());
  prefill_attention(s, row_matrix<T>(0, s.q_width()), k.topRows(0), v.topRows(0), a, 0, none,
                    this->ws_);
  EXPECT_TRUE(snapshot<TypeParam>(a) == before);
}

TYPED_TEST(SlidingWindowTest, PrefillBadInputChangesNothing) {
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 16);
  sliding_window_cache<TypeParam> cache(cache_shape(2, s), 4, 1);
  cache.append(0, random_matrix(7, 32, 1), random_matrix(7, 32, 2));
  const snapshot<TypeParam> before(cache);
  const row_matrix<T> q3 = row_matrix<T>::Zero(3, 128);
  row_matrix<T> out3(3, 128);
  const auto k3 = random_matrix(3, 32, 3), v3 = random_matrix(3, 32, 4);
  auto& ws = this->ws_;

  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 2, out3, ws), std::out_of_range);
  expect_message([&] { prefill_attention(s, q3, k3, v3, cache, -1, out3, ws); },
                 "prefill_attention: layer -1 out of range [0, 2)");
  EXPECT_THROW(prefill_attention(attention_shape(8, 4, 16), q3, k3, v3, cache, 0, out3, ws),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, row_matrix<T>::Zero(3, 120), k3, v3, cache, 0, out3, ws),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q3, random_matrix(2, 32, 5), random_matrix(2, 32, 6), cache,
                                 0, out3, ws),
               std::invalid_argument);
  expect_message([&] { prefill_attention(s, q3, random_matrix(3, 31, 5), v3, cache, 0, out3, ws); },
                 "prefill_attention: k has 31 columns, expected n_kv_heads*head_dim = 32");
  EXPECT_THROW(prefill_attention(s, q3, k3, random_matrix(2, 32, 6), cache, 0, out3, ws),
               std::invalid_argument);
  row_matrix<T> out_wrong(3, 127);
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 0, out_wrong, ws), std::invalid_argument);
  attention_options zero_tile;
  zero_tile.tile_tokens = 0;
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 0, out3, ws, zero_tile),
               std::invalid_argument);
  attention_options negative_split;
  negative_split.split_tokens = -1;
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 0, out3, ws, negative_split),
               std::invalid_argument);
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);

  // Decode rejects an empty layer and a view that does not fit the shape.
  row_vector<T> q = row_vector<T>::Zero(128), out(128);
  EXPECT_THROW(decode_attention(s, q, cache.view(1), out, ws), std::invalid_argument);
  EXPECT_THROW(decode_attention(attention_shape(8, 8, 16), q, cache.view(0), out, ws),
               std::invalid_argument);
}

}  // namespace
}  // namespace kvcache::test
