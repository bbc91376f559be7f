// SPDX-License-Identifier: Apache-2.0
// Sliding-window KV cache with attention sinks: constant memory, a ring buffer per layer.
#pragma once

#include "kvcache/cache.hpp"
#include "kvcache/format/plain.hpp"
#include "kvcache/layout/ring.hpp"

namespace kvcache {

/// A whole model's sliding-window cache of plain `Scalar` storage: the first `sinks` tokens and
/// the last `window` tokens per layer (StreamingLLM), plus `max_rollback` more for exact
/// rollback: kv_cache over ring_layout and plain_format<Scalar>. Decode over view(l) after
/// appending the token at position p equals full attention over every token ever appended with
/// the window + sinks mask. Positions are not stored per token: apply RoPE at position(l).
template <class Scalar>
class sliding_window_cache : public kv_cache<ring_layout, plain_format<Scalar>> {
  using base = kv_cache<ring_layout, plain_format<Scalar>>;

 public:
  /// A copy that continues independently; see kv_cache::fork.
  sliding_window_cache fork() const { return *this; }
  /// Throws std::invalid_argument unless window >= 1, 0 <= sinks < window and
  /// max_rollback >= 0, std::length_error when the cache is more than memory can address.
  sliding_window_cache(const cache_shape& shape, Index window, Index sinks = 0,
                       Index max_rollback = 0)
      : base(shape, ring_layout{window, sinks, max_rollback}) {}

  /// Recent tokens each query sees.
  Index window() const noexcept { return this->layout().window; }
  /// First tokens kept per layer for good.
  Index sinks() const noexcept { return this->layout().sinks; }
  /// Tokens kept beyond the window for exact rollback.
  Index max_rollback() const noexcept { return this->layout().max_rollback; }
  /// The most tokens a layer holds: sinks + window + max_rollback.
  Index capacity() const noexcept { return sinks() + window() + max_rollback(); }
};

}  // namespace kvcache
