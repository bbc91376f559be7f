// SPDX-License-Identifier: Apache-2.0
// Validated value types for the shape of a model's attention and of its KV cache.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <stdexcept>

namespace kvcache {

/// The heads of one attention layer: `n_heads` query heads share `n_kv_heads` key/value heads
/// in groups of `group_size() = n_heads / n_kv_heads`. MHA has n_kv_heads == n_heads, MQA has
/// n_kv_heads == 1, grouped-query attention (GQA) anything in between.
///
/// Values are stored apart from keys, head_dim wide, unless the shape says otherwise with
/// with_values_in_keys(value_dim): then each kv head stores one row of head_dim per token,
/// read whole as the key and its first value_dim columns as the value, and each query head's
/// output is value_dim wide. That is multi-head latent attention decoded with absorbed weights
/// (DeepSeek-V2, arXiv 2405.04434; FlashMLA): one kv head whose row is [c_kv | k_pe] and whose
/// value is c_kv (see mla.hpp).
class attention_shape {
 public:
  /// Throws std::invalid_argument unless every size is positive and n_heads is a multiple of
  /// n_kv_heads; std::length_error, naming the values, when n_heads * head_dim (and so
  /// n_kv_heads * head_dim) does not fit Index, so q_width() and kv_width() never overflow.
  attention_shape(Index n_heads, Index n_kv_heads, Index head_dim)
      : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim) {
    check_positive("n_heads", n_heads);
    check_positive("n_kv_heads", n_kv_heads);
    check_positive("head_dim", head_dim);
    if (n_heads % n_kv_heads != 0) {
      detail::fail<std::invalid_argument>("attention_shape: n_heads = ", n_heads,
                                          " is not a multiple of n_kv_heads = ", n_kv_heads);
    }
    // n_kv_heads <= n_heads, so the query width is the larger of the two.
    if (detail::product_overflows({n_heads, head_dim})) {
      detail::fail<std::length_error>("attention_shape: n_heads * head_dim = ", n_heads, " x ",
                                      head_dim, " overflows a 64-bit size");
    }
  }

  Index n_heads() const noexcept { return n_heads_; }
  Index n_kv_heads() const noexcept { return n_kv_heads_; }
  Index head_dim() const noexcept { return head_dim_; }
  /// Query heads per kv head.
  Index group_size() const noexcept { return n_heads_ / n_kv_heads_; }
  /// Width of a token's queries: n_heads * head_dim.
  Index q_width() const noexcept { return n_heads_ * head_dim_; }
  /// Width of a token's keys (and of its values, when they are stored apart):
  /// n_kv_heads * head_dim.
  Index kv_width() const noexcept { return n_kv_heads_ * head_dim_; }
  /// Width of one kv head's value and of one query head's output: head_dim, or the value_dim
  /// given to with_values_in_keys.
  Index value_dim() const noexcept { return value_dim_ > 0 ? value_dim_ : head_dim_; }
  /// Whether values are the first value_dim() columns of the keys, stored once with them.
  bool values_in_keys() const noexcept { return value_dim_ > 0; }
  /// Width of a token's attention output: n_heads * value_dim().
  Index out_width() const noexcept { return n_heads_ * value_dim(); }

  /// This shape with values read from the keys: each kv head's value is the first `value_dim`
  /// columns of its key row, which is all a cache of this shape stores (MLA's latent, one kv
  /// head of kv_lora_rank + rope_dim with value_dim = kv_lora_rank). Throws
  /// std::invalid_argument unless 1 <= value_dim <= head_dim.
  attention_shape with_values_in_keys(Index value_dim) const {
    if (value_dim < 1 || value_dim > head_dim_) {
      detail::fail<std::invalid_argument>("attention_shape: value_dim = ", value_dim,
                                          " must be in [1, head_dim = ", head_dim_, "]");
    }
    attention_shape out(*this);
    out.value_dim_ = value_dim;
    return out;
  }

  friend bool operator==(const attention_shape& a, const attention_shape& b) noexcept {
    return a.n_heads_ == b.n_heads_ && a.n_kv_heads_ == b.n_kv_heads_ &&
           a.head_dim_ == b.head_dim_ && a.value_dim_ == b.value_dim_;
  }
  friend bool operator!=(const attention_shape& a, const attention_shape& b) noexcept {
    return !(a == b);
  }

 protected:
  static void check_positive(const char* what, Index value) {
    if (value <= 0) {
      detail::fail<std::invalid_argument>("attention_shape: ", what, " must be positive, got ",
                                          value);
    }
  }

 private:
  Index n_heads_;
  Index n_kv_heads_;
  Index head_dim_;
  Index value_dim_ = 0;  // 0: values stored apart, head_dim wide
};

/// The attention of a whole model: `n_layers` layers of one attention_shape each.
class cache_shape : public attention_shape {
 public:
  /// Throws as attention_shape does, std::invalid_argument for n_layers <= 0, and
  /// std::length_error, naming the values, when the bytes of one token of the whole model at
  /// the widest storage scalar, 2 (K and V) * n_layers * n_kv_heads * head_dim * 8 (double),
  /// do not fit Index: then no per-token size any cache computes from this shape can overflow.
  cache_shape(Index n_layers, Index n_heads, Index n_kv_heads, Index head_dim)
      : attention_shape(n_heads, n_kv_heads, head_dim), n_layers_(n_layers) {
    check_layers();
  }
  cache_shape(Index n_layers, const attention_shape& heads)
      : attention_shape(heads), n_layers_(n_layers) {
    check_layers();
  }

  Index n_layers() const noexcept { return n_layers_; }
  /// This shape with values read from the keys; see attention_shape::with_values_in_keys.
  cache_shape with_values_in_keys(Index value_dim) const {
    return cache_shape(n_layers_, heads().with_values_in_keys(value_dim));
  }
  /// The per-layer part of the shape.
  const attention_shape& heads() const noexcept { return *this; }

  friend bool operator==(const cache_shape& a, const cache_shape& b) noexcept {
    return a.n_layers_ == b.n_layers_ && a.heads() == b.heads();
  }
  friend bool operator!=(const cache_shape& a, const cache_shape& b) noexcept {
    return !(a == b);
  }

 private:
  void check_layers() const {
    check_positive("n_layers", n_layers_);
    if (detail::product_overflows({2, n_layers_, n_kv_heads(), head_dim(), 8})) {
      detail::fail<std::length_error>(
          "cache_shape: one token of the model takes 2 x n_layers x n_kv_heads x head_dim x 8 "
          "bytes = 2 x ", n_layers_, " x ", n_kv_heads(), " x ", head_dim(),
          " x 8, which overflows a 64-bit size");
    }
  }

  Index n_layers_;
};

}  // namespace kvcache
