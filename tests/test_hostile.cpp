// SPDX-License-Identifier: Apache-2.0
// Hostile sizes, positions, options and values at the attention and cache boundary: each is a
// typed exception or the right answer, never undefined behaviour.
#include "common.hpp"

#include <limits>
#include <thread>

namespace {

using namespace kvcache;
using namespace kvcache::test;

constexpr Index big = std::numeric_limits<Index>::max();

// A full-precision residual of 2^62 tokens is more than memory can address: refused when the
// cache is built, before any buffer is sized from it.
TEST(Hostile, HugeResidualIsALengthError) {
  EXPECT_THROW(quantized_cache<8>(cache_shape(1, 2, 2, 64), 16, Index(1) << 62), std::length_error);
  EXPECT_THROW((kv_cache<ring_layout, quantized_format<4>>(
                   cache_shape(1, 2, 2, 64), ring_layout{4, 0}, quantized_format<4>(16, Index(1) << 62))),
               std::length_error);
  EXPECT_THROW(quantized_format<8>(16, big), std::length_error);
}

// Window and rollback margins that overflow are refused as such.
TEST(Hostile, HugeWindowIsALengthError) {
  EXPECT_THROW(sliding_window_cache<float>(cache_shape(1, 1, 1, 8), big / 2, 0, big / 2 + 2),
               std::length_error);
  EXPECT_THROW(fixed_cache<float>(cache_shape(2, 4, 4, 64), big / 4), std::length_error);
}

// A query position past the cache is out_of_range, not NaN.
TEST(Hostile, QueryPositionOutOfRange) {
  const attention_shape s(4, 2, 8);
  contiguous_cache<float> cache(cache_shape(1, s));
  cache.append(0, random_matrix<float>(5, s.kv_width(), 1), random_matrix<float>(5, s.kv_width(), 2));
  attention_workspace<float> ws;
  const row_matrix<float> q = random_matrix<float>(1, s.q_width(), 3);
  row_matrix<float> out(1, s.q_width());
  EXPECT_THROW(causal_attention(s, q, cache.view(0), big, out, ws), std::out_of_range);
  EXPECT_THROW(causal_attention(s, q, cache.view(0), -1, out, ws), std::out_of_range);
  EXPECT_THROW(causal_attention(s, q, cache.view(0), 5, out, ws), std::out_of_range);
}

// tile_tokens and split_tokens of INT64_MAX are one tile and one run: the same answer.
TEST(Hostile, HugeTilesAndSplits) {
  const attention_shape s(4, 2, 8);
  contiguous_cache<float> cache(cache_shape(1, s));
  cache.append(0, random_matrix<float>(300, s.kv_width(), 1),
               random_matrix<float>(300, s.kv_width(), 2));
  attention_workspace<float> ws;
  const row_vector<float> q = random_matrix<float>(1, s.q_width(), 3);
  row_vector<float> want(s.q_width()), got(s.q_width());
  decode_attention(s, q, cache.view(0), want, ws);
  for (const auto& [tile, split] : {std::pair<Index, Index>{big, 0}, {128, big}, {big, big}}) {
    attention_options opt;
    opt.tile_tokens = tile;
    opt.split_tokens = split;
    decode_attention(s, q, cache.view(0), got, ws, opt);
    EXPECT_LT((got - want).cwiseAbs().maxCoeff(), 1e-6) << tile << " " << split;
  }
}

// A NaN or infinite scale is refused; 0 means 1/sqrt(head_dim).
TEST(Hostile, NonFiniteScaleIsRefused) {
  const attention_shape s(4, 2, 8);
  contiguous_cache<float> cache(cache_shape(1, s));
  cache.append(0, random_matrix<float>(3, s.kv_width(), 1), random_matrix<float>(3, s.kv_width(), 2));
  attention_workspace<float> ws;
  const row_vector<float> q = random_matrix<float>(1, s.q_width(), 3);
  row_vector<float> out(s.q_width());
  for (const double scale : {std::numeric_limits<double>::quiet_NaN(),
                             std::numeric_limits<double>::infinity()}) {
    attention_options opt;
    opt.scale = scale;
    EXPECT_THROW(decode_attention(s, q, cache.view(0), out, ws, opt), std::invalid_argument);
  }
}

// Values near the float limit: the running output stays a weighted mean of values, so four
// equal scores over values of 1e38 give 1e38, as the double reference does, not inf.
TEST(Hostile, LargeValuesDoNotOverflowTheRunningOutput) {
  const attention_shape s(1, 1, 4);
  contiguous_cache<float> cache(cache_shape(1, s));
  const row_matrix<float> k = row_matrix<float>::Zero(4, 4);
  const row_matrix<float> v = row_matrix<float>::Constant(4, 4, 1e38f);
  cache.append(0, k, v);
  attention_workspace<float> ws;
  const row_vector<float> q = row_vector<float>::Ones(4);
  row_vector<float> out(4);
  attention_options opt;
  opt.tile_tokens = 2;  // two tiles: the merge across tiles too
  decode_attention(s, q, cache.view(0), out, ws, opt);
  const auto want = reference_attention<double>(s, q, k, v);
  EXPECT_TRUE(out.allFinite()) << out;
  EXPECT_NEAR(double(out(0)) / want(0, 0), 1.0, 1e-6);
  opt.split_tokens = 1;  // four runs, merged
  decode_attention(s, q, cache.view(0), out, ws, opt);
  EXPECT_TRUE(out.allFinite()) << out;
}

// One workspace used by two calls at once is caught, not a data race: the second call throws
// std::logic_error before touching anything, and the workspace serves the next call.
TEST(Hostile, SharedWorkspaceIsCaught) {
  const attention_shape s(4, 2, 8);
  contiguous_cache<float> cache(cache_shape(1, s));
  cache.append(0, random_matrix<float>(3, s.kv_width(), 1), random_matrix<float>(3, s.kv_width(), 2));
  attention_workspace<float> ws;
  const row_vector<float> q = random_matrix<float>(1, s.q_width(), 3);
  row_vector<float> out(s.q_width());
  {
    const attention_workspace<float>::guard other_call(ws, "another call");
    std::thread t([&] {
      EXPECT_THROW(decode_attention(s, q, cache.view(0), out, ws), std::logic_error);
    });
    t.join();
  }
  EXPECT_NO_THROW(decode_attention(s, q, cache.view(0), out, ws));
}

}  // namespace
