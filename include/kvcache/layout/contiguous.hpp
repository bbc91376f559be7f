// SPDX-License-Identifier: Apache-2.0
// The contiguous layout: every token of a layer in one growing run per kv head.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/layout/plan.hpp"

#include <stdexcept>

namespace kvcache {

/// Per layer and kv head, every cached token in one run that grows by doubling (amortized O(1)
/// per token, never a copy of the whole cache per token). With `max_tokens` set, appending
/// past it throws std::length_error. Attention reads it as one block.
struct contiguous_layout {
  Index max_tokens = no_limit;

  static constexpr bool grows = true;
  static constexpr const char* name = "contiguous";

  /// Throws std::invalid_argument for a negative max_tokens.
  layout_plan plan(Index /*unit_tokens*/) const {
    if (max_tokens < 0) {
      detail::fail<std::invalid_argument>("contiguous_layout: max_tokens must be >= 0, got ",
                                          max_tokens);
    }
    layout_plan p;
    p.grows = true;
    p.max_tokens = max_tokens;
    return p;
  }

  friend bool operator==(const contiguous_layout& a, const contiguous_layout& b) noexcept {
    return a.max_tokens == b.max_tokens;
  }
};

}  // namespace kvcache
