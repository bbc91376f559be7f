// SPDX-License-Identifier: Apache-2.0
// Sliding-window KV cache: Mistral's rolling buffer, with optional StreamingLLM attention sinks.
#pragma once

#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/kernel.hpp"
#include "kvcache/attention/prefill.hpp"
#include "kvcache/cache/block.hpp"
#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {

/// One layer of a sliding_window_cache as attention reads it: the held tokens oldest first,
/// as up to three blocks per kv head: the sinks, then the ring's older part, then its newer
/// part. Before the ring wraps, and whenever its oldest token sits in its first slot, the
/// sinks and the ring are one block. A non-owning, trivially copyable view, valid until the
/// cache is next modified.
template <class Scalar>
struct sliding_window_view {
  using scalar_type = Scalar;
  using block_type = kv_block<Scalar>;

  /// `tokens` consecutive slots from `slot` on.
  struct run {
    Index slot = 0;
    Index tokens = 0;
  };

  const Scalar* keys = nullptr;    // [kv_head][slot][head_dim], heads `head_stride` apart
  const Scalar* values = nullptr;  // same layout as keys
  Index kv_heads = 0;
  Index dim = 0;
  Index tokens = 0;
  Index head_stride = 0;
  Index blocks = 0;
  std::array<run, 3> runs{};  // the first `blocks` hold the tokens, oldest first

  Index n_kv_heads() const noexcept { return kv_heads; }
  Index head_dim() const noexcept { return dim; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return blocks; }
  block_type block(Index kv_head, Index i) const noexcept {
    const run& r = runs[static_cast<std::size_t>(i)];
    const Index offset = kv_head * head_stride + r.slot * dim;
    return {keys + offset, values + offset, r.tokens, dim};
  }
};

namespace detail {

// Sizes `ws` for decode_attention over views of `tokens` tokens, choosing the same number of
// split-K runs as decode_attention does, so the decode steps that follow allocate nothing
// and cannot fail for want of memory.
template <class Scalar, class T>
void prepare_decode(attention_workspace<T>& ws, const attention_shape& shape, Index tokens,
                    const attention_options& opt) {
  const Index H = shape.n_kv_heads(), tile = opt.tile_tokens;
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;
  Index splits = opt.split_tokens > 0 ? (tokens + opt.split_tokens - 1) / opt.split_tokens
                                      : (workers + H - 1) / H;
  splits = std::max<Index>(1, std::min(splits, (tokens + tile - 1) / tile));
  ws.prepare(workers, shape.group_size(), tile, shape.head_dim(), !std::is_same_v<Scalar, T>,
             splits > 1 ? H * splits : 0);
}

}  // namespace detail

/// A whole model's sliding-window KV cache (Mistral's rolling buffer) with optional attention
/// sinks (StreamingLLM). Per layer, the first `sinks` tokens ever appended are kept for good,
/// and of the later ones the most recent `window` in a ring buffer of exactly `window` slots:
/// once a layer has seen sinks + window tokens, each new token overwrites the oldest non-sink
/// one. Memory is allocated once, at construction, and stays constant however long
/// generation runs.
///
/// Decode over `view(l)` after appending the token at position p equals full attention over
/// every token ever appended with a sliding-window mask: the query sees keys at positions
/// p-window+1..p and those below `sinks` (reference_attention's attention_mask{window, sinks}).
/// Positions are not stored: apply RoPE with the true position, position(l) for the next
/// token, before appending.
///
/// Layout: per layer, per kv head, `[slot][head_dim]` with the sinks in slots 0..sinks-1 and
/// the ring in slots sinks..sinks+window-1. Every member that throws leaves the cache exactly
/// as it was.
template <class Scalar>
class sliding_window_cache {
 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using view_type = sliding_window_view<Scalar>;

  /// An empty cache of `window` recent tokens plus `sinks` first tokens per layer, allocated
  /// now: capacity_bytes() = 2 * n_layers * (sinks + window) * n_kv_heads * head_dim *
  /// sizeof(Scalar). Throws std::invalid_argument unless window >= 1 and 0 <= sinks < window
  /// (more sinks than window would crowd out the recent tokens the window is for),
  /// std::length_error when the cache is more than memory can address, std::bad_alloc when
  /// memory is short.
  sliding_window_cache(const cache_shape& shape, Index window, Index sinks = 0)
      : shape_(shape), window_(window), sinks_(sinks) {
    if (window < 1) {
      detail::fail<std::invalid_argument>("sliding_window_cache: window must be >= 1, got ",
                                          window);
    }
    if (sinks < 0) {
      detail::fail<std::invalid_argument>("sliding_window_cache: sinks must be >= 0, got ",
                                          sinks);
    }
    if (sinks >= window) {
      detail::fail<std::invalid_argument>("sliding_window_cache: sinks = ", sinks,
                                          " must be less than window = ", window,
                                          ", or the sinks would crowd out the window");
    }
    const Index per_token = 2 * shape.n_layers() * shape.kv_width() * Index(sizeof(Scalar));
    if (window > std::numeric_limits<Index>::max() / per_token - sinks) {
      detail::fail<std::length_error>("sliding_window_cache: sinks + window = ", sinks, " + ",
                                      window, " tokens are more than memory can address");
    }
    keys_ = detail::buffer<Scalar>(shape.n_layers() * layer_stride());
    values_ = detail::buffer<Scalar>(shape.n_layers() * layer_stride());
    positions_.assign(static_cast<std::size_t>(shape.n_layers()), 0);
  }

  /// Deep copy: allocates as much as `other` holds allocated.
  sliding_window_cache(const sliding_window_cache& other)
      : shape_(other.shape_), window_(other.window_), sinks_(other.sinks_),
        keys_(other.keys_.size()), values_(other.values_.size()), positions_(other.positions_) {
    const auto bytes = static_cast<std::size_t>(keys_.size()) * sizeof(Scalar);
    if (bytes > 0) {
      std::memcpy(keys_.data(), other.keys_.data(), bytes);
      std::memcpy(values_.data(), other.values_.data(), bytes);
    }
  }
  sliding_window_cache& operator=(const sliding_window_cache& other) {
    if (this != &other) {
      sliding_window_cache copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  sliding_window_cache(sliding_window_cache&&) noexcept = default;
  sliding_window_cache& operator=(sliding_window_cache&&) noexcept = default;
  ~sliding_window_cache() = default;

  const cache_shape& shape() const noexcept { return shape_; }
  Index n_layers() const noexcept { return shape_.n_layers(); }
  /// Recent tokens kept per layer.
  Index window() const noexcept { return window_; }
  /// First tokens kept per layer for good.
  Index sinks() const noexcept { return sinks_; }
  /// The most tokens a layer holds: sinks() + window().
  Index capacity() const noexcept { return sinks_ + window_; }

  /// Tokens ever appended to layer `l` since construction or clear(): the position of the
  /// next token, which its RoPE must use. Throws std::out_of_range for a bad layer.
  Index position(Index l) const { return positions_[checked(l, "position")]; }
  /// Tokens layer `l` holds now: min(position(l), sinks() + window()). Throws
  /// std::out_of_range for a bad layer.
  Index size(Index l) const { return held(positions_[checked(l, "size")]); }
  /// Tokens every layer holds (the smallest size(l)).
  Index size() const noexcept {
    Index n = capacity();
    for (const Index p : positions_) n = std::min(n, held(p));
    return n;
  }

  /// Appends `k.rows()` tokens to layer `l`. `k` and `v` are `(tokens x n_kv_heads*head_dim)`,
  /// one row per token with the heads side by side, of any scalar type convertible to
  /// Scalar. The result equals appending the rows one at a time: past sinks + window tokens
  /// the oldest non-sink ones are overwritten in order, and rows a longer chunk would
  /// overwrite itself are never written. O(1) per token kept, never allocates. Throws
  /// std::out_of_range for a bad layer and std::invalid_argument for a wrong shape; nothing
  /// changes when it throws.
  template <class DerivedK, class DerivedV>
  void append(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    const std::size_t i = checked(l, "append");
    check_input("append", k, v);
    write(i, k, v);
  }

  /// Drops every token of every layer (positions restart at 0); the memory stays allocated.
  void clear() noexcept { std::fill(positions_.begin(), positions_.end(), Index(0)); }

  /// Bytes held by the tokens the layers hold now, summed over layers:
  /// 2 * held * n_kv_heads * head_dim * sizeof(Scalar) per layer. Constant once every layer
  /// has seen sinks + window tokens.
  Index bytes() const noexcept {
    Index total = 0;
    for (const Index p : positions_) total += held(p) * token_bytes();
    return total;
  }
  /// Bytes allocated for keys and values: constant for the cache's life.
  Index capacity_bytes() const noexcept { return n_layers() * capacity() * token_bytes(); }

  /// Layer `l` as attention reads it: `decode_attention(shape, q, cache.view(l), out, ws)`.
  /// O(1); valid until the cache is next modified. Throws std::out_of_range for a bad layer.
  view_type view(Index l) const {
    const std::size_t i = checked(l, "view");
    const Index p = positions_[i];
    const Index offset = static_cast<Index>(i) * layer_stride();
    view_type out;
    out.keys = keys_.data() + offset;
    out.values = values_.data() + offset;
    out.kv_heads = shape_.n_kv_heads();
    out.dim = shape_.head_dim();
    out.tokens = held(p);
    out.head_stride = capacity() * shape_.head_dim();
    const Index ring = std::clamp<Index>(p - sinks_, 0, window_);  // tokens in the ring
    const Index oldest = ring == window_ ? (p - sinks_) % window_ : 0;  // its oldest's slot
    const auto add = [&out](Index slot, Index tokens) {
      if (tokens > 0) out.runs[static_cast<std::size_t>(out.blocks++)] = {slot, tokens};
    };
    if (oldest == 0) {
      add(0, out.tokens);  // the sinks, if any, run straight on into the ring
    } else {
      add(0, sinks_);
      add(sinks_ + oldest, window_ - oldest);
      add(sinks_, oldest);
    }
    return out;
  }

  /// Prefill of a chunk of `n` tokens onto layer `l` of `cache`: appends `k` and `v`
  /// (`n x n_kv_heads*head_dim`) and writes to `out` (`n x n_heads*head_dim`) the attention
  /// of each query row of `q` (`n x n_heads*head_dim`) over exactly its own window: the
  /// tokens at positions p-window+1..p and the sinks, p being the row's position. A chunk
  /// longer than the window would evict keys its earlier queries need, so the rows are
  /// appended and attended one at a time once the layer is full: the rows that fit before the
  /// layer first holds sinks + window tokens are one causal prefill, and each later row is
  /// one decode step over sinks + window tokens. Cost: at most n decode steps, each reading
  /// at most sinks + window tokens. Everything is checked before anything is written, and the
  /// workspace sized, so it allocates nothing once `ws` is warm. Throws std::out_of_range for
  /// a bad layer, std::invalid_argument for shapes that do not fit or bad options; the cache
  /// is unchanged when it throws.
  template <class DerivedK, class DerivedV>
  friend void prefill_attention(const attention_shape& shape,
                                const Eigen::Ref<const row_matrix<compute_type>>& q,
                                const Eigen::MatrixBase<DerivedK>& k,
                                const Eigen::MatrixBase<DerivedV>& v,
                                sliding_window_cache& cache, Index l,
                                Eigen::Ref<row_matrix<compute_type>> out,
                                attention_workspace<compute_type>& ws,
                                const attention_options& opt = {}) {
    using T = compute_type;
    const std::size_t i = cache.checked(l, "prefill_attention");
    detail::check_view("prefill_attention", shape, cache.view(l));
    if (q.cols() != shape.q_width()) {
      detail::fail<std::invalid_argument>("prefill_attention: q has ", q.cols(),
                                          " columns, expected n_heads*head_dim = ",
                                          shape.q_width());
    }
    if (k.rows() != q.rows()) {
      detail::fail<std::invalid_argument>("prefill_attention: q has ", q.rows(),
                                          " rows (tokens) but k has ", k.rows());
    }
    cache.check_input("prefill_attention", k, v);
    if (out.rows() != q.rows() || out.cols() != shape.q_width()) {
      detail::fail<std::invalid_argument>("prefill_attention: out is ", out.rows(), " x ",
                                          out.cols(), ", expected ", q.rows(), " x ",
                                          shape.q_width());
    }
    if (opt.tile_tokens <= 0 || opt.split_tokens < 0) {
      detail::fail<std::invalid_argument>("prefill_attention: tile_tokens must be > 0 and "
                                          "split_tokens >= 0, got ", opt.tile_tokens, " and ",
                                          opt.split_tokens);
    }
    const Index n = q.rows(), pos0 = cache.positions_[i];
    // Rows before the layer is full: nothing is evicted yet, so a key's index in the view is
    // its position and one causal pass sees exactly each row's window.
    const Index fits = std::clamp<Index>(cache.capacity() - pos0, 0, n);
    const Index G = shape.group_size(), tile = opt.tile_tokens;
    if (fits > 0) {
      const Index q_tile = std::max<Index>(1, std::min(fits, tile / G));
      ws.prepare(opt.pool != nullptr ? opt.pool->size() : 1, q_tile * G, tile, shape.head_dim(),
                 !std::is_same_v<Scalar, T>, 0);
    }
    if (fits < n) detail::prepare_decode<Scalar>(ws, shape, cache.capacity(), opt);

    if (fits > 0) {
      cache.write(i, k.topRows(fits), v.topRows(fits));
      causal_attention(shape, q.topRows(fits), cache.view(l), pos0, out.topRows(fits), ws, opt);
    }
    for (Index r = fits; r < n; ++r) {
      cache.write(i, k.row(r), v.row(r));
      decode_attention(shape, q.row(r), cache.view(l), out.row(r), ws, opt);
    }
  }

 private:
  // Per layer: [kv_head][slot][head_dim].
  Index layer_stride() const noexcept {
    return shape_.n_kv_heads() * capacity() * shape_.head_dim();
  }
  Index token_bytes() const noexcept { return 2 * shape_.kv_width() * Index(sizeof(Scalar)); }
  Index held(Index position) const noexcept { return std::min(position, capacity()); }

  std::size_t checked(Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return static_cast<std::size_t>(l);
  }

  template <class DerivedK, class DerivedV>
  void check_input(const char* fn, const Eigen::MatrixBase<DerivedK>& k,
                   const Eigen::MatrixBase<DerivedV>& v) const {
    const Index width = shape_.kv_width();
    if (k.cols() != width) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", width);
    }
    if (v.cols() != width) {
      detail::fail<std::invalid_argument>(fn, ": v has ", v.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", width);
    }
    if (k.rows() != v.rows()) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.rows(), " rows (tokens) but v has ",
                                          v.rows());
    }
  }

  // Writes checked rows to layer i, as if one at a time; cannot throw.
  template <class DerivedK, class DerivedV>
  void write(std::size_t i, const Eigen::MatrixBase<DerivedK>& k,
             const Eigen::MatrixBase<DerivedV>& v) {
    Index& pos = positions_[i];
    const Index end = pos + k.rows();
    // Rows at positions below sinks go to the sink slot of their position.
    const Index sink_rows = std::max<Index>(0, std::min(end, sinks_) - pos);
    copy_rows(i, k, v, 0, pos, sink_rows);
    // Of the rest, only the last `window` survive this call; they fill at most two runs of
    // ring slots, the second one after wrapping around to the ring's first slot.
    const Index first = std::max({pos, sinks_, end - window_});
    const Index count = std::max<Index>(0, end - first);
    if (count > 0) {
      const Index slot = (first - sinks_) % window_;
      const Index before_wrap = std::min(count, window_ - slot);
      copy_rows(i, k, v, first - pos, sinks_ + slot, before_wrap);
      copy_rows(i, k, v, first - pos + before_wrap, sinks_, count - before_wrap);
    }
    pos = end;
  }

  // Copies `count` rows of k and v from `row` on into slots `slot`.. of layer i, every head.
  template <class DerivedK, class DerivedV>
  void copy_rows(std::size_t i, const Eigen::MatrixBase<DerivedK>& k,
                 const Eigen::MatrixBase<DerivedV>& v, Index row, Index slot, Index count) {
    if (count <= 0) return;
    const Index d = shape_.head_dim(), head_stride = capacity() * d;
    const Index base = static_cast<Index>(i) * layer_stride() + slot * d;
    for (Index h = 0; h < shape_.n_kv_heads(); ++h) {
      Eigen::Map<row_matrix<Scalar>> kdst(keys_.data() + base + h * head_stride, count, d);
      Eigen::Map<row_matrix<Scalar>> vdst(values_.data() + base + h * head_stride, count, d);
      kdst = k.block(row, h * d, count, d).template cast<Scalar>();
      vdst = v.block(row, h * d, count, d).template cast<Scalar>();
    }
  }

  cache_shape shape_;
  Index window_;
  Index sinks_;
  detail::buffer<Scalar> keys_;    // [layer][kv_head][slot][head_dim]
  detail::buffer<Scalar> values_;  // [layer][kv_head][slot][head_dim]
  std::vector<Index> positions_;   // [layer] tokens ever appended
};

}  // namespace kvcache
