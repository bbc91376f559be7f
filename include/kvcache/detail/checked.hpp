// SPDX-License-Identifier: Apache-2.0
// Checked size arithmetic: a product or sum of sizes that would overflow is std::length_error.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <initializer_list>
#include <stdexcept>

namespace kvcache::detail {

/// a * b, or std::length_error naming `what` and both values when it would overflow Index.
/// constexpr, so compile-time size formulas use it too.
constexpr Index checked_mul(Index a, Index b, const char* what = "size") {
  Index out = 0;
  if (__builtin_mul_overflow(a, b, &out)) {
    fail<std::length_error>(what, ": ", a, " x ", b, " overflows a 64-bit size");
  }
  return out;
}

/// a + b, or std::length_error naming `what` and both values when it would overflow Index.
constexpr Index checked_add(Index a, Index b, const char* what = "size") {
  Index out = 0;
  if (__builtin_add_overflow(a, b, &out)) {
    fail<std::length_error>(what, ": ", a, " + ", b, " overflows a 64-bit size");
  }
  return out;
}

/// The product of every factor, checked as checked_mul.
constexpr Index checked_product(std::initializer_list<Index> factors, const char* what = "size") {
  Index out = 1;
  for (const Index f : factors) out = checked_mul(out, f, what);
  return out;
}

/// Whether the product of the factors overflows Index, for callers that name every factor in
/// their own message.
constexpr bool product_overflows(std::initializer_list<Index> factors) noexcept {
  Index out = 1;
  for (const Index f : factors) {
    if (__builtin_mul_overflow(out, f, &out)) return true;
  }
  return false;
}

/// a / b rounded up, for a >= 0 and b > 0, without overflow.
constexpr Index ceil_div(Index a, Index b) noexcept { return a / b + (a % b != 0 ? 1 : 0); }

}  // namespace kvcache::detail
