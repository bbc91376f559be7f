// SPDX-License-Identifier: Apache-2.0
// Tests of fixed_cache: contents, one allocation for life, capacity errors, and attention on it.
#include "common.hpp"

#include <kvcache/cache/fixed.hpp>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache::test {
namespace {

template <class Scalar>
class FixedTest : public ::testing::Test {
 protected:
  using T = compute_t<Scalar>;
  attention_workspace<T> ws_;
};
TYPED_TEST_SUITE(FixedTest, storage_types, scalar_name);


// Everything observable about a cache, to prove a throwing call changed nothing.
template <class Scalar>
struct snapshot {
  std::vector<Index> sizes;
  std::vector<row_matrix<double>> keys, values;
  Index bytes, capacity_bytes;
  explicit snapshot(const fixed_cache<Scalar>& c) : bytes(c.bytes()), capacity_bytes(c.capacity_bytes()) {
    for (Index l = 0; l < c.n_layers(); ++l) {
      sizes.push_back(c.size(l));
      keys.push_back(read_back(c, l, true));
      values.push_back(read_back(c, l, false));
    }
  }
  bool operator==(const snapshot& o) const {
    return sizes == o.sizes && keys == o.keys && values == o.values && bytes == o.bytes &&
           capacity_bytes == o.capacity_bytes;
  }
};

// The data pointers of every layer and head.
template <class Scalar>
std::vector<const Scalar*> data_pointers(const fixed_cache<Scalar>& c) {
  std::vector<const Scalar*> out;
  for (Index l = 0; l < c.n_layers(); ++l) {
    out.push_back(c.view(l).storage->keys.data());
    out.push_back(c.view(l).storage->values.data());
  }
  return out;
}

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

TYPED_TEST(FixedTest, AllocatesEverythingUpFront) {
  const cache_shape shape(3, 8, 2, 5);
  fixed_cache<TypeParam> cache(shape, 100);
  EXPECT_EQ(cache.capacity(), 100);
  EXPECT_EQ(cache.n_layers(), 3);
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.bytes(), 0);
  EXPECT_EQ(cache.capacity_bytes(), kv_cache_bytes(1, 100, 3, 2, 5, sizeof(TypeParam)));
  for (Index l = 0; l < 3; ++l) {
    EXPECT_EQ(cache.capacity(l), 100);
    EXPECT_NE(cache.view(l).storage->keys.data(), nullptr);
  }
}

TYPED_TEST(FixedTest, NeverReallocates) {
  const cache_shape shape(2, 4, 2, 8);
  fixed_cache<TypeParam> cache(shape, 64);
  const auto pointers = data_pointers(cache);
  const Index capacity_bytes = cache.capacity_bytes();
  auto check = [&](const char* when) {
    SCOPED_TRACE(when);
    EXPECT_EQ(data_pointers(cache), pointers);
    EXPECT_EQ(cache.capacity_bytes(), capacity_bytes);
  };
  for (Index t = 0; t < 40; ++t) {
    for (Index l = 0; l < 2; ++l) {
      cache.append(l, random_matrix(1, 16, unsigned(2 * t)), random_matrix(1, 16, unsigned(2 * t + 1)));
    }
  }
  check("one token at a time");
  for (Index l = 0; l < 2; ++l) cache.append(l, random_matrix(24, 16, 1), random_matrix(24, 16, 2));
  EXPECT_EQ(cache.size(), 64);
  check("filled to capacity with a chunk");
  EXPECT_THROW(cache.append(0, random_matrix(1, 16, 3), random_matrix(1, 16, 4)), std::length_error);
  check("after a refused append");
  cache.crop(10);
  check("after crop");
  cache.append(1, random_matrix(54, 16, 5), random_matrix(54, 16, 6));
  check("refilled after crop");
  cache.clear();
  check("after clear");
  EXPECT_EQ(cache.bytes(), 0);
  cache.append(0, random_matrix(64, 16, 7), random_matrix(64, 16, 8));
  check("refilled after clear");

  // A moved cache keeps its allocation; a copy has one of its own of the same capacity.
  fixed_cache<TypeParam> moved(std::move(cache));
  EXPECT_EQ(data_pointers(moved), pointers);
  fixed_cache<TypeParam> copy(moved);
  EXPECT_NE(data_pointers(copy), pointers);
  EXPECT_EQ(copy.capacity_bytes(), capacity_bytes);
  EXPECT_EQ(read_back(copy, 0, true), read_back(moved, 0, true));
  copy.append(1, random_matrix(64, 16, 9), random_matrix(64, 16, 10));
  EXPECT_EQ(moved.size(1), 0);
}

TYPED_TEST(FixedTest, StoresWhatWasAppended) {
  const Index H = 3, d = 7;
  fixed_cache<TypeParam> cache(cache_shape(2, 6, H, d), 50);
  const auto k = random_matrix(50, H * d, 1), v = random_matrix(50, H * d, 2);
  cache.append(0, k, v);  // layer 0 in one chunk, layer 1 a token at a time
  for (Index t = 0; t < 50; ++t) cache.append(1, k.row(t), v.row(t));
  for (Index l = 0; l < 2; ++l) {
    ASSERT_EQ(cache.size(l), 50);
    EXPECT_EQ(read_back(cache, l, true), stored<TypeParam>(k));
    EXPECT_EQ(read_back(cache, l, false), stored<TypeParam>(v));
  }
  EXPECT_EQ(cache.bytes(), cache.capacity_bytes());
  EXPECT_EQ(cache.bytes(), kv_cache_bytes(1, 50, 2, H, d, sizeof(TypeParam)));
}

TYPED_TEST(FixedTest, PastCapacityThrowsLengthErrorAndChangesNothing) {
  const cache_shape shape(2, 4, 2, 4);
  fixed_cache<TypeParam> cache(shape, 10);
  cache.append(0, random_matrix(4, 8, 1), random_matrix(4, 8, 2));
  cache.append(1, random_matrix(8, 8, 3), random_matrix(8, 8, 4));
  const snapshot<TypeParam> before(cache);
  EXPECT_THROW(cache.append(1, random_matrix(3, 8, 5), random_matrix(3, 8, 6)), std::length_error);
  expect_message([&] { cache.append(1, random_matrix(3, 8, 5), random_matrix(3, 8, 6)); },
                 "append: layer 1 holds 8 tokens, 3 more exceed capacity = 10");
  EXPECT_THROW(cache.append(0, random_matrix(7, 8, 5), random_matrix(7, 8, 6)), std::length_error);
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);
  // Exactly up to capacity is fine, then not one token more.
  cache.append(1, random_matrix(2, 8, 7), random_matrix(2, 8, 8));
  EXPECT_EQ(cache.size(1), 10);
  EXPECT_THROW(cache.append(1, random_matrix(1, 8, 9), random_matrix(1, 8, 10)), std::length_error);
  EXPECT_EQ(cache.size(1), 10);
}

TYPED_TEST(FixedTest, BadInputThrowsAndChangesNothing) {
  fixed_cache<TypeParam> cache(cache_shape(2, 4, 2, 4), 10);
  cache.append(0, random_matrix(5, 8, 1), random_matrix(5, 8, 2));
  cache.append(1, random_matrix(3, 8, 3), random_matrix(3, 8, 4));
  const snapshot<TypeParam> before(cache);
  const auto ok = random_matrix(1, 8, 5), narrow = random_matrix(1, 7, 6);

  EXPECT_THROW(cache.append(0, narrow, ok), std::invalid_argument);
  expect_message([&] { cache.append(0, narrow, ok); },
                 "append: k has 7 columns, expected n_kv_heads*head_dim = 8");
  EXPECT_THROW(cache.append(0, ok, narrow), std::invalid_argument);
  EXPECT_THROW(cache.append(0, ok, random_matrix(2, 8, 7)), std::invalid_argument);
  // A malformed chunk that would also overflow is reported as malformed.
  EXPECT_THROW(cache.append(0, random_matrix(6, 7, 8), random_matrix(6, 7, 9)),
               std::invalid_argument);
  EXPECT_THROW(cache.append(2, ok, ok), std::out_of_range);
  EXPECT_THROW(cache.append(-1, ok, ok), std::out_of_range);
  expect_message([&] { cache.append(2, ok, ok); }, "append: layer 2 out of range [0, 2)");
  EXPECT_THROW((void)cache.view(2), std::out_of_range);
  EXPECT_THROW((void)cache.size(-1), std::out_of_range);
  EXPECT_THROW(cache.crop(4), std::out_of_range) << "layer 1 holds only 3";
  EXPECT_THROW(cache.crop(-1), std::out_of_range);
  expect_message([&] { cache.crop(4); }, "crop: n = 4 out of range [0, 3] of layer 1");
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);

  EXPECT_THROW(fixed_cache<TypeParam>(cache_shape(1, 4, 2, 4), 0), std::invalid_argument);
  EXPECT_THROW(fixed_cache<TypeParam>(cache_shape(1, 4, 2, 4), -3), std::invalid_argument);
  expect_message([] { fixed_cache<TypeParam>(cache_shape(1, 4, 2, 4), 0); },
                 "fixed_cache: capacity must be >= 1, got 0");
}

TYPED_TEST(FixedTest, CropThenAppendEqualsNeverAppended) {
  fixed_cache<TypeParam> straight(cache_shape(1, 2, 2, 3), 30), rolled_back(cache_shape(1, 2, 2, 3), 30);
  const auto k = random_matrix(30, 6, 1), v = random_matrix(30, 6, 2);
  straight.append(0, k, v);
  rolled_back.append(0, k.topRows(20), v.topRows(20));
  rolled_back.append(0, random_matrix(10, 6, 3), random_matrix(10, 6, 4));  // rejected
  rolled_back.crop(20);
  rolled_back.append(0, k.bottomRows(10), v.bottomRows(10));
  EXPECT_EQ(read_back(straight, 0, true), read_back(rolled_back, 0, true));
  EXPECT_EQ(read_back(straight, 0, false), read_back(rolled_back, 0, false));
}

// Chunked prefill onto a layer of the cache, then decode steps, against the oracle; on every
// shape, and with split-K over two threads.
TYPED_TEST(FixedTest, PrefillAndDecodeMatchReference) {
  using T = typename TestFixture::T;
  thread_pool two(2);
  unsigned seed = 20;
  for (const auto& c : shape_cases) {
    for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &two}) {
      SCOPED_TRACE(std::string(c.name) + (pool ? " threads=2" : " threads=1"));
      const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
      const Index n = 70, prompt = 45;
      const auto q = random_matrix(n, s.q_width(), seed += 3);
      const auto k = random_matrix(n, s.kv_width(), seed + 1);
      const auto v = random_matrix(n, s.kv_width(), seed + 2);
      attention_options opt;
      opt.pool = pool;
      opt.split_tokens = pool ? 8 : 0;
      opt.tile_tokens = 16;
      fixed_cache<TypeParam> cache(cache_shape(2, s), n);
      row_matrix<T> out(n, s.q_width());
      const Index cuts[] = {0, 30, 31, prompt};  // a prompt in chunks of 30, 1 and 14
      for (std::size_t i = 0; i + 1 < std::size(cuts); ++i) {
        const Index a = cuts[i], len = cuts[i + 1] - a;
        row_matrix<T> chunk_out(len, s.q_width());
        prefill_attention(s, q.middleRows(a, len).template cast<T>(), k.middleRows(a, len),
                          v.middleRows(a, len), cache, 1, chunk_out, this->ws_, opt);
        out.middleRows(a, len) = chunk_out;
      }
      EXPECT_EQ(cache.size(1), prompt);
      EXPECT_EQ(cache.size(0), 0);
      for (Index t = prompt; t < n; ++t) {
        cache.append(1, k.row(t), v.row(t));
        row_vector<T> step(s.q_width());
        decode_attention(s, q.row(t).template cast<T>(), cache.view(1), step, this->ws_, opt);
        out.row(t) = step;
      }
      EXPECT_EQ(cache.size(1), cache.capacity());
      const auto want = reference_attention<double>(s, q, stored<TypeParam>(k),
                                                    stored<TypeParam>(v));
      EXPECT_LT(max_error(out, want),
                kernel_tolerance<TypeParam>());
    }
  }
}

TYPED_TEST(FixedTest, PrefillBadInputChangesNothing) {
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 16);
  fixed_cache<TypeParam> cache(cache_shape(2, s), 6);
  cache.append(0, random_matrix(4, 32, 1), random_matrix(4, 32, 2));
  const snapshot<TypeParam> before(cache);
  const row_matrix<T> q3 = row_matrix<T>::Zero(3, 128);
  row_matrix<T> out3(3, 128);
  const auto k3 = random_matrix(3, 32, 3), v3 = random_matrix(3, 32, 4);
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 0, out3, this->ws_), std::length_error);
  expect_message([&] { prefill_attention(s, q3, k3, v3, cache, 0, out3, this->ws_); },
                 "prefill_attention: layer 0 holds 4 tokens, 3 more exceed capacity = 6");
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 2, out3, this->ws_), std::out_of_range);
  EXPECT_THROW(prefill_attention(s, row_matrix<T>::Zero(3, 120), k3, v3, cache, 1, out3, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q3, random_matrix(3, 31, 5), v3, cache, 1, out3, this->ws_),
               std::invalid_argument);
  row_matrix<T> out_wrong(2, 128);
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, cache, 1, out_wrong, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(attention_shape(8, 4, 16), q3, k3, v3, cache, 1, out3, this->ws_),
               std::invalid_argument);
  EXPECT_TRUE(snapshot<TypeParam>(cache) == before);
}

}  // namespace
}  // namespace kvcache::test
