// SPDX-License-Identifier: Apache-2.0
// Quantized KV cache (KIVI): int8/int4 keys per channel, values per token, recent tokens exact.
#pragma once

#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/kernel.hpp"
#include "kvcache/attention/quantized_kernel.hpp"
#include "kvcache/cache/block.hpp"
#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

namespace kvcache {

/// One layer of a quantized_cache as attention reads it, per kv head: the quantized tokens
/// as one block, then the full-precision residual as one or two blocks (two when its ring
/// buffer has wrapped). A non-owning, trivially copyable view, valid until the cache is next
/// modified. decode_attention (and causal_attention) take it like any other view.
template <int Bits>
struct quantized_view {
  using scalar_type = quantized_code<Bits>;
  using block_type = detail::quantized_block<Bits>;

  /// `tokens` consecutive residual slots from `slot` on.
  struct run {
    Index slot = 0;
    Index tokens = 0;
  };

  const std::uint8_t* key_codes = nullptr;    // [kv_head][token][head_dim * Bits / 8]
  const std::uint8_t* value_codes = nullptr;  // same layout
  const Eigen::half* key_scales = nullptr;    // [kv_head][token / group][head_dim]
  const Eigen::half* key_zeros = nullptr;     // same layout
  const Eigen::half* value_scales = nullptr;  // [kv_head][token][head_dim / group]
  const Eigen::half* value_zeros = nullptr;   // same layout
  const float* residual_keys = nullptr;       // [kv_head][slot][head_dim]
  const float* residual_values = nullptr;     // same layout
  Index code_head_stride = 0;                 // between heads, in bytes of codes
  Index key_scale_head_stride = 0;            // in key scales
  Index value_scale_head_stride = 0;          // in value scales
  Index residual_head_stride = 0;             // in floats
  Index kv_heads = 0;
  Index dim = 0;
  Index group = 0;
  Index quantized_tokens = 0;
  Index residual_blocks = 0;
  std::array<run, 2> runs{};  // the first `residual_blocks` hold the residual, oldest first

  Index n_kv_heads() const noexcept { return kv_heads; }
  Index head_dim() const noexcept { return dim; }
  Index size() const noexcept { return quantized_tokens + runs[0].tokens + runs[1].tokens; }
  Index n_blocks() const noexcept { return (quantized_tokens > 0 ? 1 : 0) + residual_blocks; }
  block_type block(Index kv_head, Index i) const noexcept {
    block_type b;
    if (quantized_tokens > 0 && i == 0) {
      b.tokens = quantized_tokens;
      b.quantized = true;
      b.group = group;
      b.key_codes = key_codes + kv_head * code_head_stride;
      b.value_codes = value_codes + kv_head * code_head_stride;
      b.key_scales = key_scales + kv_head * key_scale_head_stride;
      b.key_zeros = key_zeros + kv_head * key_scale_head_stride;
      b.value_scales = value_scales + kv_head * value_scale_head_stride;
      b.value_zeros = value_zeros + kv_head * value_scale_head_stride;
      return b;
    }
    const run& r = runs[static_cast<std::size_t>(quantized_tokens > 0 ? i - 1 : i)];
    const Index offset = kv_head * residual_head_stride + r.slot * dim;
    b.tokens = r.tokens;
    b.residual = {residual_keys + offset, residual_values + offset, r.tokens, dim};
    return b;
  }
};

/// One layer of a quantized KV cache, after KIVI (Liu et al., 2024): per kv head, a quantized
/// region of whole groups of tokens and a full-precision (float) residual of the most recent
/// ones. Keys are quantized per channel over groups of `group_size` consecutive tokens (the
/// outlier channels of keys stay within their own range); values per token over groups of
/// `group_size` consecutive channels. Each group stores `Bits`-bit codes (8 or 4; int4 packs
/// two per byte, the even channel in the low nibble) with an fp16 scale (max - min) /
/// (2^Bits - 1) and an fp16 zero point (the min); an element reads back as
/// scale * code + zero. Keys and values must lie within fp16's range.
///
/// Appending puts tokens in the residual; when it holds `residual + group_size` tokens, the
/// oldest `group_size` are quantized and leave it. So the `residual` most recent tokens are
/// always exact, and with residual 0 fewer than group_size tokens are (the key group that is
/// still filling). Appending many tokens equals appending them one at a time. Every member
/// that throws leaves the layer exactly as it was.
template <int Bits>
class quantized_layer {
  static_assert(Bits == 8 || Bits == 4, "kvcache: quantized_layer holds int8 or int4 codes");

 public:
  using view_type = quantized_view<Bits>;

  /// Largest code: 255 for int8, 15 for int4.
  static constexpr int max_code = (1 << Bits) - 1;

  /// An empty layer; nothing is allocated until the first append or reserve. Throws
  /// std::invalid_argument for non-positive sizes, a group_size that is not a multiple of 16
  /// (the widest float SIMD register, so a group is whole registers) or does not divide
  /// head_dim, and a residual that is negative or not a multiple of group_size.
  quantized_layer(Index n_kv_heads, Index head_dim, Index group_size = 32, Index residual = 0)
      : n_kv_heads_(n_kv_heads), head_dim_(head_dim), group_(group_size), residual_(residual) {
    if (n_kv_heads <= 0 || head_dim <= 0) {
      detail::fail<std::invalid_argument>(
          "quantized_layer: n_kv_heads and head_dim must be positive, got ", n_kv_heads, " and ",
          head_dim);
    }
    if (group_size <= 0 || group_size % 16 != 0 || head_dim % group_size != 0) {
      detail::fail<std::invalid_argument>("quantized_layer: group_size = ", group_size,
                                          " must be a positive multiple of 16 that divides "
                                          "head_dim = ", head_dim);
    }
    if (residual < 0 || residual % group_size != 0) {
      detail::fail<std::invalid_argument>("quantized_layer: residual = ", residual,
                                          " must be >= 0 and a multiple of group_size = ",
                                          group_size);
    }
  }

  /// Deep copy.
  quantized_layer(const quantized_layer& other)
      : n_kv_heads_(other.n_kv_heads_), head_dim_(other.head_dim_), group_(other.group_),
        residual_(other.residual_) {
    if (other.ring_keys_.data() == nullptr) return;  // nothing allocated yet
    quantized_layer copy = other.regrown(other.capacity_);
    swap(copy);
  }
  quantized_layer& operator=(const quantized_layer& other) {
    if (this != &other) {
      quantized_layer copy(other);
      swap(copy);
    }
    return *this;
  }
  quantized_layer(quantized_layer&& other) noexcept { swap(other); }
  quantized_layer& operator=(quantized_layer&& other) noexcept {
    swap(other);
    return *this;
  }
  ~quantized_layer() = default;

  void swap(quantized_layer& other) noexcept {
    std::swap(n_kv_heads_, other.n_kv_heads_);
    std::swap(head_dim_, other.head_dim_);
    std::swap(group_, other.group_);
    std::swap(residual_, other.residual_);
    std::swap(quantized_, other.quantized_);
    std::swap(capacity_, other.capacity_);
    std::swap(ring_start_, other.ring_start_);
    std::swap(ring_size_, other.ring_size_);
    key_codes_.swap(other.key_codes_);
    value_codes_.swap(other.value_codes_);
    key_scales_.swap(other.key_scales_);
    key_zeros_.swap(other.key_zeros_);
    value_scales_.swap(other.value_scales_);
    value_zeros_.swap(other.value_zeros_);
    ring_keys_.swap(other.ring_keys_);
    ring_values_.swap(other.ring_values_);
  }

  Index n_kv_heads() const noexcept { return n_kv_heads_; }
  Index head_dim() const noexcept { return head_dim_; }
  /// Width of one token's keys: n_kv_heads * head_dim.
  Index kv_width() const noexcept { return n_kv_heads_ * head_dim_; }
  /// Tokens per key group and channels per value group.
  Index group_size() const noexcept { return group_; }
  /// Most recent tokens that always stay in full precision.
  Index residual() const noexcept { return residual_; }
  /// Tokens held, quantized or not.
  Index size() const noexcept { return quantized_ + ring_size_; }
  bool empty() const noexcept { return size() == 0; }
  /// Tokens held as codes (a multiple of group_size).
  Index quantized_size() const noexcept { return quantized_; }
  /// Tokens held in full precision (the most recent ones).
  Index residual_size() const noexcept { return ring_size_; }
  /// Quantized tokens that fit before the next reallocation.
  Index capacity() const noexcept { return capacity_; }
  /// The format of the quantized tokens, for memory.hpp's formulas.
  kv_dtype dtype() const noexcept {
    return Bits == 8 ? kv_dtype::int8(static_cast<int>(group_))
                     : kv_dtype::int4(static_cast<int>(group_));
  }

  /// Bytes one quantized token takes, keys and values of every kv head, scales and zero
  /// points included: 2 * n_kv_heads * head_dim * (Bits / 8 + 4 / group_size), which is
  /// memory.hpp's kv_bytes_per_token(1, n_kv_heads, head_dim, dtype()).
  Index quantized_bytes_per_token() const noexcept {
    return 2 * n_kv_heads_ * (code_row_bytes() + 4 * head_dim_ / group_);
  }
  /// Bytes held: the codes, scales and zero points of the quantized tokens plus
  /// 2 * 4 * n_kv_heads * head_dim per residual token.
  Index bytes() const noexcept {
    return quantized_ * quantized_bytes_per_token() +
           ring_size_ * 2 * kv_width() * Index(sizeof(float));
  }
  /// Bytes allocated, used or not.
  Index capacity_bytes() const noexcept {
    return capacity_ * quantized_bytes_per_token() +
           (ring_keys_.size() + ring_values_.size()) * Index(sizeof(float));
  }

  /// Makes room for `tokens` tokens without further allocation. Never shrinks.
  /// Throws std::length_error for a count memory cannot address, std::bad_alloc when memory is
  /// short; the layer is unchanged either way.
  void reserve(Index tokens) {
    if (has_room(tokens)) return;
    quantized_layer grown = reserved(tokens);
    swap(grown);
  }

  /// A copy of this layer with room for `tokens` tokens. Throws as reserve() does.
  quantized_layer reserved(Index tokens) const {
    check_fits("reserve", tokens);
    return regrown(std::max(tokens / group_ * group_, capacity_));
  }

  /// Whether `tokens` tokens fit without allocation: quantized tokens never exceed
  /// tokens rounded down to a multiple of group_size.
  bool has_room(Index tokens) const noexcept {
    return tokens / group_ * group_ <= capacity_ && ring_keys_.data() != nullptr;
  }

  /// Appends `k.rows()` tokens. `k` and `v` are `(tokens x n_kv_heads*head_dim)`, one row per
  /// token with the heads side by side, of any scalar type convertible to float. Quantizes a
  /// group of keys and values of every kv head whenever the residual fills: amortized
  /// O(n_kv_heads * head_dim) per token. Reallocates (doubling) only when the quantized
  /// capacity runs out. Throws std::invalid_argument for a wrong shape, std::length_error for
  /// more tokens than memory can address and std::bad_alloc when memory is short; nothing
  /// changes then.
  template <class DerivedK, class DerivedV>
  void append(const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    check_input("append", k, v);
    const Index n = k.rows();
    if (n == 0) return;
    check_fits("append", size() + n);
    const Index total = ring_size_ + n;
    const Index flushed = total >= residual_ + group_ ? (total - residual_) / group_ * group_ : 0;
    const Index needed = quantized_ + flushed;
    if (needed > capacity_ || ring_keys_.data() == nullptr) {
      quantized_layer grown = regrown(grown_capacity(needed));
      swap(grown);
    }
    for (Index t = 0; t < n; ++t) {
      const Index slot = (ring_start_ + ring_size_) % ring_capacity();
      for (Index h = 0; h < n_kv_heads_; ++h) {
        Eigen::Map<row_vector<float>>(ring_row(ring_keys_, h, slot), head_dim_) =
            k.row(t).segment(h * head_dim_, head_dim_).template cast<float>();
        Eigen::Map<row_vector<float>>(ring_row(ring_values_, h, slot), head_dim_) =
            v.row(t).segment(h * head_dim_, head_dim_).template cast<float>();
      }
      if (++ring_size_ == residual_ + group_) flush_group();
    }
  }

  /// Keeps the oldest `n` tokens and drops the rest (rollback of rejected speculative tokens).
  /// Exact only where nothing quantized is cut: `n` must be at least quantized_size() (only
  /// residual tokens go) or a multiple of group_size (whole quantized groups go, and with them
  /// every residual token; the kept tokens stay quantized, as codes cannot be undone).
  /// Capacity is kept. Throws std::out_of_range unless 0 <= n <= size(), and
  /// std::invalid_argument when n would cut a quantized group; nothing changes then.
  void crop(Index n) {
    check_crop(n);
    if (n >= quantized_) {
      ring_size_ = n - quantized_;
    } else {
      quantized_ = n;
      ring_start_ = 0;
      ring_size_ = 0;
    }
  }

  /// Throws as crop(n) would, changing nothing.
  void check_crop(Index n) const {
    if (n < 0 || n > size()) {
      detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ", size(), "]");
    }
    if (n < quantized_ && n % group_ != 0) {
      detail::fail<std::invalid_argument>(
          "crop: n = ", n, " cuts the quantized group of tokens ", n / group_ * group_, "..",
          (n / group_ + 1) * group_ - 1, ", which cannot be dequantized exactly; n must be >= ",
          quantized_, " (the quantized tokens) or a multiple of group_size = ", group_);
    }
  }

  /// Drops every token; capacity is kept.
  void clear() noexcept {
    quantized_ = 0;
    ring_start_ = 0;
    ring_size_ = 0;
  }

  /// Every held key as attention reads it, oldest first: `size() x n_kv_heads*head_dim`,
  /// quantized tokens dequantized (scale * code + zero), residual tokens as stored. For tests
  /// and error analysis; allocates and reads the whole layer.
  row_matrix<float> dequantized_keys() const { return dequantized(true); }
  /// Every held value, as dequantized_keys().
  row_matrix<float> dequantized_values() const { return dequantized(false); }

  /// The layer as attention reads it.
  view_type view() const noexcept {
    view_type w;
    w.key_codes = key_codes_.data();
    w.value_codes = value_codes_.data();
    w.key_scales = key_scales_.data();
    w.key_zeros = key_zeros_.data();
    w.value_scales = value_scales_.data();
    w.value_zeros = value_zeros_.data();
    w.residual_keys = ring_keys_.data();
    w.residual_values = ring_values_.data();
    w.code_head_stride = capacity_ * code_row_bytes();
    w.key_scale_head_stride = capacity_ / group_ * head_dim_;
    w.value_scale_head_stride = capacity_ * (head_dim_ / group_);
    w.residual_head_stride = ring_capacity() * head_dim_;
    w.kv_heads = n_kv_heads_;
    w.dim = head_dim_;
    w.group = group_;
    w.quantized_tokens = quantized_;
    if (ring_size_ > 0) {
      const Index first = std::min(ring_size_, ring_capacity() - ring_start_);
      w.runs[0] = {ring_start_, first};
      w.residual_blocks = 1;
      if (first < ring_size_) {
        w.runs[1] = {0, ring_size_ - first};
        w.residual_blocks = 2;
      }
    }
    return w;
  }

  /// Checks k and v as append would, throwing std::invalid_argument (named after `fn`).
  template <class DerivedK, class DerivedV>
  void check_input(const char* fn, const Eigen::MatrixBase<DerivedK>& k,
                   const Eigen::MatrixBase<DerivedV>& v) const {
    if (k.cols() != kv_width()) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", kv_width());
    }
    if (v.cols() != kv_width()) {
      detail::fail<std::invalid_argument>(fn, ": v has ", v.cols(),
                                          " columns, expected n_kv_heads*head_dim = ", kv_width());
    }
    if (k.rows() != v.rows()) {
      detail::fail<std::invalid_argument>(fn, ": k has ", k.rows(), " rows (tokens) but v has ",
                                          v.rows());
    }
  }

 private:
  Index code_row_bytes() const noexcept { return detail::code_row_bytes<Bits>(head_dim_); }
  Index ring_capacity() const noexcept { return residual_ + group_; }

  float* ring_row(detail::buffer<float>& ring, Index h, Index slot) noexcept {
    return ring.data() + (h * ring_capacity() + slot) * head_dim_;
  }
  const float* ring_row(const detail::buffer<float>& ring, Index h, Index slot) const noexcept {
    return ring.data() + (h * ring_capacity() + slot) * head_dim_;
  }

  void check_fits(const char* fn, Index tokens) const {
    const Index per_token = std::max(quantized_bytes_per_token(), 2 * kv_width() * Index(4));
    if (tokens > std::numeric_limits<Index>::max() / 2 / per_token) {
      detail::fail<std::length_error>(fn, ": ", tokens, " tokens are more than memory can address");
    }
  }

  // Doubling, from at least 4 groups, never below `needed`; a multiple of the group size.
  Index grown_capacity(Index needed) const noexcept {
    if (needed <= capacity_) return capacity_;
    return std::max(needed, std::max(2 * capacity_, 4 * group_));
  }

  // A new layer with the same contents, room for `cap` quantized tokens (>= quantized_, a
  // multiple of group_) and an allocated residual ring.
  quantized_layer regrown(Index cap) const {
    quantized_layer out(n_kv_heads_, head_dim_, group_, residual_);
    const Index H = n_kv_heads_, d = head_dim_, groups = d / group_, row = code_row_bytes();
    out.key_codes_ = detail::buffer<std::uint8_t>(H * cap * row);
    out.value_codes_ = detail::buffer<std::uint8_t>(H * cap * row);
    out.key_scales_ = detail::buffer<Eigen::half>(H * (cap / group_) * d);
    out.key_zeros_ = detail::buffer<Eigen::half>(H * (cap / group_) * d);
    out.value_scales_ = detail::buffer<Eigen::half>(H * cap * groups);
    out.value_zeros_ = detail::buffer<Eigen::half>(H * cap * groups);
    out.ring_keys_ = detail::buffer<float>(H * ring_capacity() * d);
    out.ring_values_ = detail::buffer<float>(H * ring_capacity() * d);
    out.capacity_ = cap;
    out.quantized_ = quantized_;
    out.ring_start_ = ring_start_;
    out.ring_size_ = ring_size_;
    for (Index h = 0; h < H; ++h) {
      copy(out.key_codes_, h * cap * row, key_codes_, h * capacity_ * row, quantized_ * row);
      copy(out.value_codes_, h * cap * row, value_codes_, h * capacity_ * row, quantized_ * row);
      const Index kg = quantized_ / group_ * d;
      copy(out.key_scales_, h * (cap / group_) * d, key_scales_, h * (capacity_ / group_) * d, kg);
      copy(out.key_zeros_, h * (cap / group_) * d, key_zeros_, h * (capacity_ / group_) * d, kg);
      const Index vg = quantized_ * groups;
      copy(out.value_scales_, h * cap * groups, value_scales_, h * capacity_ * groups, vg);
      copy(out.value_zeros_, h * cap * groups, value_zeros_, h * capacity_ * groups, vg);
    }
    if (ring_keys_.data() != nullptr) {
      copy(out.ring_keys_, 0, ring_keys_, 0, ring_keys_.size());
      copy(out.ring_values_, 0, ring_values_, 0, ring_values_.size());
    }
    return out;
  }

  template <class U>
  static void copy(detail::buffer<U>& dst, Index dst_at, const detail::buffer<U>& src,
                   Index src_at, Index count) noexcept {
    if (count > 0) {
      std::memcpy(dst.data() + dst_at, src.data() + src_at,
                  static_cast<std::size_t>(count) * sizeof(U));
    }
  }

  // Code of x for a group whose stored scale and zero point are `scale` and `zero`:
  // round((x - zero) / scale), ties away from zero, clamped to [0, max_code]; 0 for a
  // constant group (scale 0) and for NaN.
  static int quantize(float x, float scale, float zero) noexcept {
    if (!(scale > 0.0f)) return 0;
    const float c = (x - zero) / scale;
    // For 0.5 <= c < max_code + 0.5, c + 0.5 truncated is std::round(c), without a call.
    return c >= float(max_code) ? max_code : c >= 0.5f ? static_cast<int>(c + 0.5f) : 0;
  }

  // Stores the codes of channels x and x + 1 (x even) of a row: two bytes of int8, or one
  // byte of int4 with channel x in the low nibble.
  static void put_codes(std::uint8_t* row, Index x, int even, int odd) noexcept {
    if constexpr (Bits == 8) {
      row[x] = static_cast<std::uint8_t>(even);
      row[x + 1] = static_cast<std::uint8_t>(odd);
    } else {
      row[x / 2] = static_cast<std::uint8_t>(even | (odd << 4));
    }
  }

  // Fp16 scale and zero point of a group whose elements lie in [lo, hi].
  static std::pair<Eigen::half, Eigen::half> scale_zero(float lo, float hi) noexcept {
    return {Eigen::half((hi - lo) / float(max_code)), Eigen::half(lo)};
  }

  // Quantizes the residual's oldest group_size tokens of every kv head into the quantized
  // region (capacity must suffice) and drops them from the residual.
  void flush_group() noexcept {
    const Index d = head_dim_, g = group_, groups = d / g, row = code_row_bytes();
    const Index first = quantized_;
    for (Index h = 0; h < n_kv_heads_; ++h) {
      // The group's rows are consecutive: the ring holds whole groups from slot 0 on.
      Eigen::Map<const row_matrix<float>> K(ring_row(ring_keys_, h, ring_start_), g, d);
      Eigen::Map<const row_matrix<float>> V(ring_row(ring_values_, h, ring_start_), g, d);
      Eigen::half* kscale = key_scales_.data() + (h * (capacity_ / g) + first / g) * d;
      Eigen::half* kzero = key_zeros_.data() + (h * (capacity_ / g) + first / g) * d;
      std::uint8_t* kcodes = key_codes_.data() + (h * capacity_ + first) * row;
      std::uint8_t* vcodes = value_codes_.data() + (h * capacity_ + first) * row;
      Eigen::half* vscale = value_scales_.data() + (h * capacity_ + first) * groups;
      Eigen::half* vzero = value_zeros_.data() + (h * capacity_ + first) * groups;
      // Keys per channel over the group's tokens, two channels at a time (one int4 byte).
      for (Index x = 0; x < d; x += 2) {
        const auto [scale0, zero0] = scale_zero(K.col(x).minCoeff(), K.col(x).maxCoeff());
        const auto [scale1, zero1] =
            scale_zero(K.col(x + 1).minCoeff(), K.col(x + 1).maxCoeff());
        kscale[x] = scale0;
        kzero[x] = zero0;
        kscale[x + 1] = scale1;
        kzero[x + 1] = zero1;
        for (Index t = 0; t < g; ++t) {
          put_codes(kcodes + t * row, x, quantize(K(t, x), float(scale0), float(zero0)),
                    quantize(K(t, x + 1), float(scale1), float(zero1)));
        }
      }
      // Values per token over groups of channels.
      for (Index t = 0; t < g; ++t) {
        for (Index j = 0; j < groups; ++j) {
          const auto seg = V.row(t).segment(j * g, g);
          const auto [scale, zero] = scale_zero(seg.minCoeff(), seg.maxCoeff());
          vscale[t * groups + j] = scale;
          vzero[t * groups + j] = zero;
          const float sf = float(scale), zf = float(zero);
          for (Index x = j * g; x < (j + 1) * g; x += 2) {
            put_codes(vcodes + t * row, x, quantize(V(t, x), sf, zf),
                      quantize(V(t, x + 1), sf, zf));
          }
        }
      }
    }
    quantized_ += g;
    ring_start_ = (ring_start_ + g) % ring_capacity();
    ring_size_ -= g;
  }

  row_matrix<float> dequantized(bool keys) const {
    const Index d = head_dim_, g = group_, groups = d / g, row = code_row_bytes();
    row_matrix<float> out(size(), kv_width());
    for (Index h = 0; h < n_kv_heads_; ++h) {
      const std::uint8_t* codes =
          (keys ? key_codes_.data() : value_codes_.data()) + h * capacity_ * row;
      for (Index t = 0; t < quantized_; ++t) {
        for (Index x = 0; x < d; ++x) {
          Eigen::half scale, zero;
          if (keys) {
            const Index at = (h * (capacity_ / g) + t / g) * d + x;
            scale = key_scales_.data()[at];
            zero = key_zeros_.data()[at];
          } else {
            const Index at = (h * capacity_ + t) * groups + x / g;
            scale = value_scales_.data()[at];
            zero = value_zeros_.data()[at];
          }
          out(t, h * d + x) =
              float(scale) * float(detail::code_at<Bits>(codes + t * row, x)) + float(zero);
        }
      }
      const detail::buffer<float>& ring = keys ? ring_keys_ : ring_values_;
      for (Index i = 0; i < ring_size_; ++i) {
        out.row(quantized_ + i).segment(h * d, d) = Eigen::Map<const row_vector<float>>(
            ring_row(ring, h, (ring_start_ + i) % ring_capacity()), d);
      }
    }
    return out;
  }

  Index n_kv_heads_ = 0;
  Index head_dim_ = 0;
  Index group_ = 0;
  Index residual_ = 0;
  Index quantized_ = 0;   // quantized tokens, a multiple of group_
  Index capacity_ = 0;    // room for quantized tokens, a multiple of group_
  Index ring_start_ = 0;  // slot of the oldest residual token, a multiple of group_
  Index ring_size_ = 0;   // residual tokens, < residual_ + group_ between calls
  detail::buffer<std::uint8_t> key_codes_;    // [kv_head][capacity][head_dim * Bits / 8]
  detail::buffer<std::uint8_t> value_codes_;  // [kv_head][capacity][head_dim * Bits / 8]
  detail::buffer<Eigen::half> key_scales_;    // [kv_head][capacity / group][head_dim]
  detail::buffer<Eigen::half> key_zeros_;     // [kv_head][capacity / group][head_dim]
  detail::buffer<Eigen::half> value_scales_;  // [kv_head][capacity][head_dim / group]
  detail::buffer<Eigen::half> value_zeros_;   // [kv_head][capacity][head_dim / group]
  detail::buffer<float> ring_keys_;    // [kv_head][residual + group][head_dim], a ring
  detail::buffer<float> ring_values_;  // [kv_head][residual + group][head_dim], a ring
};

/// A whole model's quantized KV cache: one quantized_layer per layer (see there for the
/// format), all of one cache_shape, group size and residual. `Bits` is 8 or 4.
///
/// At group 32 a quantized token costs 0.28125x of float32 in int8 and 0.15625x in int4
/// (memory.hpp's kv_dtype::int8(32) and int4(32)); decode attention reads that much less.
template <int Bits>
class quantized_cache {
 public:
  using layer_type = quantized_layer<Bits>;
  using view_type = quantized_view<Bits>;

  /// An empty cache. Throws std::invalid_argument for a group_size that is not a positive
  /// multiple of 16 dividing head_dim, or a residual that is negative or not a multiple of
  /// group_size.
  explicit quantized_cache(const cache_shape& shape, Index group_size = 32, Index residual = 0)
      : shape_(shape) {
    layers_.reserve(static_cast<std::size_t>(shape.n_layers()));
    for (Index l = 0; l < shape.n_layers(); ++l) {
      layers_.emplace_back(shape.n_kv_heads(), shape.head_dim(), group_size, residual);
    }
  }

  const cache_shape& shape() const noexcept { return shape_; }
  Index n_layers() const noexcept { return shape_.n_layers(); }
  Index group_size() const noexcept { return layers_.front().group_size(); }
  Index residual() const noexcept { return layers_.front().residual(); }
  /// The format of the quantized tokens, for memory.hpp's formulas.
  kv_dtype dtype() const noexcept { return layers_.front().dtype(); }

  /// Tokens cached in every layer (the smallest layer size).
  Index size() const noexcept {
    Index n = layers_.front().size();
    for (const auto& layer : layers_) n = std::min(n, layer.size());
    return n;
  }
  /// Tokens cached in layer `l`. Throws std::out_of_range for a layer that does not exist.
  Index size(Index l) const { return layer(l).size(); }

  /// Layer `l`. Throws std::out_of_range for a layer that does not exist.
  const layer_type& layer(Index l) const { return layers_[checked(l, "layer")]; }
  layer_type& layer(Index l) { return layers_[checked(l, "layer")]; }

  /// Appends tokens to layer `l`; see quantized_layer::append. Throws std::out_of_range for a
  /// bad layer, and as quantized_layer::append otherwise; nothing changes when it throws.
  template <class DerivedK, class DerivedV>
  void append(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    layers_[checked(l, "append")].append(k, v);
  }

  /// Reserves room for `tokens` tokens in every layer, all or nothing; throws as
  /// quantized_layer::reserve does. Copies every layer that grows: O(size).
  void reserve(Index tokens) {
    if (std::all_of(layers_.begin(), layers_.end(),
                    [&](const layer_type& layer) { return layer.has_room(tokens); })) {
      return;
    }
    std::vector<layer_type> grown;
    grown.reserve(layers_.size());
    for (const auto& layer : layers_) grown.push_back(layer.reserved(tokens));
    layers_.swap(grown);
  }

  /// Keeps the oldest `n` tokens of every layer; see quantized_layer::crop. Throws, changing
  /// nothing, unless every layer can be cropped to n: std::out_of_range unless
  /// 0 <= n <= size(l) for every layer, else std::invalid_argument when n cuts a quantized
  /// group of some layer.
  void crop(Index n) {
    for (Index l = 0; l < n_layers(); ++l) {
      const Index held = layers_[static_cast<std::size_t>(l)].size();
      if (n < 0 || n > held) {
        detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ", held,
                                        "] of layer ", l);
      }
    }
    for (Index l = 0; l < n_layers(); ++l) {
      try {
        layers_[static_cast<std::size_t>(l)].check_crop(n);
      } catch (const std::invalid_argument& e) {
        detail::fail<std::invalid_argument>(e.what(), " (layer ", l, ")");
      }
    }
    for (auto& layer : layers_) layer.crop(n);
  }

  /// Drops every token of every layer; capacity is kept.
  void clear() noexcept {
    for (auto& layer : layers_) layer.clear();
  }

  /// Bytes held, summed over layers; see quantized_layer::bytes.
  Index bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.bytes();
    return total;
  }
  /// Bytes allocated, summed over layers.
  Index capacity_bytes() const noexcept {
    Index total = 0;
    for (const auto& layer : layers_) total += layer.capacity_bytes();
    return total;
  }
  /// Bytes one quantized token takes in the whole cache (every layer, K and V, scales
  /// included): memory.hpp's kv_bytes_per_token(n_layers, n_kv_heads, head_dim, dtype()).
  Index quantized_bytes_per_token() const noexcept {
    return n_layers() * layers_.front().quantized_bytes_per_token();
  }

  /// Layer `l` as attention reads it. Throws std::out_of_range for a layer that does not exist.
  view_type view(Index l) const { return layers_[checked(l, "view")].view(); }

  /// Layer `l`'s keys (values) as attention reads them; see quantized_layer::dequantized_keys.
  row_matrix<float> dequantized_keys(Index l) const {
    return layers_[checked(l, "dequantized_keys")].dequantized_keys();
  }
  row_matrix<float> dequantized_values(Index l) const {
    return layers_[checked(l, "dequantized_values")].dequantized_values();
  }

 private:
  std::size_t checked(Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return static_cast<std::size_t>(l);
  }

  cache_shape shape_;
  std::vector<layer_type> layers_;
};

namespace detail {

// Sizes `ws` for decode_attention over views of up to `tokens` tokens with the split-K runs
// decode_attention will choose (their number never falls as tokens grow), so later calls
// allocate nothing and cannot fail for want of memory.
inline void prepare_quantized_decode(attention_workspace<float>& ws, const attention_shape& shape,
                                     Index tokens, const attention_options& opt) {
  const Index H = shape.n_kv_heads(), tile = opt.tile_tokens;
  const Index workers = opt.pool != nullptr ? opt.pool->size() : 1;
  Index splits = opt.split_tokens > 0 ? (tokens + opt.split_tokens - 1) / opt.split_tokens
                                      : (workers + H - 1) / H;
  splits = std::max<Index>(1, std::min(splits, (tokens + tile - 1) / tile));
  ws.prepare(workers, shape.group_size(), tile, shape.head_dim(), true,
             splits > 1 ? H * splits : 0);
}

}  // namespace detail

/// Prefill of `n` tokens onto a quantized layer: appends them one at a time and, after each,
/// attends that token's queries (row i of `q`, `n x n_heads*head_dim`) over everything cached,
/// writing row i of `out`. Each query so sees the cache exactly as a decode step at its
/// position would (older tokens possibly quantized by the appends before it). `k` and `v` are
/// `n x n_kv_heads*head_dim`.
///
/// Cost: n decode steps, O(n * (size + n)) reads of the cache. Checks everything, reserves
/// capacity and sizes `ws` before changing anything: throws std::invalid_argument for shapes
/// or options that do not fit, std::length_error or std::bad_alloc when memory runs short,
/// and the layer is unchanged when it throws.
template <int Bits, class DerivedK, class DerivedV>
void prefill_attention(const attention_shape& shape,
                       const Eigen::Ref<const row_matrix<float>>& q,
                       const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                       quantized_layer<Bits>& layer, Eigen::Ref<row_matrix<float>> out,
                       attention_workspace<float>& ws, const attention_options& opt = {}) {
  detail::check_view("prefill_attention", shape, layer.view());
  if (q.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("prefill_attention: q has ", q.cols(),
                                        " columns, expected n_heads*head_dim = ", shape.q_width());
  }
  layer.check_input("prefill_attention", k, v);
  if (k.rows() != q.rows()) {
    detail::fail<std::invalid_argument>("prefill_attention: q has ", q.rows(),
                                        " rows (tokens) but k has ", k.rows());
  }
  if (out.rows() != q.rows() || out.cols() != shape.q_width()) {
    detail::fail<std::invalid_argument>("prefill_attention: out is ", out.rows(), " x ",
                                        out.cols(), ", expected ", q.rows(), " x ",
                                        shape.q_width());
  }
  if (opt.tile_tokens <= 0 || opt.split_tokens < 0) {
    detail::fail<std::invalid_argument>("prefill_attention: tile_tokens must be > 0 and "
                                        "split_tokens >= 0, got ", opt.tile_tokens, " and ",
                                        opt.split_tokens);
  }
  const Index n = q.rows();
  if (n == 0) return;
  const Index final_size = layer.size() + n;
  detail::prepare_quantized_decode(ws, shape, final_size, opt);
  layer.reserve(final_size);
  // From here on nothing allocates or throws: capacity and scratch suffice.
  for (Index i = 0; i < n; ++i) {
    layer.append(k.row(i), v.row(i));
    decode_attention(shape, q.row(i), layer.view(), out.row(i), ws, opt);
  }
}

/// prefill_attention onto layer `l` of a quantized cache. Throws std::out_of_range for a layer
/// that does not exist, and as the layer overload otherwise; nothing changes when it throws.
template <int Bits, class DerivedK, class DerivedV>
void prefill_attention(const attention_shape& shape,
                       const Eigen::Ref<const row_matrix<float>>& q,
                       const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                       quantized_cache<Bits>& cache, Index l, Eigen::Ref<row_matrix<float>> out,
                       attention_workspace<float>& ws, const attention_options& opt = {}) {
  if (l < 0 || l >= cache.n_layers()) {
    detail::fail<std::out_of_range>("prefill_attention: layer ", l, " out of range [0, ",
                                    cache.n_layers(), ")");
  }
  prefill_attention(shape, q, k, v, cache.layer(l), out, ws, opt);
}

}  // namespace kvcache
