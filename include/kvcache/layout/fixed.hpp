// SPDX-License-Identifier: Apache-2.0
// The fixed layout: room for a set number of tokens per layer, allocated once.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/layout/plan.hpp"

#include <stdexcept>

namespace kvcache {

/// Per layer, room for `capacity` tokens allocated when the cache is built and never moved
/// (pointers into it stay valid for the cache's life). Appending past it throws
/// std::length_error and leaves the cache as it was. Attention reads it as one block.
struct fixed_layout {
  Index capacity = 0;

  static constexpr bool grows = false;
  static constexpr const char* name = "fixed";

  /// Throws std::invalid_argument for capacity < 1.
  layout_plan plan(Index unit_tokens) const {
    if (capacity < 1) {
      detail::fail<std::invalid_argument>("fixed_cache: capacity must be >= 1, got ", capacity);
    }
    layout_plan p;
    p.ring_units = capacity / unit_tokens;  // the rest waits in the format's tail
    p.max_tokens = capacity;
    return p;
  }

  friend bool operator==(const fixed_layout& a, const fixed_layout& b) noexcept {
    return a.capacity == b.capacity;
  }
};

}  // namespace kvcache
