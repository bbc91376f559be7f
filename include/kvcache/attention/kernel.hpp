// SPDX-License-Identifier: Apache-2.0
// The one attention kernel: query rows against a view's positioned blocks, in tiles, with an
// online softmax and masks computed from positions. Decode and prefill are two ways of cutting
// its work into items. Never includes a layout.
#pragma once

#include "kvcache/attention/micro_kernel.hpp"
#include "kvcache/attention/online_softmax.hpp"
#include "kvcache/attention/tile_kernel.hpp"
#include "kvcache/detail/assert.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/thread_pool.hpp"
#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace kvcache {
namespace detail {

// Up to this many query rows an item takes the micro-kernels; more rows (prefill) take the
// register-blocked tile products (tile_kernel).
inline constexpr Index micro_kernel_rows = 8;

}  // namespace detail

/// Knobs of the attention kernels. The defaults are right for most uses.
struct attention_options {
  /// Scale of the scores; 0 means 1/sqrt(head_dim). Must be finite.
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

namespace detail {
// A unit of batched attention: rows [q0, q0 + nq) of sequence `seq`'s queries, for kv head
// `head`, over its keys [k0, k1).
struct work_item {
  Index seq = 0;
  Index head = 0;
  Index q0 = 0;
  Index nq = 0;
  Index k0 = 0;
  Index k1 = 0;
};
}  // namespace detail

/// Scratch memory of the attention kernels. Reusing one across calls makes them allocation
/// free after the first call of the largest shape (the warm-up).
///
/// Thread safety: one workspace serves one attention call at a time (a call spreads its own
/// work over its pool, giving each worker its own scratch). Two calls that share a workspace
/// at once are caught: the second throws std::logic_error before touching anything. Give each
/// calling thread its own workspace.
template <class T>
class attention_workspace {
 public:
  struct worker_scratch {
    row_matrix<T> q;         // [row][head_dim] the item's scaled queries
    row_matrix<T> s;         // [row][tile] scores, then probabilities
    row_matrix<T> k;         // [tile][head_dim] keys converted to T, when stored otherwise
    row_matrix<T> v;         // [tile][head_dim] values converted to T
    row_matrix<T> kt;        // [head_dim][tile] keys transposed, for items of many rows
    std::vector<Index> pos;  // [row] position of each query row, for the masks
    softmax_state<T> state;  // of the item being run, when it needs no merge
  };

  attention_workspace() = default;
  /// Copies start empty: scratch is not state.
  attention_workspace(const attention_workspace&) {}
  attention_workspace& operator=(const attention_workspace&) { return *this; }
  ~attention_workspace() = default;

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
      if (rows > detail::micro_kernel_rows) {
        grow(s.kt, head_dim, detail::tile_kernel<T>::padded(tile));
      }
      if (convert) {
        grow(s.k, tile, head_dim);
        grow(s.v, tile, head_dim);
      }
      if (Index(s.pos.size()) < rows) s.pos.resize(static_cast<std::size_t>(rows));
      if (s.state.rows() < rows || s.state.o.cols() != head_dim) s.state.reset(rows, head_dim);
    }
    if (Index(partials_.size()) < partials) partials_.resize(static_cast<std::size_t>(partials));
    for (Index i = 0; i < partials; ++i) {
      if (partial(i).rows() < rows || partial(i).o.cols() != head_dim) partial(i).reset(rows, head_dim);
    }
  }
  worker_scratch& worker(Index w) { return workers_[static_cast<std::size_t>(w)]; }
  softmax_state<T>& partial(Index i) { return partials_[static_cast<std::size_t>(i)]; }
  /// The work items of a batched call; keeps its capacity between calls.
  std::vector<detail::work_item>& items() noexcept { return items_; }
  /// Query offsets of a batched decode call; keeps its capacity between calls.
  std::vector<Index>& indptr() noexcept { return indptr_; }

  /// Marks the workspace busy for the lifetime of the returned guard; throws std::logic_error
  /// naming `fn` when another call holds it.
  class guard {
   public:
    guard(attention_workspace& ws, const char* fn) : ws_(ws) {
      if (ws.busy_.exchange(true, std::memory_order_acquire)) {
        detail::fail<std::logic_error>(fn, ": this attention_workspace is in use by another "
                                           "call; give each thread its own workspace");
      }
    }
    guard(const guard&) = delete;
    guard& operator=(const guard&) = delete;
    ~guard() { ws_.busy_.store(false, std::memory_order_release); }

   private:
    attention_workspace& ws_;
  };

 private:
  // Makes `m` at least rows x cols without shrinking it.
  static void grow(row_matrix<T>& m, Index rows, Index cols) {
    if (m.rows() < rows || m.cols() < cols) {
      m.resize(std::max(m.rows(), rows), std::max(m.cols(), cols));
    }
  }

  std::vector<worker_scratch> workers_;
  std::vector<softmax_state<T>> partials_;
  std::vector<detail::work_item> items_;
  std::vector<Index> indptr_;
  std::atomic<bool> busy_{false};
};

namespace detail {


// Sets to -inf the scores that `mask` hides: row r's query sits at position row_pos[r], the
// tile's key j at position first + j. Keys after the query are hidden when the mask is causal,
// and with a window those in [sinks, p - window] too.
template <class Scores>
void apply_mask(Scores& S, const Index* row_pos, Index first, const attention_mask& mask) {
  using T = typename Scores::Scalar;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const Index n = S.cols();
  for (Index r = 0; r < S.rows(); ++r) {
    const Index p = row_pos[r];
    // Keys at or before p; every key of the tile without a causal mask.
    const Index visible = mask.causal ? std::clamp<Index>(p - first + 1, 0, n) : n;
    if (visible < n) S.row(r).tail(n - visible).setConstant(neg_inf);
    if (mask.window > 0) {
      const Index lo = std::clamp<Index>(mask.sinks - first, 0, visible);
      // Keys before stale_end are out of the window; written so that no window overflows.
      const Index stale_end = p >= mask.window ? p - mask.window + 1 : 0;
      const Index hi = std::clamp<Index>(stale_end - first, lo, visible);
      if (hi > lo) S.row(r).segment(lo, hi - lo).setConstant(neg_inf);
    }
  }
}

// Whether a tile of keys at positions [first, first + n) needs masking for any row.
inline bool needs_mask(const Index* row_pos, Index rows, Index first, Index n,
                       const attention_mask& mask) noexcept {
  if (row_pos == nullptr) return false;
  for (Index r = 0; r < rows; ++r) {
    const Index p = row_pos[r];
    if (mask.causal && first + n - 1 > p) return true;
    if (mask.window > 0 && first <= p - mask.window && first + n > mask.sinks) return true;
  }
  return false;
}

// The online softmax step for rows of scores stored row-major (`s_stride` apart), vectorized:
// per row, one pass for the max, one for exp(score - max) and its sum, one to scale. Rows whose
// scores are all -inf (masked) get zeros; a NaN score makes its row NaN.
template <class T>
void online_softmax_rows(T* s, Index s_stride, Index rows, Index n, softmax_state<T>& st) {
  using namespace Eigen::internal;
  using packet = typename tile_kernel<T>::packet;
  constexpr Index width = tile_kernel<T>::width;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const Index np = n - n % width, dv = st.o.cols(), dp = dv - dv % width;
  for (Index r = 0; r < rows; ++r) {
    T* row = s + r * s_stride;
    packet mx0 = pset1<packet>(neg_inf), mx1 = mx0;
    Index j = 0;
    for (; j + 2 * width <= np; j += 2 * width) {
      mx0 = pmax(mx0, ploadu<packet>(row + j));
      mx1 = pmax(mx1, ploadu<packet>(row + j + width));
    }
    if (j < np) mx0 = pmax(mx0, ploadu<packet>(row + j));
    T tile_max = predux_max(pmax(mx0, mx1));
    for (j = np; j < n; ++j) tile_max = std::max(tile_max, row[j]);
    if (tile_max == neg_inf && std::none_of(row, row + n, [](T x) { return x != x; })) {
      std::fill(row, row + n, T(0));  // every key of the tile hidden from this row
      continue;
    }
    const T m_new = std::max(st.m(r), tile_max);
    const T alpha = std::exp(st.m(r) - m_new) * st.l(r);  // 0 before any key
    const packet m_p = pset1<packet>(m_new);
    packet sum0 = pset1<packet>(T(0)), sum1 = sum0;
    for (j = 0; j + 2 * width <= np; j += 2 * width) {
      const packet e0 = pexp(psub(ploadu<packet>(row + j), m_p));
      const packet e1 = pexp(psub(ploadu<packet>(row + j + width), m_p));
      pstoreu(row + j, e0);
      pstoreu(row + j + width, e1);
      sum0 = padd(sum0, e0);
      sum1 = padd(sum1, e1);
    }
    if (j < np) {
      const packet e0 = pexp(psub(ploadu<packet>(row + j), m_p));
      pstoreu(row + j, e0);
      sum0 = padd(sum0, e0);
    }
    T sum = predux(padd(sum0, sum1));
    for (j = np; j < n; ++j) {
      row[j] = std::exp(row[j] - m_new);
      sum += row[j];
    }
    const T l_new = alpha + sum;
    const T inv = T(1) / l_new;
    const packet inv_p = pset1<packet>(inv);
    for (j = 0; j < np; j += width) pstoreu(row + j, pmul(ploadu<packet>(row + j), inv_p));
    for (j = np; j < n; ++j) row[j] *= inv;
    T* o = st.o.data() + r * st.o.outerStride();
    const T w = alpha * inv;
    const packet w_p = pset1<packet>(w);
    for (j = 0; j < dp; j += width) pstoreu(o + j, pmul(ploadu<packet>(o + j), w_p));
    for (j = dp; j < dv; ++j) o[j] *= w;
    st.l(r) = l_new;
    st.m(r) = m_new;
  }
}

// The online softmax step for one tile: scores S (rows x n) become probabilities relative to
// each row's new running max, already divided by the new running sum, and the state's output
// is reweighted to match, so the output stays normalized (see softmax_state). Rows that see no
// key in the tile get zero probabilities and keep their state.
template <class Scores, class T>
void online_softmax_update(Scores& S, softmax_state<T>& st) {
  if constexpr (bool(Scores::IsRowMajor) && (int(Scores::Flags) & Eigen::DirectAccessBit) != 0 &&
                Eigen::internal::packet_traits<T>::Vectorizable) {
    online_softmax_rows(S.data(), S.outerStride(), S.rows(), S.cols(), st);
    return;
  }
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (Index r = 0; r < S.rows(); ++r) {
    const T tile_max = S.row(r).maxCoeff();
    if (tile_max == neg_inf) {
      S.row(r).setZero();
      continue;
    }
    const T m_new = std::max(st.m(r), tile_max);
    const T alpha = std::exp(st.m(r) - m_new) * st.l(r);  // 0 before any key
    S.row(r) = (S.row(r).array() - m_new).exp().matrix();
    const T l_new = alpha + S.row(r).sum();
    const T inv = T(1) / l_new;
    S.row(r) *= inv;
    st.o.row(r) *= alpha * inv;
    st.l(r) = l_new;
    st.m(r) = m_new;
  }
}

// `n` stored rows `stride` apart, converted to T into rows `dst_stride` apart.
template <class T, class Scalar>
void convert_rows(const Scalar* src, Index stride, Index n, Index d, T* dst, Index dst_stride) {
  using w = widen<T, Scalar>;
  const Index dv = d - d % w::width;
  for (Index t = 0; t < n; ++t, src += stride, dst += dst_stride) {
    for (Index x = 0; x < dv; x += w::width) Eigen::internal::pstoreu(dst + x, w::load(src + x));
    for (Index x = dv; x < d; ++x) dst[x] = T(src[x]);
  }
}

// Folds rows [lo, hi) of one block (rows counted from the block's start, which sits at
// position `first`) into the first `rows` rows of `st`, for the first `rows` rows of `ws.q`.
// With `row_pos`, row r sees the keys that `mask` lets a query at row_pos[r] see. The block
// read after this one (or null) is the last argument: formats that ask for their next rows a
// fixed lead ahead ask for that block's once they pass this one's end. This is the overload
// for blocks of plain storage, which gathers short blocks (pages) and takes no next block;
// formats overload it for their own blocks.
template <class T, class Scalar>
void attend_block(const kv_block<Scalar>& blk, Index lo, Index hi, Index first, Index d,
                  Index rows, const Index* row_pos, const attention_mask& mask, Index tile,
                  typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                  const kv_block<Scalar>* /*next*/ = nullptr) {
  for (Index t0 = lo; t0 < hi; t0 += tile) {
    const Index n = std::min(tile, hi - t0);
    auto S = ws.s.topLeftCorner(rows, n);
    const bool micro = rows <= micro_kernel_rows;
    const Scalar* keys = blk.keys + t0 * blk.stride;
    const Scalar* values = blk.values + t0 * blk.stride;
    const Index row_bytes = d * Index(sizeof(Scalar));
    // Decode with a common head_dim reads storage directly; otherwise tiles are taken as T.
    // Scoring the keys asks for the tile's values, summing the values for the next tile's keys.
    const bool fixed = micro && with_fixed_chunks<T>(d, [&](auto chunks) {
      const row_run<Scalar> value_run{values, n, blk.stride};
      prefetch_cursor<Scalar> ahead{&value_run, 1, row_bytes};
      fixed_micro_kernel<T, decltype(chunks)::value>::scores(ws.q.data(), ws.q.cols(), rows, keys,
                                                             blk.stride, n, ws.s.data(),
                                                             ws.s.cols(), &ahead);
    });
    if (!fixed && micro) {
      const auto K = load_tile<T>(blk.keys, blk.stride, t0, n, d, ws.k);
      micro_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, K.data(), K.outerStride(), n, d,
                              ws.s.data(), ws.s.cols());
    } else if (!fixed) {
      const row_run<Scalar> key_run{keys, n, blk.stride};
      tile_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, &key_run, 1, d, ws.s.data(),
                             ws.s.cols(), ws.kt);
    }
    if (needs_mask(row_pos, rows, first + t0, n, mask)) apply_mask(S, row_pos, first + t0, mask);
    online_softmax_update(S, st);
    if (fixed) {
      with_fixed_chunks<T>(d, [&](auto chunks) {
        // Formed only when the block has rows after this tile: a row past its end may lie
        // past its buffer.
        const Index next_n = std::min(tile, hi - t0 - n);
        const row_run<Scalar> next_keys{next_n > 0 ? keys + n * blk.stride : keys, next_n,
                                        blk.stride};
        prefetch_cursor<Scalar> ahead{&next_keys, 1, row_bytes};
        fixed_micro_kernel<T, decltype(chunks)::value>::accumulate(
            ws.s.data(), ws.s.cols(), rows, values, blk.stride, n, st.o.data(), st.o.cols(),
            &ahead);
      });
    } else {
      const auto V = load_tile<T>(blk.values, blk.stride, t0, n, d, ws.v);
      if (micro) {
        micro_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, V.data(), V.outerStride(), n,
                                    d, st.o.data(), st.o.cols());
      } else {
        const row_run<T> value_run{V.data(), n, V.outerStride()};
        tile_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, &value_run, 1, d, st.o.data(),
                                   st.o.cols());
      }
    }
  }
}

// A cache layer's block: its format's stored run, or a run of the full-precision tail.
template <class T, class StoredBlock>
void attend_block(const layer_block<StoredBlock, T>& blk, Index lo, Index hi, Index first,
                  Index d, Index rows, const Index* row_pos, const attention_mask& mask,
                  Index tile, typename attention_workspace<T>::worker_scratch& ws,
                  softmax_state<T>& st, const layer_block<StoredBlock, T>* next = nullptr) {
  if (blk.in_tail) {
    attend_block<T>(blk.tail, lo, hi, first, d, rows, row_pos, mask, tile, ws, st);
  } else {
    const StoredBlock* next_stored = next != nullptr && !next->in_tail ? &next->stored : nullptr;
    attend_block<T>(blk.stored, lo, hi, first, d, rows, row_pos, mask, tile, ws, st, next_stored);
  }
}

// Short runs of plain rows (the pages of a paged cache) gathered into one tile: their keys,
// their values, and the position of each run's first token.
template <class Scalar>
struct page_tile {
  static constexpr Index max_runs = 64;
  std::array<row_run<Scalar>, static_cast<std::size_t>(max_runs)> keys{};
  std::array<row_run<Scalar>, static_cast<std::size_t>(max_runs)> values{};
  std::array<Index, static_cast<std::size_t>(max_runs)> first{};
  Index count = 0;
  Index tokens = 0;
};

// Folds a page_tile into `st` as one tile: scores of every run side by side, one online
// softmax step, then the values of every run, with the queries (then the outputs) held in
// registers across the runs. Pages of 16 tokens thus cost what one tile of their total does,
// not a softmax step and a kernel call each. At most the scratch's tile of tokens.
template <class T, class Scalar>
void attend_pages(const page_tile<Scalar>& pt, Index d, Index rows, const Index* row_pos,
                  const attention_mask& mask, typename attention_workspace<T>::worker_scratch& ws,
                  softmax_state<T>& st) {
  const bool micro = rows <= micro_kernel_rows;
  auto S = ws.s.topLeftCorner(rows, pt.tokens);
  // (Asking for the pages' values while scoring their keys, as attend_block does for a
  // block's tile, made batched paged decode 20% slower on x86-64-v3.)
  const bool fixed = micro && with_fixed_chunks<T>(d, [&](auto chunks) {
    fixed_micro_kernel<T, decltype(chunks)::value>::scores(ws.q.data(), ws.q.cols(), rows,
                                                           pt.keys.data(), pt.count, ws.s.data(),
                                                           ws.s.cols());
  });
  if (!micro) {
    tile_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, pt.keys.data(), pt.count, d,
                           ws.s.data(), ws.s.cols(), ws.kt);
  }
  Index col = 0;
  for (Index i = 0; i < pt.count; ++i) {
    const auto at = static_cast<std::size_t>(i);
    const row_run<Scalar>& k = pt.keys[at];
    if (micro && !fixed) {
      const auto K = load_tile<T>(k.rows, k.stride, 0, k.n, d, ws.k);
      micro_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, K.data(), K.outerStride(), k.n, d,
                              ws.s.data() + col, ws.s.cols());
    }
    if (needs_mask(row_pos, rows, pt.first[at], k.n, mask)) {
      auto Sk = S.middleCols(col, k.n);
      apply_mask(Sk, row_pos, pt.first[at], mask);
    }
    col += k.n;
  }
  online_softmax_update(S, st);
  if (fixed) {
    with_fixed_chunks<T>(d, [&](auto chunks) {
      fixed_micro_kernel<T, decltype(chunks)::value>::accumulate(
          ws.s.data(), ws.s.cols(), rows, pt.values.data(), pt.count, st.o.data(), st.o.cols());
    });
    return;
  }
  if (!micro) {
    if constexpr (std::is_same_v<Scalar, T>) {
      tile_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, pt.values.data(), pt.count, d,
                                 st.o.data(), st.o.cols());
    } else {
      // Values stored otherwise are converted into one tile of T, the runs one after another.
      for (Index i = 0, at = 0; i < pt.count; at += pt.values[std::size_t(i)].n, ++i) {
        const row_run<Scalar>& v = pt.values[static_cast<std::size_t>(i)];
        convert_rows(v.rows, v.stride, v.n, d, ws.v.data() + at * ws.v.cols(), ws.v.cols());
      }
      const row_run<T> tile{ws.v.data(), pt.tokens, ws.v.cols()};
      tile_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, &tile, 1, d, st.o.data(),
                                 st.o.cols());
    }
    return;
  }
  col = 0;
  for (Index i = 0; i < pt.count; ++i) {
    const row_run<Scalar>& v = pt.values[static_cast<std::size_t>(i)];
    const auto V = load_tile<T>(v.rows, v.stride, 0, v.n, d, ws.v);
    micro_kernel<T>::accumulate(ws.s.data() + col, ws.s.cols(), rows, V.data(), V.outerStride(),
                                v.n, d, st.o.data(), st.o.cols());
    col += v.n;
  }
}

// A block's plain storage when it has one (kv_block, or a layer_block's stored kv_block), else
// null: only such blocks are gathered into a page_tile.
template <class Scalar>
const kv_block<Scalar>* plain_of(const kv_block<Scalar>& blk) noexcept {
  return &blk;
}
template <class Scalar, class T>
const kv_block<Scalar>* plain_of(const layer_block<kv_block<Scalar>, T>& blk) noexcept {
  return blk.in_tail ? nullptr : &blk.stored;
}
template <class Block>
std::nullptr_t plain_of(const Block&) noexcept {
  return nullptr;
}
template <class P>
struct page_tile_of {
  using type = page_tile<float>;  // never filled: such blocks are not gathered
};
template <class Scalar>
struct page_tile_of<const kv_block<Scalar>*> {
  using type = page_tile<Scalar>;
};

// Rows [lo, hi) of a stored block whose first token sits at position `first`: one of the
// short blocks (pages) a format gathers into a tile.
template <class Block>
struct gathered_run {
  Block blk{};
  Index lo = 0;
  Index hi = 0;
  Index first = 0;
};
inline constexpr Index max_gathered_runs = 16;

// A block's stored run when its format gathers short blocks into one tile (the format
// overloads it, and attend_gathered, for its blocks), else null. Plain pages are gathered by
// plain_of and attend_pages instead.
template <class Block>
std::nullptr_t gathered_of(const Block&) noexcept {
  return nullptr;
}

// Folds gathered runs into `st` each on its own (attend_block), each asking ahead for the run
// after it and the last for `next`.
template <class T, class Block>
void attend_each_run(const gathered_run<Block>* runs, Index count, Index d, Index rows,
                     const Index* row_pos, const attention_mask& mask, Index tile,
                     typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                     const Block* next) {
  for (Index i = 0; i < count; ++i) {
    attend_block<T>(runs[i].blk, runs[i].lo, runs[i].hi, runs[i].first, d, rows, row_pos, mask,
                    tile, ws, st, i + 1 < count ? &runs[i + 1].blk : next);
  }
}

// Folds gathered runs into `st`: here each on its own; formats that gather overload it to
// fold them as one tile.
template <class T, class Block>
void attend_gathered(const gathered_run<Block>* runs, Index count, Index d, Index rows,
                     const Index* row_pos, const attention_mask& mask, Index tile,
                     typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                     const Block* next) {
  attend_each_run<T>(runs, count, d, rows, row_pos, mask, tile, ws, st, next);
}

// Rows [t0, t0 + n) of a block's keys as a tile of T (see load_tile): mapped in place when
// stored as T, otherwise converted into `scratch`. Formats overload it for their own blocks.
template <class T, class Scalar>
tile_map<T> key_tile(const kv_block<Scalar>& blk, Index t0, Index n, Index d,
                     row_matrix<T>& scratch) {
  return load_tile<T>(blk.keys, blk.stride, t0, n, d, scratch);
}
template <class T, class StoredBlock>
tile_map<T> key_tile(const layer_block<StoredBlock, T>& blk, Index t0, Index n, Index d,
                     row_matrix<T>& scratch) {
  return blk.in_tail ? key_tile<T>(blk.tail, t0, n, d, scratch)
                     : key_tile<T>(blk.stored, t0, n, d, scratch);
}

// Folds one tile of keys K (n x d, rows of T) whose first dv columns are the values too into
// `st`: scores, mask_tile(scores), one online softmax step, then the weighted sum of the same
// rows. Every row is read from memory once for both. `next`, when given, walks the stored rows
// of the next tile, which the weighted sum asks for while it works on rows already in cache.
template <class T, class Tile, class MaskTile, class Ahead = prefetch_cursor<T>>
void fold_shared_tile(const Tile& K, Index d, Index dv, Index rows,
                      typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                      MaskTile&& mask_tile, Ahead* next = nullptr) {
  const Index n = K.rows();
  auto S = ws.s.topLeftCorner(rows, n);
  // Decode's few rows (MLA's heads) take the wide kernels; prefill's many, the tile products.
  const bool wide = rows <= wide_kernel<T>::max_rows;
  const row_run<T> run{K.data(), n, K.outerStride()};
  if (wide) {
    wide_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, K.data(), K.outerStride(), n, d,
                           ws.s.data(), ws.s.cols());
  } else {
    tile_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, &run, 1, d, ws.s.data(), ws.s.cols(),
                           ws.kt);
  }
  mask_tile(S);
  online_softmax_update(S, st);
  if (wide) {
    wide_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, K.data(), K.outerStride(), n, dv,
                               st.o.data(), st.o.cols(), next);
  } else {
    tile_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, &run, 1, dv, st.o.data(),
                               st.o.cols());
  }
}

// attend_range for views whose values are the first value_dim() columns of the keys (MLA's
// latent rows): each tile of keys is loaded once (converted or dequantized once, in the
// workspace's k tile) and read for both the scores and the values. Blocks shorter than a tile
// with plain storage (pages) are gathered into one tile, each run masked by its own positions.
template <class View, class T>
void attend_range_shared(const View& view, Index h, Index k0, Index k1, Index rows,
                         const Index* row_pos, Index max_pos, Index tile,
                         typename attention_workspace<T>::worker_scratch& ws,
                         softmax_state<T>& st) {
  const attention_mask mask = view.mask();
  const Index d = view.head_dim(), dv = view.value_dim();
  using plain_t = decltype(plain_of(view.block(h, 0)));
  constexpr bool may_gather = !std::is_same_v<plain_t, std::nullptr_t>;
  struct gathered_run {
    Index col = 0;
    Index n = 0;
    Index first = 0;
  };
  constexpr std::size_t max_runs = 64;
  std::array<gathered_run, max_runs> runs{};
  std::size_t count = 0;
  Index gathered = 0;
  const auto flush = [&] {
    if (gathered == 0) return;
    const tile_map<T> K(ws.k.data(), gathered, d, Eigen::OuterStride<>(ws.k.cols()));
    fold_shared_tile<T>(K, d, dv, rows, ws, st, [&](auto& S) {
      for (std::size_t i = 0; i < count; ++i) {
        const gathered_run& r = runs[i];
        if (needs_mask(row_pos, rows, r.first, r.n, mask)) {
          auto Sr = S.middleCols(r.col, r.n);
          apply_mask(Sr, row_pos, r.first, mask);
        }
      }
    });
    count = 0;
    gathered = 0;
  };
  Index offset = 0;  // index of the current block's first token within the view
  for (Index b = 0; b < view.n_blocks() && offset < k1; ++b) {
    const auto blk = view.block(h, b);
    const Index first = view.position(b);
    if (first > max_pos) break;
    const Index seen = std::min(blk.tokens, max_pos - first + 1);  // keys at or before max_pos
    const Index lo = std::max(k0, offset), hi = std::min(k1, offset + seen);
    if (lo < hi) {
      bool done = false;
      if constexpr (may_gather) {
        const auto* plain = plain_of(blk);
        if (plain != nullptr && hi - lo < tile) {
          if (gathered + (hi - lo) > tile || count == max_runs) flush();
          const Index from = lo - offset;
          convert_rows<T>(plain->keys + from * plain->stride, plain->stride, hi - lo, d,
                          ws.k.data() + gathered * ws.k.cols(), ws.k.cols());
          runs[count++] = {gathered, hi - lo, first + from};
          gathered += hi - lo;
          done = true;
        }
      }
      if (!done) {
        flush();
        [[maybe_unused]] const auto plain = plain_of(blk);
        for (Index t0 = lo - offset; t0 < hi - offset; t0 += tile) {
          const Index n = std::min(tile, hi - offset - t0);
          const auto K = key_tile<T>(blk, t0, n, d, ws.k);
          const auto mask_tile = [&](auto& S) {
            if (needs_mask(row_pos, rows, first + t0, n, mask)) {
              apply_mask(S, row_pos, first + t0, mask);
            }
          };
          // Plain storage: the next tile of this block is asked for while this one is summed
          // (formed only when the block has rows after this tile).
          const Index next_n = std::min(tile, hi - offset - t0 - n);
          if constexpr (may_gather) {
            if (plain != nullptr && next_n > 0) {
              using Scalar = std::remove_cv_t<std::remove_reference_t<decltype(*plain->keys)>>;
              const row_run<Scalar> next_rows{plain->keys + (t0 + n) * plain->stride, next_n,
                                              plain->stride};
              prefetch_cursor<Scalar> ahead{&next_rows, 1, d * Index(sizeof(Scalar))};
              fold_shared_tile<T>(K, d, dv, rows, ws, st, mask_tile, &ahead);
              continue;
            }
          }
          fold_shared_tile<T>(K, d, dv, rows, ws, st, mask_tile);
        }
      }
    }
    offset += blk.tokens;
  }
  flush();
}

// Folds the keys [k0, k1) of kv head `h` (counted over the view's blocks, oldest first) into
// `st`. Under a causal mask, keys whose position lies after `max_pos` are skipped, not masked:
// no row can see them (so causal prefill does half the work of the full square).
template <class View, class T>
void attend_range(const View& view, Index h, Index k0, Index k1, Index rows, const Index* row_pos,
                  Index max_pos, Index tile, typename attention_workspace<T>::worker_scratch& ws,
                  softmax_state<T>& st) {
  if (view.values_in_keys()) {
    attend_range_shared<View, T>(view, h, k0, k1, rows, row_pos, max_pos, tile, ws, st);
    return;
  }
  const attention_mask mask = view.mask();
  const Index d = view.head_dim();
  // Blocks shorter than a tile with plain storage (pages) are gathered into tiles.
  using plain_t = decltype(plain_of(view.block(h, 0)));
  constexpr bool may_gather = !std::is_same_v<plain_t, std::nullptr_t>;
  typename page_tile_of<plain_t>::type pt;
  const auto flush = [&] {
    if constexpr (may_gather) {
      if (pt.count > 0) attend_pages<T>(pt, d, rows, row_pos, mask, ws, st);
    }
    pt.count = 0;
    pt.tokens = 0;
  };
  // Short blocks of a format that gathers them (quantized pages), folded as one tile by the
  // format's attend_gathered; `next` is the block read after them, or null.
  using runs_t = decltype(gathered_of(view.block(h, 0)));
  constexpr bool may_gather_runs = !std::is_same_v<runs_t, std::nullptr_t>;
  using run_block = std::conditional_t<may_gather_runs,
                                       std::remove_cv_t<std::remove_pointer_t<runs_t>>, int>;
  std::array<gathered_run<run_block>, static_cast<std::size_t>(max_gathered_runs)> runs{};
  Index run_count = 0, run_tokens = 0;
  const auto flush_runs = [&](const run_block* next) {
    if constexpr (may_gather_runs) {
      if (run_count > 0) {
        attend_gathered<T>(runs.data(), run_count, d, rows, row_pos, mask, tile, ws, st, next);
      }
    }
    run_count = 0;
    run_tokens = 0;
  };
  Index offset = 0;  // index of the current block's first token within the view
  for (Index b = 0; b < view.n_blocks() && offset < k1; ++b) {
    const auto blk = view.block(h, b);
    const Index first = view.position(b);
    if (mask.causal && first > max_pos) break;
    // Keys at or before max_pos, or every key without a causal mask.
    const Index seen = mask.causal ? std::min(blk.tokens, max_pos - first + 1) : blk.tokens;
    const Index lo = std::max(k0, offset), hi = std::min(k1, offset + seen);
    if (lo < hi) {
      bool gathered = false;
      if constexpr (may_gather) {
        const auto* plain = plain_of(blk);
        if (plain != nullptr && hi - lo < tile) {
          if (pt.tokens + (hi - lo) > tile || pt.count == pt.max_runs) flush();
          const Index from = lo - offset;  // within the block
          const auto* keys = plain->keys + from * plain->stride;
          const auto* values = plain->values + from * plain->stride;
          const auto last = static_cast<std::size_t>(pt.count - 1);
          if (pt.count > 0 && pt.keys[last].stride == plain->stride &&
              pt.keys[last].rows + pt.keys[last].n * plain->stride == keys &&
              pt.values[last].rows + pt.values[last].n * plain->stride == values &&
              pt.first[last] + pt.keys[last].n == first + from) {
            // The page after the last one in memory and in positions: one run.
            pt.keys[last].n += hi - lo;
            pt.values[last].n += hi - lo;
          } else {
            const auto at = static_cast<std::size_t>(pt.count++);
            pt.keys[at] = {keys, hi - lo, plain->stride};
            pt.values[at] = {values, hi - lo, plain->stride};
            pt.first[at] = first + from;
          }
          pt.tokens += hi - lo;
          gathered = true;
        }
      }
      if constexpr (may_gather_runs) {
        const auto* stored = gathered_of(blk);
        if (stored != nullptr && hi - lo < tile) {
          if (run_tokens + (hi - lo) > tile || run_count == max_gathered_runs) flush_runs(stored);
          runs[static_cast<std::size_t>(run_count++)] = {*stored, lo - offset, hi - offset, first};
          run_tokens += hi - lo;
          gathered = true;
        }
      }
      if (!gathered) {
        if constexpr (may_gather_runs) flush_runs(gathered_of(blk));
        flush();
        // The block after it, when this item reads on into it.
        const bool more = b + 1 < view.n_blocks() && offset + blk.tokens < k1 &&
                          !(mask.causal && view.position(b + 1) > max_pos);
        const auto next = more ? view.block(h, b + 1) : decltype(blk){};
        attend_block<T>(blk, lo - offset, hi - offset, first, d, rows, row_pos, mask, tile, ws, st,
                        more ? &next : nullptr);
      }
    }
    offset += blk.tokens;
  }
  flush();
  flush_runs(nullptr);
}

template <class View>
void check_view(const char* fn, const attention_shape& shape, const View& view) {
  if (view.n_kv_heads() != shape.n_kv_heads() || view.head_dim() != shape.head_dim()) {
    fail<std::invalid_argument>(fn, ": cache has ", view.n_kv_heads(), " kv heads of dim ",
                                view.head_dim(), ", expected ", shape.n_kv_heads(), " of dim ",
                                shape.head_dim());
  }
  if (view.values_in_keys() != shape.values_in_keys() || view.value_dim() != shape.value_dim()) {
    fail<std::invalid_argument>(fn, ": cache has values ", view.value_dim(), " wide ",
                                view.values_in_keys() ? "in its keys" : "apart from its keys",
                                ", the shape ", shape.value_dim(), " wide ",
                                shape.values_in_keys() ? "in its keys" : "apart from its keys");
  }
}

// Refuses options no kernel can run with, naming `fn`.
inline void check_options(const char* fn, const attention_options& opt) {
  if (opt.tile_tokens <= 0 || opt.split_tokens < 0) {
    fail<std::invalid_argument>(fn, ": tile_tokens must be > 0 and split_tokens >= 0, got ",
                                opt.tile_tokens, " and ", opt.split_tokens);
  }
  if (!std::isfinite(opt.scale)) {
    fail<std::invalid_argument>(fn, ": scale must be finite (0 for 1/sqrt(head_dim)), got ",
                                opt.scale);
  }
}

template <class T>
T score_scale(const attention_options& opt, Index head_dim) {
  return opt.scale != 0.0 ? T(opt.scale) : T(1) / std::sqrt(T(head_dim));
}

// Keys per tile for a view of `tokens` tokens: tile_tokens, but a tile_tokens far beyond the
// view sizes no scratch beyond it (nor beyond the default tile, so that views growing by a
// token per step do not regrow the scratch).
inline Index tile_for(const attention_options& opt, Index tokens) noexcept {
  return std::max<Index>(1, std::min(opt.tile_tokens, std::max<Index>(tokens, 128)));
}

// The number of runs decode splits each kv head's `tokens` keys into (split-K), for `tile`
// keys per tile: enough runs to give every worker work, none shorter than a tile. Never falls
// as tokens grow, so sizing for the largest view sizes for every smaller one.
inline Index decode_splits(const attention_options& opt, Index n_kv_heads, Index tokens,
                           Index tile) noexcept {
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;
  Index splits = opt.split_tokens > 0 ? ceil_div(tokens, opt.split_tokens)
                                      : ceil_div(workers, n_kv_heads);
  return std::max<Index>(1, std::min(splits, ceil_div(tokens, tile)));
}

}  // namespace detail
}  // namespace kvcache
