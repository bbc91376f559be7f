// SPDX-License-Identifier: Apache-2.0
// What attention reads: per kv head, a short list of blocks of consecutive stored tokens, each
// with the position of its first token, and the mask that the positions are read through.
#pragma once

#include "kvcache/types.hpp"

#include <array>

namespace kvcache {

/// A run of `tokens` consecutive cached tokens of one kv head in plain storage. Token t's key
/// is the `head_dim` scalars at `keys + t * stride`, its value those at `values + t * stride`.
/// A non-owning, trivially copyable view: valid until the cache that handed it out is next
/// modified.
template <class Scalar>
struct kv_block {
  const Scalar* keys = nullptr;    // [token][head_dim], rows `stride` apart
  const Scalar* values = nullptr;  // [token][head_dim], rows `stride` apart
  Index tokens = 0;
  Index stride = 0;
};

/// Which keys a query may see, as a function of positions. A query at position p sees a key at
/// position k when k <= p (`causal`; without it, keys at every position, as a decoder's
/// cross-attention sees every token of the encoder's output) and, when `window` > 0, also
/// p - window < k (Mistral's sliding window) or k < `sinks` (StreamingLLM's attention sinks).
/// `q_pos0` is for reference_attention, whose keys sit at positions 0..n_keys-1: the position
/// of its first query, -1 placing the queries last. The kernels read causal, window and sinks
/// from a view.
struct attention_mask {
  bool causal = true;
  Index q_pos0 = -1;
  Index window = 0;
  Index sinks = 0;
};

/// One block of a cache's view: either a run of the format's stored tokens (`stored`) or a run
/// of the full-precision tail (`tail`, the newest tokens that a quantized format has not
/// converted yet), in the compute type `T`.
template <class StoredBlock, class T>
struct layer_block {
  StoredBlock stored{};
  kv_block<T> tail{};
  bool in_tail = false;
  Index tokens = 0;
};

/// A layer as attention reads it. Any type with these members can be read by the kernels:
///   using scalar_type = ...;  (names the format: compute_t<scalar_type> is the arithmetic)
///   Index n_kv_heads() const; Index head_dim() const;
///   Index value_dim() const;   head_dim, or the width of the values read from the keys
///   bool values_in_keys() const;  whether each block's values are the first value_dim()
///                                 columns of its keys (MLA's latent rows)
///   Index size() const;        tokens in all blocks
///   Index n_blocks() const;    block_type block(Index kv_head, Index i) const;
///   Index position(Index i) const;  position of block i's first token (the same for every head;
///                                   positions increase with i)
///   Index end_position() const;     one past the newest token's position
///   attention_mask mask() const;
///
/// single_block_view is the simplest: one run of plain storage per kv head at positions
/// 0..tokens-1, no window.
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
  Index value_dim() const noexcept { return dim; }
  bool values_in_keys() const noexcept { return false; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return tokens > 0 ? 1 : 0; }
  block_type block(Index kv_head, Index /*i*/) const noexcept {
    return {keys + kv_head * head_stride, values + kv_head * head_stride, tokens, dim};
  }
  Index position(Index /*i*/) const noexcept { return 0; }
  Index end_position() const noexcept { return tokens; }
  attention_mask mask() const noexcept { return {}; }
};

}  // namespace kvcache
