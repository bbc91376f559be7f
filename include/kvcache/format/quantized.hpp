// SPDX-License-Identifier: Apache-2.0
// The quantized formats (KIVI): int8/int4 codes, keys per channel over groups of tokens, values
// per token over groups of channels, an fp16 scale and zero point per group.
#pragma once

#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/format/quantized_kernel.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/types.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace kvcache {

/// Quantized keys and values after KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric
/// 2bit Quantization for KV Cache"). A stored unit is a group of `group_size` tokens: keys are
/// quantized per channel over the group's tokens (the outlier channels of keys stay within
/// their own range), values per token over groups of `group_size` consecutive channels (the
/// last group shorter when group_size does not divide head_dim). Each group stores `Bits`-bit
/// codes (8 or 4; int4 packs two per byte, the even channel in the low nibble) with an fp16
/// scale (max - min) / (2^Bits - 1) and an fp16 zero point (the min); an element reads back as
/// scale * code + zero, to within half a scale step (plus fp16 rounding of scale and zero).
///
/// The cache keeps the newest tokens in full precision (float) until `residual + group_size`
/// of them have gathered; then the oldest group_size are quantized into a unit. So the
/// `residual` newest tokens are always exact.
///
/// Non-finite values: a group that holds a NaN or infinite element stores a NaN scale, so all
/// its elements read back as NaN and attention over them is NaN, as it is over a plain cache.
/// Finite values beyond fp16's range (65504) saturate the scale to infinity: keep keys and
/// values within fp16's range.
///
/// with_values_in_keys(true) stores keys only, for shapes whose values are the first columns
/// of the keys (attention_shape::values_in_keys, MLA's latent): rows are quantized as keys
/// (per channel over groups of tokens, which keeps RoPE's outlier channels in their own
/// range), no value codes or value scales are allocated, and attention dequantizes the key
/// rows it reads as values too.
template <int Bits>
class quantized_format {
  static_assert(Bits == 8 || Bits == 4, "kvcache: quantized_format holds int8 or int4 codes");

 public:
  using scalar_type = quantized_code<Bits>;
  using compute_type = float;
  using block_type = detail::quantized_block<Bits>;

  static constexpr bool lossless = false;
  /// Largest code: 255 for int8, 15 for int4.
  static constexpr int max_code = (1 << Bits) - 1;

  /// Throws std::invalid_argument unless group_size >= 1 and residual >= 0.
  explicit quantized_format(Index group_size = 32, Index residual = 0)
      : group_(group_size), residual_(residual) {
    if (group_size < 1) {
      detail::fail<std::invalid_argument>("quantized_format: group_size must be >= 1, got ",
                                          group_size);
    }
    if (residual < 0) {
      detail::fail<std::invalid_argument>("quantized_format: residual must be >= 0, got ",
                                          residual);
    }
    detail::checked_add(residual, group_size, "quantized_format: residual + group_size");
  }

  Index group_size() const noexcept { return group_; }
  Index unit_tokens() const noexcept { return group_; }
  Index residual() const noexcept { return residual_; }
  /// "int8" or "int4"; storing keys only, followed by " keys only".
  std::string name() const {
    return std::string(scalar_traits<scalar_type>::name) + (keys_only_ ? " keys only" : "");
  }
  /// The format as memory.hpp's formulas count it.
  kv_dtype dtype() const noexcept {
    return Bits == 8 ? kv_dtype::int8(static_cast<int>(group_))
                     : kv_dtype::int4(static_cast<int>(group_));
  }
  /// Throws std::invalid_argument (naming fn) when a group does not fit memory.hpp's int group.
  void check(const char* fn, Index /*head_dim*/) const {
    if (group_ > 1 << 30) {
      detail::fail<std::invalid_argument>(fn, ": group_size = ", group_, " exceeds 2^30");
    }
  }

  /// Bytes of one unit (group_size tokens) of `heads` kv heads, keys and values (keys only,
  /// with values in keys), scales and zero points included.
  Index unit_bytes(Index heads, Index d) const {
    const Index codes = detail::checked_product({keys_only_ ? 1 : 2, group_, code_row_bytes(d)},
                                                "quantized_format");
    const Index key_scales = detail::checked_mul(4, d, "quantized_format");
    const Index value_scales =
        keys_only_ ? 0 : detail::checked_product({4, group_, value_groups(d)}, "quantized_format");
    return detail::checked_mul(heads, codes + key_scales + value_scales, "quantized_format");
  }

  /// Whether values are read from the keys and not stored.
  bool values_in_keys() const noexcept { return keys_only_; }
  /// This format storing keys only (`on`) or keys and values.
  quantized_format with_values_in_keys(bool on) const noexcept {
    quantized_format out(*this);
    out.keys_only_ = on;
    return out;
  }

  friend bool operator==(const quantized_format& a, const quantized_format& b) noexcept {
    return a.group_ == b.group_ && a.residual_ == b.residual_ && a.keys_only_ == b.keys_only_;
  }
  friend bool operator!=(const quantized_format& a, const quantized_format& b) noexcept {
    return !(a == b);
  }

  /// Room for `slots` units of every kv head.
  struct storage {
    detail::buffer<std::uint8_t> key_codes;    // [kv_head][slot * group + t][code_row_bytes]
    detail::buffer<std::uint8_t> value_codes;  // same layout
    detail::buffer<Eigen::half> key_scales;    // [kv_head][slot][head_dim]
    detail::buffer<Eigen::half> key_zeros;     // same layout
    detail::buffer<Eigen::half> value_scales;  // [kv_head][slot * group + t][value_groups]
    detail::buffer<Eigen::half> value_zeros;   // same layout
    Index heads = 0;
    Index dim = 0;
    Index slots = 0;
    Index group = 0;
    bool keys_only = false;  // no value codes, scales or zero points
  };

  storage allocate(Index heads, Index d, Index slots) const {
    const Index tokens = detail::checked_product({heads, slots, group_}, "cache capacity");
    detail::checked_mul(slots, unit_bytes(heads, d), "cache capacity");
    storage s;
    s.key_codes = detail::buffer<std::uint8_t>(detail::checked_mul(tokens, code_row_bytes(d)));
    s.key_scales = detail::buffer<Eigen::half>(heads * slots * d);
    s.key_zeros = detail::buffer<Eigen::half>(heads * slots * d);
    if (!keys_only_) {
      s.value_codes = detail::buffer<std::uint8_t>(tokens * code_row_bytes(d));
      s.value_scales = detail::buffer<Eigen::half>(tokens * value_groups(d));
      s.value_zeros = detail::buffer<Eigen::half>(tokens * value_groups(d));
    }
    s.keys_only = keys_only_;
    s.heads = heads;
    s.dim = d;
    s.slots = slots;
    s.group = group_;
    return s;
  }

  /// Calls f(elements per unit, the array of each storage) for every array of the format, in
  /// the order format/units.hpp copies and visits them.
  template <class F, class S0, class... S>
  static void for_each_array(F&& f, S0& s0, S&... s) {
    if (s0.slots == 0) return;  // nothing allocated yet (group 0): no array holds a unit
    const Index d = s0.dim, g = s0.group, codes = g * code_row_bytes(d);
    const Index scales = g * value_groups_of(d, g);
    f(codes, s0.key_codes, s.key_codes...);
    if (!s0.keys_only) f(codes, s0.value_codes, s.value_codes...);
    f(d, s0.key_scales, s.key_scales...);
    f(d, s0.key_zeros, s.key_zeros...);
    if (s0.keys_only) return;
    f(scales, s0.value_scales, s.value_scales...);
    f(scales, s0.value_zeros, s.value_zeros...);
  }

  /// Quantizes the rows of `k` and `v` (`n * group_size x heads*head_dim`) into units
  /// [slot, slot + n). Room must exist.
  template <class K, class V>
  void write(storage& s, Index slot, const K& k, const V& v) const {
    const Index g = group_;
    for (Index u = 0; u < k.rows() / g; ++u) {
      for (Index h = 0; h < s.heads; ++h) {
        quantize_unit(s, h, slot + u, k.block(u * g, h * s.dim, g, s.dim),
                      v.block(u * g, h * s.dim, g, s.dim));
      }
    }
  }

  /// Dequantizes units [slot, slot + n) into the first n * group_size rows of `k` and `v`
  /// (keys only: the keys into both).
  template <class K, class V>
  void read(const storage& s, Index slot, Index n, K&& k, V&& v) const {
    const Index d = s.dim, row = code_row_bytes(d), vg = value_groups(d);
    for (Index h = 0; h < s.heads; ++h) {
      for (Index t = 0; t < n * group_; ++t) {
        const Index token = (h * s.slots + slot) * group_ + t;
        const Index unit = h * s.slots + slot + t / group_;
        for (Index x = 0; x < d; ++x) {
          k(t, h * d + x) =
              float(s.key_scales.data()[unit * d + x]) *
                  float(detail::code_at<Bits>(s.key_codes.data() + token * row, x)) +
              float(s.key_zeros.data()[unit * d + x]);
          if (s.keys_only) {
            v(t, h * d + x) = k(t, h * d + x);
            continue;
          }
          v(t, h * d + x) =
              float(s.value_scales.data()[token * vg + x / group_]) *
                  float(detail::code_at<Bits>(s.value_codes.data() + token * row, x)) +
              float(s.value_zeros.data()[token * vg + x / group_]);
        }
      }
    }
  }

  block_type block(const storage& s, Index h, Index slot, Index n) const noexcept {
    const Index d = s.dim, token = (h * s.slots + slot) * group_, unit = h * s.slots + slot;
    block_type b;
    b.tokens = n * group_;
    b.group = group_;
    b.key_codes = s.key_codes.data() + token * code_row_bytes(d);
    b.key_scales = s.key_scales.data() + unit * d;
    b.key_zeros = s.key_zeros.data() + unit * d;
    if (s.keys_only) return b;  // values are read from the keys
    b.value_codes = s.value_codes.data() + token * code_row_bytes(d);
    b.value_scales = s.value_scales.data() + token * value_groups(d);
    b.value_zeros = s.value_zeros.data() + token * value_groups(d);
    return b;
  }

  /// Bytes of one token's codes for one kv head: head_dim for int8, ceil(head_dim / 2) for int4.
  static constexpr Index code_row_bytes(Index d) noexcept { return detail::code_row_bytes<Bits>(d); }
  /// Value groups per token and kv head: ceil(head_dim / group_size).
  Index value_groups(Index d) const noexcept { return value_groups_of(d, group_); }

 private:
  static Index value_groups_of(Index d, Index g) noexcept { return detail::ceil_div(d, g); }

  // Code of x for a group whose stored scale and zero point are `scale` and `zero`:
  // round((x - zero) / scale), ties away from zero, clamped to [0, max_code]; 0 for a
  // constant group (scale 0) and for a non-finite group (NaN scale).
  static int quantize(float x, float scale, float zero) noexcept {
    if (!(scale > 0.0f) || !std::isfinite(scale)) return 0;
    const float c = (x - zero) / scale;
    // For 0.5 <= c < max_code + 0.5, c + 0.5 truncated is std::round(c), without a call.
    return c >= float(max_code) ? max_code : c >= 0.5f ? static_cast<int>(c + 0.5f) : 0;
  }

  static void put_code(std::uint8_t* row, Index x, int code) noexcept {
    if constexpr (Bits == 8) {
      row[x] = static_cast<std::uint8_t>(code);
    } else {
      const int shift = 4 * static_cast<int>(x & 1);
      row[x / 2] = static_cast<std::uint8_t>((row[x / 2] & ~(0x0F << shift)) | (code << shift));
    }
  }

  // Fp16 scale and zero point of a group whose elements lie in [lo, hi]; a NaN scale when
  // the group holds a non-finite element.
  template <class Group>
  static std::pair<Eigen::half, Eigen::half> scale_zero(const Group& x) noexcept {
    if (!x.allFinite()) {
      return {Eigen::half(std::numeric_limits<float>::quiet_NaN()), Eigen::half(0.0f)};
    }
    const float lo = x.minCoeff(), hi = x.maxCoeff();
    return {Eigen::half((hi - lo) / float(max_code)), Eigen::half(lo)};
  }

  // Quantizes one group of tokens (float rows of K and V, `group x head_dim`) of kv head h
  // into unit `slot`. Allocates nothing.
  template <class K, class V>
  void quantize_unit(storage& s, Index h, Index slot, const K& Kf, const V& Vf) const {
    static_assert(std::is_same_v<typename K::Scalar, float> &&
                      std::is_same_v<typename V::Scalar, float>,
                  "kvcache: quantized units are written from float rows");
    const Index d = s.dim, g = group_, row = code_row_bytes(d), vg = value_groups(d);
    const Index token0 = (h * s.slots + slot) * g, unit = h * s.slots + slot;
    std::uint8_t* kcodes = s.key_codes.data() + token0 * row;
    if constexpr (Bits == 4) std::memset(kcodes, 0, static_cast<std::size_t>(g * row));
    // Keys per channel over the group's tokens.
    for (Index x = 0; x < d; ++x) {
      const auto [scale, zero] = scale_zero(Kf.col(x));
      s.key_scales.data()[unit * d + x] = scale;
      s.key_zeros.data()[unit * d + x] = zero;
      const float sf = float(scale), zf = float(zero);
      for (Index t = 0; t < g; ++t) put_code(kcodes + t * row, x, quantize(Kf(t, x), sf, zf));
    }
    if (s.keys_only) return;
    std::uint8_t* vcodes = s.value_codes.data() + token0 * row;
    if constexpr (Bits == 4) std::memset(vcodes, 0, static_cast<std::size_t>(g * row));
    // Values per token over groups of channels.
    for (Index t = 0; t < g; ++t) {
      for (Index j = 0; j < vg; ++j) {
        const Index x0 = j * g, n = std::min(d, x0 + g) - x0;
        const auto [scale, zero] = scale_zero(Vf.row(t).segment(x0, n));
        s.value_scales.data()[(token0 + t) * vg + j] = scale;
        s.value_zeros.data()[(token0 + t) * vg + j] = zero;
        const float sf = float(scale), zf = float(zero);
        for (Index x = x0; x < x0 + n; ++x) put_code(vcodes + t * row, x, quantize(Vf(t, x), sf, zf));
      }
    }
  }

  Index group_ = 32;
  Index residual_ = 0;
  bool keys_only_ = false;
};

}  // namespace kvcache
