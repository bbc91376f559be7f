// SPDX-License-Identifier: Apache-2.0
// Fixed-capacity KV cache: every layer allocated once, up front, and never reallocated.
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/attention/prefill.hpp"
#include "kvcache/cache/contiguous.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace kvcache {

/// A whole model's KV cache whose capacity is fixed at construction: one kv_layer per layer,
/// each allocated for exactly `capacity` tokens before the first append. Nothing is ever
/// reallocated, so the data pointers of every layer stay the same for the cache's whole life
/// and no append allocates: the cache for a serving slot whose maximum length is known.
///
/// Layers are read through `layer(l)` (const: growth, shrinking or replacement of a layer
/// would break the fixed allocation) and written only through the cache's own `append` and
/// `prefill_attention`. Every member that throws leaves the cache exactly as it was.
template <class Scalar>
class fixed_cache {
 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using layer_type = kv_layer<Scalar>;

  /// An empty cache with room for `capacity` tokens in every layer, allocated now:
  /// capacity_bytes() = 2 * n_layers * capacity * n_kv_heads * head_dim * sizeof(Scalar).
  /// Throws std::invalid_argument for capacity < 1, std::length_error when the capacity is
  /// more than memory can address, std::bad_alloc when memory is short.
  fixed_cache(const cache_shape& shape, Index capacity) : shape_(shape), capacity_(capacity) {
    if (capacity < 1) {
      detail::fail<std::invalid_argument>("fixed_cache: capacity must be >= 1, got ", capacity);
    }
    layers_.reserve(static_cast<std::size_t>(shape.n_layers()));
    for (Index l = 0; l < shape.n_layers(); ++l) {
      layers_.emplace_back(shape.n_kv_heads(), shape.head_dim(), capacity);
      layers_.back().reserve(capacity);
    }
  }

  const cache_shape& shape() const noexcept { return shape_; }
  Index n_layers() const noexcept { return shape_.n_layers(); }
  /// The most tokens any layer may hold, fixed at construction.
  Index capacity() const noexcept { return capacity_; }

  /// Tokens cached in every layer (the smallest layer size).
  Index size() const noexcept {
    Index n = capacity_;
    for (const auto& layer : layers_) n = std::min(n, layer.size());
    return n;
  }
  /// Tokens cached in layer `l`. Throws std::out_of_range for a layer that does not exist.
  Index size(Index l) const { return layer(l).size(); }

  /// Layer `l`, read-only: `layer(l).keys(h)`, `layer(l).view()`, and
  /// `decode_attention(shape, q, cache.layer(l), out, ws)` read it without copies.
  /// Throws std::out_of_range for a layer that does not exist.
  const layer_type& layer(Index l) const { return layers_[checked(l, "layer")]; }

  /// Appends `k.rows()` tokens to layer `l`; `k` and `v` as in kv_layer::append. O(1) per
  /// token, never allocates. Throws std::out_of_range for a bad layer, std::invalid_argument
  /// for a wrong shape, std::length_error when the layer would hold more than capacity();
  /// nothing changes when it throws.
  template <class DerivedK, class DerivedV>
  void append(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    const std::size_t i = checked(l, "append");
    check_room("append", l, k, v);
    layers_[i].append(k, v);
  }

  /// Keeps the oldest `n` tokens of every layer; the memory stays allocated. Throws
  /// std::out_of_range, changing nothing, unless 0 <= n <= size(l) for every layer.
  void crop(Index n) {
    for (Index l = 0; l < n_layers(); ++l) {
      const Index held = layers_[static_cast<std::size_t>(l)].size();
      if (n < 0 || n > held) {
        detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ", held,
                                        "] of layer ", l);
      }
    }
    for (auto& layer : layers_) layer.crop(n);
  }

  /// Drops every token of every layer; the memory stays allocated.
  void clear() noexcept {
    for (auto& layer : layers_) layer.clear();
  }

  /// Bytes held by cached keys and values, summed over layers.
  Index bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.bytes();
    return total;
  }
  /// Bytes allocated for keys and values, summed over layers: constant for the cache's life.
  Index capacity_bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.capacity_bytes();
    return total;
  }

  /// Prefill of a chunk of `n` tokens onto layer `l` of `cache`: appends `k` and `v`
  /// (`n x n_kv_heads*head_dim`), then writes to `out` (`n x n_heads*head_dim`) the causal
  /// attention of `q` over everything the layer holds, exactly as prefill_attention onto a
  /// kv_layer does. Reads the layer's tokens once per tile of queries; never allocates cache
  /// memory. Throws std::out_of_range for a bad layer, std::invalid_argument for shapes that
  /// do not fit, std::length_error past capacity(); the cache is unchanged when it throws.
  template <class DerivedK, class DerivedV>
  friend void prefill_attention(const attention_shape& shape,
                                const Eigen::Ref<const row_matrix<compute_type>>& q,
                                const Eigen::MatrixBase<DerivedK>& k,
                                const Eigen::MatrixBase<DerivedV>& v, fixed_cache& cache, Index l,
                                Eigen::Ref<row_matrix<compute_type>> out,
                                attention_workspace<compute_type>& ws,
                                const attention_options& opt = {}) {
    const std::size_t i = cache.checked(l, "prefill_attention");
    cache.check_room("prefill_attention", l, k, v);
    kvcache::prefill_attention(shape, q, k, v, cache.layers_[i], out, ws, opt);
  }

 private:
  std::size_t checked(Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return static_cast<std::size_t>(l);
  }

  // Throws std::length_error when well-formed k and v would overfill layer l. Malformed ones
  // are left to kv_layer, whose std::invalid_argument says what is wrong with them.
  template <class DerivedK, class DerivedV>
  void check_room(const char* fn, Index l, const Eigen::MatrixBase<DerivedK>& k,
                  const Eigen::MatrixBase<DerivedV>& v) const {
    const bool well_formed = k.cols() == shape_.kv_width() && v.cols() == shape_.kv_width() &&
                             k.rows() == v.rows();
    const Index held = layers_[static_cast<std::size_t>(l)].size();
    if (well_formed && k.rows() > capacity_ - held) {
      detail::fail<std::length_error>(fn, ": layer ", l, " holds ", held, " tokens, ", k.rows(),
                                      " more exceed capacity = ", capacity_);
    }
  }

  cache_shape shape_;
  Index capacity_;
  std::vector<layer_type> layers_;  // each with max_tokens == capacity(), reserved in full
};

}  // namespace kvcache
