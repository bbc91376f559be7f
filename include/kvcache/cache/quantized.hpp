// SPDX-License-Identifier: Apache-2.0
// Quantized KV cache (KIVI): int8/int4 keys per channel, values per token, recent tokens exact.
#pragma once

#include "kvcache/cache.hpp"
#include "kvcache/format/quantized.hpp"
#include "kvcache/layout/contiguous.hpp"

namespace kvcache {

/// A whole model's contiguous cache in a quantized format (see quantized_format: int8 or int4
/// codes, group size, full-precision residual): kv_cache over contiguous_layout and
/// quantized_format<Bits>. At group 32 a stored token costs 0.28125x of float32 in int8 and
/// 0.15625x in int4; decode attention reads that much less.
template <int Bits>
class quantized_cache : public kv_cache<contiguous_layout, quantized_format<Bits>> {
  using base = kv_cache<contiguous_layout, quantized_format<Bits>>;

 public:
  /// A copy that continues independently; see kv_cache::fork.
  quantized_cache fork() const { return *this; }
  /// Throws std::invalid_argument for group_size < 1 or residual < 0, std::length_error when
  /// residual + group_size overflows.
  explicit quantized_cache(const cache_shape& shape, Index group_size = 32, Index residual = 0)
      : base(shape, contiguous_layout{}, quantized_format<Bits>(group_size, residual)) {}

  Index group_size() const noexcept { return this->format().group_size(); }
  Index residual() const noexcept { return this->format().residual(); }
  /// The format as memory.hpp's formulas count it.
  kv_dtype dtype() const noexcept { return this->format().dtype(); }
  /// Layer `l`'s keys as attention reads them, dequantized; see kv_cache::keys.
  row_matrix<float> dequantized_keys(Index l) const { return this->keys(l); }
  row_matrix<float> dequantized_values(Index l) const { return this->values(l); }
  /// Bytes one stored token takes in the whole cache (every layer, K and V, scales included).
  Index quantized_bytes_per_token() const noexcept {
    return this->n_layers() * this->unit_bytes() / group_size();
  }
};

}  // namespace kvcache
