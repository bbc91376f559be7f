// SPDX-License-Identifier: Apache-2.0
// Batched attention: many sequences of different lengths in one call, each with one query
// token (batched decode) or a chunk of them (chunked prefill mixed with decode).
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"

#include <algorithm>
#include <vector>

namespace kvcache {

namespace detail {

template <class Batch>
using batch_compute_t = compute_t<typename Batch::scalar_type>;

// Checks qo_indptr against the batch and q, naming `fn`.
template <class Batch>
void check_batch(const char* fn, const attention_shape& shape, const std::vector<Index>& qo_indptr,
                 const Batch& batch, Index q_rows, Index q_cols, Index out_rows, Index out_cols) {
  const Index B = batch.size();
  if (Index(qo_indptr.size()) != B + 1 || qo_indptr.front() != 0) {
    fail<std::invalid_argument>(fn, ": qo_indptr has ", qo_indptr.size(),
                                " entries, expected batch size + 1 = ", B + 1, " starting at 0");
  }
  for (Index b = 0; b < B; ++b) {
    const auto i = static_cast<std::size_t>(b);
    if (qo_indptr[i + 1] < qo_indptr[i]) {
      fail<std::invalid_argument>(fn, ": qo_indptr decreases at sequence ", b);
    }
  }
  if (qo_indptr.back() != q_rows) {
    fail<std::invalid_argument>(fn, ": qo_indptr ends at ", qo_indptr.back(), " but q has ",
                                q_rows, " rows");
  }
  if (q_cols != shape.q_width()) {
    fail<std::invalid_argument>(fn, ": q has ", q_cols, " columns, expected n_heads*head_dim = ",
                                shape.q_width());
  }
  if (out_rows != q_rows || out_cols != shape.out_width()) {
    fail<std::invalid_argument>(fn, ": out is ", out_rows, " x ", out_cols, ", expected ", q_rows,
                                " x ", shape.out_width());
  }
  for (Index b = 0; b < B; ++b) {
    const auto v = batch.sequence(b);
    check_view(fn, shape, v);
    const Index nq = qo_indptr[static_cast<std::size_t>(b + 1)] - qo_indptr[static_cast<std::size_t>(b)];
    if (nq > 0 && v.size() == 0) {
      fail<std::invalid_argument>(fn, ": sequence ", b, " of the batch holds no token to attend to");
    }
    if (v.mask().causal && nq > v.end_position()) {
      fail<std::out_of_range>(fn, ": sequence ", b, " has ", nq, " queries but its newest ",
                              "position is ", v.end_position() - 1);
    }
  }
}


template <class Batch>
void batch_attention_unguarded(const char* fn, const attention_shape& shape,
                               const Eigen::Ref<const row_matrix<batch_compute_t<Batch>>>& q,
                               const std::vector<Index>& qo_indptr, const Batch& batch,
                               Eigen::Ref<row_matrix<batch_compute_t<Batch>>> out,
                               attention_workspace<batch_compute_t<Batch>>& ws,
                               const attention_options& opt) {
  using Scalar = typename Batch::scalar_type;
  using T = compute_t<Scalar>;
  check_batch(fn, shape, qo_indptr, batch, q.rows(), q.cols(), out.rows(), out.cols());
  check_options(fn, opt);
  const Index B = batch.size(), H = shape.n_kv_heads(), G = shape.group_size();
  const Index d = shape.head_dim(), dv = shape.value_dim();
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;

  // Items, balanced by tokens.
  Index total = 0, longest = 0;
  for (Index b = 0; b < B; ++b) {
    if (qo_indptr[static_cast<std::size_t>(b + 1)] == qo_indptr[static_cast<std::size_t>(b)]) continue;
    const Index n = batch.sequence(b).size();
    total = checked_add(total, n, "batch_attention: tokens");
    longest = std::max(longest, n);
  }
  const Index tile = tile_for(opt, longest);
  const Index q_tile = std::max<Index>(1, tile / G);
  Index run_tokens = opt.split_tokens > 0 ? opt.split_tokens
                     : workers == 1       ? std::max<Index>(longest, 1)
                                          : ceil_div(checked_mul(total, H), 2 * workers);
  run_tokens = std::max(run_tokens, tile);
  auto& items = ws.items();
  items.clear();
  Index rows_max = 0;
  for (Index b = 0; b < B; ++b) {
    const Index nq = qo_indptr[static_cast<std::size_t>(b + 1)] - qo_indptr[static_cast<std::size_t>(b)];
    if (nq == 0) continue;
    const Index n = batch.sequence(b).size();
    const Index runs = ceil_div(n, run_tokens);
    // Run bounds as n * r / runs without overflowing n * r.
    const auto bound = [&](Index r) { return n / runs * r + n % runs * r / runs; };
    for (Index h = 0; h < H; ++h) {
      for (Index q0 = 0; q0 < nq; q0 += q_tile) {
        const Index rows = std::min(q_tile, nq - q0);
        rows_max = std::max(rows_max, rows * G);
        for (Index r = 0; r < runs; ++r) items.push_back({b, h, q0, rows, bound(r), bound(r + 1)});
      }
    }
  }
  const Index n_items = Index(items.size());
  ws.prepare(workers, rows_max, tile, d, !std::is_same_v<Scalar, T> || shape.values_in_keys(),
             n_items);
  const T scale = score_scale<T>(opt, d);

  auto run = [&](Index i, Index worker) {
    const work_item& it = items[static_cast<std::size_t>(i)];
    const auto view = batch.sequence(it.seq);
    const Index row0 = qo_indptr[static_cast<std::size_t>(it.seq)];
    const Index nq = qo_indptr[static_cast<std::size_t>(it.seq + 1)] - row0;
    const Index pos0 = view.end_position() - nq;  // position of the sequence's first query
    auto& scratch = ws.worker(worker);
    for (Index r = 0; r < it.nq; ++r) {
      for (Index g = 0; g < G; ++g) {
        scratch.q.row(r * G + g).head(d) =
            q.block(row0 + it.q0 + r, (it.head * G + g) * d, 1, d) * scale;
        scratch.pos[static_cast<std::size_t>(r * G + g)] = pos0 + it.q0 + r;
      }
    }
    auto& st = ws.partial(i);
    st.clear(it.nq * G);
    attend_range(view, it.head, it.k0, it.k1, it.nq * G, scratch.pos.data(),
                         pos0 + it.q0 + it.nq - 1, tile, scratch, st);
  };
  if (opt.pool != nullptr) {
    opt.pool->parallel_for(n_items, run);
  } else {
    for (Index i = 0; i < n_items; ++i) run(i, 0);
  }
  // Merge each (sequence, kv head, query tile)'s runs, which are consecutive items.
  for (Index i = 0; i < n_items;) {
    const work_item& it = items[static_cast<std::size_t>(i)];
    auto& acc = ws.partial(i);
    Index j = i + 1;
    for (; j < n_items; ++j) {
      const work_item& next = items[static_cast<std::size_t>(j)];
      if (next.seq != it.seq || next.head != it.head || next.q0 != it.q0) break;
      acc.merge(ws.partial(j), it.nq * G);
    }
    const Index row0 = qo_indptr[static_cast<std::size_t>(it.seq)] + it.q0;
    for (Index r = 0; r < it.nq; ++r) {
      for (Index g = 0; g < G; ++g) {
        out.block(row0 + r, (it.head * G + g) * dv, 1, dv) = acc.o.row(r * G + g).head(dv);
      }
    }
    i = j;
  }
}

}  // namespace detail

/// Attention of many sequences at once (FlashInfer's BatchPrefillWithPagedKVCache and
/// BatchDecodeWithPagedKVCache in one). Sequence b of `batch` (any type with `size()` and
/// `sequence(b)` returning a view: paged_batch from paged_kv_cache::batch) has the queries in
/// rows qo_indptr[b] .. qo_indptr[b+1] - 1 of `q` (`total x n_heads*head_dim`); they are its
/// newest tokens, so with m of them query i sits at position end_position() - m + i and sees,
/// causally, what the sequence's mask lets it see (every key of a view whose mask is not
/// causal, whatever the number of queries: cross-attention). One query per sequence is batched
/// decode; more is a prefill chunk, and a batch may mix both (chunked prefill, Sarathi-Serve).
/// The result goes to the same rows of `out`.
///
/// Work is cut into items (sequence, kv head, tile of queries, run of keys) balanced by
/// tokens: with `opt.pool`, each sequence's keys are split into runs of about
/// total tokens / (2 * threads) (or opt.split_tokens), so one long sequence is shared by all
/// threads while many short ones are not split; the runs' partial softmax states are merged
/// (merge_state). Each key and value row is read once per kv head group and query tile.
///
/// Equals attending each sequence alone (decode_attention, causal_attention) up to rounding.
/// Allocates nothing once `ws` has run a batch of the same or a larger size.
/// Throws std::invalid_argument when q, out, qo_indptr or a view do not fit `shape` or a
/// sequence with queries holds no token, std::out_of_range when a sequence with a causal mask
/// has more queries than positions, std::logic_error when `ws` is in use by another call.
template <class Batch>
void batch_attention(const attention_shape& shape,
                     const Eigen::Ref<const row_matrix<detail::batch_compute_t<Batch>>>& q,
                     const std::vector<Index>& qo_indptr, const Batch& batch,
                     Eigen::Ref<row_matrix<detail::batch_compute_t<Batch>>> out,
                     attention_workspace<detail::batch_compute_t<Batch>>& ws,
                     const attention_options& opt = {}) {
  using T = detail::batch_compute_t<Batch>;
  const typename attention_workspace<T>::guard busy(ws, "batch_attention");
  detail::batch_attention_unguarded("batch_attention", shape, q, qo_indptr, batch, out, ws, opt);
}

/// Batched decode: one query token per sequence of `batch`, q and out `B x n_heads*head_dim`
/// (row b for sequence b), each sequence attended at its newest position: batch_attention
/// with qo_indptr = 0, 1, ..., B. Throws as batch_attention does.
template <class Batch>
void batch_decode_attention(const attention_shape& shape,
                            const Eigen::Ref<const row_matrix<detail::batch_compute_t<Batch>>>& q,
                            const Batch& batch,
                            Eigen::Ref<row_matrix<detail::batch_compute_t<Batch>>> out,
                            attention_workspace<detail::batch_compute_t<Batch>>& ws,
                            const attention_options& opt = {}) {
  using T = detail::batch_compute_t<Batch>;
  const typename attention_workspace<T>::guard busy(ws, "batch_decode_attention");
  auto& qo_indptr = ws.indptr();
  qo_indptr.resize(static_cast<std::size_t>(batch.size() + 1));
  for (Index b = 0; b <= batch.size(); ++b) qo_indptr[static_cast<std::size_t>(b)] = b;
  detail::batch_attention_unguarded("batch_decode_attention", shape, q, qo_indptr, batch, out,
                                    ws, opt);
}

}  // namespace kvcache
