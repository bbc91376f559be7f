// SPDX-License-Identifier: Apache-2.0
// The one attention kernel: query rows against a cache view's blocks, in tiles, with an
// online softmax. Decode and prefill are two ways of cutting its work into items.
#pragma once

#include "kvcache/attention/micro_kernel.hpp"
#include "kvcache/attention/online_softmax.hpp"
#include "kvcache/cache/block.hpp"
#include "kvcache/detail/assert.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/thread_pool.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace kvcache {

/// Knobs of the attention kernels. The defaults are right for most uses.
struct attention_options {
  /// Scale of the scores; 0 means 1/sqrt(head_dim).
  double scale = 0.0;
  /// Keys per inner tile: scores are never materialized for more keys than this at once.
  Index tile_tokens = 128;
  /// Decode only: split each kv head's keys into runs of about this many tokens that are
  /// attended separately (in parallel when a pool is given) and merged. 0 chooses: one run
  /// per kv head, or shorter runs when there are more threads than kv heads.
  Index split_tokens = 0;
  /// Threads to run on; nullptr runs on the calling thread alone.
  thread_pool* pool = nullptr;
};

/// Scratch memory of the attention kernels. Reusing one across calls makes them allocation
/// free after the first call of the largest shape (the warm-up).
template <class T>
class attention_workspace {
 public:
  struct worker_scratch {
    row_matrix<T> q;      // [row][head_dim] the item's scaled queries
    row_matrix<T> s;      // [row][tile] scores, then probabilities
    row_matrix<T> k;      // [tile][head_dim] keys converted to T, when stored otherwise
    row_matrix<T> v;      // [tile][head_dim] values converted to T
    std::vector<Index> pos;  // [row] position of each query row, for the causal mask
    softmax_state<T> state;  // of the item being run, when it needs no merge
  };

  /// Sizes the scratch for `workers` workers and `partials` partial states (grow only).
  /// Sizes the scratch of `workers` workers for items of up to `rows` query rows and tiles of
  /// `tile` keys of `head_dim`, and `partials` partial states of `rows` rows. Allocates only
  /// what is missing, so every later call of the same or a smaller size allocates nothing.
  void prepare(Index workers, Index rows, Index tile, Index head_dim, bool convert,
               Index partials) {
    if (Index(workers_.size()) < workers) workers_.resize(static_cast<std::size_t>(workers));
    for (Index w = 0; w < workers; ++w) {
      auto& s = worker(w);
      grow(s.q, rows, head_dim);
      grow(s.s, rows, tile);
      if (convert) {
        grow(s.k, tile, head_dim);
        grow(s.v, tile, head_dim);
      }
      if (Index(s.pos.size()) < rows) s.pos.resize(static_cast<std::size_t>(rows));
      if (s.state.rows() < rows || s.state.o.cols() != head_dim) s.state.reset(rows, head_dim);
    }
    if (Index(partials_.size()) < partials) partials_.resize(static_cast<std::size_t>(partials));
    for (Index i = 0; i < partials; ++i) partial(i).reset(rows, head_dim);
  }
  worker_scratch& worker(Index w) { return workers_[static_cast<std::size_t>(w)]; }
  softmax_state<T>& partial(Index i) { return partials_[static_cast<std::size_t>(i)]; }

 private:
  // Makes `m` at least rows x cols without shrinking it.
  static void grow(row_matrix<T>& m, Index rows, Index cols) {
    if (m.rows() < rows || m.cols() < cols) {
      m.resize(std::max(m.rows(), rows), std::max(m.cols(), cols));
    }
  }

  std::vector<worker_scratch> workers_;
  std::vector<softmax_state<T>> partials_;
};

namespace detail {

// Up to this many query rows an item takes the micro-kernels; more rows (prefill) amortize a
// general matrix product's packing and take Eigen's.
inline constexpr Index micro_kernel_rows = 8;

// Sets to -inf the scores of keys after each row's position; the tile's first key sits at
// position `first`.
template <class Scores>
void mask_causal(Scores& S, const Index* row_pos, Index first) {
  using T = typename Scores::Scalar;
  for (Index r = 0; r < S.rows(); ++r) {
    const Index visible = row_pos[r] - first + 1;  // keys of this tile row r may see
    if (visible < S.cols()) {
      S.row(r).tail(S.cols() - std::max<Index>(visible, 0)).setConstant(-std::numeric_limits<T>::infinity());
    }
  }
}

// The online softmax step for one tile: scores S (rows x n) become probabilities relative to
// each row's new running max, and the state's sum and output are rescaled to that max.
// Rows that see no key in the tile get zero probabilities and keep their state.
template <class Scores, class T>
void online_softmax_update(Scores& S, softmax_state<T>& st) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (Index r = 0; r < S.rows(); ++r) {
    const T tile_max = S.row(r).maxCoeff();
    if (tile_max == neg_inf) {
      S.row(r).setZero();
      continue;
    }
    const T m_new = std::max(st.m(r), tile_max);
    const T alpha = std::exp(st.m(r) - m_new);
    S.row(r) = (S.row(r).array() - m_new).exp().matrix();
    st.l(r) = alpha * st.l(r) + S.row(r).sum();
    st.o.row(r) *= alpha;
    st.m(r) = m_new;
  }
}

// Folds rows [lo, hi) of one block (rows counted from the block's start, the first at
// position `offset`) into the first `rows` rows of `st`, for the first `rows` rows of `ws.q`.
// With `row_pos`, row r sees only keys at positions <= row_pos[r]. This is the overload for
// blocks of plain storage; other block kinds (quantized) overload it.
template <class T, class Scalar>
void attend_block(const kv_block<Scalar>& blk, Index lo, Index hi, Index offset, Index d,
                  Index rows, const Index* row_pos, Index tile,
                  typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st) {
  for (Index t0 = lo; t0 < hi; t0 += tile) {
    const Index n = std::min(tile, hi - t0);
    auto S = ws.s.topLeftCorner(rows, n);
    const bool micro = rows <= micro_kernel_rows;
    const Scalar* keys = blk.keys + t0 * blk.stride;
    const Scalar* values = blk.values + t0 * blk.stride;
    // Decode with a common head_dim reads storage directly; otherwise tiles are taken as T.
    const bool fixed = micro && with_fixed_chunks<T>(d, [&](auto chunks) {
      fixed_micro_kernel<T, decltype(chunks)::value>::scores(ws.q.data(), ws.q.cols(), rows, keys,
                                                             blk.stride, n, ws.s.data(),
                                                             ws.s.cols());
    });
    if (!fixed) {
      const auto K = load_tile<T>(blk.keys, blk.stride, t0, n, d, ws.k);
      if (micro) {
        micro_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, K.data(), K.outerStride(), n, d,
                                ws.s.data(), ws.s.cols());
      } else {
        S.noalias() = ws.q.topLeftCorner(rows, d) * K.transpose();
      }
    }
    if (row_pos != nullptr) mask_causal(S, row_pos, offset + t0);
    online_softmax_update(S, st);
    if (fixed) {
      with_fixed_chunks<T>(d, [&](auto chunks) {
        fixed_micro_kernel<T, decltype(chunks)::value>::accumulate(
            ws.s.data(), ws.s.cols(), rows, values, blk.stride, n, st.o.data(), st.o.cols());
      });
    } else {
      const auto V = load_tile<T>(blk.values, blk.stride, t0, n, d, ws.v);
      if (micro) {
        micro_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, V.data(), V.outerStride(), n,
                                    d, st.o.data(), st.o.cols());
      } else {
        st.o.topRows(rows).noalias() += S * V;
      }
    }
  }
}

// Folds keys [k0, k1) of kv head `h` (positions in the view, oldest first) into `st`.
template <class View, class T>
void attend_range(const View& view, Index h, Index k0, Index k1, Index rows, const Index* row_pos,
                  Index tile, typename attention_workspace<T>::worker_scratch& ws,
                  softmax_state<T>& st) {
  Index offset = 0;  // position of the current block's first token
  for (Index b = 0; b < view.n_blocks() && offset < k1; ++b) {
    const auto blk = view.block(h, b);
    const Index lo = std::max(k0, offset), hi = std::min(k1, offset + blk.tokens);
    if (lo < hi) {
      attend_block<T>(blk, lo - offset, hi - offset, offset, view.head_dim(), rows, row_pos, tile,
                      ws, st);
    }
    offset += blk.tokens;
  }
}

template <class View>
void check_view(const char* fn, const attention_shape& shape, const View& view) {
  if (view.n_kv_heads() != shape.n_kv_heads() || view.head_dim() != shape.head_dim()) {
    fail<std::invalid_argument>(fn, ": cache has ", view.n_kv_heads(), " kv heads of dim ",
                                view.head_dim(), ", expected ", shape.n_kv_heads(), " of dim ",
                                shape.head_dim());
  }
}

template <class T>
T score_scale(const attention_options& opt, Index head_dim) {
  return opt.scale != 0.0 ? T(opt.scale) : T(1) / std::sqrt(T(head_dim));
}

}  // namespace detail
}  // namespace kvcache
