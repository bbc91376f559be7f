// SPDX-License-Identifier: Apache-2.0
// What a layout decides for each layer of a cache: where stored units live and when they leave.
#pragma once

#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <limits>

namespace kvcache {

/// No limit on the number of tokens a cache may hold.
inline constexpr Index no_limit = std::numeric_limits<Index>::max();

/// A layout's decisions for one layer, in units of the format (a unit is one token for plain
/// formats, a group of tokens for quantized ones). Storage is a region of `sink_units` slots
/// kept for good, then a rolling region of `ring_units` slots.
struct layout_plan {
  /// Units kept for good at the front (attention sinks); 0 for most layouts.
  Index sink_units = 0;
  /// Slots of the rolling region; with `grows`, the slots allocated up front (then doubling).
  Index ring_units = 0;
  /// The rolling region grows by doubling when full (a contiguous cache).
  bool grows = false;
  /// When the rolling region is full, its oldest unit leaves (a ring); otherwise appending past
  /// max_tokens is refused.
  bool evicts = false;
  /// The most tokens a layer may hold (no_limit: unbounded); unused when `evicts`.
  Index max_tokens = no_limit;
  /// The mask that attention reads the layer through.
  attention_mask mask{};
};

}  // namespace kvcache
