// SPDX-License-Identifier: Apache-2.0
// What a KV cache costs: the byte formula and its inverses, checked for overflow.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"

#include <cstdint>
#include <limits>
#include <stdexcept>

namespace kvcache {

namespace detail {
constexpr void check_positive(const char* what, std::int64_t value) {
  if (value <= 0) throw std::invalid_argument(what);
}

/// Quotient and remainder of a division.
struct quotient_remainder {
  std::int64_t quotient;
  std::int64_t remainder;
};

/// floor(a * b / c) and (a * b) mod c for a, b >= 0 and c > 0, exact without a wider type: the
/// product is never formed. Throws std::overflow_error only when the quotient itself does not
/// fit 64 bits. O(log b).
constexpr quotient_remainder mul_div(std::int64_t a, std::int64_t b, std::int64_t c) {
  // a * b = (qa*c + ra) * b = qa*b*c + ra*b: the first term divides exactly, the second is
  // built bit by bit with its quotient and remainder kept below c, so nothing overflows.
  const std::int64_t qa = a / c;
  const std::int64_t ra = a % c;
  std::int64_t quotient = checked_mul(qa, b);
  std::int64_t high = 0;  // ra * (the bits of b seen so far) = high * c + low, high < b
  std::int64_t low = 0;   // 0 <= low < c
  for (int bit = std::numeric_limits<std::int64_t>::digits - 1; bit >= 0; --bit) {
    high *= 2;
    if (low >= c - low) {
      low -= c - low;
      high += 1;
    } else {
      low += low;
    }
    if ((b >> bit) & 1) {
      if (low >= c - ra) {
        low -= c - ra;
        high += 1;
      } else {
        low += ra;
      }
    }
  }
  if (quotient > std::numeric_limits<std::int64_t>::max() - high) {
    throw std::overflow_error("kvcache: byte count overflows 64 bits");
  }
  quotient += high;
  return {quotient, low};
}
}  // namespace detail

/// How one cached element (one number of a key or value vector) is stored: `bits` per element
/// and, for quantized formats, a scale and zero point of `scale_bits` in total per group of
/// `group_size` elements. `group_size == 0` means unquantized (no groups, no scales).
///
/// Presets: `f32()`, `f16()`, `bf16()`, and `int8(group)`, `int4(group)` with an fp16 scale and
/// an fp16 zero point per group (asymmetric, as KIVI stores them): 32 bits per group, so at
/// group 32 int8 costs 9 bits per element (0.28125x of f32) and int4 5 bits (0.15625x).
/// Quantized groups run along head_dim for values and along tokens for keys (KIVI's per-channel
/// keys). The byte functions spread each group's scale and zero point over its elements: exact
/// when keys come in whole groups of tokens; a partial last group of keys, which KIVI keeps in
/// full precision until it fills, is not modelled.
struct kv_dtype {
  const char* name;
  int bits;
  int group_size;
  int scale_bits;

  static constexpr kv_dtype f32() noexcept { return {"f32", 32, 0, 0}; }
  static constexpr kv_dtype f16() noexcept { return {"f16", 16, 0, 0}; }
  static constexpr kv_dtype bf16() noexcept { return {"bf16", 16, 0, 0}; }
  /// 8-bit codes, an fp16 scale and fp16 zero point per `group` elements. The group is checked
  /// where the dtype is used (it must be positive and divide head_dim).
  static constexpr kv_dtype int8(int group) noexcept { return {"int8", 8, group, 32}; }
  /// 4-bit codes, an fp16 scale and fp16 zero point per `group` elements.
  static constexpr kv_dtype int4(int group) noexcept { return {"int4", 4, group, 32}; }

  /// Whether elements are stored as codes with a scale and zero point per group.
  constexpr bool quantized() const noexcept { return group_size != 0; }
  /// Bits one group of elements takes, scales included (one element when unquantized).
  constexpr std::int64_t bits_per_group() const noexcept {
    return quantized() ? std::int64_t{bits} * group_size + scale_bits : std::int64_t{bits};
  }
  /// Elements in a group (1 when unquantized).
  constexpr std::int64_t elements_per_group() const noexcept {
    return quantized() ? std::int64_t{group_size} : 1;
  }
  /// Average bits per element, scales included: 16 for f16, 9 for int8 at group 32.
  constexpr double bits_per_element() const noexcept {
    return static_cast<double>(bits_per_group()) / static_cast<double>(elements_per_group());
  }
};

namespace detail {
constexpr const char* dtype_name(const kv_dtype& dtype) {
  return dtype.name != nullptr ? dtype.name : "(unnamed)";
}

constexpr void check_dtype(const char* function, const kv_dtype& dtype) {
  if (dtype.bits <= 0 || dtype.bits > 64) {
    fail<std::invalid_argument>(function, ": dtype ", dtype_name(dtype), " has bits = ",
                                dtype.bits, ", expected 1..64");
  }
  if (dtype.group_size < 0) {
    fail<std::invalid_argument>(function, ": dtype ", dtype_name(dtype), " has group_size = ",
                                dtype.group_size, ", expected > 0 (or 0 for unquantized)");
  }
  if (dtype.scale_bits < 0 || (dtype.group_size == 0 && dtype.scale_bits != 0)) {
    fail<std::invalid_argument>(function, ": dtype ", dtype_name(dtype), " has scale_bits = ",
                                dtype.scale_bits, ", expected >= 0 and 0 when unquantized");
  }
}

/// Checks the shape and the dtype and returns the elements one token adds per sequence:
/// 2 (K and V) x layers x kv_heads x head_dim.
constexpr std::int64_t kv_elements_per_token(const char* function, std::int64_t layers,
                                             std::int64_t kv_heads, std::int64_t head_dim,
                                             const kv_dtype& dtype) {
  if (layers <= 0 || kv_heads <= 0 || head_dim <= 0) {
    fail<std::invalid_argument>(function, ": layers, kv_heads and head_dim must be positive, got ",
                                layers, ", ", kv_heads, ", ", head_dim);
  }
  check_dtype(function, dtype);
  if (dtype.quantized() && head_dim % dtype.group_size != 0) {
    fail<std::invalid_argument>(
        function, ": head_dim = ", head_dim, " is not a multiple of the ", dtype_name(dtype),
        " group size ", dtype.group_size,
        " (groups run along head_dim for values, so they must tile it exactly)");
  }
  return checked_mul(checked_mul(checked_mul(2, layers), kv_heads), head_dim);
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

/// Exact bytes of `elements` cached elements stored as `dtype`:
/// ceil(elements x (bits x group + scale_bits) / (8 x group)), or ceil(elements x bits / 8)
/// unquantized. Throws std::invalid_argument for a negative count or an invalid dtype, and
/// std::overflow_error when the count does not fit 64 bits. O(1).
constexpr std::int64_t kv_element_bytes(std::int64_t elements, const kv_dtype& dtype) {
  if (elements < 0) {
    detail::fail<std::invalid_argument>("kv_element_bytes: elements must be >= 0, got ",
                                        elements);
  }
  detail::check_dtype("kv_element_bytes", dtype);
  const detail::quotient_remainder bits_in_bytes =
      detail::mul_div(elements, dtype.bits_per_group(), 8 * dtype.elements_per_group());
  if (bits_in_bytes.remainder == 0) return bits_in_bytes.quotient;
  if (bits_in_bytes.quotient == std::numeric_limits<std::int64_t>::max()) {
    throw std::overflow_error("kvcache: byte count overflows 64 bits");
  }
  return bits_in_bytes.quotient + 1;
}

/// The inverse of kv_element_bytes: the most elements whose bytes fit `budget_bytes`. Throws
/// std::invalid_argument for a negative budget or an invalid dtype, std::overflow_error when
/// the count does not fit 64 bits (a budget of exabytes in a sub-byte format).
constexpr std::int64_t kv_elements_that_fit(std::int64_t budget_bytes, const kv_dtype& dtype) {
  if (budget_bytes < 0) {
    detail::fail<std::invalid_argument>("kv_elements_that_fit: budget must be >= 0, got ",
                                        budget_bytes);
  }
  detail::check_dtype("kv_elements_that_fit", dtype);
  // ceil(n * bits / 8) <= budget  <=>  n * bits <= 8 * budget (per group: bits and elements).
  return detail::mul_div(budget_bytes, 8 * dtype.elements_per_group(), dtype.bits_per_group())
      .quotient;
}

/// Bytes one token adds to a model's cache per sequence, for K and V of every layer stored as
/// `dtype`: kv_element_bytes(2 x layers x kv_heads x head_dim, dtype), e.g. 2x32x8x128 elements
/// x 9/8 bytes = 73728 for Llama-3-8B in int8 at group 32. Throws std::invalid_argument for a
/// non-positive shape, an invalid dtype, or a quantized dtype whose group_size does not divide
/// head_dim; std::overflow_error when the count does not fit 64 bits.
constexpr std::int64_t kv_bytes_per_token(std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  return kv_element_bytes(
      detail::kv_elements_per_token("kv_bytes_per_token", layers, kv_heads, head_dim, dtype),
      dtype);
}

/// Bytes of a KV cache of `batch` sequences of `seq_len` tokens stored as `dtype`: the exact
/// bytes of 2 x batch x seq_len x layers x kv_heads x head_dim elements. Throws
/// std::invalid_argument for a negative batch or seq_len and as kv_bytes_per_token does;
/// std::overflow_error when the count does not fit 64 bits.
constexpr std::int64_t kv_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                      std::int64_t layers, std::int64_t kv_heads,
                                      std::int64_t head_dim, const kv_dtype& dtype) {
  if (batch < 0 || seq_len < 0) {
    detail::fail<std::invalid_argument>("kv_cache_bytes: batch and seq_len must be >= 0, got ",
                                        batch, " and ", seq_len);
  }
  const std::int64_t per_token =
      detail::kv_elements_per_token("kv_cache_bytes", layers, kv_heads, head_dim, dtype);
  return kv_element_bytes(detail::checked_mul(detail::checked_mul(batch, seq_len), per_token),
                          dtype);
}

/// The inverse of kv_cache_bytes in seq_len: the most tokens per sequence whose cache, at
/// `batch` sequences stored as `dtype`, fits `budget_bytes`; kv_tokens_that_fit(
/// kv_cache_bytes(b, n, ...), b, ...) == n. Throws std::invalid_argument for a negative budget,
/// a non-positive batch and as kv_bytes_per_token does.
constexpr std::int64_t kv_tokens_that_fit(std::int64_t budget_bytes, std::int64_t batch,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  if (batch <= 0) {
    detail::fail<std::invalid_argument>("kv_tokens_that_fit: batch must be positive, got ",
                                        batch);
  }
  const std::int64_t per_token =
      detail::kv_elements_per_token("kv_tokens_that_fit", layers, kv_heads, head_dim, dtype);
  // Bytes grow with elements, so n fits exactly when batch x n x per_token elements fit.
  return kv_elements_that_fit(budget_bytes, dtype) / per_token / batch;
}

/// The inverse of kv_cache_bytes in batch: the most sequences of `seq_len` tokens stored as
/// `dtype` that fit `budget_bytes`. Throws std::invalid_argument for a negative budget, a
/// non-positive seq_len and as kv_bytes_per_token does.
constexpr std::int64_t kv_batch_that_fits(std::int64_t budget_bytes, std::int64_t seq_len,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  if (seq_len <= 0) {
    detail::fail<std::invalid_argument>("kv_batch_that_fits: seq_len must be positive, got ",
                                        seq_len);
  }
  const std::int64_t per_token =
      detail::kv_elements_per_token("kv_batch_that_fits", layers, kv_heads, head_dim, dtype);
  return kv_elements_that_fit(budget_bytes, dtype) / per_token / seq_len;
}

}  // namespace kvcache
