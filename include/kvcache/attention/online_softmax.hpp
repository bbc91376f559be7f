// SPDX-License-Identifier: Apache-2.0
// The partial state of attention over part of the keys, and its exact, associative merge.
#pragma once

#include "kvcache/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvcache {

/// Attention of `rows` query rows over some of the keys: for each row the running max `m` of
/// its scores, the running sum `l` of exp(score - m), and the output `o` over the keys seen so
/// far, already normalized (o = sum of exp(score - m) * value / l). Keeping `o` normalized makes
/// it a convex combination of values, so it never overflows where the values do not (the
/// unnormalized sum of four values of 1e38 would). Two states over disjoint sets of keys merge
/// exactly (FlashAttention's online softmax, FlashInfer's merge_state), so attention can be
/// split across blocks, threads, or a shared prefix and a private suffix.
template <class T>
struct softmax_state {
  row_matrix<T> o;                       // [row][head_dim], normalized by l
  Eigen::Array<T, Eigen::Dynamic, 1> m;  // [row] running max of scores, -inf before any key
  Eigen::Array<T, Eigen::Dynamic, 1> l;  // [row] running sum of exp(score - m)

  /// Sizes the state for `rows` rows of `head_dim` and empties it. Allocates only when the
  /// size changes.
  void reset(Index rows, Index head_dim) {
    if (o.rows() != rows || o.cols() != head_dim) {
      o.resize(rows, head_dim);
      m.resize(rows);
      l.resize(rows);
    }
    o.setZero();
    m.setConstant(-std::numeric_limits<T>::infinity());
    l.setZero();
  }

  /// Empties the first `rows` rows, keeping the size.
  void clear(Index rows) {
    o.topRows(rows).setZero();
    m.head(rows).setConstant(-std::numeric_limits<T>::infinity());
    l.head(rows).setZero();
  }

  Index rows() const noexcept { return o.rows(); }

  /// Folds `other` (the same rows over other keys) into this state. Exact up to rounding,
  /// commutative and associative; an empty state is the identity. Both weights lie in [0, 1],
  /// so the merged output stays within the range of the two outputs.
  /// Only the first `n_rows` rows when given (-1: all).
  void merge(const softmax_state& other, Index n_rows = -1) {
    const Index n = n_rows < 0 ? rows() : n_rows;
    for (Index r = 0; r < n; ++r) {
      const T mo = other.m(r);
      if (mo == -std::numeric_limits<T>::infinity()) continue;  // other saw no key for r
      const T mn = std::max(m(r), mo);
      const T a = std::exp(m(r) - mn) * l(r);  // 0 when this state saw no key
      const T b = std::exp(mo - mn) * other.l(r);
      const T total = a + b;
      o.row(r) = (a / total) * o.row(r) + (b / total) * other.o.row(r);
      l(r) = total;
      m(r) = mn;
    }
  }
};

}  // namespace kvcache
