// SPDX-License-Identifier: Apache-2.0
// The view every cache kind hands to attention: runs of consecutive tokens of one kv head.
#pragma once

#include "kvcache/types.hpp"

namespace kvcache {

/// A run of `tokens` consecutive cached tokens of one kv head. Token t's key is the
/// `head_dim` scalars at `keys + t * stride`, its value those at `values + t * stride`.
/// A non-owning, trivially copyable view: it is valid until the cache that handed it out
/// is next modified.
template <class Scalar>
struct kv_block {
  const Scalar* keys = nullptr;    // [token][head_dim], rows `stride` apart
  const Scalar* values = nullptr;  // [token][head_dim], rows `stride` apart
  Index tokens = 0;
  Index stride = 0;
};

/// A layer of a cache as attention reads it: for each kv head the same number of blocks,
/// which concatenated in order hold the cached tokens oldest first. A contiguous cache is one
/// block; a ring buffer that wrapped is two; a paged cache is one block per page.
///
/// Any type with these members can be read by the decode kernel:
///   Index n_kv_heads() const; Index head_dim() const; Index size() const;
///   Index n_blocks() const;   block_type block(Index kv_head, Index i) const;
template <class Scalar>
struct single_block_view {
  using scalar_type = Scalar;
  using block_type = kv_block<Scalar>;

  const Scalar* keys = nullptr;    // [kv_head][token][head_dim], heads `head_stride` apart
  const Scalar* values = nullptr;  // same layout as keys
  Index kv_heads = 0;
  Index dim = 0;
  Index tokens = 0;
  Index head_stride = 0;

  Index n_kv_heads() const noexcept { return kv_heads; }
  Index head_dim() const noexcept { return dim; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return tokens > 0 ? 1 : 0; }
  block_type block(Index kv_head, Index /*i*/) const noexcept {
    return {keys + kv_head * head_stride, values + kv_head * head_stride, tokens, dim};
  }
};

}  // namespace kvcache
