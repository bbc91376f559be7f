// SPDX-License-Identifier: Apache-2.0
// The chained hash of a full page of tokens, by which prefix caching finds a cached page.
#pragma once

#include "kvcache/detail/xxhash.hpp"
#include "kvcache/types.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvcache {

/// A 128-bit XXH3 hash naming a page of tokens together with every token before it.
struct page_hash {
  std::uint64_t low = 0;
  std::uint64_t high = 0;

  friend bool operator==(const page_hash& a, const page_hash& b) noexcept {
    return a.low == b.low && a.high == b.high;
  }
  friend bool operator!=(const page_hash& a, const page_hash& b) noexcept { return !(a == b); }
};

/// For unordered containers keyed by page_hash: its low 64 bits, already uniform.
struct page_hash_hasher {
  std::size_t operator()(const page_hash& h) const noexcept {
    return static_cast<std::size_t>(h.low);
  }
};

/// The root of every hash chain: XXH3-128 of `extra_key` (a model fingerprint, an adapter, a
/// tenant: anything whose caches must never mix; empty for none) under a seed of our own. Two
/// different extra keys give unrelated chains, so their pages are never shared.
inline page_hash prefix_root(std::string_view extra_key = {}) noexcept {
  constexpr std::uint64_t seed = 0x6b76636163686531ULL;  // "kvcache1"
  const XXH128_hash_t h = XXH3_128bits_withSeed(extra_key.data(), extra_key.size(), seed);
  return {h.low64, h.high64};
}

/// The hash of a full page holding `tokens[0..n)` after the prefix whose last page hashed to
/// `parent` (prefix_root for the first page): XXH3-128 of the parent's 16 bytes followed by the
/// token ids (vLLM's automatic prefix caching chains its block hashes the same way, with
/// SHA-256). A page's hash so names its whole prefix. Cost: one pass over 16 + 4n bytes, a few
/// nanoseconds per token. `n` >= 0.
inline page_hash chain_hash(const page_hash& parent, const std::int32_t* tokens, Index n) noexcept {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_128bits_reset(&state);
  const std::uint64_t head[2] = {parent.low, parent.high};
  XXH3_128bits_update(&state, head, sizeof(head));
  if (n > 0) {
    XXH3_128bits_update(&state, tokens, static_cast<std::size_t>(n) * sizeof(std::int32_t));
  }
  const XXH128_hash_t h = XXH3_128bits_digest(&state);
  return {h.low64, h.high64};
}

}  // namespace kvcache
