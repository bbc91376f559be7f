// SPDX-License-Identifier: Apache-2.0
// Attention over blocks of int8/int4 codes with group scales: dequantized in registers.
#pragma once

#include "kvcache/attention/kernel.hpp"
#include "kvcache/attention/micro_kernel.hpp"
#include "kvcache/view.hpp"
#include "kvcache/detail/assert.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__) || defined(__AVX__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace kvcache {

/// The storage scalar that names a quantized format to the attention drivers: `Bits`-bit codes (8 or 4) with an fp16
/// scale and zero point per group. Never stored as such; it names the format to the attention
/// drivers, which run its arithmetic in float.
template <int Bits>
struct quantized_code {
  static_assert(Bits == 8 || Bits == 4, "kvcache: quantized codes have 8 or 4 bits");
};

template <>
struct scalar_traits<quantized_code<8>> {
  using compute = float;
  static constexpr const char* name = "int8";
};

template <>
struct scalar_traits<quantized_code<4>> {
  using compute = float;
  static constexpr const char* name = "int4";
};

namespace detail {

/// A run of quantized tokens of one kv head. Keys have a scale and zero point per channel and
/// group of `group` tokens, values per token and group of `group` channels (the last group of a
/// head_dim that `group` does not divide is shorter); an element reads back as
/// `scale * code + zero`. The run starts at a group boundary of the keys. Non-owning,
/// trivially copyable.
template <int Bits>
struct quantized_block {
  Index tokens = 0;
  Index group = 0;
  const std::uint8_t* key_codes = nullptr;    // [token][code_row_bytes(head_dim)]
  const std::uint8_t* value_codes = nullptr;  // [token][code_row_bytes(head_dim)]
  const Eigen::half* key_scales = nullptr;    // [token / group][head_dim]
  const Eigen::half* key_zeros = nullptr;     // [token / group][head_dim]
  const Eigen::half* value_scales = nullptr;  // [token][ceil(head_dim / group)]
  const Eigen::half* value_zeros = nullptr;   // [token][ceil(head_dim / group)]
};

/// Bytes of one token's codes for one kv head.
template <int Bits>
constexpr Index code_row_bytes(Index head_dim) noexcept {
  return Bits == 8 ? head_dim : (head_dim + 1) / 2;
}

/// The code of channel `x` of a row of codes; int4 holds two per byte, the even channel in
/// the low nibble.
template <int Bits>
inline int code_at(const std::uint8_t* row, Index x) noexcept {
  if constexpr (Bits == 8) {
    return row[x];
  } else {
    return (row[x / 2] >> (4 * (x & 1))) & 0x0F;
  }
}

// Loads the codes of channels [x, x + width) of a row as one float packet, converting in
// registers: int8 bytes zero-extended to int32 lanes, then converted to float; int4 nibbles
// moved one per lane, then looked up in a 16-entry table (AVX-512), shifted into place lane by
// lane (AVX2) or split, interleaved and converted like bytes. Scalar where the target has no such instructions.
template <class T, int Bits>
struct code_loader {
  static_assert(std::is_same_v<T, float>, "kvcache: codes load as float");
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;

  static packet load(const std::uint8_t* row, Index x) {
#if defined(__AVX512F__)
    if constexpr (width == 16) {
      if constexpr (Bits == 8) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + x));
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
      } else {
        return lookup(row, x, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      }
    }
#endif
#if defined(__AVX2__)
    if constexpr (width == 8) {
      if constexpr (Bits == 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + x));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
      } else {
        // Channel i of the 8 sits at bit 4i of the 4 bytes: the word in every lane, each lane
        // shifted by its own count, the low nibble kept.
        std::int32_t bits = 0;
        std::memcpy(&bits, row + x / 2, 4);
        const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32(bits),
                                                _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(0x0F)));
      }
    }
#endif
#if defined(__SSE2__)
    if constexpr (width == 4) {
      __m128i b;
      if constexpr (Bits == 8) {
        std::int32_t bits = 0;
        std::memcpy(&bits, row + x, 4);
        b = _mm_cvtsi32_si128(bits);
      } else {
        std::uint16_t bits = 0;
        std::memcpy(&bits, row + x / 2, 2);
        b = split_nibbles(_mm_cvtsi32_si128(bits));
      }
      const __m128i zero = _mm_setzero_si128();
      return _mm_cvtepi32_ps(_mm_unpacklo_epi16(_mm_unpacklo_epi8(b, zero), zero));
    }
#endif
    alignas(64) T buf[width];
    for (Index i = 0; i < width; ++i) buf[i] = T(code_at<Bits>(row, x + i));
    return Eigen::internal::pload<packet>(buf);
  }

  // Whether int4 codes dequantize by table: lookup(row, x, table(scale, zero)) is
  // scale * load(row, x) + zero, one 16-entry permute per packet instead of a conversion and
  // a multiply-add; the table is built once per group.
  static constexpr bool by_table =
#if defined(__AVX512F__)
      Bits == 4 && width == 16;
#else
      false;
#endif

  // The 16 values scale * c + zero, c = 0..15, as one packet.
  static packet table(T scale, T zero) {
    using namespace Eigen::internal;
    return pmadd(pset1<packet>(scale), plset<packet>(T(0)), pset1<packet>(zero));
  }

#if defined(__AVX512F__)
  // table[code] for the int4 codes of channels [x, x + 16) of a row.
  static packet lookup(const std::uint8_t* row, Index x, const packet& table) {
    static_assert(Bits == 4 && width == 16, "kvcache: table lookup is for int4 packets of 16");
#if defined(__AVX512VBMI__)
    std::int64_t bits = 0;
    std::memcpy(&bits, row + x / 2, 8);
    // Lane i takes the byte at bit 4i of the 8 bytes: code i in its low 4 bits.
    const __m512i at_bit = _mm512_setr_epi64(
        0ll | (4ll << 32), 8ll | (12ll << 32), 16ll | (20ll << 32), 24ll | (28ll << 32),
        32ll | (36ll << 32), 40ll | (44ll << 32), 48ll | (52ll << 32), 56ll | (60ll << 32));
    const __m512i lanes = _mm512_multishift_epi64_epi8(at_bit, _mm512_set1_epi64(bits));
#else
    // Byte 2j takes byte j, byte 2j+1 byte j shifted down a nibble; then one per lane.
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + x / 2));
    const __m512i lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4)));
#endif
    // vpermps reads only the low 4 bits of each lane: the code.
    return _mm512_permutexvar_ps(lanes, table);
  }
#endif

#if defined(__SSE2__)
  // Bytes b0 b1 ... (two codes each) to bytes lo(b0) hi(b0) lo(b1) hi(b1) ...: codes in
  // channel order, from the low half of `b`.
  static __m128i split_nibbles(__m128i b) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm_unpacklo_epi8(lo, hi);
  }
#endif
};

// Whether the register-resident kernels below take a head_dim of `d` and a group of `g`: d is
// 1, 2, 4, 8 or 16 float packets, and g a whole number of packets.
template <class T>
bool quantized_fixed_fits(Index d, Index g) {
  constexpr Index width = code_loader<T, 8>::width;
  if (d % width != 0 || g % width != 0 || d % g != 0) return false;
  const Index c = d / width;
  return (c == 1 || c == 2 || c == 4 || c == 8 || c == 16) && c % (g / width) == 0;
}

// Calls f(std::integral_constant<int, P>{}) for P = `packets` when P divides C.
template <int C, int P, class F>
bool call_with_packets(F& f) {
  if constexpr (C % P == 0) {
    f(std::integral_constant<int, P>{});
    return true;
  } else {
    return false;
  }
}

template <int C, class F>
bool with_group_packets(Index packets, F&& f) {
  switch (packets) {
    case 1: return call_with_packets<C, 1>(f);
    case 2: return call_with_packets<C, 2>(f);
    case 4: return call_with_packets<C, 4>(f);
    case 8: return call_with_packets<C, 8>(f);
    case 16: return call_with_packets<C, 16>(f);
    default: return false;
  }
}

// How far ahead the kernels below prefetch codes: 4 KiB per stream (32 tokens of int8 codes
// at head_dim 128, 64 of int4), which measured best for both at 32k tokens from DRAM.
inline constexpr Index code_prefetch_bytes = 4096;

// Asks for the rows of codes a lead ahead of those a kernel below reads, one row a step: in
// the block, then in `next`, the block attention reads after it (the sequence's next page of
// a paged cache, whose pages lie anywhere in the pool), then nowhere. The lead is
// code_prefetch_bytes of rows, at most one block when a next block is given, so that pages
// shorter than the lead still ask for their successor. (The row 4 KiB after a page's codes
// in memory is some other page's, often another sequence's, which a fixed offset would fetch
// for nothing.) Rows of `RowBytes` bytes; the state is a few integers, so that the kernels'
// accumulators keep their registers.
template <Index RowBytes>
struct code_lead {
  const std::uint8_t* row = nullptr;  // the next row asked for, or null past the next block
  Index left = 0;                     // rows from `row` to the end of its block
  const std::uint8_t* next = nullptr;
  Index next_rows = 0;

  // For reads from row `from` of a block of `rows` rows of codes at `codes`.
  code_lead(const std::uint8_t* codes, Index rows, const std::uint8_t* next_codes, Index next_n,
            Index from) noexcept {
    Index lead = std::max<Index>(1, code_prefetch_bytes / RowBytes);
    if (next_codes != nullptr) lead = std::max<Index>(1, std::min(lead, rows));
    const Index u = from + lead;
    if (u < rows) {
      row = codes + u * RowBytes;
      left = rows - u;
      next = next_codes;
      next_rows = next_n;
    } else if (next_codes != nullptr && u - rows < next_n) {
      row = next_codes + (u - rows) * RowBytes;
      left = next_n - (u - rows);
    }
  }
  // Asks for the next `Rows` rows.
  template <int Rows>
  EIGEN_ALWAYS_INLINE void ask() noexcept {
    for (int u = 0; u < Rows; ++u) {
      if (row == nullptr) return;
      for (Index line = 0; line < RowBytes; line += 64) prefetch_ahead(row, line);
      row += RowBytes;
      if (--left == 0) {
        row = next;
        left = next_rows;
        next = nullptr;
      }
    }
  }
};

#if defined(__AVX512F__)
// For 4 rows x 4 tokens of packets of 16: s[r][u] = bias[r] + sum of the lanes of acc[r][u]
// (rows of s `s_stride` apart). A tree of 45 shuffles and adds instead of 16 separate
// reductions: each level adds pairs of packets after shuffling halves of their partial sums
// against each other, halving the lanes per sum.
EIGEN_ALWAYS_INLINE void lane_sums16(const __m512 (&acc)[4][4], const float* bias, float* s,
                                     Index s_stride) {
  // Level 1 of acc[r][u], input i = 4u + r: 16 lanes per sum to 8.
  __m512 z[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = acc[(2 * i) % 4][(2 * i) / 4], b = acc[(2 * i + 1) % 4][(2 * i + 1) / 4];
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  __m512 w[4];  // 8 lanes to 4
  for (int i = 0; i < 4; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xDD));
  }
  __m512 v[2];  // 4 lanes to 2
  for (int i = 0; i < 2; ++i) {
    v[i] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * i], w[2 * i + 1]),
                         _mm512_unpackhi_ps(w[2 * i], w[2 * i + 1]));
  }
  // 2 lanes to 1: lane 4r + u holds the sum of input 4u + r, that is acc[r][u].
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]));
  const __m512 biases = _mm512_setr_ps(bias[0], bias[0], bias[0], bias[0], bias[1], bias[1],
                                       bias[1], bias[1], bias[2], bias[2], bias[2], bias[2],
                                       bias[3], bias[3], bias[3], bias[3]);
  const __m512 sums =
      _mm512_add_ps(_mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi)), biases);
  _mm_storeu_ps(s, _mm512_castps512_ps128(sums));
  _mm_storeu_ps(s + s_stride, _mm512_extractf32x4_ps(sums, 1));
  _mm_storeu_ps(s + 2 * s_stride, _mm512_extractf32x4_ps(sums, 2));
  _mm_storeu_ps(s + 3 * s_stride, _mm512_extractf32x4_ps(sums, 3));
}
#endif

// For a head_dim of exactly C float packets: decode's few query rows against quantized codes,
// read straight from storage and converted in registers. Scales and zero points are folded
// in per group, not per element:
//   keys, a group of tokens (scale, zero per channel):   q . k_t = (q o scale) . c_t + q . zero
//   values, a token (scale, zero per group of channels): v_t = scale_t * c_t + zero_t
// Keys: rows' q o scale sit in L1 and blocks of 4 tokens accumulate in registers, so a code
// packet is converted once for up to 4 rows and 4 scores are reduced together. Values: the
// outputs of every row stay in registers for a run of channels, so a code packet is converted
// and dequantized once for all rows. Per token and row: C + C fused multiply-adds.
template <class T, int Bits, int C>
struct quantized_fixed_kernel {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  using codes = code_loader<T, Bits>;
  using halves = widen<T, Eigen::half>;
  static constexpr Index width = codes::width;
  static constexpr Index dim = C * width;
  static constexpr Index row_bytes = code_row_bytes<Bits>(dim);
  // Rows of a key pass and tokens of a block: 4 rows x 4 tokens of accumulators take half of
  // 32 vector registers; with 16 (AVX2), 4 x 2 of them, so that nothing spills.
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  static constexpr int key_rows = 4;
  static constexpr int key_tokens = registers >= 32 ? 4 : 2;

  // s[r][t - a] = q_r . k_t for R rows and the tokens [a, b) of one key group.
  template <int R>
  static void scores_pass(const T* q, Index q_stride, const quantized_block<Bits>& blk,
                          const quantized_block<Bits>* next, Index a, Index b, T* s,
                          Index s_stride) {
    using namespace Eigen::internal;
    const Eigen::half* scale = blk.key_scales + (a / blk.group) * dim;
    const Eigen::half* zero = blk.key_zeros + (a / blk.group) * dim;
    // The next group's scales and zero points, 32 halves a line: this block's, or the next
    // block's first when this group is the block's last.
    const bool last_group = (a / blk.group + 1) * blk.group >= blk.tokens;
    const Eigen::half* next_scale = !last_group ? scale + dim
                                    : next != nullptr ? next->key_scales : nullptr;
    const Eigen::half* next_zero = !last_group ? zero + dim
                                   : next != nullptr ? next->key_zeros : nullptr;
    if (next_scale != nullptr) {
      for (Index i = 0; i < dim; i += 32) {
        prefetch_ahead(next_scale, 2 * i);
        prefetch_ahead(next_zero, 2 * i);
      }
    }
    code_lead<row_bytes> ahead(blk.key_codes, blk.tokens,
                               next != nullptr ? next->key_codes : nullptr,
                               next != nullptr ? next->tokens : 0, a);
    alignas(64) T qs[R][dim];  // q o scale
    packet bias_acc[R];
    for (int r = 0; r < R; ++r) bias_acc[r] = pset1<packet>(T(0));
    for (int c = 0; c < C; ++c) {
      const packet sc = halves::load(scale + c * width);
      const packet zc = halves::load(zero + c * width);
      for (int r = 0; r < R; ++r) {
        const packet qc = ploadu<packet>(q + r * q_stride + c * width);
        pstore(qs[r] + c * width, pmul(qc, sc));
        bias_acc[r] = pmadd(qc, zc, bias_acc[r]);
      }
    }
    T bias[R];
    for (int r = 0; r < R; ++r) bias[r] = predux(bias_acc[r]);
    Index t = a;
    for (; t + key_tokens <= b; t += key_tokens) {
      const std::uint8_t* kt = blk.key_codes + t * row_bytes;
      ahead.template ask<key_tokens>();
      // Packets outer, tokens inner: R x 4 independent sums in flight, and each packet of
      // q o scale loaded once for the 4 tokens.
      packet acc[R][key_tokens];
      for (int u = 0; u < key_tokens; ++u) {
        const packet k0 = codes::load(kt + u * row_bytes, 0);
        for (int r = 0; r < R; ++r) acc[r][u] = pmul(pload<packet>(qs[r]), k0);
      }
      for (int c = 1; c < C; ++c) {
        packet qc[R];
        for (int r = 0; r < R; ++r) qc[r] = pload<packet>(qs[r] + c * width);
        for (int u = 0; u < key_tokens; ++u) {
          const packet kc = codes::load(kt + u * row_bytes, c * width);
          for (int r = 0; r < R; ++r) acc[r][u] = pmadd(qc[r], kc, acc[r][u]);
        }
      }
#if defined(__AVX512F__)
      if constexpr (R == 4 && width == 16) {
        lane_sums16(acc, bias, s + (t - a), s_stride);
        continue;
      }
#endif
      if constexpr (key_tokens == 4) {
        for (int r = 0; r < R; ++r) {
          lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], bias[r],
                     s + r * s_stride + (t - a));
        }
      } else {
        // Two rows' two tokens reduced together.
        int r = 0;
        for (; r + 2 <= R; r += 2) {
          T sums[4];
          lane_sums4(acc[r][0], acc[r][1], acc[r + 1][0], acc[r + 1][1], T(0), sums);
          for (int u = 0; u < 2; ++u) {
            s[r * s_stride + (t - a) + u] = sums[u] + bias[r];
            s[(r + 1) * s_stride + (t - a) + u] = sums[2 + u] + bias[r + 1];
          }
        }
        for (; r < R; ++r) {
          for (int u = 0; u < key_tokens; ++u) {
            s[r * s_stride + (t - a) + u] = predux(acc[r][u]) + bias[r];
          }
        }
      }
    }
    for (; t < b; ++t) {
      const std::uint8_t* kt = blk.key_codes + t * row_bytes;
      packet acc[R];
      const packet k0 = codes::load(kt, 0);
      for (int r = 0; r < R; ++r) acc[r] = pmul(pload<packet>(qs[r]), k0);
      for (int c = 1; c < C; ++c) {
        const packet kc = codes::load(kt, c * width);
        for (int r = 0; r < R; ++r) acc[r] = pmadd(pload<packet>(qs[r] + c * width), kc, acc[r]);
      }
      for (int r = 0; r < R; ++r) s[r * s_stride + (t - a)] = predux(acc[r]) + bias[r];
    }
  }

  // Scores of `rows` rows for the tokens [t0, t0 + n), written to columns 0..n-1 of s.
  // `next` (or null) is the block read after this one, whose codes are asked for ahead.
  static void scores(const T* q, Index q_stride, Index rows, const quantized_block<Bits>& blk,
                     Index t0, Index n, T* s, Index s_stride,
                     const quantized_block<Bits>* next = nullptr) {
    for (Index a = t0; a < t0 + n;) {
      const Index b = std::min(t0 + n, (a / blk.group + 1) * blk.group);
      T* sa = s + (a - t0);
      Index r = 0;
      for (; r + key_rows <= rows; r += key_rows) {
        scores_pass<key_rows>(q + r * q_stride, q_stride, blk, next, a, b, sa + r * s_stride,
                              s_stride);
      }
      const T* qr = q + r * q_stride;
      T* sr = sa + r * s_stride;
      switch (rows - r) {
        case 1: scores_pass<1>(qr, q_stride, blk, next, a, b, sr, s_stride); break;
        case 2: scores_pass<2>(qr, q_stride, blk, next, a, b, sr, s_stride); break;
        case 3: scores_pass<3>(qr, q_stride, blk, next, a, b, sr, s_stride); break;
        default: break;
      }
      a = b;
    }
  }

  // The packets [C0, C0 + CC) of o_r += sum over t in [0, n) of p[r][t] * v_{t0 + t} for R
  // rows, value groups of P packets. `scale` and `zero` are the n tokens' scales and zero
  // points as T, [t][group]. The first run of packets prefetches the codes. Out of line: when
  // GCC 12 inlined the runs into accumulate, decode over int8 took 15% longer in them.
  template <int R, int P, int C0, int CC>
  EIGEN_DONT_INLINE static void accumulate_packets(const T* p, Index p_stride,
                                                   const quantized_block<Bits>& blk,
                                                   code_lead<row_bytes> ahead, Index t0,
                                                   Index n, const T* scale, const T* zero, T* o,
                                                   Index o_stride) {
    using namespace Eigen::internal;
    constexpr int groups = C / P;
    packet acc[R][CC];
    for (int r = 0; r < R; ++r) {
      for (int cc = 0; cc < CC; ++cc) acc[r][cc] = ploadu<packet>(o + r * o_stride + (C0 + cc) * width);
    }
    const std::uint8_t* vt = blk.value_codes + t0 * row_bytes;
    for (Index t = 0; t < n; ++t, vt += row_bytes) {
      if constexpr (C0 == 0) ahead.template ask<1>();
      packet w[R];
      for (int r = 0; r < R; ++r) w[r] = pset1<packet>(p[r * p_stride + t]);
      [[maybe_unused]] packet table;
      for (int cc = 0; cc < CC; ++cc) {
        const int c = C0 + cc;
        const T sc = scale[t * groups + c / P], zc = zero[t * groups + c / P];
        packet v;
        if constexpr (codes::by_table) {
          if (cc == 0 || c % P == 0) table = codes::table(sc, zc);
          v = codes::lookup(vt, c * width, table);
        } else {
          v = pmadd(pset1<packet>(sc), codes::load(vt, c * width), pset1<packet>(zc));
        }
        for (int r = 0; r < R; ++r) acc[r][cc] = pmadd(w[r], v, acc[r][cc]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int cc = 0; cc < CC; ++cc) pstoreu(o + r * o_stride + (C0 + cc) * width, acc[r][cc]);
    }
  }

  // o_r += sum over t in [0, n) of p[r][t] * v_{t0 + t} for R rows, in runs of packets whose
  // R x CC accumulators take half the vector registers.
  template <int R, int P>
  static void accumulate_rows(const T* p, Index p_stride, const quantized_block<Bits>& blk,
                              const code_lead<row_bytes>& ahead, Index t0, Index n,
                              const T* scale, const T* zero, T* o, Index o_stride) {
    // A power of two, so that the runs tile the C packets (C is one): half the registers / R
    // itself would leave packets out for R = 3, 5, 6, 7.
    constexpr int budget = std::max(1, registers / 2 / R);
    constexpr int CC = std::min(C, budget >= 16 ? 16 : budget >= 8 ? 8 : budget >= 4 ? 4 : budget >= 2 ? 2 : 1);
    accumulate_runs<R, P, CC>(p, p_stride, blk, ahead, t0, n, scale, zero, o, o_stride,
                              std::make_integer_sequence<int, C / CC>{});
  }

  template <int R, int P, int CC, int... Run>
  static void accumulate_runs(const T* p, Index p_stride, const quantized_block<Bits>& blk,
                              const code_lead<row_bytes>& ahead, Index t0, Index n,
                              const T* scale, const T* zero, T* o, Index o_stride,
                              std::integer_sequence<int, Run...>) {
    (accumulate_packets<R, P, Run * CC, CC>(p, p_stride, blk, ahead, t0, n, scale, zero, o,
                                            o_stride),
     ...);
  }

  // o_r += sum over t in [t0, t0 + n) of p[r][t - t0] * v_t for `rows` rows (at most
  // micro_kernel_rows); `scratch` holds 2 * n * C / P values of T. `next` (or null) is the
  // block read after this one, whose codes are asked for ahead.
  template <int P>
  static void accumulate(const T* p, Index p_stride, Index rows,
                         const quantized_block<Bits>& blk, Index t0, Index n, T* o,
                         Index o_stride, T* scratch,
                         const quantized_block<Bits>* next = nullptr) {
    constexpr Index groups = C / P;
    // The next tile's scales and zero points, 32 halves a line: small streams the codes'
    // prefetch does not cover. This block's, or the next block's first when this tile ends it.
    const bool last_tile = t0 + n >= blk.tokens;
    const Eigen::half* next_scales = !last_tile ? blk.value_scales + (t0 + n) * groups
                                     : next != nullptr ? next->value_scales : nullptr;
    const Eigen::half* next_zeros = !last_tile ? blk.value_zeros + (t0 + n) * groups
                                    : next != nullptr ? next->value_zeros : nullptr;
    if (next_scales != nullptr) {
      for (Index i = 0; i < n * groups; i += 32) {
        prefetch_ahead(next_scales, 2 * i);
        prefetch_ahead(next_zeros, 2 * i);
      }
    }
    const code_lead<row_bytes> ahead(blk.value_codes, blk.tokens,
                                     next != nullptr ? next->value_codes : nullptr,
                                     next != nullptr ? next->tokens : 0, t0);
    T* scale = scratch;
    T* zero = scratch + n * groups;
    convert(blk.value_scales + t0 * groups, n * groups, scale);
    convert(blk.value_zeros + t0 * groups, n * groups, zero);
    const auto pass = [&](auto r) {
      accumulate_rows<decltype(r)::value, P>(p, p_stride, blk, ahead, t0, n, scale, zero, o,
                                             o_stride);
    };
    switch (rows) {
      case 1: pass(std::integral_constant<int, 1>{}); break;
      case 2: pass(std::integral_constant<int, 2>{}); break;
      case 3: pass(std::integral_constant<int, 3>{}); break;
      case 4: pass(std::integral_constant<int, 4>{}); break;
      case 5: pass(std::integral_constant<int, 5>{}); break;
      case 6: pass(std::integral_constant<int, 6>{}); break;
      case 7: pass(std::integral_constant<int, 7>{}); break;
      default:
        KVCACHE_ASSERT(rows == 8);
        pass(std::integral_constant<int, 8>{});
        break;
    }
  }

  // dst[i] = src[i] for i < count, fp16 to T.
  static void convert(const Eigen::half* src, Index count, T* dst) {
    const Index vectorized = count - count % width;
    for (Index i = 0; i < vectorized; i += width) {
      Eigen::internal::pstoreu(dst + i, halves::load(src + i));
    }
    for (Index i = vectorized; i < count; ++i) dst[i] = T(src[i]);
  }
};

// Keys [t0, t0 + n) of a quantized block, dequantized into the first n rows of `tile` (one
// tile in cache, for the general paths; never the whole cache).
template <class T, int Bits>
void dequantize_key_tile(const quantized_block<Bits>& blk, Index t0, Index n, Index d,
                         row_matrix<T>& tile) {
  using namespace Eigen::internal;
  using codes_of = code_loader<T, Bits>;
  using halves = widen<T, Eigen::half>;
  constexpr Index width = codes_of::width;
  const Index dv = d - d % width, row_bytes = code_row_bytes<Bits>(d);
  for (Index t = 0; t < n; ++t) {
    const Index token = t0 + t;
    const std::uint8_t* codes = blk.key_codes + token * row_bytes;
    const Eigen::half* scale = blk.key_scales + (token / blk.group) * d;
    const Eigen::half* zero = blk.key_zeros + (token / blk.group) * d;
    T* dst = tile.data() + t * tile.cols();
    for (Index x = 0; x < dv; x += width) {
      pstoreu(dst + x, pmadd(halves::load(scale + x), codes_of::load(codes, x),
                             halves::load(zero + x)));
    }
    for (Index x = dv; x < d; ++x) {
      dst[x] = T(scale[x]) * T(code_at<Bits>(codes, x)) + T(zero[x]);
    }
  }
}

// Values [t0, t0 + n) of a quantized block, dequantized into the first n rows of `tile`.
template <class T, int Bits>
void dequantize_value_tile(const quantized_block<Bits>& blk, Index t0, Index n, Index d,
                           row_matrix<T>& tile) {
  using namespace Eigen::internal;
  using codes_of = code_loader<T, Bits>;
  using packet = typename codes_of::packet;
  constexpr Index width = codes_of::width;
  const Index g = blk.group, groups = ceil_div(d, g), row_bytes = code_row_bytes<Bits>(d);
  for (Index t = 0; t < n; ++t) {
    const Index token = t0 + t;
    const std::uint8_t* codes = blk.value_codes + token * row_bytes;
    T* dst = tile.data() + t * tile.cols();
    for (Index j = 0; j < groups; ++j) {
      const T sj = T(blk.value_scales[token * groups + j]);
      const T zj = T(blk.value_zeros[token * groups + j]);
      const packet sp = pset1<packet>(sj), zp = pset1<packet>(zj);
      const Index end = std::min(d, (j + 1) * g), vend = j * g + (end - j * g) / width * width;
      for (Index x = j * g; x < vend; x += width) {
        pstoreu(dst + x, pmadd(sp, codes_of::load(codes, x), zp));
      }
      for (Index x = vend; x < end; ++x) {
        dst[x] = sj * T(code_at<Bits>(codes, x)) + zj;
      }
    }
  }
}

// Keys [t0, t0 + n) of a quantized block as a tile of T, dequantized into `scratch`: the
// key_tile of kernel.hpp for this format, which attention over values read from the keys
// (MLA's latent) uses for both.
template <class T, int Bits>
tile_map<T> key_tile(const quantized_block<Bits>& blk, Index t0, Index n, Index d,
                     row_matrix<T>& scratch) {
  dequantize_key_tile<T>(blk, t0, n, d, scratch);
  return tile_map<T>(scratch.data(), n, d, Eigen::OuterStride<>(scratch.cols()));
}

// attend_block for runs of quantized tokens (see kernel.hpp's overload for plain blocks; the
// arguments mean the same). Decode with a common head_dim reads the codes directly
// (quantized_fixed_kernel); other head dims and prefill's many rows dequantize one tile at a
// time into the workspace's k and v tiles, which the drivers size because this format is not
// stored as float. The codes of `next`, the block read after this one (or null), are asked for
// ahead of their use.
template <class T, int Bits>
void attend_block(const quantized_block<Bits>& blk, Index lo, Index hi, Index first, Index d,
                  Index rows, const Index* row_pos, const attention_mask& mask, Index tile,
                  typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                  const quantized_block<Bits>* next = nullptr) {
  static_assert(std::is_same_v<T, float>, "kvcache: quantized caches compute in float");
  KVCACHE_ASSERT(blk.group > 0);
  // The drivers size k and v as tile x head_dim (the format is not float); the fixed
  // kernels keep the tile's value scales and zero points in v.
  KVCACHE_ASSERT(ws.k.rows() >= std::min(tile, hi - lo) && ws.k.cols() >= d);
  KVCACHE_ASSERT(ws.v.rows() >= std::min(tile, hi - lo) && ws.v.cols() >= d);
  const bool micro = rows <= micro_kernel_rows;
  static_assert(micro_kernel_rows <= 8, "kvcache: the quantized micro-kernels take <= 8 rows");
  const bool fixed = micro && quantized_fixed_fits<T>(d, blk.group);
  const Index packets = blk.group / code_loader<T, Bits>::width;
  for (Index t0 = lo; t0 < hi; t0 += tile) {
    const Index n = std::min(tile, hi - t0);
    auto S = ws.s.topLeftCorner(rows, n);
    if (fixed) {
      with_fixed_chunks<T>(d, [&](auto chunks) {
        quantized_fixed_kernel<T, Bits, decltype(chunks)::value>::scores(
            ws.q.data(), ws.q.cols(), rows, blk, t0, n, ws.s.data(), ws.s.cols(), next);
      });
    } else {
      dequantize_key_tile<T>(blk, t0, n, d, ws.k);
      if (micro) {
        micro_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, ws.k.data(), ws.k.cols(), n, d,
                                ws.s.data(), ws.s.cols());
      } else {
        const row_run<T> keys{ws.k.data(), n, ws.k.cols()};
        tile_kernel<T>::scores(ws.q.data(), ws.q.cols(), rows, &keys, 1, d, ws.s.data(),
                               ws.s.cols(), ws.kt);
      }
    }
    if (needs_mask(row_pos, rows, first + t0, n, mask)) apply_mask(S, row_pos, first + t0, mask);
    online_softmax_update(S, st);
    if (fixed) {
      with_fixed_chunks<T>(d, [&](auto chunks) {
        constexpr int C = decltype(chunks)::value;
        with_group_packets<C>(packets, [&](auto group_packets) {
          quantized_fixed_kernel<T, Bits, C>::template accumulate<decltype(group_packets)::value>(
              ws.s.data(), ws.s.cols(), rows, blk, t0, n, st.o.data(), st.o.cols(), ws.v.data(),
              next);
        });
      });
    } else {
      dequantize_value_tile<T>(blk, t0, n, d, ws.v);
      if (micro) {
        micro_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, ws.v.data(), ws.v.cols(), n,
                                    d, st.o.data(), st.o.cols());
      } else {
        const row_run<T> values{ws.v.data(), n, ws.v.cols()};
        tile_kernel<T>::accumulate(ws.s.data(), ws.s.cols(), rows, &values, 1, d, st.o.data(),
                                   st.o.cols());
      }
    }
  }
}

// Quantized pages are gathered into tiles (see attend_range): a layer block's stored run.
template <int Bits, class T>
const quantized_block<Bits>* gathered_of(
    const layer_block<quantized_block<Bits>, T>& blk) noexcept {
  return blk.in_tail ? nullptr : &blk.stored;
}

// Folds `count` short runs of quantized tokens (pages, at most a tile of them in all) into `st`
// as one tile: the scores of every run side by side, one online softmax step, then the values
// of every run, so that pages of 32 tokens cost one softmax step a tile, not one each. Each
// run asks ahead for the next run's codes, the last for `next` (or nothing). Where the fixed
// kernels do not apply, each run is its own attend_block.
template <class T, int Bits>
void attend_gathered(const gathered_run<quantized_block<Bits>>* runs, Index count, Index d,
                     Index rows, const Index* row_pos, const attention_mask& mask, Index tile,
                     typename attention_workspace<T>::worker_scratch& ws, softmax_state<T>& st,
                     const quantized_block<Bits>* next) {
  const auto next_of = [&](Index i) { return i + 1 < count ? &runs[i + 1].blk : next; };
  bool fixed = rows <= micro_kernel_rows;
  Index tokens = 0;
  for (Index i = 0; i < count; ++i) {
    fixed = fixed && runs[i].blk.group == runs[0].blk.group &&
            quantized_fixed_fits<T>(d, runs[i].blk.group);
    tokens += runs[i].hi - runs[i].lo;
  }
  fixed = fixed && with_fixed_chunks<T>(d, [&](auto chunks) {
    constexpr int C = decltype(chunks)::value;
    using kernel = quantized_fixed_kernel<T, Bits, C>;
    auto S = ws.s.topLeftCorner(rows, tokens);
    Index col = 0;
    for (Index i = 0; i < count; ++i) {
      const gathered_run<quantized_block<Bits>>& r = runs[i];
      const Index n = r.hi - r.lo;
      kernel::scores(ws.q.data(), ws.q.cols(), rows, r.blk, r.lo, n, ws.s.data() + col,
                     ws.s.cols(), next_of(i));
      if (needs_mask(row_pos, rows, r.first + r.lo, n, mask)) {
        auto Sr = S.middleCols(col, n);
        apply_mask(Sr, row_pos, r.first + r.lo, mask);
      }
      col += n;
    }
    online_softmax_update(S, st);
    with_group_packets<C>(runs[0].blk.group / code_loader<T, Bits>::width, [&](auto packets) {
      Index at = 0;
      for (Index i = 0; i < count; ++i) {
        const gathered_run<quantized_block<Bits>>& r = runs[i];
        kernel::template accumulate<decltype(packets)::value>(
            ws.s.data() + at, ws.s.cols(), rows, r.blk, r.lo, r.hi - r.lo, st.o.data(),
            st.o.cols(), ws.v.data(), next_of(i));
        at += r.hi - r.lo;
      }
    });
  });
  if (!fixed) attend_each_run<T>(runs, count, d, rows, row_pos, mask, tile, ws, st, next);
}

}  // namespace detail
}  // namespace kvcache
