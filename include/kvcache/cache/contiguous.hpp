// SPDX-License-Identifier: Apache-2.0
// Contiguous KV cache: per layer, per kv head, every cached token's key and value in one run.
#pragma once

#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/prefill.hpp"
#include "kvcache/cache.hpp"
#include "kvcache/format/plain.hpp"
#include "kvcache/layout/contiguous.hpp"

namespace kvcache {

/// A whole model's contiguous cache of plain `Scalar` storage: kv_cache over
/// contiguous_layout and plain_format<Scalar>. With `max_tokens` set, no layer may hold more
/// (std::length_error).
template <class Scalar>
class contiguous_cache : public kv_cache<contiguous_layout, plain_format<Scalar>> {
  using base = kv_cache<contiguous_layout, plain_format<Scalar>>;

 public:
  /// A copy that continues independently; see kv_cache::fork.
  contiguous_cache fork() const { return *this; }
  explicit contiguous_cache(const cache_shape& shape, Index max_tokens = no_limit)
      : base(shape, contiguous_layout{max_tokens}) {}
  /// The most tokens a layer may hold.
  Index max_tokens() const noexcept { return this->layout().max_tokens; }
};

/// One layer's keys and values on their own, laid out `[kv_head][token][head_dim]` so that a kv
/// head's keys are one row-major `(size() x head_dim)` matrix: a one-layer contiguous cache.
/// Capacity grows by doubling, so `append` is amortized O(1) per token; with `max_tokens` set,
/// appending past it throws std::length_error. Every member that throws leaves the layer as it
/// was. A moved-from layer is empty and holds no memory; appending to it throws
/// std::out_of_range.
template <class Scalar>
class kv_layer {
  using cache_type = contiguous_cache<Scalar>;

 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using matrix_view = Eigen::Map<const row_matrix<Scalar>, 0, Eigen::OuterStride<>>;  // [token][head_dim]
  using block_view = typename cache_type::view_type;

  /// An empty layer; nothing is allocated until the first append or reserve.
  /// Throws std::invalid_argument for non-positive sizes or a negative max_tokens.
  kv_layer(Index n_kv_heads, Index head_dim, Index max_tokens = no_limit)
      : c_(make(n_kv_heads, head_dim, max_tokens)) {}

  Index n_kv_heads() const noexcept { return c_.shape().n_kv_heads(); }
  Index head_dim() const noexcept { return c_.shape().head_dim(); }
  /// Width of one token's keys: n_kv_heads * head_dim.
  Index kv_width() const noexcept { return c_.shape().kv_width(); }
  /// Tokens cached.
  Index size() const noexcept { return c_.size(); }
  bool empty() const noexcept { return size() == 0; }
  /// Tokens that fit before the next reallocation.
  Index capacity() const noexcept { return c_.n_layers() > 0 ? c_.capacity(0) : 0; }
  /// The most tokens this layer may ever hold (no_limit when unbounded).
  Index max_tokens() const noexcept { return c_.max_tokens(); }
  /// Bytes held by cached keys and values: 2 * size * n_kv_heads * head_dim * sizeof(Scalar).
  Index bytes() const noexcept { return c_.bytes(); }
  /// Bytes allocated for keys and values, used or not.
  Index capacity_bytes() const noexcept { return c_.capacity_bytes(); }

  /// Makes room for `tokens` tokens without further allocation. Never shrinks. Throws
  /// std::length_error past max_tokens, std::bad_alloc when memory is short.
  void reserve(Index tokens) { c_.reserve(tokens); }
  /// A copy of this layer with room for `tokens` tokens. Throws as reserve() does.
  kv_layer reserved(Index tokens) const {
    kv_layer out(n_kv_heads(), head_dim(), max_tokens());
    static_cast<typename cache_type::kv_cache&>(out.c_) = c_.reserved(tokens);
    return out;
  }
  /// Frees the capacity beyond size().
  void shrink_to_fit() { c_.shrink_to_fit(); }

  /// Appends `k.rows()` tokens (`tokens x n_kv_heads*head_dim`, heads side by side), of any
  /// scalar type convertible to Scalar. Throws std::invalid_argument for a wrong shape and
  /// std::length_error past max_tokens; either way nothing changes.
  template <class DerivedK, class DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    c_.append(0, k, v);
  }
  /// `torch.cat` semantics: a new layer holding this layer's tokens followed by `k`, `v`,
  /// allocated to exactly that size; this layer is untouched. O(size) per call.
  template <class DerivedK, class DerivedV>
  kv_layer concatenated(const Eigen::MatrixBase<DerivedK>& k,
                        const Eigen::MatrixBase<DerivedV>& v) const {
    kv_layer out(n_kv_heads(), head_dim(), max_tokens());
    out.c_.assign_concatenated(0, c_, k, v);
    return out;
  }
  /// Keeps the oldest `n` tokens (rollback). Throws std::out_of_range unless 0 <= n <= size().
  void crop(Index n) { c_.crop(n); }
  /// Drops every token; capacity is kept.
  void clear() noexcept { c_.clear(); }

  /// Keys of kv head `h` as a `(size() x head_dim)` row-major map; no copy. Valid until the
  /// layer is next modified. Throws std::out_of_range for a head that does not exist.
  matrix_view keys(Index h) const { return head(h, "keys", true); }
  /// Values of kv head `h`, as keys().
  matrix_view values(Index h) const { return head(h, "values", false); }

  /// The layer as attention reads it: one block per kv head.
  block_view view() const { return c_.n_layers() > 0 ? c_.view(0) : block_view{}; }

  /// The one-layer cache underneath.
  const cache_type& cache() const noexcept { return c_; }
  cache_type& cache() noexcept { return c_; }

 private:
  static cache_type make(Index n_kv_heads, Index head_dim, Index max_tokens) {
    if (n_kv_heads <= 0 || head_dim <= 0) {
      detail::fail<std::invalid_argument>("kv_layer: n_kv_heads and head_dim must be positive, got ",
                                          n_kv_heads, " and ", head_dim);
    }
    if (max_tokens < 0) {
      detail::fail<std::invalid_argument>("kv_layer: max_tokens must be >= 0, got ", max_tokens);
    }
    return cache_type(cache_shape(1, n_kv_heads, n_kv_heads, head_dim), max_tokens);
  }

  matrix_view head(Index h, const char* what, bool keys) const {
    if (h < 0 || h >= n_kv_heads()) {
      detail::fail<std::out_of_range>(what, ": kv head ", h, " out of range [0, ", n_kv_heads(),
                                      ")");
    }
    const block_view w = view();
    if (w.storage == nullptr || w.storage->slots == 0) {
      return {nullptr, 0, head_dim(), Eigen::OuterStride<>(head_dim())};
    }
    const auto b = w.block(h, 0).stored;
    return {keys ? b.keys : b.values, size(), head_dim(), Eigen::OuterStride<>(b.stride)};
  }

  cache_type c_;
};

/// decode_attention over a kv_layer.
template <class Scalar>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<compute_t<Scalar>>>& q,
                      const kv_layer<Scalar>& layer, Eigen::Ref<row_vector<compute_t<Scalar>>> out,
                      attention_workspace<compute_t<Scalar>>& ws, const attention_options& opt = {}) {
  decode_attention(shape, q, layer.view(), out, ws, opt);
}

/// decode_attention over a kv_layer with a workspace of its own: allocates on every call.
template <class Scalar>
void decode_attention(const attention_shape& shape,
                      const Eigen::Ref<const row_vector<compute_t<Scalar>>>& q,
                      const kv_layer<Scalar>& layer, Eigen::Ref<row_vector<compute_t<Scalar>>> out,
                      const attention_options& opt = {}) {
  attention_workspace<compute_t<Scalar>> ws;
  decode_attention(shape, q, layer.view(), out, ws, opt);
}

/// prefill_attention onto a kv_layer (see cache.hpp's prefill_attention).
template <class Scalar, class DerivedK, class DerivedV>
void prefill_attention(const attention_shape& shape,
                       const Eigen::Ref<const row_matrix<compute_t<Scalar>>>& q,
                       const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                       kv_layer<Scalar>& layer, Eigen::Ref<row_matrix<compute_t<Scalar>>> out,
                       attention_workspace<compute_t<Scalar>>& ws,
                       const attention_options& opt = {}) {
  layer.cache().prefill(shape, q, k, v, 0, out, ws, opt);
}

}  // namespace kvcache
