// SPDX-License-Identifier: Apache-2.0
// Fixed-capacity KV cache: room for a set number of tokens per layer, allocated once.
#pragma once

#include "kvcache/cache.hpp"
#include "kvcache/format/plain.hpp"
#include "kvcache/layout/fixed.hpp"

namespace kvcache {

/// A whole model's cache of plain `Scalar` storage with room for `capacity` tokens per layer,
/// allocated when built and never moved: kv_cache over fixed_layout and plain_format<Scalar>.
/// Appending past the capacity throws std::length_error and changes nothing.
template <class Scalar>
class fixed_cache : public kv_cache<fixed_layout, plain_format<Scalar>> {
  using base = kv_cache<fixed_layout, plain_format<Scalar>>;

 public:
  /// A copy that continues independently; see kv_cache::fork.
  fixed_cache fork() const { return *this; }
  /// Throws std::invalid_argument for capacity < 1, std::length_error when it overflows,
  /// std::bad_alloc when memory is short.
  fixed_cache(const cache_shape& shape, Index capacity) : base(shape, fixed_layout{capacity}) {}
  /// Tokens each layer can hold.
  Index capacity() const noexcept { return this->layout().capacity; }
  using base::capacity;
};

}  // namespace kvcache
