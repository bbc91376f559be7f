// SPDX-License-Identifier: Apache-2.0
// The ring layout: a sliding window of recent tokens plus attention sinks, in constant memory.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/layout/plan.hpp"

#include <stdexcept>

namespace kvcache {

/// A sliding window over a ring buffer, with attention sinks (StreamingLLM, Xiao et al., 2023;
/// Mistral's rolling buffer cache): per layer the first `sinks` tokens for good and the most
/// recent `window` tokens, the oldest overwritten in place; memory is allocated once. A query
/// at position p sees keys at positions p-window+1..p and those below `sinks`.
///
/// `max_rollback` keeps that many more recent tokens than the window needs, so rolling back up
/// to that many tokens (speculative decoding rejecting drafted tokens) restores exactly the
/// state of never having appended them, even after the ring wrapped; the mask hides the extra
/// tokens from attention.
struct ring_layout {
  Index window = 0;
  Index sinks = 0;
  Index max_rollback = 0;

  static constexpr bool grows = false;
  static constexpr const char* name = "ring";

  /// Throws std::invalid_argument unless window >= 1, 0 <= sinks < window and max_rollback >= 0,
  /// std::length_error when the sizes overflow.
  layout_plan plan(Index unit_tokens) const {
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
    if (max_rollback < 0) {
      detail::fail<std::invalid_argument>("sliding_window_cache: max_rollback must be >= 0, got ",
                                          max_rollback);
    }
    const Index kept = detail::checked_add(window, max_rollback, "sliding_window_cache: window");
    layout_plan p;
    p.sink_units = sinks / unit_tokens + (sinks % unit_tokens != 0 ? 1 : 0);
    // With units of several tokens, one more slot keeps the window whole whatever the
    // alignment of its oldest token (the tail may be empty right after a unit is stored).
    p.ring_units = unit_tokens == 1 ? kept : detail::ceil_div(kept, unit_tokens) + 1;
    p.evicts = true;
    p.mask.window = window;
    p.mask.sinks = sinks;
    return p;
  }

  friend bool operator==(const ring_layout& a, const ring_layout& b) noexcept {
    return a.window == b.window && a.sinks == b.sinks && a.max_rollback == b.max_rollback;
  }
};

}  // namespace kvcache
