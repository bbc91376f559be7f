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
constexpr void check_positive(const char* function, const char* what, std::int64_t value) {
  if (value <= 0) {
    fail<std::invalid_argument>(function, ": ", what, " must be positive, got ", value);
  }
}

/// Quotient and remainder of a division.
struct quotient_remainder {
  std::int64_t quotient;
  std::int64_t remainder;
};

/// floor(a * b / c) and (a * b) mod c for a, b >= 0 and c > 0, exact without a wider type: the
/// product is never formed. Throws std::length_error only when the quotient itself does not
/// fit 64 bits. O(log b).
constexpr quotient_remainder mul_div(std::int64_t a, std::int64_t b, std::int64_t c) {
  // a * b = (qa*c + ra) * b = qa*b*c + ra*b: the first term divides exactly, the second is
  // built bit by bit with its quotient and remainder kept below c, so nothing overflows.
  const std::int64_t qa = a / c;
  const std::int64_t ra = a % c;
  std::int64_t quotient = checked_mul(qa, b, "kvcache: byte count");
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
  return {checked_add(quotient, high, "kvcache: byte count"), low};
}

/// A size as a fraction: `bits` bits for every `per` items (elements, or rows of a cache).
struct bit_rate {
  std::int64_t bits;  // > 0
  std::int64_t per;   // > 0, at most INT_MAX
};

/// Exact bytes of `count` items at `rate`: ceil(count x bits / (8 x per)), without forming the
/// product. Throws std::length_error when the bytes do not fit 64 bits.
constexpr std::int64_t bytes_at(std::int64_t count, bit_rate rate) {
  const quotient_remainder q = mul_div(count, rate.bits, 8 * rate.per);
  return q.remainder == 0 ? q.quotient : checked_add(q.quotient, 1, "kvcache: byte count");
}

/// The most items whose bytes at `rate` fit `budget`: ceil(n x bits / (8 x per)) <= budget
/// exactly when n x bits <= 8 x per x budget. Throws std::length_error when that count does
/// not fit 64 bits (items of less than a byte, a budget of exabytes).
constexpr std::int64_t count_within(std::int64_t budget, bit_rate rate) {
  return mul_div(budget, 8 * rate.per, rate.bits).quotient;
}
}  // namespace detail

/// How one cached element (one number of a key or value vector) is stored: `bits` per element
/// and, for quantized formats, a scale and zero point of `scale_bits` in total per group of
/// `group_size` elements. `group_size == 0` means unquantized (no groups, no scales).
///
/// Presets: `f32()`, `f16()`, `bf16()`, and `int8(group)`, `int4(group)` with an fp16 scale and
/// an fp16 zero point per group (asymmetric, as KIVI stores them): 32 bits per group, so at
/// group 32 int8 costs 9 bits per element (0.28125x of f32) and int4 5 bits (0.15625x).
///
/// Quantized caches group as KIVI does. Values: per token and kv head, groups of `group_size`
/// channels along head_dim, the last one shorter when group_size does not divide head_dim, so
/// ceil(head_dim / group_size) scale and zero points. Keys: per channel, groups of
/// `group_size` tokens, so head_dim scale and zero points per group of tokens. The codes of one
/// token's key (and value) of one kv head take ceil(head_dim x bits / 8) bytes. Any
/// group_size >= 1 is allowed. The byte functions below count exactly that, spreading each key
/// group's scales over its tokens; a partial last group of keys, which KIVI keeps in full
/// precision until it fills, is not modelled.
struct kv_dtype {
  const char* name;
  int bits;
  int group_size;
  int scale_bits;

  static constexpr kv_dtype f32() noexcept { return {"f32", 32, 0, 0}; }
  static constexpr kv_dtype f16() noexcept { return {"f16", 16, 0, 0}; }
  static constexpr kv_dtype bf16() noexcept { return {"bf16", 16, 0, 0}; }
  /// 8-bit codes, an fp16 scale and fp16 zero point per `group` elements. The group is checked
  /// where the dtype is used (it must be >= 1).
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
  /// Average bits per element, scales included: 16 for f16, 9 for int8 at group 32. Exact for
  /// a cache when group_size divides head_dim (and head_dim x bits is whole bytes).
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
                                dtype.group_size, ", expected >= 1 (or 0 for unquantized)");
  }
  if (dtype.group_size == 0 && dtype.scale_bits != 0) {
    fail<std::invalid_argument>(function, ": dtype ", dtype_name(dtype),
                                " has group_size = 0 with scale_bits = ", dtype.scale_bits,
                                ": a quantized dtype needs group_size >= 1 (group_size 0 means "
                                "unquantized, without scales)");
  }
  if (dtype.scale_bits < 0) {
    fail<std::invalid_argument>(function, ": dtype ", dtype_name(dtype), " has scale_bits = ",
                                dtype.scale_bits, ", expected >= 0");
  }
}


/// Bits of the codes of one token's vector of `dim` elements: ceil(dim x bits / 8) bytes.
constexpr std::int64_t code_bits(std::int64_t dim, const kv_dtype& dtype) {
  const quotient_remainder bytes = mul_div(dim, dtype.bits, 8);
  return checked_mul(bytes.quotient + (bytes.remainder != 0), 8, "kvcache: bits of a vector");
}

/// Bits of the scales and zero points of one token's vector of `dim` elements grouped along
/// its channels, the last group shorter.
constexpr std::int64_t channel_scale_bits(std::int64_t dim, const kv_dtype& dtype) {
  return checked_mul(ceil_div(dim, dtype.group_size), dtype.scale_bits,
                     "kvcache: bits of a vector");
}

/// Bits one token's vector of `dim` elements takes stored as a value is: dim x bits
/// unquantized; quantized, its codes and its channel groups' scales.
constexpr std::int64_t vector_bits(std::int64_t dim, const kv_dtype& dtype) {
  if (!dtype.quantized()) return checked_mul(dim, dtype.bits, "kvcache: bits of a vector");
  return checked_add(code_bits(dim, dtype), channel_scale_bits(dim, dtype),
                     "kvcache: bits of a vector");
}

/// What one token adds to one sequence's cache: `rows` rows at `rate`.
struct token_rows {
  std::int64_t rows;
  bit_rate rate;
};

/// One token of a model with kv heads: a row per layer and kv head holding its key and value.
/// Checks the shape and the dtype.
constexpr token_rows kv_token_rows(const char* function, std::int64_t layers,
                                   std::int64_t kv_heads, std::int64_t head_dim,
                                   const kv_dtype& dtype) {
  if (layers <= 0 || kv_heads <= 0 || head_dim <= 0) {
    fail<std::invalid_argument>(function, ": layers, kv_heads and head_dim must be positive, got ",
                                layers, ", ", kv_heads, ", ", head_dim);
  }
  check_dtype(function, dtype);
  const std::int64_t rows = checked_mul(layers, kv_heads, "kvcache: layers x kv_heads");
  const char* what = "kvcache: bits of a cached row";
  if (!dtype.quantized()) return {rows, {checked_product({2, head_dim, dtype.bits}, what), 1}};
  // Over group_size tokens: the value (codes and channel-group scales) and the key codes of
  // each token, and one scale and zero point per key channel.
  const std::int64_t per_token = checked_add(code_bits(head_dim, dtype),
                                             vector_bits(head_dim, dtype), what);
  const std::int64_t per_group =
      checked_add(checked_mul(per_token, dtype.group_size, what),
                  checked_mul(head_dim, dtype.scale_bits, what), what);
  return {rows, {per_group, dtype.group_size}};
}

/// One token of a model with multi-head latent attention (MLA): a row per layer holding the
/// compressed latent and the decoupled RoPE key, each stored as a value is. Checks the shape
/// and the dtype.
constexpr token_rows latent_token_rows(const char* function, std::int64_t layers,
                                       std::int64_t latent_dim, std::int64_t rope_dim,
                                       const kv_dtype& dtype) {
  if (layers <= 0 || latent_dim <= 0 || rope_dim < 0) {
    fail<std::invalid_argument>(function, ": layers and latent_dim must be positive and rope_dim "
                                "non-negative, got ", layers, ", ", latent_dim, ", ", rope_dim);
  }
  check_dtype(function, dtype);
  const char* what = "kvcache: bits of a cached row";
  const std::int64_t bits = dtype.quantized()
      ? checked_add(vector_bits(latent_dim, dtype), vector_bits(rope_dim, dtype), what)
      : checked_mul(checked_add(latent_dim, rope_dim, what), dtype.bits, what);
  return {layers, {bits, 1}};
}

constexpr std::int64_t cache_bytes_of(const char* function, std::int64_t batch,
                                   std::int64_t seq_len, token_rows token) {
  if (batch < 0 || seq_len < 0) {
    fail<std::invalid_argument>(function, ": batch and seq_len must be >= 0, got ", batch,
                                " and ", seq_len);
  }
  return bytes_at(checked_product({batch, seq_len, token.rows}, "kvcache: rows of the cache"),
                  token.rate);
}

/// The most n with cache_bytes(n) <= budget, for n tokens (or sequences) of `per` rows times
/// `times`: bytes grow with rows, so n fits exactly when n x per x times rows fit, and
/// floor(floor(x / a) / b) = floor(x / (a x b)) needs no product.
constexpr std::int64_t count_that_fits(const char* function, const char* what,
                                       std::int64_t budget, std::int64_t times,
                                       token_rows token) {
  if (budget < 0) fail<std::invalid_argument>(function, ": budget must be >= 0, got ", budget);
  check_positive(function, what, times);
  return count_within(budget, token.rate) / token.rows / times;
}
}  // namespace detail

/// Bytes one token adds to a model's cache: 2 (K and V) x layers x kv_heads x head_dim x
/// bytes_per_element. Throws std::invalid_argument for a non-positive argument and
/// std::length_error when the product does not fit 64 bits.
constexpr std::int64_t kv_bytes_per_token(std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  detail::check_positive("kv_bytes_per_token", "layers", layers);
  detail::check_positive("kv_bytes_per_token", "kv_heads", kv_heads);
  detail::check_positive("kv_bytes_per_token", "head_dim", head_dim);
  detail::check_positive("kv_bytes_per_token", "bytes_per_element", bytes_per_element);
  return detail::checked_product({2, layers, kv_heads, head_dim, bytes_per_element},
                                 "kv_bytes_per_token: 2 x layers x kv_heads x head_dim x bytes");
}

/// Bytes of a KV cache: 2 x batch x seq_len x layers x kv_heads x head_dim x bytes_per_element.
/// Throws std::invalid_argument for a negative batch or seq_len or a non-positive shape, and
/// std::length_error when the count does not fit 64 bits.
constexpr std::int64_t kv_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                      std::int64_t layers, std::int64_t kv_heads,
                                      std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (batch < 0 || seq_len < 0) {
    detail::fail<std::invalid_argument>("kv_cache_bytes: batch and seq_len must be >= 0, got ",
                                        batch, " and ", seq_len);
  }
  return detail::checked_product(
      {batch, seq_len, kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element)},
      "kv_cache_bytes: batch x seq_len x bytes per token");
}

/// The inverse in seq_len: how many tokens per sequence fit `budget_bytes` at `batch`
/// sequences (rounded down). Throws std::invalid_argument for a negative budget, a
/// non-positive batch or shape, std::length_error when one token's bytes do not fit 64 bits.
constexpr std::int64_t kv_tokens_that_fit(std::int64_t budget_bytes, std::int64_t batch,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (budget_bytes < 0) {
    detail::fail<std::invalid_argument>("kv_tokens_that_fit: budget must be >= 0, got ",
                                        budget_bytes);
  }
  detail::check_positive("kv_tokens_that_fit", "batch", batch);
  return budget_bytes / kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element) / batch;
}

/// The inverse in batch: how many sequences of `seq_len` tokens fit `budget_bytes`. Throws as
/// kv_tokens_that_fit does, with seq_len in place of batch.
constexpr std::int64_t kv_batch_that_fits(std::int64_t budget_bytes, std::int64_t seq_len,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, std::int64_t bytes_per_element) {
  if (budget_bytes < 0) {
    detail::fail<std::invalid_argument>("kv_batch_that_fits: budget must be >= 0, got ",
                                        budget_bytes);
  }
  detail::check_positive("kv_batch_that_fits", "seq_len", seq_len);
  return budget_bytes / kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element) /
         seq_len;
}

/// Exact bytes of `elements` cached elements stored as `dtype`, each group's scale and zero
/// point spread over its elements: ceil(elements x (bits x group + scale_bits) / (8 x group)),
/// or ceil(elements x bits / 8) unquantized. Throws std::invalid_argument for a negative count
/// or an invalid dtype, and std::length_error when the count does not fit 64 bits. O(1).
constexpr std::int64_t kv_element_bytes(std::int64_t elements, const kv_dtype& dtype) {
  if (elements < 0) {
    detail::fail<std::invalid_argument>("kv_element_bytes: elements must be >= 0, got ",
                                        elements);
  }
  detail::check_dtype("kv_element_bytes", dtype);
  return detail::bytes_at(elements, {dtype.bits_per_group(), dtype.elements_per_group()});
}

/// The inverse of kv_element_bytes: the most elements whose bytes fit `budget_bytes`. Throws
/// std::invalid_argument for a negative budget or an invalid dtype, std::length_error when
/// the count does not fit 64 bits (a budget of exabytes in a sub-byte format).
constexpr std::int64_t kv_elements_that_fit(std::int64_t budget_bytes, const kv_dtype& dtype) {
  if (budget_bytes < 0) {
    detail::fail<std::invalid_argument>("kv_elements_that_fit: budget must be >= 0, got ",
                                        budget_bytes);
  }
  detail::check_dtype("kv_elements_that_fit", dtype);
  return detail::count_within(budget_bytes, {dtype.bits_per_group(), dtype.elements_per_group()});
}

/// Bytes one token adds to a model's cache per sequence, for K and V of every layer and kv
/// head stored as `dtype`. Unquantized: ceil(2 x layers x kv_heads x head_dim x bits / 8).
/// Quantized, per layer and kv head (see kv_dtype): 2 x ceil(head_dim x bits / 8) bytes of
/// codes, ceil(head_dim / group) value scale and zero points, and head_dim key scale and zero
/// points per group tokens, i.e. head_dim / group per token; the total rounded up to a byte.
/// E.g. 2x32x8x128 x 9/8 = 73728 for Llama-3-8B in int8 at group 32. Throws
/// std::invalid_argument for a non-positive shape or an invalid dtype; std::length_error when
/// the count does not fit 64 bits.
constexpr std::int64_t kv_bytes_per_token(std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  const detail::token_rows token =
      detail::kv_token_rows("kv_bytes_per_token", layers, kv_heads, head_dim, dtype);
  return detail::bytes_at(token.rows, token.rate);
}

/// Bytes of a KV cache of `batch` sequences of `seq_len` tokens stored as `dtype`: batch x
/// seq_len tokens counted as kv_bytes_per_token counts one, rounded up once. Throws
/// std::invalid_argument for a negative batch or seq_len and as kv_bytes_per_token does;
/// std::length_error when the count does not fit 64 bits.
constexpr std::int64_t kv_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                      std::int64_t layers, std::int64_t kv_heads,
                                      std::int64_t head_dim, const kv_dtype& dtype) {
  return detail::cache_bytes_of(
      "kv_cache_bytes", batch, seq_len,
      detail::kv_token_rows("kv_cache_bytes", layers, kv_heads, head_dim, dtype));
}

/// The inverse of kv_cache_bytes in seq_len: the most tokens per sequence whose cache, at
/// `batch` sequences stored as `dtype`, fits `budget_bytes`; kv_tokens_that_fit(
/// kv_cache_bytes(b, n, ...), b, ...) == n. Throws std::invalid_argument for a negative budget,
/// a non-positive batch and as kv_bytes_per_token does.
constexpr std::int64_t kv_tokens_that_fit(std::int64_t budget_bytes, std::int64_t batch,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  return detail::count_that_fits(
      "kv_tokens_that_fit", "batch", budget_bytes, batch,
      detail::kv_token_rows("kv_tokens_that_fit", layers, kv_heads, head_dim, dtype));
}

/// The inverse of kv_cache_bytes in batch: the most sequences of `seq_len` tokens stored as
/// `dtype` that fit `budget_bytes`. Throws std::invalid_argument for a negative budget, a
/// non-positive seq_len and as kv_bytes_per_token does.
constexpr std::int64_t kv_batch_that_fits(std::int64_t budget_bytes, std::int64_t seq_len,
                                          std::int64_t layers, std::int64_t kv_heads,
                                          std::int64_t head_dim, const kv_dtype& dtype) {
  return detail::count_that_fits(
      "kv_batch_that_fits", "seq_len", budget_bytes, seq_len,
      detail::kv_token_rows("kv_batch_that_fits", layers, kv_heads, head_dim, dtype));
}

/// Bytes one token adds per sequence to the cache of a model with multi-head latent attention
/// (MLA, DeepSeek-V2): per layer, one compressed latent of `latent_dim` and `rope_dim`
/// decoupled RoPE key dims, no heads and no separate K and V. Each vector is stored as a value
/// is (see kv_dtype): unquantized, ceil(layers x (latent_dim + rope_dim) x bits / 8);
/// quantized, codes padded to whole bytes and a scale and zero point per group of channels.
/// Throws std::invalid_argument for layers or latent_dim <= 0, rope_dim < 0 or an invalid
/// dtype; std::length_error when the count does not fit 64 bits.
constexpr std::int64_t kv_latent_bytes_per_token(std::int64_t layers, std::int64_t latent_dim,
                                                 std::int64_t rope_dim, const kv_dtype& dtype) {
  const detail::token_rows token = detail::latent_token_rows(
      "kv_latent_bytes_per_token", layers, latent_dim, rope_dim, dtype);
  return detail::bytes_at(token.rows, token.rate);
}

/// Bytes of an MLA cache of `batch` sequences of `seq_len` tokens, as kv_cache_bytes for
/// kv_latent_bytes_per_token.
constexpr std::int64_t kv_latent_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                             std::int64_t layers, std::int64_t latent_dim,
                                             std::int64_t rope_dim, const kv_dtype& dtype) {
  return detail::cache_bytes_of(
      "kv_latent_cache_bytes", batch, seq_len,
      detail::latent_token_rows("kv_latent_cache_bytes", layers, latent_dim, rope_dim, dtype));
}

/// The inverse of kv_latent_cache_bytes in seq_len, as kv_tokens_that_fit.
constexpr std::int64_t kv_latent_tokens_that_fit(std::int64_t budget_bytes, std::int64_t batch,
                                                 std::int64_t layers, std::int64_t latent_dim,
                                                 std::int64_t rope_dim, const kv_dtype& dtype) {
  return detail::count_that_fits(
      "kv_latent_tokens_that_fit", "batch", budget_bytes, batch,
      detail::latent_token_rows("kv_latent_tokens_that_fit", layers, latent_dim, rope_dim, dtype));
}

/// The inverse of kv_latent_cache_bytes in batch, as kv_batch_that_fits.
constexpr std::int64_t kv_latent_batch_that_fits(std::int64_t budget_bytes, std::int64_t seq_len,
                                                 std::int64_t layers, std::int64_t latent_dim,
                                                 std::int64_t rope_dim, const kv_dtype& dtype) {
  return detail::count_that_fits(
      "kv_latent_batch_that_fits", "seq_len", budget_bytes, seq_len,
      detail::latent_token_rows("kv_latent_batch_that_fits", layers, latent_dim, rope_dim, dtype));
}

// Paged caches (vLLM's PagedAttention: W. Kwon et al., "Efficient Memory Management for Large
// Language Model Serving with PagedAttention", SOSP 2023). A sequence's cache is a list of
// pages (vLLM's blocks) of `page_size` token slots each, allocated one whole page at a time, so
// only the last page of a sequence is partly filled. A page holds its tokens' K and V of every
// layer and kv head (one block table serves all layers); it is counted as a whole number of
// bytes.

namespace detail {
constexpr void check_tokens(const char* function, std::int64_t batch, std::int64_t seq_len) {
  if (batch < 0 || seq_len < 0) {
    fail<std::invalid_argument>(function, ": batch and seq_len must be >= 0, got ", batch,
                                " and ", seq_len);
  }
}

constexpr void check_page_size(const char* function, std::int64_t page_size) {
  if (page_size <= 0) {
    fail<std::invalid_argument>(function, ": page_size must be a positive number of tokens, got ",
                                page_size);
  }
}

/// Bytes of one page of `page_size` tokens of `token`, rows of a cache whose dtype is checked.
constexpr std::int64_t page_bytes_of(std::int64_t page_size, token_rows token) {
  return bytes_at(checked_mul(page_size, token.rows, "kvcache: rows of a page"), token.rate);
}

/// One token of a model with kv heads, for a page of `page_size` tokens: checks the shape, the
/// dtype and that a quantized page holds whole groups of keys (groups of group_size tokens).
constexpr token_rows kv_page_rows(const char* function, std::int64_t page_size,
                                  std::int64_t layers, std::int64_t kv_heads,
                                  std::int64_t head_dim, const kv_dtype& dtype) {
  check_page_size(function, page_size);
  const token_rows token = kv_token_rows(function, layers, kv_heads, head_dim, dtype);
  if (dtype.quantized() && page_size % dtype.group_size != 0) {
    fail<std::invalid_argument>(function, ": page_size must be a multiple of the ",
                                dtype_name(dtype), " group of ", dtype.group_size,
                                " tokens (a page holds whole groups of keys), got ", page_size);
  }
  return token;
}

/// One token of an MLA model, for a page of `page_size` tokens. Its vectors are grouped along
/// their channels, within one token, so any page size holds whole groups.
constexpr token_rows latent_page_rows(const char* function, std::int64_t page_size,
                                      std::int64_t layers, std::int64_t latent_dim,
                                      std::int64_t rope_dim, const kv_dtype& dtype) {
  check_page_size(function, page_size);
  return latent_token_rows(function, layers, latent_dim, rope_dim, dtype);
}

/// batch x ceil(seq_len / page_size) pages of `token` rows.
constexpr std::int64_t paged_bytes_of(const char* function, std::int64_t batch,
                                      std::int64_t seq_len, std::int64_t page_size,
                                      token_rows token) {
  check_tokens(function, batch, seq_len);
  const std::int64_t pages =
      checked_mul(batch, ceil_div(seq_len, page_size), "kvcache: pages of the cache");
  return checked_mul(pages, page_bytes_of(page_size, token), "kvcache: bytes of the pages");
}

/// The paged bytes minus the bytes of the same tokens stored contiguously.
constexpr std::int64_t paged_waste_of(const char* function, std::int64_t batch,
                                      std::int64_t seq_len, std::int64_t page_size,
                                      token_rows token) {
  const std::int64_t paged = paged_bytes_of(function, batch, seq_len, page_size, token);
  return paged - cache_bytes_of(function, batch, seq_len, token);
}

constexpr std::int64_t pages_within(const char* function, std::int64_t budget,
                                    std::int64_t page_size, token_rows token) {
  if (budget < 0) fail<std::invalid_argument>(function, ": budget must be >= 0, got ", budget);
  return budget / page_bytes_of(page_size, token);
}

constexpr std::int64_t paged_tokens_within(const char* function, std::int64_t budget,
                                           std::int64_t page_size, token_rows token) {
  return checked_mul(pages_within(function, budget, page_size, token), page_size,
                     "kvcache: token slots of the pages");
}
}  // namespace detail

/// Pages of `page_size` tokens a sequence of `tokens` tokens takes: ceil(tokens / page_size),
/// 0 for no tokens. Throws std::invalid_argument for tokens < 0 or page_size <= 0. Never
/// overflows.
constexpr std::int64_t kv_pages_for_tokens(std::int64_t tokens, std::int64_t page_size) {
  if (tokens < 0) {
    detail::fail<std::invalid_argument>("kv_pages_for_tokens: tokens must be >= 0, got ", tokens);
  }
  detail::check_page_size("kv_pages_for_tokens", page_size);
  return detail::ceil_div(tokens, page_size);
}

/// Bytes of one page of a paged cache: `page_size` tokens' K and V of every layer and kv head
/// stored as `dtype`, counted as kv_cache_bytes(1, page_size, ...) counts them. E.g. 16 tokens
/// of Llama-2-7B in f16: 16 x 2 x 32 x 32 x 128 x 2 = 8388608 bytes (8 MiB). A quantized page
/// holds whole groups of keys (keys are grouped along tokens, see kv_dtype), so its
/// page_size must be a multiple of dtype.group_size. Throws std::invalid_argument for
/// page_size <= 0, a page_size that is not a multiple of the group, a non-positive shape or an
/// invalid dtype; std::length_error when the count does not fit 64 bits.
constexpr std::int64_t kv_page_bytes(std::int64_t page_size, std::int64_t layers,
                                     std::int64_t kv_heads, std::int64_t head_dim,
                                     const kv_dtype& dtype) {
  return detail::page_bytes_of(
      page_size,
      detail::kv_page_rows("kv_page_bytes", page_size, layers, kv_heads, head_dim, dtype));
}

/// Bytes of the pages of `batch` sequences of `seq_len` tokens: batch x kv_pages_for_tokens(
/// seq_len, page_size) x kv_page_bytes(page_size, ...). At least kv_cache_bytes(batch,
/// seq_len, ...); more by kv_paged_waste_bytes. Throws std::invalid_argument for a negative
/// batch or seq_len and as kv_page_bytes does; std::length_error when a count does not fit 64
/// bits.
constexpr std::int64_t kv_paged_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                            std::int64_t page_size, std::int64_t layers,
                                            std::int64_t kv_heads, std::int64_t head_dim,
                                            const kv_dtype& dtype) {
  return detail::paged_bytes_of(
      "kv_paged_cache_bytes", batch, seq_len, page_size,
      detail::kv_page_rows("kv_paged_cache_bytes", page_size, layers, kv_heads, head_dim, dtype));
}

/// What paging costs beyond a contiguous cache: kv_paged_cache_bytes - kv_cache_bytes, the
/// bytes of the unused token slots in the last page of each sequence, batch x (pages x
/// page_size - seq_len) slots; 0 when page_size divides seq_len. Below batch x page bytes (at
/// most one partly filled page a sequence) when a page is whole bytes, as it is for f32, f16,
/// bf16, int8 and int4; a page of a custom dtype that is not is rounded up to a byte, and that
/// rounding counts too. Throws as kv_paged_cache_bytes does.
constexpr std::int64_t kv_paged_waste_bytes(std::int64_t batch, std::int64_t seq_len,
                                            std::int64_t page_size, std::int64_t layers,
                                            std::int64_t kv_heads, std::int64_t head_dim,
                                            const kv_dtype& dtype) {
  return detail::paged_waste_of(
      "kv_paged_waste_bytes", batch, seq_len, page_size,
      detail::kv_page_rows("kv_paged_waste_bytes", page_size, layers, kv_heads, head_dim, dtype));
}

/// How many whole pages `budget_bytes` holds: floor(budget_bytes / kv_page_bytes(page_size,
/// ...)). Throws std::invalid_argument for a negative budget and as kv_page_bytes does;
/// std::length_error when a page's bytes do not fit 64 bits.
constexpr std::int64_t kv_pages_that_fit(std::int64_t budget_bytes, std::int64_t page_size,
                                         std::int64_t layers, std::int64_t kv_heads,
                                         std::int64_t head_dim, const kv_dtype& dtype) {
  return detail::pages_within(
      "kv_pages_that_fit", budget_bytes, page_size,
      detail::kv_page_rows("kv_pages_that_fit", page_size, layers, kv_heads, head_dim, dtype));
}

/// How many tokens `budget_bytes` holds in pages: kv_pages_that_fit(...) x page_size token
/// slots, a multiple of page_size, at most kv_tokens_that_fit(budget_bytes, 1, ...). Throws as
/// kv_pages_that_fit does, and std::length_error when the slots do not fit 64 bits.
constexpr std::int64_t kv_paged_tokens_that_fit(std::int64_t budget_bytes, std::int64_t page_size,
                                                std::int64_t layers, std::int64_t kv_heads,
                                                std::int64_t head_dim, const kv_dtype& dtype) {
  return detail::paged_tokens_within(
      "kv_paged_tokens_that_fit", budget_bytes, page_size,
      detail::kv_page_rows("kv_paged_tokens_that_fit", page_size, layers, kv_heads, head_dim,
                           dtype));
}

/// Bytes of one page of an MLA cache: `page_size` tokens counted as kv_latent_cache_bytes(1,
/// page_size, ...) counts them. Quantized latents are grouped along the channels of each token,
/// so any page_size holds whole groups. Throws std::invalid_argument for page_size <= 0 and as
/// kv_latent_bytes_per_token does; std::length_error when the count does not fit 64 bits.
constexpr std::int64_t kv_latent_page_bytes(std::int64_t page_size, std::int64_t layers,
                                            std::int64_t latent_dim, std::int64_t rope_dim,
                                            const kv_dtype& dtype) {
  return detail::page_bytes_of(
      page_size, detail::latent_page_rows("kv_latent_page_bytes", page_size, layers, latent_dim,
                                          rope_dim, dtype));
}

/// Bytes of the pages of an MLA cache, as kv_paged_cache_bytes for kv_latent_page_bytes.
constexpr std::int64_t kv_latent_paged_cache_bytes(std::int64_t batch, std::int64_t seq_len,
                                                   std::int64_t page_size, std::int64_t layers,
                                                   std::int64_t latent_dim, std::int64_t rope_dim,
                                                   const kv_dtype& dtype) {
  return detail::paged_bytes_of(
      "kv_latent_paged_cache_bytes", batch, seq_len, page_size,
      detail::latent_page_rows("kv_latent_paged_cache_bytes", page_size, layers, latent_dim,
                               rope_dim, dtype));
}

/// kv_latent_paged_cache_bytes - kv_latent_cache_bytes, as kv_paged_waste_bytes.
constexpr std::int64_t kv_latent_paged_waste_bytes(std::int64_t batch, std::int64_t seq_len,
                                                   std::int64_t page_size, std::int64_t layers,
                                                   std::int64_t latent_dim, std::int64_t rope_dim,
                                                   const kv_dtype& dtype) {
  return detail::paged_waste_of(
      "kv_latent_paged_waste_bytes", batch, seq_len, page_size,
      detail::latent_page_rows("kv_latent_paged_waste_bytes", page_size, layers, latent_dim,
                               rope_dim, dtype));
}

/// Whole MLA pages that fit `budget_bytes`, as kv_pages_that_fit.
constexpr std::int64_t kv_latent_pages_that_fit(std::int64_t budget_bytes, std::int64_t page_size,
                                                std::int64_t layers, std::int64_t latent_dim,
                                                std::int64_t rope_dim, const kv_dtype& dtype) {
  return detail::pages_within(
      "kv_latent_pages_that_fit", budget_bytes, page_size,
      detail::latent_page_rows("kv_latent_pages_that_fit", page_size, layers, latent_dim,
                               rope_dim, dtype));
}

/// Token slots in the MLA pages that fit `budget_bytes`, as kv_paged_tokens_that_fit.
constexpr std::int64_t kv_latent_paged_tokens_that_fit(std::int64_t budget_bytes,
                                                       std::int64_t page_size,
                                                       std::int64_t layers,
                                                       std::int64_t latent_dim,
                                                       std::int64_t rope_dim,
                                                       const kv_dtype& dtype) {
  return detail::paged_tokens_within(
      "kv_latent_paged_tokens_that_fit", budget_bytes, page_size,
      detail::latent_page_rows("kv_latent_paged_tokens_that_fit", page_size, layers, latent_dim,
                               rope_dim, dtype));
}

}  // namespace kvcache
