// SPDX-License-Identifier: Apache-2.0
// The cross-attention cache of an encoder-decoder model: per decoder layer, the keys and values
// of the encoder's output, filled once and read by every decoder step without a causal mask.
#pragma once

#include "kvcache/attention/batch.hpp"
#include "kvcache/attention/decode.hpp"
#include "kvcache/cache.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/layout/fixed.hpp"

#include <stdexcept>
#include <utility>
#include <vector>

namespace kvcache {

/// The cross-attention keys and values of an encoder-decoder transformer (Vaswani et al., 2017,
/// "Attention Is All You Need", section 3.2.3): every decoder layer attends over the encoder's
/// output projected by that layer's own W_k and W_v. The encoder's output does not change while
/// the decoder generates, so they are computed once per layer and encoder input and read at
/// every step; T5 and Whisper decoders keep them this way, beside the self-attention cache
/// (Hugging Face's EncoderDecoderCache holds the two side by side).
///
/// Per layer, room for `capacity` encoder tokens in `Format` (plain_format<Scalar>, or
/// quantized_format<Bits> with its groups and full-precision tail) is allocated when the cache
/// is built, and never moved: a kv_cache over fixed_layout underneath, so storage, formats and
/// bytes() are those of every other cache. fill(l, k, v) writes layer l's keys and values of
/// every encoder token at once. Nothing can be appended to a layer (there is no append), and a
/// filled layer cannot be filled again until clear() empties every layer for a new encoder
/// input. Every filled layer holds the same number of encoder tokens, size().
///
/// view(l) is read through a mask that is not causal: every decoder query sees every encoder
/// token (cross_attention below; decode_attention and batch_attention read it the same way).
///
/// Errors: std::out_of_range for a layer that does not exist, std::invalid_argument for shapes
/// that do not fit, std::length_error past the capacity, std::logic_error for a layer filled
/// twice or read before it is filled; every member that throws leaves the cache as it was.
///
/// Thread safety: const members may run concurrently; a non-const member needs the cache to
/// itself. A moved-from cache has no layers (n_layers() == 0) and holds no tokens.
template <class Format>
class cross_attention_cache {
 public:
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using storage_type = kv_cache<fixed_layout, Format>;
  using view_type = cache_view<Format>;

  /// An empty cache with room for `capacity` encoder tokens in each of shape.n_layers() layers,
  /// allocated now. Throws std::invalid_argument for capacity < 1 or a format that does not fit
  /// the shape, std::length_error when the sizes overflow, std::bad_alloc when memory is short.
  cross_attention_cache(const cache_shape& shape, Index capacity, Format format = Format())
      : cache_(shape, fixed_layout{checked_capacity(capacity)}, format) {}

  cross_attention_cache(const cross_attention_cache&) = default;
  cross_attention_cache& operator=(const cross_attention_cache&) = default;
  cross_attention_cache(cross_attention_cache&& other) noexcept
      : cache_(std::move(other.cache_)), tokens_(std::exchange(other.tokens_, 0)) {}
  cross_attention_cache& operator=(cross_attention_cache&& other) noexcept {
    cache_ = std::move(other.cache_);
    tokens_ = std::exchange(other.tokens_, 0);
    return *this;
  }
  ~cross_attention_cache() = default;

  const cache_shape& shape() const noexcept { return cache_.shape(); }
  const Format& format() const noexcept { return cache_.format(); }
  /// Layers; 0 for a moved-from cache.
  Index n_layers() const noexcept { return cache_.n_layers(); }
  /// Encoder tokens each layer has room for.
  Index capacity() const noexcept { return cache_.layout().capacity; }
  /// Encoder tokens every filled layer holds; 0 while no layer is filled.
  Index size() const noexcept { return tokens_; }
  /// Encoder tokens layer `l` holds: size() once filled, else 0. Throws std::out_of_range for a
  /// bad layer.
  Index size(Index l) const { return cache_.size(l); }
  /// Whether layer `l` is filled. Throws std::out_of_range for a bad layer.
  bool filled(Index l) const { return cache_.size(l) > 0; }
  /// Whether every layer is filled (false without layers).
  bool filled() const noexcept { return n_layers() > 0 && cache_.size() > 0; }

  /// Writes the keys and values of all the encoder's tokens into layer `l`: `k` and `v` are
  /// `(tokens x n_kv_heads*head_dim)`, one row per encoder token with the kv heads side by side
  /// (the encoder's output times the layer's W_k^T and W_v^T): float for a quantized format,
  /// any scalar type convertible to the compute type for a plain one. An expression without
  /// storage of its own (such as that product) is evaluated once, after the checks.
  /// Cost: one write of every row, O(tokens x n_kv_heads x head_dim), plus the evaluation of an
  /// expression.
  /// Throws std::out_of_range for a bad layer; std::invalid_argument for a wrong shape, no
  /// tokens, or a number of tokens other than the filled layers hold; std::length_error past
  /// capacity(); std::logic_error when the layer is filled already (clear() first);
  /// std::bad_alloc when an expression cannot be evaluated for want of memory. Nothing changes
  /// when it throws.
  template <class DerivedK, class DerivedV>
  void fill(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>("fill: layer ", l, " out of range [0, ", n_layers(), ")");
    }
    detail::check_kv_input("fill", shape(), k, v, /*keys_alone=*/false);
    const Index n = k.rows();
    if (n == 0) {
      detail::fail<std::invalid_argument>("fill: k and v hold no encoder token");
    }
    if (n > capacity()) {
      detail::fail<std::length_error>("fill: ", n, " encoder tokens exceed capacity = ",
                                      capacity());
    }
    if (filled(l)) {
      detail::fail<std::logic_error>("fill: layer ", l, " is filled already with ", size(l),
                                     " encoder tokens; clear() before filling it for a new "
                                     "encoder input");
    }
    if (tokens_ > 0 && n != tokens_) {
      detail::fail<std::invalid_argument>(
          "fill: ", n, " encoder tokens for layer ", l, " but the filled layers hold ", tokens_,
          "; every layer attends over the same encoder output");
    }
    // The format reads its input a row or a head at a time: an expression such as a product
    // would be evaluated again for each.
    constexpr bool k_stored = (int(DerivedK::Flags) & Eigen::DirectAccessBit) != 0;
    constexpr bool v_stored = (int(DerivedV::Flags) & Eigen::DirectAccessBit) != 0;
    if constexpr (k_stored && v_stored) {
      cache_.append(l, k, v);
    } else {
      cache_.append(l, k.eval(), v.eval());
    }
    tokens_ = n;
  }

  /// Empties every layer for a new encoder input; memory stays allocated.
  void clear() noexcept {
    cache_.clear();
    tokens_ = 0;
  }

  /// Bytes held by the filled layers' keys and values: the format's stored units (codes and
  /// scales included) plus any full-precision tail, as kv_cache::bytes() counts them. For plain
  /// storage, filled layers x size() x 2 x n_kv_heads x head_dim x sizeof(Scalar).
  Index bytes() const noexcept { return cache_.bytes(); }
  /// Bytes allocated for keys and values, used or not.
  Index capacity_bytes() const noexcept { return cache_.capacity_bytes(); }

  /// Layer `l` as attention reads it, every token at once: encoder tokens at positions
  /// 0..size(l)-1 under a mask that is not causal. Empty while the layer is not filled. O(1);
  /// valid until the cache is next modified. Throws std::out_of_range for a bad layer.
  view_type view(Index l) const {
    view_type w = cache_.view(l);
    w.mask_.causal = false;
    return w;
  }

  /// Every key layer `l` holds, as attention reads it (quantized ones dequantized):
  /// `size(l) x n_kv_heads*head_dim`. For tests and error analysis; allocates.
  row_matrix<compute_type> keys(Index l) const { return cache_.keys(l); }
  /// Every value layer `l` holds, as keys(l).
  row_matrix<compute_type> values(Index l) const { return cache_.values(l); }

  /// The kv_cache underneath, read-only: its view(l) is causal, so read layers through view(l)
  /// of this class.
  const storage_type& cache() const noexcept { return cache_; }

 private:
  static Index checked_capacity(Index capacity) {
    if (capacity < 1) {
      detail::fail<std::invalid_argument>(
          "cross_attention_cache: capacity (encoder tokens per layer) must be >= 1, got ",
          capacity);
    }
    return capacity;
  }

  storage_type cache_;
  Index tokens_ = 0;
};

namespace detail {
// One view as a batch of one sequence, for batch_attention.
template <class View>
struct single_view_batch {
  using scalar_type = typename View::scalar_type;
  View view;
  Index size() const noexcept { return 1; }
  View sequence(Index /*b*/) const noexcept { return view; }
};
}  // namespace detail

/// Cross-attention of `q.rows()` decoder tokens (`n x n_heads*head_dim`, heads side by side:
/// one row at a decode step, more for a decoder prompt) over every encoder token of layer `l`
/// of `cache`, written to `out` (same shape). No mask: each query row sees every encoder token,
/// whatever its own position. One row runs decode_attention (kv heads and runs of encoder
/// tokens split over opt.pool's threads, partial softmax states merged); more rows run
/// batch_attention's tiles of queries over runs of encoder tokens, merged the same way. Either
/// way each cached key and value row is read once per group of query heads sharing a kv head
/// (and per tile of queries), converted in registers from the stored format.
///
/// Cost: reads layer l's keys and values once (bytes() / filled layers). Allocates nothing once
/// `ws` has run a call of the same or a larger size.
/// Throws std::out_of_range for a bad layer; std::logic_error when layer `l` is not filled or
/// `ws` is in use by another call; std::invalid_argument when q, out or `shape` do not fit the
/// cache or the options are bad (non-finite scale, tile_tokens <= 0, split_tokens < 0).
template <class Format>
void cross_attention(const attention_shape& shape,
                     const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& q,
                     const cross_attention_cache<Format>& cache, Index l,
                     Eigen::Ref<row_matrix<compute_t<typename Format::scalar_type>>> out,
                     attention_workspace<compute_t<typename Format::scalar_type>>& ws,
                     const attention_options& opt = {}) {
  using T = compute_t<typename Format::scalar_type>;
  if (l < 0 || l >= cache.n_layers()) {
    detail::fail<std::out_of_range>("cross_attention: layer ", l, " out of range [0, ",
                                    cache.n_layers(), ")");
  }
  const auto view = cache.view(l);
  detail::check_view("cross_attention", shape, view);
  if (q.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("cross_attention: q has ", q.cols(),
                                        " columns, expected n_heads*head_dim = ", shape.q_width());
  }
  if (out.rows() != q.rows() || out.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("cross_attention: out is ", out.rows(), " x ",
                                        out.cols(), ", expected ", q.rows(), " x ",
                                        shape.q_width());
  }
  detail::check_options("cross_attention", opt);
  if (view.size() == 0) {
    detail::fail<std::logic_error>("cross_attention: layer ", l, " is not filled; fill(", l,
                                   ", k, v) with the encoder's keys and values first");
  }
  const Index n = q.rows();
  if (n == 0) return;
  if (n == 1) {
    decode_attention(shape, q.row(0), view, out.row(0), ws, opt);
    return;
  }
  const typename attention_workspace<T>::guard busy(ws, "cross_attention");
  auto& qo_indptr = ws.indptr();
  qo_indptr.assign({Index(0), n});
  detail::batch_attention_unguarded("cross_attention", shape, q, qo_indptr,
                                    detail::single_view_batch<decltype(view)>{view}, out, ws, opt);
}

}  // namespace kvcache
