// SPDX-License-Identifier: Apache-2.0
// Contiguous KV cache: per layer, per kv head, every cached token's key and value in one run.
#pragma once

#include "kvcache/cache/block.hpp"
#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

namespace kvcache {

/// No limit on the number of tokens a cache may hold.
inline constexpr Index no_limit = std::numeric_limits<Index>::max();

/// One layer's keys and values, laid out `[kv_head][token][head_dim]` so that a kv head's
/// keys are one row-major `(size() x head_dim)` matrix. Owns its memory; hands out views.
///
/// Capacity grows geometrically (doubling), so `append` is amortized O(1) per token and never
/// copies the whole cache per token. With `max_tokens` set, appending past it throws
/// std::length_error. Every member that throws leaves the layer exactly as it was.
template <class Scalar>
class kv_layer {
 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using matrix_view = Eigen::Map<const row_matrix<Scalar>>;  // [token][head_dim]
  using block_view = single_block_view<Scalar>;

  /// An empty layer; nothing is allocated until the first append or reserve.
  /// Throws std::invalid_argument for non-positive sizes or a negative max_tokens.
  kv_layer(Index n_kv_heads, Index head_dim, Index max_tokens = no_limit)
      : n_kv_heads_(n_kv_heads), head_dim_(head_dim), max_tokens_(max_tokens) {
    if (n_kv_heads <= 0 || head_dim <= 0) {
      detail::fail<std::invalid_argument>("kv_layer: n_kv_heads and head_dim must be positive, got ",
                                          n_kv_heads, " and ", head_dim);
    }
    if (max_tokens < 0) {
      detail::fail<std::invalid_argument>("kv_layer: max_tokens must be >= 0, got ", max_tokens);
    }
  }

  /// Deep copy.
  kv_layer(const kv_layer& other)
      : n_kv_heads_(other.n_kv_heads_), head_dim_(other.head_dim_),
        max_tokens_(other.max_tokens_) {
    kv_layer copy = other.regrown(other.capacity_);
    swap(copy);
  }
  kv_layer& operator=(const kv_layer& other) {
    if (this != &other) {
      kv_layer copy(other);
      swap(copy);
    }
    return *this;
  }
  kv_layer(kv_layer&& other) noexcept { swap(other); }
  kv_layer& operator=(kv_layer&& other) noexcept {
    swap(other);
    return *this;
  }
  ~kv_layer() = default;

  void swap(kv_layer& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(head_dim_, other.head_dim_);
    std::swap(max_tokens_, other.max_tokens_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    keys_.swap(other.keys_);
    values_.swap(other.values_);
  }

  Index n_kv_heads() const noexcept { return n_kv_heads_; }
  Index head_dim() const noexcept { return head_dim_; }
  /// Width of one token's keys: n_kv_heads * head_dim.
  Index kv_width() const noexcept { return n_kv_heads_ * head_dim_; }
  /// Tokens cached.
  Index size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  /// Tokens that fit before the next reallocation.
  Index capacity() const noexcept { return capacity_; }
  /// The most tokens this layer may ever hold (no_limit when unbounded).
  Index max_tokens() const noexcept { return max_tokens_; }

  /// Bytes held by cached keys and values: 2 * size * n_kv_heads * head_dim * sizeof(Scalar).
  Index bytes() const noexcept { return 2 * size_ * kv_width() * Index(sizeof(Scalar)); }
  /// Bytes allocated for keys and values, used or not.
  Index capacity_bytes() const noexcept {
    return 2 * capacity_ * kv_width() * Index(sizeof(Scalar));
  }

  /// Makes room for `tokens` tokens without further allocation. Never shrinks.
  /// Throws std::length_error past max_tokens, std::bad_alloc when memory is short.
  void reserve(Index tokens) {
    if (tokens <= capacity_) return;
    kv_layer grown = reserved(tokens);
    swap(grown);
  }

  /// A copy of this layer with room for `tokens` tokens (or its current capacity, if larger).
  /// Throws as reserve() does.
  kv_layer reserved(Index tokens) const {
    check_fits("reserve", tokens);
    return regrown(std::max(tokens, capacity_));
  }

  /// Frees the capacity beyond size().
  void shrink_to_fit() {
    if (capacity_ == size_) return;
    kv_layer shrunk = regrown(size_);
    swap(shrunk);
  }

  /// Appends `k.rows()` tokens. `k` and `v` are `(tokens x n_kv_heads*head_dim)`, one row per
  /// token with the heads side by side (the layout a K or V projection produces), of any
  /// scalar type convertible to Scalar. Amortized O(1) per token; reallocates (doubling) only
  /// when capacity runs out. Throws std::invalid_argument for a wrong shape and
  /// std::length_error past max_tokens; either way nothing changes.
  template <class DerivedK, class DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    check_input("append", k, v);
    const Index needed = size_ + k.rows();
    check_fits("append", needed);
    if (needed > capacity_) {
      kv_layer grown = regrown(grown_capacity(needed));
      swap(grown);
    }
    write_rows(k, v);
  }

  /// `torch.cat` semantics: returns a new layer holding this layer's tokens followed by `k`,
  /// `v`, allocated to exactly that size; this layer is untouched. Copies every cached token:
  /// O(size) per call, which is what in-place append avoids. Throws as append does.
  template <class DerivedK, class DerivedV>
  kv_layer concatenated(const Eigen::MatrixBase<DerivedK>& k,
                        const Eigen::MatrixBase<DerivedV>& v) const {
    check_input("concat", k, v);
    check_fits("concat", size_ + k.rows());
    kv_layer out = regrown(size_ + k.rows());
    out.write_rows(k, v);
    return out;
  }

  /// Keeps the oldest `n` tokens and drops the rest (rollback of rejected speculative tokens).
  /// Capacity is kept. Throws std::out_of_range unless 0 <= n <= size().
  void crop(Index n) {
    if (n < 0 || n > size_) {
      detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ", size_, "]");
    }
    size_ = n;
  }

  /// Drops every token; capacity is kept.
  void clear() noexcept { size_ = 0; }

  /// Keys of kv head `h` as a `(size() x head_dim)` row-major map; no copy. Valid until the
  /// layer is next modified. Throws std::out_of_range for a head that does not exist.
  matrix_view keys(Index h) const { return {head_ptr(keys_, "keys", h), size_, head_dim_}; }
  /// Values of kv head `h`, as keys().
  matrix_view values(Index h) const { return {head_ptr(values_, "values", h), size_, head_dim_}; }

  /// The layer as attention reads it: one block per kv head.
  block_view view() const noexcept {
    return {keys_.data(), values_.data(), n_kv_heads_, head_dim_, size_, head_stride()};
  }

 private:
  Index head_stride() const noexcept { return capacity_ * head_dim_; }

  const Scalar* head_ptr(const detail::buffer<Scalar>& buf, const char* what, Index h) const {
    if (h < 0 || h >= n_kv_heads_) {
      detail::fail<std::out_of_range>(what, ": kv head ", h, " out of range [0, ", n_kv_heads_,
                                      ")");
    }
    return buf.data() == nullptr ? nullptr : buf.data() + h * head_stride();
  }

  template <class DerivedK, class DerivedV>
  void check_input(const char* fn, const Eigen::MatrixBase<DerivedK>& k,
                   const Eigen::MatrixBase<DerivedV>& v) const {
    if (k.cols() != kv_width()) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", kv_width());
    }
    if (v.cols() != kv_width()) {
      detail::fail<std::invalid_argument>(fn, ": v has ", v.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", kv_width());
    }
    if (k.rows() != v.rows()) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.rows(), " rows (tokens) but v has ",
                                          v.rows());
    }
  }

  void check_fits(const char* fn, Index tokens) const {
    if (tokens > max_tokens_) {
      detail::fail<std::length_error>(fn, ": ", tokens, " tokens exceed max_tokens = ",
                                      max_tokens_);
    }
    if (tokens > std::numeric_limits<Index>::max() / 2 / kv_width() / Index(sizeof(Scalar))) {
      detail::fail<std::length_error>(fn, ": ", tokens, " tokens are more than memory can address");
    }
  }

  // Doubling, from at least 16 tokens, clamped to max_tokens but never below `needed`.
  Index grown_capacity(Index needed) const noexcept {
    const Index doubled = capacity_ > max_tokens_ / 2 ? max_tokens_ : 2 * capacity_;
    return std::max(needed, std::min(max_tokens_, std::max(doubled, Index(16))));
  }

  // A new layer with the same contents and capacity `cap` (>= size_).
  kv_layer regrown(Index cap) const {
    kv_layer out(n_kv_heads_, head_dim_, max_tokens_);
    out.keys_ = detail::buffer<Scalar>(n_kv_heads_ * cap * head_dim_);
    out.values_ = detail::buffer<Scalar>(n_kv_heads_ * cap * head_dim_);
    out.capacity_ = cap;
    out.size_ = size_;
    const std::size_t run = static_cast<std::size_t>(size_ * head_dim_) * sizeof(Scalar);
    if (run > 0) {
      for (Index h = 0; h < n_kv_heads_; ++h) {
        std::memcpy(out.keys_.data() + h * out.head_stride(), keys_.data() + h * head_stride(), run);
        std::memcpy(out.values_.data() + h * out.head_stride(), values_.data() + h * head_stride(),
                    run);
      }
    }
    return out;
  }

  // Writes the rows of k and v after the cached tokens; capacity must suffice.
  template <class DerivedK, class DerivedV>
  void write_rows(const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    const Index n = k.rows();
    for (Index h = 0; h < n_kv_heads_; ++h) {
      Eigen::Map<row_matrix<Scalar>, 0, Eigen::OuterStride<>> kdst(
          keys_.data() + h * head_stride() + size_ * head_dim_, n, head_dim_,
          Eigen::OuterStride<>(head_dim_));
      Eigen::Map<row_matrix<Scalar>, 0, Eigen::OuterStride<>> vdst(
          values_.data() + h * head_stride() + size_ * head_dim_, n, head_dim_,
          Eigen::OuterStride<>(head_dim_));
      kdst = k.middleCols(h * head_dim_, head_dim_).template cast<Scalar>();
      vdst = v.middleCols(h * head_dim_, head_dim_).template cast<Scalar>();
    }
    size_ += n;
  }

  Index n_kv_heads_ = 0;
  Index head_dim_ = 0;
  Index max_tokens_ = no_limit;
  Index size_ = 0;
  Index capacity_ = 0;
  detail::buffer<Scalar> keys_;    // [kv_head][capacity][head_dim]
  detail::buffer<Scalar> values_;  // [kv_head][capacity][head_dim]
};

/// A whole model's contiguous KV cache: one kv_layer per layer, all of one cache_shape.
/// Layers are appended to one at a time, as a forward pass reaches them, so between layers
/// of one step their sizes differ; size() counts the tokens every layer holds.
template <class Scalar>
class contiguous_cache {
 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using layer_type = kv_layer<Scalar>;

  /// An empty cache. With `max_tokens` set, no layer may hold more (std::length_error).
  explicit contiguous_cache(const cache_shape& shape, Index max_tokens = no_limit)
      : shape_(shape) {
    layers_.reserve(static_cast<std::size_t>(shape.n_layers()));
    for (Index l = 0; l < shape.n_layers(); ++l) {
      layers_.emplace_back(shape.n_kv_heads(), shape.head_dim(), max_tokens);
    }
  }

  const cache_shape& shape() const noexcept { return shape_; }
  Index n_layers() const noexcept { return shape_.n_layers(); }

  /// Tokens cached in every layer (the smallest layer size).
  Index size() const noexcept {
    Index n = layers_.front().size();
    for (const auto& layer : layers_) n = std::min(n, layer.size());
    return n;
  }
  /// Tokens cached in layer `l`. Throws std::out_of_range for a layer that does not exist.
  Index size(Index l) const { return layer(l).size(); }

  /// Layer `l`. Throws std::out_of_range for a layer that does not exist.
  const layer_type& layer(Index l) const { return layers_[checked(l, "layer")]; }
  layer_type& layer(Index l) { return layers_[checked(l, "layer")]; }

  /// Appends tokens to layer `l`; see kv_layer::append. Throws std::out_of_range for a bad
  /// layer, and as kv_layer::append otherwise; nothing changes when it throws.
  template <class DerivedK, class DerivedV>
  void append(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    layers_[checked(l, "append")].append(k, v);
  }

  /// `torch.cat` semantics for layer `l`: the layer is replaced by a newly allocated one that
  /// holds its old tokens and the new ones (O(size) copy per call). Throws as append does.
  template <class DerivedK, class DerivedV>
  void concat(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    auto& layer = layers_[checked(l, "concat")];
    layer = layer.concatenated(k, v);
  }

  /// Reserves room for `tokens` tokens in every layer, all or nothing.
  void reserve(Index tokens) {
    if (std::all_of(layers_.begin(), layers_.end(),
                    [&](const layer_type& layer) { return layer.capacity() >= tokens; })) {
      return;
    }
    std::vector<layer_type> grown;
    grown.reserve(layers_.size());
    for (const auto& layer : layers_) grown.push_back(layer.reserved(tokens));
    layers_.swap(grown);
  }

  /// Keeps the oldest `n` tokens of every layer. Throws std::out_of_range, changing nothing,
  /// unless 0 <= n <= size(l) for every layer.
  void crop(Index n) {
    for (Index l = 0; l < n_layers(); ++l) {
      if (n < 0 || n > layers_[static_cast<std::size_t>(l)].size()) {
        detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ",
                                        layers_[static_cast<std::size_t>(l)].size(), "] of layer ",
                                        l);
      }
    }
    for (auto& layer : layers_) layer.crop(n);
  }

  /// Drops every token of every layer; capacity is kept.
  void clear() noexcept {
    for (auto& layer : layers_) layer.clear();
  }

  /// Bytes held by cached keys and values, summed over layers.
  Index bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.bytes();
    return total;
  }
  /// Bytes allocated for keys and values, summed over layers.
  Index capacity_bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.capacity_bytes();
    return total;
  }

 private:
  std::size_t checked(Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return static_cast<std::size_t>(l);
  }

  cache_shape shape_;
  std::vector<layer_type> layers_;
};

}  // namespace kvcache
