// SPDX-License-Identifier: Apache-2.0
// Prefill: a chunk of new tokens written to the cache, then attended with a causal mask.
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/cache/contiguous.hpp"

namespace kvcache {

/// Causal attention of `q.rows()` consecutive query tokens (`n x n_heads*head_dim`) whose
/// first sits at position `q_pos0` of `view`: query i attends to cached tokens 0..q_pos0+i.
/// Works in tiles of queries and keys with an online softmax, so no n x n score matrix exists;
/// kv heads and query tiles are spread over `opt.pool`'s threads.
/// Throws std::invalid_argument when the shapes do not fit, std::out_of_range when the view
/// does not hold a key at every query's position (q_pos0 + n > view.size()).
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
  if (out.rows() != q.rows() || out.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("causal_attention: out is ", out.rows(), " x ",
                                        out.cols(), ", expected ", q.rows(), " x ",
                                        shape.q_width());
  }
  if (q_pos0 < 0 || q_pos0 + q.rows() > view.size()) {
    detail::fail<std::out_of_range>("causal_attention: queries at positions ", q_pos0, "..",
                                    q_pos0 + q.rows() - 1, " but the cache holds ", view.size(),
                                    " tokens");
  }
  if (opt.tile_tokens <= 0) {
    detail::fail<std::invalid_argument>("causal_attention: tile_tokens must be > 0, got ",
                                        opt.tile_tokens);
  }
  const Index n = q.rows();
  if (n == 0) return;
  const Index d = shape.head_dim(), G = shape.group_size(), H = shape.n_kv_heads();
  const Index tile = opt.tile_tokens;
  // Queries per item: the rows of an item are (query, head of the group) pairs.
  const Index q_tile = std::max<Index>(1, std::min(n, tile / G));
  const Index q_tiles = (n + q_tile - 1) / q_tile;
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;
  ws.prepare(workers, q_tile * G, tile, d, !std::is_same_v<Scalar, T>, 0);
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
    detail::attend_range(view, h, 0, q_pos0 + i0 + nq, rows, scratch.pos.data(), tile, scratch,
                         st);
    for (Index i = 0; i < nq; ++i) {
      for (Index g = 0; g < G; ++g) {
        out.block(i0 + i, (h * G + g) * d, 1, d) = st.o.row(i * G + g) / st.l(i * G + g);
      }
    }
  };
  if (opt.pool != nullptr) {
    opt.pool->parallel_for(H * q_tiles, run);
  } else {
    for (Index item = 0; item < H * q_tiles; ++item) run(item, 0);
  }
}

/// Prefill of a chunk of `n` tokens onto `layer`, which may already hold tokens (chunked
/// prefill, a later turn of a chat): appends `k` and `v` (`n x n_kv_heads*head_dim`), then
/// writes to `out` (`n x n_heads*head_dim`) the causal attention of `q` (`n x n_heads*head_dim`)
/// over everything cached, token i of the chunk seeing the old tokens and new ones up to i.
/// Attention reads the keys and values as stored, exactly as later decode steps will.
/// Throws std::invalid_argument for shapes that do not fit and std::length_error past the
/// layer's max_tokens; the layer is unchanged when it throws.
template <class Scalar, class DerivedK, class DerivedV>
void prefill_attention(const attention_shape& shape,
                       const Eigen::Ref<const row_matrix<compute_t<Scalar>>>& q,
                       const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                       kv_layer<Scalar>& layer, Eigen::Ref<row_matrix<compute_t<Scalar>>> out,
                       attention_workspace<compute_t<Scalar>>& ws,
                       const attention_options& opt = {}) {
  using T = compute_t<Scalar>;
  detail::check_view("prefill_attention", shape, layer.view());
  if (q.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("prefill_attention: q has ", q.cols(),
                                        " columns, expected n_heads*head_dim = ", shape.q_width());
  }
  if (k.rows() != q.rows()) {
    detail::fail<std::invalid_argument>("prefill_attention: q has ", q.rows(),
                                        " rows (tokens) but k has ", k.rows());
  }
  if (out.rows() != q.rows() || out.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("prefill_attention: out is ", out.rows(), " x ",
                                        out.cols(), ", expected ", q.rows(), " x ",
                                        shape.q_width());
  }
  if (opt.tile_tokens <= 0) {
    detail::fail<std::invalid_argument>("prefill_attention: tile_tokens must be > 0, got ",
                                        opt.tile_tokens);
  }
  // Size the scratch before the append, so nothing can throw once the layer has changed.
  const Index G = shape.group_size(), tile = opt.tile_tokens;
  const Index q_tile = std::max<Index>(1, std::min(q.rows(), tile / G));
  ws.prepare(opt.pool != nullptr ? opt.pool->size() : 1, q_tile * G, tile, shape.head_dim(),
             !std::is_same_v<Scalar, T>, 0);
  const Index pos0 = layer.size();
  layer.append(k, v);
  causal_attention(shape, q, layer.view(), pos0, out, ws, opt);
}

}  // namespace kvcache
