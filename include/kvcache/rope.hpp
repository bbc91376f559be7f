// SPDX-License-Identifier: Apache-2.0
// Rotary position embeddings (RoPE): keys and queries rotated by their token's position.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <cmath>
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
/// positions are computed as they come.
class rope {
 public:
  /// Throws std::invalid_argument for an odd or non-positive head_dim, theta <= 0, or
  /// max_positions < 0.
  explicit rope(Index head_dim, double theta = 10000.0, rope_style style = rope_style::interleaved,
                Index max_positions = 0)
      : head_dim_(head_dim), theta_(theta), style_(style) {
    if (head_dim <= 0 || head_dim % 2 != 0) {
      detail::fail<std::invalid_argument>("rope: head_dim must be positive and even, got ",
                                          head_dim);
    }
    if (!(theta > 0.0)) detail::fail<std::invalid_argument>("rope: theta must be > 0, got ", theta);
    if (max_positions < 0) {
      detail::fail<std::invalid_argument>("rope: max_positions must be >= 0, got ", max_positions);
    }
    table_.resize(static_cast<std::size_t>(max_positions * head_dim));
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

  /// Rotates, in place, every head of every row of `x` (`tokens x n*head_dim`, heads side by
  /// side); row r is the token at position `pos0 + r`. Throws std::invalid_argument when the
  /// width is not a multiple of head_dim, std::out_of_range for a negative position.
  template <class Derived>
  void apply(const Eigen::MatrixBase<Derived>& x_, Index pos0) const {
    auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);  // Eigen's idiom for writable blocks
    if (x.cols() % head_dim_ != 0) {
      detail::fail<std::invalid_argument>("rope: x has ", x.cols(),
                                          " columns, not a multiple of head_dim = ", head_dim_);
    }
    if (pos0 < 0) detail::fail<std::out_of_range>("rope: position ", pos0, " is negative");
    using T = typename Derived::Scalar;
    const Index half = head_dim_ / 2, heads = x.cols() / head_dim_;
    for (Index r = 0; r < x.rows(); ++r) {
      const Index p = pos0 + r;
      for (Index i = 0; i < half; ++i) {
        double c, s;
        if (p * head_dim_ < Index(table_.size())) {
          c = table_[static_cast<std::size_t>(p * head_dim_ + 2 * i)];
          s = table_[static_cast<std::size_t>(p * head_dim_ + 2 * i + 1)];
        } else {
          const double a = angle(p, i);
          c = std::cos(a);
          s = std::sin(a);
        }
        const Index a_off = style_ == rope_style::interleaved ? 2 * i : i;
        const Index b_off = style_ == rope_style::interleaved ? 2 * i + 1 : i + half;
        for (Index h = 0; h < heads; ++h) {
          const T a = x(r, h * head_dim_ + a_off), b = x(r, h * head_dim_ + b_off);
          x(r, h * head_dim_ + a_off) = T(a * c - b * s);
          x(r, h * head_dim_ + b_off) = T(a * s + b * c);
        }
      }
    }
  }

  /// Rotates every row of `x` (`tokens x n*head_dim`) by the same position offset `delta`,
  /// which may be negative: R(p) then rotate(-s) is R(p - s). Re-rotates cached keys when a
  /// context shift moves them (llama.cpp's seq_add). Throws std::invalid_argument when the
  /// width is not a multiple of head_dim.
  template <class Derived>
  void rotate(const Eigen::MatrixBase<Derived>& x_, Index delta) const {
    auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);  // Eigen's idiom for writable blocks
    if (x.cols() % head_dim_ != 0) {
      detail::fail<std::invalid_argument>("rope: x has ", x.cols(),
                                          " columns, not a multiple of head_dim = ", head_dim_);
    }
    using T = typename Derived::Scalar;
    const Index half = head_dim_ / 2, heads = x.cols() / head_dim_;
    for (Index i = 0; i < half; ++i) {
      const double a = angle(delta, i), c = std::cos(a), s = std::sin(a);
      const Index a_off = style_ == rope_style::interleaved ? 2 * i : i;
      const Index b_off = style_ == rope_style::interleaved ? 2 * i + 1 : i + half;
      for (Index r = 0; r < x.rows(); ++r) {
        for (Index h = 0; h < heads; ++h) {
          const T u = x(r, h * head_dim_ + a_off), w = x(r, h * head_dim_ + b_off);
          x(r, h * head_dim_ + a_off) = T(u * c - w * s);
          x(r, h * head_dim_ + b_off) = T(u * s + w * c);
        }
      }
    }
  }

 private:
  double angle(Index p, Index i) const {
    return double(p) * std::pow(theta_, -2.0 * double(i) / double(head_dim_));
  }

  Index head_dim_;
  double theta_;
  rope_style style_;
  std::vector<double> table_;  // [position][pair] cos, sin
};

}  // namespace kvcache
