// SPDX-License-Identifier: Apache-2.0
// Tests of kv_layer and contiguous_cache: contents, growth, crop, concat, and bad input.
#include "common.hpp"

#include <set>

namespace kvcache::test {
namespace {

template <class Scalar>
class ContiguousTest : public ::testing::Test {};
TYPED_TEST_SUITE(ContiguousTest, storage_types, scalar_name);

// Everything observable about a layer, to prove a throwing call changed nothing.
template <class Scalar>
struct snapshot {
  Index size, capacity;
  row_matrix<double> keys, values;
  explicit snapshot(const kv_layer<Scalar>& l)
      : size(l.size()), capacity(l.capacity()), keys(read_back(l, true)),
        values(read_back(l, false)) {}
  snapshot(const contiguous_cache<Scalar>& c, Index l)
      : size(c.size(l)), capacity(c.capacity(l)), keys(read_back(c, l, true)),
        values(read_back(c, l, false)) {}
  bool operator==(const snapshot& o) const {
    return size == o.size && capacity == o.capacity && keys == o.keys && values == o.values;
  }
};

TYPED_TEST(ContiguousTest, StartsEmpty) {
  kv_layer<TypeParam> layer(2, 8);
  EXPECT_EQ(layer.size(), 0);
  EXPECT_TRUE(layer.empty());
  EXPECT_EQ(layer.capacity(), 0);
  EXPECT_EQ(layer.bytes(), 0);
  EXPECT_EQ(layer.capacity_bytes(), 0);
  EXPECT_EQ(layer.keys(1).rows(), 0);
  EXPECT_EQ(layer.view().n_blocks(), 0);
}

TYPED_TEST(ContiguousTest, StoresWhatWasAppendedPerHead) {
  const Index H = 3, d = 5;
  kv_layer<TypeParam> layer(H, d);
  const auto k = random_matrix(4, H * d, 1), v = random_matrix(4, H * d, 2);
  layer.append(k, v);
  ASSERT_EQ(layer.size(), 4);
  for (Index h = 0; h < H; ++h) {
    EXPECT_EQ(layer.keys(h).template cast<double>(),
              stored<TypeParam>(k).middleCols(h * d, d));
    EXPECT_EQ(layer.values(h).template cast<double>(),
              stored<TypeParam>(v).middleCols(h * d, d));
  }
  EXPECT_EQ(layer.bytes(), 2 * 4 * H * d * Index(sizeof(TypeParam)));
}

TYPED_TEST(ContiguousTest, ManyAtOnceEqualsOneAtATime) {
  const Index H = 2, d = 7, n = 1100;
  const auto k = random_matrix(n, H * d, 3), v = random_matrix(n, H * d, 4);
  kv_layer<TypeParam> bulk(H, d), single(H, d);
  bulk.append(k, v);
  for (Index t = 0; t < n; ++t) single.append(k.row(t), v.row(t));
  EXPECT_EQ(read_back(bulk, true), read_back(single, true));
  EXPECT_EQ(read_back(bulk, false), read_back(single, false));
}

TYPED_TEST(ContiguousTest, GrowthIsGeometric) {
  const Index H = 2, d = 4, n = 5000;
  kv_layer<TypeParam> layer(H, d);
  std::set<Index> capacities;
  for (Index t = 0; t < n; ++t) {
    layer.append(random_matrix(1, H * d, unsigned(t)), random_matrix(1, H * d, unsigned(t + n)));
    capacities.insert(layer.capacity());
  }
  // Doubling from 16: 16, 32, ..., 8192 is 10 distinct capacities; a per-token copy would
  // show thousands.
  EXPECT_LE(capacities.size(), 10u);
  EXPECT_GE(layer.capacity(), n);
  EXPECT_LE(layer.capacity(), 2 * n);
}

TYPED_TEST(ContiguousTest, ReserveMeansNoReallocation) {
  kv_layer<TypeParam> layer(2, 4);
  layer.reserve(100);
  EXPECT_EQ(layer.capacity(), 100);
  EXPECT_EQ(layer.capacity_bytes(), 2 * 100 * 8 * Index(sizeof(TypeParam)));
  layer.append(random_matrix(1, 8, 1), random_matrix(1, 8, 2));
  const auto* first = layer.keys(0).data();
  for (int t = 0; t < 99; ++t) layer.append(random_matrix(1, 8, 3), random_matrix(1, 8, 4));
  EXPECT_EQ(layer.keys(0).data(), first);
  EXPECT_EQ(layer.capacity(), 100);
  layer.shrink_to_fit();
  EXPECT_EQ(layer.capacity(), 100);
  layer.crop(10);
  layer.shrink_to_fit();
  EXPECT_EQ(layer.capacity(), 10);
  EXPECT_EQ(layer.size(), 10);
}

TYPED_TEST(ContiguousTest, ConcatEqualsAppendAndCopies) {
  const Index H = 2, d = 6;
  const auto k = random_matrix(20, H * d, 5), v = random_matrix(20, H * d, 6);
  kv_layer<TypeParam> appended(H, d), concatenated(H, d);
  for (Index t = 0; t < 20; t += 5) {
    appended.append(k.middleRows(t, 5), v.middleRows(t, 5));
    const snapshot<TypeParam> before(concatenated);
    auto next = concatenated.concatenated(k.middleRows(t, 5), v.middleRows(t, 5));
    EXPECT_TRUE(snapshot<TypeParam>(concatenated) == before) << "concat must not modify its input";
    EXPECT_EQ(next.capacity(), next.size()) << "concat allocates exactly old + new";
    if (!concatenated.empty()) {
      EXPECT_NE(next.keys(0).data(), concatenated.keys(0).data());
    }
    concatenated = std::move(next);
  }
  EXPECT_EQ(read_back(appended, true), read_back(concatenated, true));
  EXPECT_EQ(read_back(appended, false), read_back(concatenated, false));
}

TYPED_TEST(ContiguousTest, CropThenAppendEqualsNeverAppended) {
  const Index H = 2, d = 3;
  const auto k = random_matrix(30, H * d, 7), v = random_matrix(30, H * d, 8);
  const auto rejected_k = random_matrix(6, H * d, 9), rejected_v = random_matrix(6, H * d, 10);
  kv_layer<TypeParam> straight(H, d), rolled_back(H, d);
  straight.append(k, v);
  rolled_back.append(k.topRows(20), v.topRows(20));
  rolled_back.append(rejected_k, rejected_v);  // speculative tokens, then rejected
  rolled_back.crop(20);
  EXPECT_EQ(rolled_back.size(), 20);
  rolled_back.append(k.bottomRows(10), v.bottomRows(10));
  EXPECT_EQ(read_back(straight, true), read_back(rolled_back, true));
  EXPECT_EQ(read_back(straight, false), read_back(rolled_back, false));
  rolled_back.clear();
  EXPECT_EQ(rolled_back.size(), 0);
  EXPECT_GT(rolled_back.capacity(), 0);
}

TYPED_TEST(ContiguousTest, CopyIsDeep) {
  kv_layer<TypeParam> a(1, 4);
  a.append(random_matrix(3, 4, 1), random_matrix(3, 4, 2));
  kv_layer<TypeParam> b = a;
  b.append(random_matrix(1, 4, 3), random_matrix(1, 4, 4));
  EXPECT_EQ(a.size(), 3);
  EXPECT_EQ(b.size(), 4);
  EXPECT_EQ(read_back(a, true), read_back(b, true).topRows(3));
  EXPECT_NE(a.keys(0).data(), b.keys(0).data());
}

TYPED_TEST(ContiguousTest, BadInputThrowsAndChangesNothing) {
  const Index H = 2, d = 4;
  kv_layer<TypeParam> layer(H, d, /*max_tokens=*/10);
  layer.append(random_matrix(5, H * d, 1), random_matrix(5, H * d, 2));
  const snapshot<TypeParam> before(layer);
  const auto ok = random_matrix(1, H * d, 3);
  const auto narrow = random_matrix(1, H * d - 1, 4);

  auto expect_message = [](auto&& call, const char* part) {
    try {
      call();
      ADD_FAILURE() << "no exception";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  EXPECT_THROW(layer.append(narrow, ok), std::invalid_argument);
  expect_message([&] { layer.append(narrow, ok); }, "append: k has 7 columns, expected n_kv_heads*head_dim = 8");
  EXPECT_THROW(layer.append(ok, narrow), std::invalid_argument);
  expect_message([&] { layer.append(ok, narrow); }, "v has 7 columns");
  EXPECT_THROW(layer.append(ok, random_matrix(2, H * d, 5)), std::invalid_argument);
  expect_message([&] { layer.append(ok, random_matrix(2, H * d, 5)); }, "k has 1 rows (tokens) but v has 2");
  EXPECT_THROW(layer.append(random_matrix(6, H * d, 6), random_matrix(6, H * d, 7)),
               std::length_error);
  expect_message([&] { layer.append(random_matrix(6, H * d, 6), random_matrix(6, H * d, 7)); },
                 "11 tokens exceed max_tokens = 10");
  EXPECT_THROW(layer.reserve(11), std::length_error);
  EXPECT_THROW((void)layer.concatenated(narrow, ok), std::invalid_argument);
  EXPECT_THROW(layer.crop(6), std::out_of_range);
  EXPECT_THROW(layer.crop(-1), std::out_of_range);
  expect_message([&] { layer.crop(6); }, "crop: n = 6 out of range [0, 5]");
  EXPECT_THROW((void)layer.keys(2), std::out_of_range);
  EXPECT_THROW((void)layer.values(-1), std::out_of_range);
  expect_message([&] { (void)layer.keys(2); }, "keys: kv head 2 out of range [0, 2)");
  EXPECT_TRUE(snapshot<TypeParam>(layer) == before);

  EXPECT_THROW(kv_layer<TypeParam>(0, 4), std::invalid_argument);
  EXPECT_THROW(kv_layer<TypeParam>(2, -1), std::invalid_argument);
  EXPECT_THROW(kv_layer<TypeParam>(2, 4, -1), std::invalid_argument);
  // Exactly at the limit is fine.
  layer.append(random_matrix(5, H * d, 8), random_matrix(5, H * d, 9));
  EXPECT_EQ(layer.size(), 10);
}

TYPED_TEST(ContiguousTest, WholeModelCache) {
  const cache_shape shape(3, 8, 2, 4);
  contiguous_cache<TypeParam> cache(shape);
  EXPECT_EQ(cache.n_layers(), 3);
  const auto k = random_matrix(4, 8, 1), v = random_matrix(4, 8, 2);
  cache.append(0, k, v);
  cache.append(1, k, v);
  EXPECT_EQ(cache.size(), 0) << "layer 2 holds nothing yet";
  EXPECT_EQ(cache.size(0), 4);
  cache.concat(2, k, v);
  EXPECT_EQ(cache.size(), 4);
  EXPECT_EQ(read_back(cache, 0, true), read_back(cache, 2, true));
  EXPECT_EQ(cache.bytes(), kv_cache_bytes(1, 4, 3, 2, 4, sizeof(TypeParam)));
  EXPECT_GE(cache.capacity_bytes(), cache.bytes());

  cache.reserve(64);
  for (Index l = 0; l < 3; ++l) EXPECT_GE(cache.capacity(l), 64);
  cache.crop(1);
  EXPECT_EQ(cache.size(), 1);
  cache.clear();
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.bytes(), 0);
}

TYPED_TEST(ContiguousTest, WholeModelBadInputChangesNothing) {
  contiguous_cache<TypeParam> cache(cache_shape(2, 4, 2, 4), /*max_tokens=*/8);
  const auto k = random_matrix(3, 8, 1), v = random_matrix(3, 8, 2);
  cache.append(0, k, v);
  cache.append(1, k.topRows(2), v.topRows(2));
  const snapshot<TypeParam> l0(cache, 0), l1(cache, 1);
  EXPECT_THROW(cache.append(2, k, v), std::out_of_range);
  EXPECT_THROW(cache.append(-1, k, v), std::out_of_range);
  EXPECT_THROW(cache.concat(2, k, v), std::out_of_range);
  EXPECT_THROW(cache.size(5), std::out_of_range);
  EXPECT_THROW(cache.crop(3), std::out_of_range) << "layer 1 holds only 2";
  EXPECT_THROW(cache.reserve(9), std::length_error);
  EXPECT_THROW(cache.concat(0, random_matrix(6, 8, 3), random_matrix(6, 8, 4)), std::length_error);
  EXPECT_TRUE(snapshot<TypeParam>(cache, 0) == l0);
  EXPECT_TRUE(snapshot<TypeParam>(cache, 1) == l1);
  try {
    cache.append(7, k, v);
  } catch (const std::out_of_range& e) {
    EXPECT_STREQ(e.what(), "append: layer 7 out of range [0, 2)");
  }
}

TEST(Shape, Validates) {
  const attention_shape gqa(32, 8, 128);
  EXPECT_EQ(gqa.group_size(), 4);
  EXPECT_EQ(gqa.q_width(), 4096);
  EXPECT_EQ(gqa.kv_width(), 1024);
  const cache_shape model(32, gqa);
  EXPECT_EQ(model.n_layers(), 32);
  EXPECT_EQ(model.heads(), gqa);
  EXPECT_NE(cache_shape(31, gqa), model);
  EXPECT_THROW(attention_shape(8, 3, 64), std::invalid_argument);
  EXPECT_THROW(attention_shape(0, 1, 64), std::invalid_argument);
  EXPECT_THROW(attention_shape(8, 0, 64), std::invalid_argument);
  EXPECT_THROW(attention_shape(8, 8, -64), std::invalid_argument);
  EXPECT_THROW(cache_shape(0, 8, 8, 64), std::invalid_argument);
  try {
    attention_shape(8, 3, 64);
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "attention_shape: n_heads = 8 is not a multiple of n_kv_heads = 3");
  }
}

}  // namespace
}  // namespace kvcache::test
