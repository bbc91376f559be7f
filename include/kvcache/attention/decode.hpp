// SPDX-License-Identifier: Apache-2.0
// Decode attention: one new token's query heads against every token of one cached layer.
#pragma once

#include "kvcache/attention/kernel.hpp"

namespace kvcache {

namespace detail {
// The compute type of a view's format.
template <class View>
using view_compute_t = compute_t<typename View::scalar_type>;
}  // namespace detail

/// Sizes `ws` so that decode_attention over views of up to `tokens` tokens allocates nothing
/// and cannot fail for want of memory. `convert` is whether the view's storage type differs
/// from T.
template <class T>
void prepare_decode(attention_workspace<T>& ws, const attention_shape& shape, Index tokens,
                    bool convert, const attention_options& opt = {}) {
  const Index tile = detail::tile_for(opt, tokens);
  const Index splits = detail::decode_splits(opt, shape.n_kv_heads(), tokens, tile);
  // Values read from the keys take every tile through the workspace's key tile.
  ws.prepare(opt.pool != nullptr ? opt.pool->size() : 1, shape.group_size(), tile,
             shape.head_dim(), convert || shape.values_in_keys(),
             splits > 1 ? shape.n_kv_heads() * splits : 0);
}

/// Attention of one token's queries `q` (`n_heads * head_dim`, heads side by side) over the
/// tokens of `view` that its mask lets the newest position see (every token, unless the view
/// has a sliding window), written to `out` (`n_heads * value_dim`: the width of q unless the
/// shape has its values in its keys, as MLA's latent does, see mla.hpp). The query sits at the view's newest
/// position, end_position() - 1. The `group_size()` query heads that share a kv head are
/// attended together, so each cached key and value row is read once per group (GQA; MHA and
/// MQA are its two ends); keys are visited in tiles with an online softmax, so no score vector
/// longer than `opt.tile_tokens` exists. With `opt.pool`, kv heads and runs of tokens (split-K)
/// are spread over its threads and the partial softmax states merged (merge_state).
///
/// Non-finite values: a NaN or infinite key, value or query makes the output of every query
/// head that attends to it non-finite, in every format.
///
/// Cost: reads every cached key and value once. Allocates nothing once `ws` is warm.
/// Throws std::invalid_argument when q, out or the view do not fit `shape`, the view is empty
/// or the options are bad (non-finite scale, tile_tokens <= 0, split_tokens < 0), and
/// std::logic_error when `ws` is in use by another call.
template <class View>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<detail::view_compute_t<View>>>& q,
                      const View& view, Eigen::Ref<row_vector<detail::view_compute_t<View>>> out,
                      attention_workspace<detail::view_compute_t<View>>& ws,
                      const attention_options& opt = {}) {
  using Scalar = typename View::scalar_type;
  using T = compute_t<Scalar>;
  detail::check_view("decode_attention", shape, view);
  if (q.size() != shape.q_width()) {
    detail::fail<std::invalid_argument>("decode_attention: q has ", q.size(),
                                        " elements, expected n_heads*head_dim = ", shape.q_width());
  }
  if (out.size() != shape.out_width()) {
    detail::fail<std::invalid_argument>("decode_attention: out has ", out.size(),
                                        " elements, expected n_heads*value_dim = ",
                                        shape.out_width());
  }
  if (view.size() == 0) {
    detail::fail<std::invalid_argument>("decode_attention: the cache holds no token to attend to");
  }
  detail::check_options("decode_attention", opt);
  const typename attention_workspace<T>::guard busy(ws, "decode_attention");

  const Index n = view.size(), d = shape.head_dim(), dv = shape.value_dim(), G = shape.group_size();
  const Index H = shape.n_kv_heads(), tile = detail::tile_for(opt, n);
  const Index splits = detail::decode_splits(opt, H, n, tile);
  prepare_decode(ws, shape, n, !std::is_same_v<Scalar, T>, opt);
  const T scale = detail::score_scale<T>(opt, d);
  // Masks are needed only for a window: every held key precedes the newest position.
  const Index q_pos = view.end_position() - 1;
  const bool masked = view.mask().window > 0;

  auto run = [&](Index item, Index worker) {
    const Index h = item / splits, s = item % splits;
    auto& scratch = ws.worker(worker);
    for (Index g = 0; g < G; ++g) {
      scratch.q.row(g).head(d) = q.segment((h * G + g) * d, d) * scale;
      scratch.pos[static_cast<std::size_t>(g)] = q_pos;
    }
    auto& st = splits > 1 ? ws.partial(item) : scratch.state;
    st.clear(G);
    // Split bounds as n * s / splits without overflowing n * s.
    const auto bound = [&](Index i) { return n / splits * i + n % splits * i / splits; };
    detail::attend_range(view, h, bound(s), bound(s + 1), G, masked ? scratch.pos.data() : nullptr,
                         q_pos, tile, scratch, st);
    if (splits == 1) {
      for (Index g = 0; g < G; ++g) out.segment((h * G + g) * dv, dv) = st.o.row(g).head(dv);
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
      for (Index g = 0; g < G; ++g) out.segment((h * G + g) * dv, dv) = total.o.row(g).head(dv);
    }
  }
}

/// decode_attention with a workspace of its own: allocates on every call.
template <class View>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<detail::view_compute_t<View>>>& q,
                      const View& view, Eigen::Ref<row_vector<detail::view_compute_t<View>>> out,
                      const attention_options& opt = {}) {
  attention_workspace<detail::view_compute_t<View>> ws;
  decode_attention(shape, q, view, out, ws, opt);
}

}  // namespace kvcache
