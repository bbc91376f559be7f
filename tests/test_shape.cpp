// SPDX-License-Identifier: Apache-2.0
// Tests of attention_shape and cache_shape: validation, and sizes that cannot overflow.
#include <kvcache/shape.hpp>

#include <gtest/gtest.h>

#include <limits>
#include <string>

namespace kvcache {
namespace {

constexpr Index max_index = std::numeric_limits<Index>::max();

// Runs `f`, expecting an `Error` whose message contains every one of `parts`.
template <class Error, class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an exception";
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(what.find(part), std::string::npos) << "'" << part << "' not in: " << what;
    }
  }
}

TEST(Shape, Widths) {
  const attention_shape s(32, 8, 128);
  EXPECT_EQ(s.group_size(), 4);
  EXPECT_EQ(s.q_width(), 4096);
  EXPECT_EQ(s.kv_width(), 1024);
  const cache_shape c(80, 64, 8, 128);
  EXPECT_EQ(c.n_layers(), 80);
  EXPECT_EQ(c.heads(), attention_shape(64, 8, 128));
}

TEST(Shape, BadShapes) {
  EXPECT_THROW(attention_shape(0, 1, 8), std::invalid_argument);
  EXPECT_THROW(attention_shape(4, 3, 8), std::invalid_argument);
  EXPECT_THROW(attention_shape(4, 2, -8), std::invalid_argument);
  EXPECT_THROW(cache_shape(0, 4, 2, 8), std::invalid_argument);
}

// q_width() of 2^33 heads of 2^31 dims was 2^64: it wrapped to 0.
TEST(Shape, QueryWidthThatOverflowsIsRefused) {
  expect_error<std::length_error>([] { attention_shape(Index(1) << 33, 1, Index(1) << 31); },
                                  {"n_heads * head_dim", "8589934592", "2147483648"});
  expect_error<std::length_error>([] { attention_shape(max_index, max_index, 2); },
                                  {"n_heads * head_dim"});
  // The largest width that fits is accepted.
  EXPECT_EQ(attention_shape(max_index, 1, 1).q_width(), max_index);
  EXPECT_EQ(attention_shape(2, 2, max_index / 2).kv_width(), max_index - 1);
}

// 2^32 kv heads of 2^32 dims made a cache divide by a wrapped width of 0 (SIGFPE).
TEST(Shape, TokenBytesThatOverflowAreRefused) {
  const Index big = Index(1) << 32;
  expect_error<std::length_error>([&] { cache_shape(1, big, big, big); }, {"n_heads * head_dim"});
  // Each width fits, but one token of every layer at 8 bytes an element does not.
  expect_error<std::length_error>(
      [] { cache_shape(1, Index(1) << 30, Index(1) << 30, Index(1) << 29); },
      {"cache_shape", "1073741824", "536870912", "overflows"});
  expect_error<std::length_error>([] { cache_shape(Index(1) << 50, 32, 8, 128); },
                                  {"n_layers", "1125899906842624", "x 8 x 128"});
  expect_error<std::length_error>(
      [] { cache_shape(max_index, attention_shape(1, 1, 1)); }, {"9223372036854775807"});
  // 2 x n_layers x kv_width x 8 = 2^62 still fits.
  EXPECT_NO_THROW(cache_shape(Index(1) << 28, 8, 8, Index(1) << 27));
  EXPECT_THROW(cache_shape(Index(1) << 29, 8, 8, Index(1) << 27), std::length_error);
}

}  // namespace
}  // namespace kvcache
