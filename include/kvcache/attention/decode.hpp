// SPDX-License-Identifier: Apache-2.0
// Decode attention: one new token's query heads against every token of one cached layer.
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/cache/contiguous.hpp"

namespace kvcache {

/// Attention of one token's queries `q` (`n_heads * head_dim`, heads side by side) over every
/// token in `view` (any cache view, see single_block_view), written to `out` (same width).
/// The `group_size()` query heads that share a kv head are attended together, so each cached
/// key and value row is read once per group; keys are visited in tiles with an online softmax,
/// so no score vector longer than `opt.tile_tokens` exists. With `opt.pool`, kv heads and runs
/// of tokens (split-K) are spread over its threads and the partial softmax states merged.
///
/// Cost: reads every cached key and value once. Allocates nothing once `ws` is warm.
/// Throws std::invalid_argument when q, out or the view do not fit `shape`, or the view is empty.
template <class View>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<compute_t<typename View::scalar_type>>>& q,
                      const View& view,
                      Eigen::Ref<row_vector<compute_t<typename View::scalar_type>>> out,
                      attention_workspace<compute_t<typename View::scalar_type>>& ws,
                      const attention_options& opt = {}) {
  using Scalar = typename View::scalar_type;
  using T = compute_t<Scalar>;
  detail::check_view("decode_attention", shape, view);
  if (q.size() != shape.q_width()) {
    detail::fail<std::invalid_argument>("decode_attention: q has ", q.size(),
                                        " elements, expected n_heads*head_dim = ", shape.q_width());
  }
  if (out.size() != shape.q_width()) {
    detail::fail<std::invalid_argument>("decode_attention: out has ", out.size(),
                                        " elements, expected n_heads*head_dim = ", shape.q_width());
  }
  if (view.size() == 0) {
    detail::fail<std::invalid_argument>("decode_attention: the cache holds no token to attend to");
  }
  if (opt.tile_tokens <= 0 || opt.split_tokens < 0) {
    detail::fail<std::invalid_argument>("decode_attention: tile_tokens must be > 0 and "
                                        "split_tokens >= 0, got ", opt.tile_tokens, " and ",
                                        opt.split_tokens);
  }

  const Index n = view.size(), d = shape.head_dim(), G = shape.group_size();
  const Index H = shape.n_kv_heads(), tile = opt.tile_tokens;
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;
  // Split-K: enough runs per head to give every worker work, none shorter than a tile.
  Index splits = opt.split_tokens > 0 ? (n + opt.split_tokens - 1) / opt.split_tokens
                                      : (workers + H - 1) / H;
  splits = std::max<Index>(1, std::min(splits, (n + tile - 1) / tile));
  ws.prepare(workers, G, tile, d, !std::is_same_v<Scalar, T>, splits > 1 ? H * splits : 0);
  const T scale = detail::score_scale<T>(opt, d);

  auto run = [&](Index item, Index worker) {
    const Index h = item / splits, s = item % splits;
    auto& scratch = ws.worker(worker);
    for (Index g = 0; g < G; ++g) scratch.q.row(g).head(d) = q.segment((h * G + g) * d, d) * scale;
    auto& st = splits > 1 ? ws.partial(item) : scratch.state;
    st.clear(G);
    detail::attend_range(view, h, n * s / splits, n * (s + 1) / splits, G, nullptr, tile, scratch,
                         st);
    if (splits == 1) {
      for (Index g = 0; g < G; ++g) out.segment((h * G + g) * d, d) = st.o.row(g) / st.l(g);
    }
  };
  if (opt.pool != nullptr) {
    opt.pool->parallel_for(H * splits, run);
  } else {
    for (Index item = 0; item < H * splits; ++item) run(item, 0);
  }
  if (splits > 1) {
    for (Index h = 0; h < H; ++h) {
      auto& total = ws.partial(h * splits);
      for (Index s = 1; s < splits; ++s) total.merge(ws.partial(h * splits + s));
      for (Index g = 0; g < G; ++g) out.segment((h * G + g) * d, d) = total.o.row(g) / total.l(g);
    }
  }
}

/// decode_attention over a kv_layer.
template <class Scalar>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<compute_t<Scalar>>>& q,
                      const kv_layer<Scalar>& layer, Eigen::Ref<row_vector<compute_t<Scalar>>> out,
                      attention_workspace<compute_t<Scalar>>& ws, const attention_options& opt = {}) {
  decode_attention(shape, q, layer.view(), out, ws, opt);
}

/// decode_attention with a workspace of its own: allocates on every call.
template <class Scalar>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<compute_t<Scalar>>>& q,
                      const kv_layer<Scalar>& layer, Eigen::Ref<row_vector<compute_t<Scalar>>> out,
                      const attention_options& opt = {}) {
  attention_workspace<compute_t<Scalar>> ws;
  decode_attention(shape, q, layer.view(), out, ws, opt);
}

}  // namespace kvcache
