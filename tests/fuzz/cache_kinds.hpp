// SPDX-License-Identifier: Apache-2.0
// The caches fuzz_cache_file loads into and make_cache_file_seeds saves: one of each layout,
// plain and quantized formats, a small shape.
#pragma once

#include <kvcache/kvcache.hpp>

#include <tuple>

namespace kvcache::fuzz {

inline const cache_shape& fuzz_shape() {
  static const cache_shape shape(2, 4, 2, 8);
  return shape;
}

/// A fresh cache of every kind, as a tuple.
inline auto cache_kinds() {
  const cache_shape& s = fuzz_shape();
  return std::make_tuple(
      kv_cache<contiguous_layout, plain_format<float>>(s),
      kv_cache<fixed_layout, plain_format<Eigen::half>>(s, fixed_layout{64}),
      kv_cache<ring_layout, plain_format<float>>(s, ring_layout{16, 2, 4}),
      kv_cache<contiguous_layout, quantized_format<8>>(s, contiguous_layout{},
                                                       quantized_format<8>(4, 3)),
      kv_cache<ring_layout, quantized_format<4>>(s, ring_layout{16, 2, 4}, quantized_format<4>(4, 0)));
}

}  // namespace kvcache::fuzz
