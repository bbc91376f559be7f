// SPDX-License-Identifier: Apache-2.0
// What a KV cache costs: the byte formula and its inverses, checked for overflow.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>

namespace kvcache {

namespace detail {
constexpr std::int64_t checked_mul(std::int64_t a, std::int64_t b) {
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a) {
    throw std::overflow_error("kvcache: byte count overflows 64 bits");
  }
  return a * b;
}
constexpr void check_positive(const char* what, std::int64_t value) {
  if (value <= 0) throw std::invalid_argument(what);
}
}  // namespace detail

/// Bytes one token adds to a model's cache: 2 (K and V) x layers x kv_heads x head_dim x
/// bytes_per_element. Throws std::invalid_argument for a non-positive argument.
constexpr std::int64_t kv_bytes_per_token(std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  detail::check_positive("kv_bytes_per_token: layers must be positive", layers);
  detail::check_positive("kv_bytes_per_token: kv_heads must be positive", kv_heads);
  detail::check_positive("kv_bytes_per_token: head_dim must be positive", head_dim);
  detail::check_positive("kv_bytes_per_token: bytes_per_element must be positive",
                         bytes_per_element);
  return detail::checked_mul(
      detail::checked_mul(detail::checked_mul(2 * layers, kv_heads), head_dim), bytes_per_element);
}

/// Bytes of a KV cache: 2 x batch x seq_len x layers x kv_heads x head_dim x bytes_per_element.
/// Throws std::invalid_argument for a negative batch or seq_len or a non-positive shape, and
/// std::overflow_error when the count does not fit 64 bits.
constexpr std::int64_t kv_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                      std::int64_t layers, std::int64_t kv_heads,
                                      std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (batch < 0 || seq_len < 0) {
    throw std::invalid_argument("kv_cache_bytes: batch and seq_len must be >= 0");
  }
  return detail::checked_mul(detail::checked_mul(batch, seq_len),
                             kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element));
}

/// The inverse in seq_len: how many tokens per sequence fit `budget_bytes` at `batch`
/// sequences (rounded down). Throws std::invalid_argument for a negative budget, a
/// non-positive batch or shape.
constexpr std::int64_t kv_tokens_that_fit(std::int64_t budget_bytes, std::int64_t batch,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (budget_bytes < 0) throw std::invalid_argument("kv_tokens_that_fit: budget must be >= 0");
  detail::check_positive("kv_tokens_that_fit: batch must be positive", batch);
  return budget_bytes /
         detail::checked_mul(batch, kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element));
}

/// The inverse in batch: how many sequences of `seq_len` tokens fit `budget_bytes`.
constexpr std::int64_t kv_batch_that_fits(std::int64_t budget_bytes, std::int64_t seq_len,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (budget_bytes < 0) throw std::invalid_argument("kv_batch_that_fits: budget must be >= 0");
  detail::check_positive("kv_batch_that_fits: seq_len must be positive", seq_len);
  return budget_bytes /
         detail::checked_mul(seq_len, kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element));
}

}  // namespace kvcache
