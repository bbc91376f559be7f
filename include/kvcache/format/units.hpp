// SPDX-License-Identifier: Apache-2.0
// Runs of stored units, for any format: copying them and visiting their bytes.
#pragma once

#include "kvcache/types.hpp"

#include <cstddef>
#include <cstring>

namespace kvcache::detail {

// A format's storage holds, per array, `heads` runs of `slots` units, each unit `per_unit`
// elements: [array][kv_head][slot][per_unit]. Format::for_each_array(f, s...) calls
// f(per_unit, array of each s...) for every array, in a fixed order.

/// Calls f(pointer, bytes) for units [slot, slot + n) of storage `s`: every array in the
/// format's order, kv heads inner. The order saving and loading use.
template <class Format, class Storage, class F>
void for_each_unit_span(Storage& s, Index slot, Index n, F&& f) {
  Format::for_each_array(
      [&](Index per_unit, auto& array) {
        for (Index h = 0; h < s.heads; ++h) {
          f(array.data() + (h * s.slots + slot) * per_unit,
            static_cast<std::size_t>(n * per_unit) * sizeof(*array.data()));
        }
      },
      s);
}

/// Copies units [src_slot, src_slot + n) of `src` to [dst_slot, dst_slot + n) of `dst` (the
/// same format, heads and head_dim; the ranges may overlap within one storage).
template <class Format, class Storage>
void copy_units(Storage& dst, Index dst_slot, const Storage& src, Index src_slot,
                Index n) noexcept {
  if (n <= 0) return;
  Format::for_each_array(
      [&](Index per_unit, auto& to, const auto& from) {
        for (Index h = 0; h < src.heads; ++h) {
          std::memmove(to.data() + (h * dst.slots + dst_slot) * per_unit,
                       from.data() + (h * src.slots + src_slot) * per_unit,
                       static_cast<std::size_t>(n * per_unit) * sizeof(*from.data()));
        }
      },
      dst, src);
}

}  // namespace kvcache::detail
