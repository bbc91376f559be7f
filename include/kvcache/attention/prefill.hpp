// SPDX-License-Identifier: Apache-2.0
// Causal attention of a chunk of consecutive queries over a view: the attention half of prefill.
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/detail/checked.hpp"

namespace kvcache {

/// Sizes `ws` so that causal_attention of up to `queries` queries over views of up to
/// `tokens` tokens allocates nothing. `convert` is whether the view's storage type differs
/// from T.
template <class T>
void prepare_causal(attention_workspace<T>& ws, const attention_shape& shape, Index queries,
                    Index tokens, bool convert, const attention_options& opt = {}) {
  const Index G = shape.group_size(), tile = detail::tile_for(opt, tokens);
  const Index q_tile = std::max<Index>(1, std::min(queries, tile / G));
  ws.prepare(opt.pool != nullptr ? opt.pool->size() : 1, q_tile * G, tile, shape.head_dim(),
             convert || shape.values_in_keys(), 0);
}

/// Causal attention of `q.rows()` consecutive query tokens (`n x n_heads*head_dim`; `out` is
/// `n x n_heads*value_dim`, see decode_attention) whose
/// first sits at position `q_pos0`: query i, at position q_pos0 + i, attends to the tokens of
/// `view` that the view's mask lets it see (every token at or before its position, unless the
/// view has a sliding window). Works in tiles of queries and keys with an online softmax, so no
/// n x n score matrix exists; kv heads and query tiles are spread over `opt.pool`'s threads.
/// Throws std::invalid_argument when the shapes or options do not fit, std::out_of_range when a
/// query's position is negative or past the view's newest token (q_pos0 + n > end_position()),
/// std::logic_error when `ws` is in use by another call.
template <class View>
void causal_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_matrix<compute_t<typename View::scalar_type>>>& q,
                      const View& view, Index q_pos0,
                      Eigen::Ref<row_matrix<compute_t<typename View::scalar_type>>> out,
                      attention_workspace<compute_t<typename View::scalar_type>>& ws,
                      const attention_options& opt = {}) {
  using Scalar = typename View::scalar_type;
  using T = compute_t<Scalar>;
  detail::check_view("causal_attention", shape, view);
  if (q.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("causal_attention: q has ", q.cols(),
                                        " columns, expected n_heads*head_dim = ", shape.q_width());
  }
  if (out.rows() != q.rows() || out.cols() != shape.out_width()) {
    detail::fail<std::invalid_argument>("causal_attention: out is ", out.rows(), " x ",
                                        out.cols(), ", expected ", q.rows(), " x ",
                                        shape.out_width());
  }
  if (q_pos0 < 0 || q_pos0 > view.end_position() - q.rows()) {
    detail::fail<std::out_of_range>("causal_attention: ", q.rows(), " queries from position ",
                                    q_pos0, " but the cache's newest position is ",
                                    view.end_position() - 1);
  }
  detail::check_options("causal_attention", opt);
  const Index n = q.rows();
  if (n == 0) return;
  const typename attention_workspace<T>::guard busy(ws, "causal_attention");
  const Index d = shape.head_dim(), dv = shape.value_dim(), G = shape.group_size();
  const Index H = shape.n_kv_heads(), tile = detail::tile_for(opt, view.size());
  // Queries per item: the rows of an item are (query, head of the group) pairs.
  const Index q_tile = std::max<Index>(1, std::min(n, tile / G));
  const Index q_tiles = detail::ceil_div(n, q_tile);
  prepare_causal(ws, shape, n, view.size(), !std::is_same_v<Scalar, T>, opt);
  const T scale = detail::score_scale<T>(opt, d);

  auto run = [&](Index item, Index worker) {
    const Index h = item / q_tiles, i0 = (item % q_tiles) * q_tile;
    const Index nq = std::min(q_tile, n - i0), rows = nq * G;
    auto& scratch = ws.worker(worker);
    for (Index i = 0; i < nq; ++i) {
      for (Index g = 0; g < G; ++g) {
        scratch.q.row(i * G + g).head(d) = q.block(i0 + i, (h * G + g) * d, 1, d) * scale;
        scratch.pos[static_cast<std::size_t>(i * G + g)] = q_pos0 + i0 + i;
      }
    }
    auto& st = scratch.state;
    st.clear(rows);
    detail::attend_range(view, h, 0, view.size(), rows, scratch.pos.data(), q_pos0 + i0 + nq - 1,
                         tile, scratch, st);
    for (Index i = 0; i < nq; ++i) {
      for (Index g = 0; g < G; ++g) {
        out.block(i0 + i, (h * G + g) * dv, 1, dv) = st.o.row(i * G + g).head(dv);
      }
    }
  };
  if (opt.pool != nullptr) {
    opt.pool->parallel_for(H * q_tiles, run);
  } else {
    for (Index item = 0; item < H * q_tiles; ++item) run(item, 0);
  }
}

}  // namespace kvcache
