// SPDX-License-Identifier: Apache-2.0
// Tests of reference_attention at the edges: extreme positions, masks that leave no key, and
// scores that are NaN or -inf.
#include "common.hpp"

#include <cmath>
#include <limits>

namespace kvcache::test {
namespace {

constexpr Index max_index = std::numeric_limits<Index>::max();

// q_pos0 + i used to wrap for q_pos0 near INT64_MAX.
TEST(ReferenceEdges, PositionsThatOverflowAreOutOfRange) {
  const attention_shape s(2, 1, 4);
  const auto q = random_matrix<double>(2, 8, 1), k = random_matrix<double>(3, 4, 2),
             v = random_matrix<double>(3, 4, 3);
  attention_mask mask;
  mask.q_pos0 = max_index;
  EXPECT_THROW(reference_attention<double>(s, q, k, v, mask), std::out_of_range);
  EXPECT_THROW(reference_attention<double>(s, q.topRows(1), k, v, mask), std::out_of_range);
  mask.q_pos0 = max_index - 1;
  EXPECT_THROW(reference_attention<double>(s, q, k, v, mask), std::out_of_range);
  try {
    reference_attention<double>(s, q, k, v, mask);
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("q_pos0 = 9223372036854775806"), std::string::npos)
        << e.what();
  }
  // The largest positions that fit: causal queries there see every key, as the last does.
  mask.q_pos0 = max_index - 2;
  attention_mask last;
  last.q_pos0 = 2;
  const auto far = reference_attention<double>(s, q, k, v, mask);
  const auto near = reference_attention<double>(s, q.topRows(1), k, v, last);
  EXPECT_LT((far.row(0) - near.row(0)).cwiseAbs().maxCoeff(), 1e-15);
  // A window of INT64_MAX at the largest positions keeps every key, without p - window
  // wrapping around.
  mask.window = max_index;
  EXPECT_EQ(reference_attention<double>(s, q, k, v, mask), far);
}

TEST(ReferenceEdges, AMaskThatLeavesNoKeyIsRefused) {
  const attention_shape s(1, 1, 4);
  const auto q = random_matrix<double>(1, 4, 4), k = random_matrix<double>(3, 4, 5),
             v = random_matrix<double>(3, 4, 6);
  attention_mask mask;
  mask.q_pos0 = 10;  // keys sit at 0..2; a window of 2 sees 9..10
  mask.window = 2;
  try {
    reference_attention<double>(s, q, k, v, mask);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("at position 10 sees no key"), std::string::npos)
        << e.what();
  }
  mask.sinks = 1;  // key 0 is a sink: seen
  EXPECT_NO_THROW(reference_attention<double>(s, q, k, v, mask));
  // More queries than keys, placed last: the first query sits at position -1, before every key.
  EXPECT_THROW(reference_attention<double>(s, random_matrix<double>(4, 4, 7), k, v),
               std::invalid_argument);
}

// NaN queries and all -inf scores used to be reported as "sees no key".
TEST(ReferenceEdges, NanAndInfiniteScoresGiveNan) {
  const attention_shape s(1, 1, 1);
  row_matrix<double> k(2, 1), v(2, 1), q(1, 1);
  k << 1, 2;
  v << 3, 4;
  q << std::numeric_limits<double>::quiet_NaN();
  const auto from_nan = reference_attention<double>(s, q, k, v);
  EXPECT_TRUE(std::isnan(from_nan(0, 0)));
  q << -std::numeric_limits<double>::infinity();  // both scores -inf
  const auto from_minus_inf = reference_attention<double>(s, q, k, v);
  EXPECT_TRUE(std::isnan(from_minus_inf(0, 0)));
  const auto in_float = reference_attention<float>(s, q.cast<float>(), k.cast<float>(),
                                                   v.cast<float>());
  EXPECT_TRUE(std::isnan(in_float(0, 0)));
}

}  // namespace
}  // namespace kvcache::test
