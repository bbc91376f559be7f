// SPDX-License-Identifier: Apache-2.0
// The plain format: every token's key and value stored as head_dim scalars (f64, f32, f16, bf16).
#pragma once

#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <string>

namespace kvcache {

/// Keys and values stored as `Scalar` (float, double, Eigen::half, Eigen::bfloat16), read by
/// the kernels in place and widened in registers. A format is a policy of the whole-model
/// cache: it says how a run of stored units is laid out (for_each_array), written, read back
/// and handed to attention. Here a unit is one token, and nothing is kept in a full-precision tail.
///
/// Non-finite values are stored as they come (NaN stays NaN, a value beyond a 16-bit type's
/// range becomes infinite).
///
/// with_values_in_keys(true) stores keys only, for shapes whose values are the first columns
/// of the keys (attention_shape::values_in_keys, MLA's latent): no value array is allocated,
/// write ignores the values, and blocks hand out the key rows as values.
template <class Scalar>
class plain_format {
 public:
  using scalar_type = Scalar;
  using compute_type = compute_t<Scalar>;
  using block_type = kv_block<Scalar>;

  /// Whether a stored token reads back exactly as it was written (after conversion to Scalar).
  static constexpr bool lossless = true;

  /// Tokens per stored unit.
  Index unit_tokens() const noexcept { return 1; }
  /// The newest tokens kept in full precision before they are stored: none.
  Index residual() const noexcept { return 0; }
  /// "f64", "f32", "f16" or "bf16"; storing keys only, followed by " keys only" (so that a
  /// saved cache of one is never loaded into a cache of the other).
  std::string name() const {
    return std::string(scalar_traits<Scalar>::name) + (keys_only_ ? " keys only" : "");
  }
  /// Nothing to check: every head_dim is stored as is.
  void check(const char* /*fn*/, Index /*head_dim*/) const noexcept {}
  /// Bytes of one stored unit, keys and values (keys only, with values in keys) of `heads` kv
  /// heads of `head_dim`.
  Index unit_bytes(Index heads, Index head_dim) const {
    return detail::checked_product({arrays(), heads, head_dim, Index(sizeof(Scalar))},
                                   "plain_format");
  }

  /// Whether values are read from the keys and not stored.
  bool values_in_keys() const noexcept { return keys_only_; }
  /// This format storing keys only (`on`) or keys and values.
  plain_format with_values_in_keys(bool on) const noexcept {
    plain_format out(*this);
    out.keys_only_ = on;
    return out;
  }

  friend bool operator==(const plain_format& a, const plain_format& b) noexcept {
    return a.keys_only_ == b.keys_only_;
  }
  friend bool operator!=(const plain_format& a, const plain_format& b) noexcept {
    return !(a == b);
  }

  /// Room for `slots` units of every kv head: [kv_head][slot][head_dim] for keys and values
  /// (no values when keys_only).
  struct storage {
    detail::buffer<Scalar> keys;
    detail::buffer<Scalar> values;
    Index heads = 0;
    Index dim = 0;
    Index slots = 0;
    bool keys_only = false;
  };

  /// Allocates room for `slots` units. Throws std::length_error when the size overflows,
  /// std::bad_alloc when memory is short.
  storage allocate(Index heads, Index head_dim, Index slots) const {
    const Index n = detail::checked_product({heads, head_dim, slots}, "cache capacity");
    detail::checked_mul(n, arrays() * Index(sizeof(Scalar)), "cache capacity");
    storage s;
    s.keys = detail::buffer<Scalar>(n);
    if (!keys_only_) s.values = detail::buffer<Scalar>(n);
    s.heads = heads;
    s.dim = head_dim;
    s.slots = slots;
    s.keys_only = keys_only_;
    return s;
  }

  /// Calls f(elements per unit, the array of each storage) for keys, then values (unless keys
  /// only): the arrays that format/units.hpp copies and visits.
  template <class F, class S0, class... S>
  static void for_each_array(F&& f, S0& s0, S&... s) {
    f(s0.dim, s0.keys, s.keys...);
    if (!s0.keys_only) f(s0.dim, s0.values, s.values...);
  }

  /// Writes the rows of `k` and `v` (`n x heads*head_dim`, heads side by side) as units
  /// [slot, slot + n). Room must exist.
  template <class K, class V>
  void write(storage& s, Index slot, const K& k, const V& v) const {
    const Index n = k.rows(), d = s.dim;
    for (Index h = 0; h < s.heads; ++h) {
      Eigen::Map<row_matrix<Scalar>> kd(s.keys.data() + (h * s.slots + slot) * d, n, d);
      kd = k.middleCols(h * d, d).template cast<Scalar>();
      if (s.keys_only) continue;
      Eigen::Map<row_matrix<Scalar>> vd(s.values.data() + (h * s.slots + slot) * d, n, d);
      vd = v.middleCols(h * d, d).template cast<Scalar>();
    }
  }

  /// Reads units [slot, slot + n) back into the first n rows of `k` and `v` (keys only: the
  /// keys into both).
  template <class K, class V>
  void read(const storage& s, Index slot, Index n, K&& k, V&& v) const {
    const Index d = s.dim;
    for (Index h = 0; h < s.heads; ++h) {
      Eigen::Map<const row_matrix<Scalar>> ks(s.keys.data() + (h * s.slots + slot) * d, n, d);
      const Scalar* values = s.keys_only ? s.keys.data() : s.values.data();
      Eigen::Map<const row_matrix<Scalar>> vs(values + (h * s.slots + slot) * d, n, d);
      k.block(0, h * d, n, d) = ks.template cast<compute_type>();
      v.block(0, h * d, n, d) = vs.template cast<compute_type>();
    }
  }

  /// Units [slot, slot + n) of kv head h as attention reads them (keys only: the key rows
  /// stand for the values too).
  block_type block(const storage& s, Index h, Index slot, Index n) const noexcept {
    const Index at = (h * s.slots + slot) * s.dim;
    const Scalar* values = s.keys_only ? s.keys.data() : s.values.data();
    return {s.keys.data() + at, values + at, n, s.dim};
  }

 private:
  Index arrays() const noexcept { return keys_only_ ? 1 : 2; }

  bool keys_only_ = false;
};

}  // namespace kvcache
