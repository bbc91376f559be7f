// SPDX-License-Identifier: Apache-2.0
// Tests of rotary position embeddings.
#include "common.hpp"

namespace kvcache::test {
namespace {

TEST(Rope, PositionZeroIsIdentityAndNormIsKept) {
  for (auto style : {rope_style::interleaved, rope_style::half}) {
    const rope r(8, 10000.0, style);
    row_matrix<double> x = random_matrix<double>(3, 16, 1);
    const row_matrix<double> x0 = x;
    r.apply(x.topRows(1), 0);
    EXPECT_LT((x.row(0) - x0.row(0)).cwiseAbs().maxCoeff(), 1e-15);
    r.apply(x, 1000);
    for (Index i = 0; i < 3; ++i) {
      for (Index h = 0; h < 2; ++h) {
        EXPECT_NEAR(x.block(i, h * 8, 1, 8).norm(), x0.block(i, h * 8, 1, 8).norm(), 1e-12);
      }
    }
  }
}

// The property RoPE exists for: q_m . k_n depends on m - n only.
TEST(Rope, DotProductDependsOnRelativePosition) {
  for (auto style : {rope_style::interleaved, rope_style::half}) {
    const rope r(16, 500.0, style);
    const auto q = random_matrix<double>(1, 16, 2), k = random_matrix<double>(1, 16, 3);
    auto rotated_dot = [&](Index m, Index n) {
      row_matrix<double> qm = q, kn = k;
      r.apply(qm, m);
      r.apply(kn, n);
      return qm.row(0).dot(kn.row(0));
    };
    EXPECT_NEAR(rotated_dot(7, 3), rotated_dot(104, 100), 1e-10);
    EXPECT_GT(std::abs(rotated_dot(7, 3) - rotated_dot(3, 7)), 1e-6);
  }
}

TEST(Rope, KnownRotation) {
  // head_dim 2: one pair, frequency theta^0 = 1, so position p rotates by p radians.
  const rope r(2);
  row_matrix<double> x(1, 2);
  x << 1, 0;
  r.apply(x, 1);
  EXPECT_NEAR(x(0, 0), std::cos(1.0), 1e-15);
  EXPECT_NEAR(x(0, 1), std::sin(1.0), 1e-15);
  // Interleaved pairs (0,1), (2,3); half pairs (0,2), (1,3): the second pair has frequency
  // theta^(-1/2) = 0.01 for theta 10^4 and head_dim 4.
  row_matrix<double> a(1, 4), b(1, 4);
  a << 0, 0, 1, 0;
  b << 0, 1, 0, 0;
  rope(4, 1e4, rope_style::interleaved).apply(a, 100);
  rope(4, 1e4, rope_style::half).apply(b, 100);
  EXPECT_NEAR(a(0, 2), std::cos(1.0), 1e-12);
  EXPECT_NEAR(a(0, 3), std::sin(1.0), 1e-12);
  EXPECT_NEAR(b(0, 1), std::cos(1.0), 1e-12);
  EXPECT_NEAR(b(0, 3), std::sin(1.0), 1e-12);
}

TEST(Rope, TableEqualsDirect) {
  const rope tabled(32, 10000.0, rope_style::interleaved, 64), direct(32);
  row_matrix<float> a = random_matrix(100, 64, 4), b = a;
  tabled.apply(a, 0);  // positions 0..99: the table covers 0..63
  direct.apply(b, 0);
  EXPECT_LT((a - b).cwiseAbs().maxCoeff(), 1e-6f);
}

// A tabled rope used to test p * head_dim < table size, which wraps for large p: position
// 2^60 came out of the table's range check as "in the table" and read garbage, or as here,
// left the input unrotated.
TEST(Rope, PositionsPastTheTableAreRotated) {
  const Index far = Index(1) << 60;
  for (auto style : {rope_style::interleaved, rope_style::half}) {
    const rope tabled(8, 10000.0, style, 16), direct(8, 10000.0, style);
    row_matrix<double> a = random_matrix<double>(2, 16, 5), b = a;
    const row_matrix<double> x0 = a;
    tabled.apply(a, far);
    direct.apply(b, far);
    EXPECT_EQ(a, b);
    EXPECT_GT((a - x0).cwiseAbs().maxCoeff(), 1e-3);
    EXPECT_NEAR(a.row(0).norm(), x0.row(0).norm(), 1e-12);
  }
}

TEST(Rope, HugeTableIsALengthError) {
  EXPECT_THROW(rope(64, 1e4, rope_style::interleaved, Index(1) << 58), std::length_error);
  try {
    rope(64, 1e4, rope_style::interleaved, std::numeric_limits<Index>::max());
    FAIL() << "expected std::length_error";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_positions x head_dim"), std::string::npos)
        << e.what();
  }
}

TEST(Rope, PositionsThatOverflowAreOutOfRange) {
  const Index max = std::numeric_limits<Index>::max();
  row_matrix<double> x = random_matrix<double>(2, 8, 6);
  EXPECT_THROW(rope(8).apply(x, max), std::out_of_range);
  EXPECT_THROW(rope(8).apply(x, max - 1), std::out_of_range);
  EXPECT_NO_THROW(rope(8).apply(x, max - 2));  // positions max-2 and max-1
  EXPECT_NO_THROW(rope(8).apply(x.topRows(1), max - 1));
}

// Keys cached at positions p and shifted by -s (a context shift) equal keys rotated at p - s,
// from the table or not, for deltas of either sign. Float inputs in [-1, 1], rotations in
// double rounded to float twice: errors of a few float roundings (6e-8 each), so 1e-5.
TEST(Rope, RotateShiftsPositions) {
  for (auto style : {rope_style::interleaved, rope_style::half}) {
    for (Index table : {Index(0), Index(64), Index(5000)}) {
      const rope r(16, 10000.0, style, table);
      for (const auto& [p0, shift] : {std::pair<Index, Index>{100, 37}, {4096, 4000}, {20, 20},
                                      {3000, -1500}, {7, 0}, {1000000, 999}}) {
        SCOPED_TRACE(std::to_string(p0) + " shifted by " + std::to_string(shift) + ", table " +
                     std::to_string(table));
        const row_matrix<float> x = random_matrix(5, 32, 7);
        row_matrix<float> shifted = x, want = x;
        r.apply(shifted, p0);
        r.rotate(shifted, -shift);
        r.apply(want, p0 - shift);
        EXPECT_LT((shifted - want).cwiseAbs().maxCoeff(), 1e-5f);
      }
    }
    // rotate(x, d) is apply at the same position d for every row, and undoes itself.
    const rope r(8, 500.0, style);
    row_matrix<double> x = random_matrix<double>(3, 16, 8);
    const row_matrix<double> x0 = x;
    r.rotate(x, 123);
    for (Index i = 0; i < 3; ++i) {
      row_matrix<double> row = x0.row(i);
      r.apply(row, 123);
      EXPECT_LT((x.row(i) - row).cwiseAbs().maxCoeff(), 1e-12);
    }
    r.rotate(x, -123);
    EXPECT_LT((x - x0).cwiseAbs().maxCoeff(), 1e-12);
    EXPECT_NO_THROW(r.rotate(x, std::numeric_limits<Index>::min()));
  }
  row_matrix<float> bad(1, 12);
  EXPECT_THROW(rope(8).rotate(bad, 1), std::invalid_argument);
}

TEST(Rope, BadInput) {
  EXPECT_THROW(rope(7), std::invalid_argument);
  EXPECT_THROW(rope(0), std::invalid_argument);
  EXPECT_THROW(rope(8, 0.0), std::invalid_argument);
  EXPECT_THROW(rope(8, 1e4, rope_style::half, -1), std::invalid_argument);
  row_matrix<float> x(1, 12);
  EXPECT_THROW(rope(8).apply(x, 0), std::invalid_argument);
  row_matrix<float> y(1, 16);
  EXPECT_THROW(rope(8).apply(y, -1), std::out_of_range);
}

}  // namespace
}  // namespace kvcache::test
