// SPDX-License-Identifier: Apache-2.0
// Rotary position embeddings (RoPE): keys and queries rotated by their token's position.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace kvcache {

/// Which dimensions RoPE rotates together.
enum class rope_style {
  interleaved,  ///< pairs (2i, 2i+1): Meta's Llama reference and llama2.c
  half,         ///< pairs (i, i + head_dim/2): the Hugging Face "rotate_half" layout
};

/// Rotates each head's pairs of dimensions by angle position * theta^(-2i/head_dim).
/// Angles for positions below `max_positions` come from a table built once; later
/// positions are computed as they come, in double. Every member is const after construction,
/// so any number of threads may use one rope at once.
class rope {
 public:
  /// Throws std::invalid_argument for an odd or non-positive head_dim, theta <= 0, or
  /// max_positions < 0; std::length_error, naming both, when the table of
  /// max_positions * head_dim angles cannot be sized. Builds the table in
  /// O(max_positions * head_dim).
  explicit rope(Index head_dim, double theta = 10000.0, rope_style style = rope_style::interleaved,
                Index max_positions = 0)
      : head_dim_(head_dim), theta_(theta), style_(style), max_positions_(max_positions) {
    if (head_dim <= 0 || head_dim % 2 != 0) {
      detail::fail<std::invalid_argument>("rope: head_dim must be positive and even, got ",
                                          head_dim);
    }
    if (!(theta > 0.0)) detail::fail<std::invalid_argument>("rope: theta must be > 0, got ", theta);
    if (max_positions < 0) {
      detail::fail<std::invalid_argument>("rope: max_positions must be >= 0, got ", max_positions);
    }
    const Index entries =
        detail::checked_mul(max_positions, head_dim, "rope: max_positions x head_dim");
    if (static_cast<std::size_t>(entries) > table_.max_size()) {
      detail::fail<std::length_error>("rope: a table of max_positions x head_dim = ", max_positions,
                                      " x ", head_dim, " angles is larger than a vector holds");
    }
    table_.resize(static_cast<std::size_t>(entries));
    for (Index p = 0; p < max_positions; ++p) {
      for (Index i = 0; i < head_dim / 2; ++i) {
        const double a = angle(p, i);
        table_[static_cast<std::size_t>(p * head_dim + 2 * i)] = std::cos(a);
        table_[static_cast<std::size_t>(p * head_dim + 2 * i + 1)] = std::sin(a);
      }
    }
  }

  Index head_dim() const noexcept { return head_dim_; }
  double theta() const noexcept { return theta_; }
  rope_style style() const noexcept { return style_; }
  /// Positions whose angles come from the table.
  Index max_positions() const noexcept { return max_positions_; }

  /// Rotates, in place, every head of every row of `x` (`tokens x n*head_dim`, heads side by
  /// side); row r is the token at position `pos0 + r`. Throws std::invalid_argument when the
  /// width is not a multiple of head_dim, std::out_of_range for a negative position or when
  /// pos0 + rows overflows Index. O(rows * width).
  template <class Derived>
  void apply(const Eigen::MatrixBase<Derived>& x_, Index pos0) const {
    auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);  // Eigen's idiom for writable blocks
    check_width(x.cols());
    if (pos0 < 0) detail::fail<std::out_of_range>("rope: position ", pos0, " is negative");
    Index end = 0;
    if (__builtin_add_overflow(pos0, x.rows(), &end)) {
      detail::fail<std::out_of_range>("rope: positions pos0 + rows = ", pos0, " + ", x.rows(),
                                      " overflow a 64-bit index");
    }
    for (Index r = 0; r < x.rows(); ++r) {
      const Index p = pos0 + r;
      for (Index i = 0; i < head_dim_ / 2; ++i) {
        double c, s;
        cos_sin(p, i, c, s);
        rotate_pair(x, r, i, c, s);
      }
    }
  }

  /// Rotates, in place, every row of `x` (`tokens x n*head_dim`) by the same position
  /// `delta`, which may be negative. Rotations compose, R(p) R(delta) = R(p + delta), so keys
  /// cached with apply() at positions p become keys at p + delta: what a context shift does
  /// to the keys it keeps (llama.cpp's seq_add, StreamingLLM's re-rotation after eviction).
  /// Throws std::invalid_argument when the width is not a multiple of head_dim.
  /// O(rows * width), plus head_dim/2 angles when delta is outside the table.
  template <class Derived>
  void rotate(const Eigen::MatrixBase<Derived>& x_, Index delta) const {
    auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);  // Eigen's idiom for writable blocks
    check_width(x.cols());
    for (Index i = 0; i < head_dim_ / 2; ++i) {
      double c, s;
      cos_sin(delta, i, c, s);
      for (Index r = 0; r < x.rows(); ++r) rotate_pair(x, r, i, c, s);
    }
  }

 private:
  double angle(Index p, Index i) const {
    return double(p) * std::pow(theta_, -2.0 * double(i) / double(head_dim_));
  }

  void check_width(Index cols) const {
    if (cols % head_dim_ != 0) {
      detail::fail<std::invalid_argument>("rope: x has ", cols,
                                          " columns, not a multiple of head_dim = ", head_dim_);
    }
  }

  // cos and sin of pair i's angle at position p, which may be negative: from the table when
  // |p| is in it (cos is even, sin odd), computed in double otherwise.
  void cos_sin(Index p, Index i, double& c, double& s) const {
    const bool negative = p < 0;
    if (p != std::numeric_limits<Index>::min() && (negative ? -p : p) < max_positions_) {
      const Index at = (negative ? -p : p) * head_dim_ + 2 * i;
      c = table_[static_cast<std::size_t>(at)];
      s = table_[static_cast<std::size_t>(at + 1)];
      if (negative) s = -s;
    } else {
      const double a = angle(p, i);
      c = std::cos(a);
      s = std::sin(a);
    }
  }

  // Rotates pair i of every head of row r by the angle whose cos and sin are c and s.
  template <class Derived>
  void rotate_pair(Eigen::MatrixBase<Derived>& x, Index r, Index i, double c, double s) const {
    using T = typename Derived::Scalar;
    const Index a_off = style_ == rope_style::interleaved ? 2 * i : i;
    const Index b_off = style_ == rope_style::interleaved ? 2 * i + 1 : i + head_dim_ / 2;
    for (Index h = 0; h < x.cols() / head_dim_; ++h) {
      const T a = x(r, h * head_dim_ + a_off), b = x(r, h * head_dim_ + b_off);
      x(r, h * head_dim_ + a_off) = T(a * c - b * s);
      x(r, h * head_dim_ + b_off) = T(a * s + b * c);
    }
  }

  Index head_dim_;
  double theta_;
  rope_style style_;
  Index max_positions_;
  std::vector<double> table_;  // [position][pair] cos, sin
};

}  // namespace kvcache
