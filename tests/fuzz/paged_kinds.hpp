// SPDX-License-Identifier: Apache-2.0
// The paged caches fuzz_paged_file loads into and make_paged_file_seeds saves from: plain and
// quantized formats, with and without a window, a small shape and a small pool.
#pragma once

#include "cache_kinds.hpp"

#include <kvcache/kvcache.hpp>

#include <tuple>

namespace kvcache::fuzz {

/// A fresh paged cache of every kind, as a tuple.
inline auto paged_kinds() {
  const cache_shape& s = fuzz_shape();
  return std::make_tuple(
      paged_kv_cache<plain_format<float>>(s, paged_layout{4, 24}),
      paged_kv_cache<plain_format<Eigen::half>>(s, paged_layout{4, 24, 8, 2}),
      paged_kv_cache<quantized_format<8>>(s, paged_layout{8, 24}, quantized_format<8>(4, 3)),
      paged_kv_cache<quantized_format<4>>(s, paged_layout{4, 24, 12, 3}, quantized_format<4>(4, 0)));
}

}  // namespace kvcache::fuzz
