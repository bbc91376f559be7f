// SPDX-License-Identifier: Apache-2.0
// Reference attention with materialized scores: the oracle, and what uncached decoding uses.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <cmath>
#include <limits>
#include <stdexcept>

namespace kvcache {

/// Scaled dot-product attention of `q` (`n_q x n_heads*head_dim`) over `k`, `v`
/// (`n_k x n_kv_heads*head_dim`), computed in T: per query head, the full score matrix
/// Q K^T * scale, masked, softmax by rows, times V. Query head j reads kv head
/// j / group_size(). `scale` 0 means 1/sqrt(head_dim).
///
/// Plain and obviously correct rather than fast; O(n_q * n_k) memory per head. Returns
/// `n_q x n_heads*head_dim`. Throws std::invalid_argument when the shapes do not fit or the
/// mask leaves a query no key, std::out_of_range when the query positions q_pos0 + n_q
/// overflow Index. Scores that are NaN or all -inf are not an error: the output follows the
/// arithmetic (NaN).
template <class T, class DerivedQ, class DerivedK, class DerivedV>
row_matrix<T> reference_attention(const attention_shape& shape, const Eigen::MatrixBase<DerivedQ>& q,
                                  const Eigen::MatrixBase<DerivedK>& k,
                                  const Eigen::MatrixBase<DerivedV>& v,
                                  const attention_mask& mask = {}, double scale = 0.0) {
  const Index nq = q.rows(), nk = k.rows(), d = shape.head_dim(), G = shape.group_size();
  if (q.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("reference_attention: q has ", q.cols(),
                                        " columns, expected n_heads*head_dim = ", shape.q_width());
  }
  if (k.cols() != shape.kv_width() || v.cols() != shape.kv_width() || v.rows() != nk) {
    detail::fail<std::invalid_argument>("reference_attention: k is ", nk, " x ", k.cols(),
                                        " and v ", v.rows(), " x ", v.cols(), ", expected n_k x ",
                                        shape.kv_width(), " for both");
  }
  if (mask.window < 0 || mask.sinks < 0) {
    detail::fail<std::invalid_argument>("reference_attention: window and sinks must be >= 0");
  }
  const Index pos0 = mask.q_pos0 < 0 ? nk - nq : mask.q_pos0;
  Index pos_end = 0;  // one past the last query's position: a sequence length, so it must fit
  if (__builtin_add_overflow(pos0, nq, &pos_end)) {
    detail::fail<std::out_of_range>("reference_attention: q_pos0 = ", pos0, " with n_q = ", nq,
                                    " queries puts positions past the largest 64-bit index");
  }
  const T sc = scale != 0.0 ? T(scale) : T(1) / std::sqrt(T(d));
  // p - j cannot overflow: p >= -n_q and 0 <= j < n_k.
  const auto visible = [&](Index i, Index j) {
    const Index p = pos0 + i;
    if (mask.causal && j > p) return false;
    if (mask.window > 0 && p - j >= mask.window && j >= mask.sinks) return false;
    return true;
  };
  for (Index i = 0; i < nq; ++i) {
    bool any = false;
    for (Index j = 0; j < nk && !any; ++j) any = visible(i, j);
    if (!any) {
      detail::fail<std::invalid_argument>("reference_attention: query ", i, " at position ",
                                          pos0 + i, " sees no key");
    }
  }

  row_matrix<T> out(nq, shape.q_width());
  for (Index h = 0; h < shape.n_heads(); ++h) {
    const Index kvh = h / G;
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> Q =
        q.middleCols(h * d, d).template cast<T>();
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> K =
        k.middleCols(kvh * d, d).template cast<T>();
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> V =
        v.middleCols(kvh * d, d).template cast<T>();
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> S = (Q * K.transpose()) * sc;
    for (Index i = 0; i < nq; ++i) {
      // Every query sees a key (checked above). When its visible scores are all -inf, row_max
      // is -inf and -inf - -inf is NaN: the output is NaN, as the arithmetic says; a NaN
      // score makes the sum, and so the output, NaN too.
      T row_max = -std::numeric_limits<T>::infinity();
      for (Index j = 0; j < nk; ++j) {
        if (visible(i, j)) {
          row_max = std::max(row_max, S(i, j));
        } else {
          S(i, j) = -std::numeric_limits<T>::infinity();
        }
      }
      S.row(i) = (S.row(i).array() - row_max).exp().matrix();
      S.row(i) /= S.row(i).sum();
    }
    out.middleCols(h * d, d) = S * V;
  }
  return out;
}

}  // namespace kvcache
