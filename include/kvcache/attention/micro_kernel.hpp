// SPDX-License-Identifier: Apache-2.0
// SIMD micro-kernels of decode: scores and weighted sums of a tile of cached rows for the few
// query rows of one GQA group, reading keys and values straight from storage.
#pragma once

#include "kvcache/types.hpp"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && (defined(__AVX512F__) || defined(__AVX__))
#define KVCACHE_F16C 1
#endif

namespace kvcache::detail {

// Loads `width` consecutive stored scalars as one packet of T, converting in registers:
// half and bfloat16 through Eigen's vectorized casts where the target has them.
template <class T, class Scalar>
struct widen {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;
  using source = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr bool vectorized =
      std::is_same_v<T, Scalar> ||
      (Index(Eigen::internal::unpacket_traits<source>::size) == width &&
       Eigen::internal::type_casting_traits<Scalar, T>::VectorizedCast &&
       Eigen::internal::type_casting_traits<Scalar, T>::SrcCoeffRatio == 1 &&
       Eigen::internal::type_casting_traits<Scalar, T>::TgtCoeffRatio == 1);

  // Eigen 3.4.0 enables its F16C half conversions for clang only; on other compilers its
  // vectorized half cast is a scalar loop, so half to float uses the instruction directly.
  static constexpr bool f16c =
#ifdef KVCACHE_F16C
      std::is_same_v<Scalar, Eigen::half> && std::is_same_v<T, float> &&
      std::is_same_v<packet, Eigen::internal::packet_traits<float>::type>;
#else
      false;
#endif

  static packet load(const Scalar* p) {
    using namespace Eigen::internal;
    if constexpr (std::is_same_v<T, Scalar>) {
      return ploadu<packet>(p);
#ifdef KVCACHE_F16C
    } else if constexpr (f16c && width == 16) {
#ifdef __AVX512F__
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
    } else if constexpr (f16c && width == 8) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
    } else if constexpr (vectorized) {
      return pcast<source, packet>(ploadu<source>(p));
    } else {
      alignas(64) T buf[width];
      for (Index i = 0; i < width; ++i) buf[i] = T(p[i]);
      return pload<packet>(buf);
    }
  }
};

// `n` cached rows of one kv head, `stride` elements apart: a block, or one page of several
// that a tile spans.
template <class Scalar>
struct row_run {
  const Scalar* rows = nullptr;
  Index n = 0;
  Index stride = 0;
};

// Walks the rows of `count` runs, asking for one row's cache lines a step: the other stream of
// a tile (its values while its keys are scored, the next tile's keys while its values are
// summed), so that memory keeps streaming while a pass works on rows it already has.
template <class Scalar>
struct prefetch_cursor {
  const row_run<Scalar>* runs = nullptr;
  Index count = 0;
  Index row_bytes = 0;
  Index i = 0;
  Index t = 0;

  void next() noexcept;
  // Moves `rows` rows on without asking for them.
  void skip(Index rows) noexcept {
    t += rows;
    settle();
  }
  // Carries t over the ends of runs, to a row of a run or past the last.
  void settle() noexcept {
    while (i < count && t >= runs[i].n) {
      t -= runs[i].n;
      ++i;
    }
  }
};

// The sums of the lanes of four packets, plus `bias`: out[i] = bias + sum of the lanes of the
// i-th packet.
template <class Packet, class T>
EIGEN_ALWAYS_INLINE void lane_sums4(const Packet& a, const Packet& b, const Packet& c,
                                    const Packet& d, T bias, T* out) {
  using namespace Eigen::internal;
  [[maybe_unused]] constexpr Index width = unpacket_traits<Packet>::size;
#if defined(__AVX512F__)
  if constexpr (width == 16 && std::is_same_v<T, float>) {
    // Halve the width twice, pairing packets so that each step is one add of two shuffles:
    // [a | b] by 256-bit halves, then [a | b | c | d] by 128-bit quarters.
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    // Transpose the four quarters' 4 x 4 partial sums and add the rows.
    const __m512 t = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), x);
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, _mm_add_ps(sums, _mm_set1_ps(bias)));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (width == 8 && std::is_same_v<T, float>) {
    const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    _mm_storeu_ps(out, _mm_add_ps(sums, _mm_set1_ps(bias)));
    return;
  }
#endif
  out[0] = bias + predux(a);
  out[1] = bias + predux(b);
  out[2] = bias + predux(c);
  out[3] = bias + predux(d);
}

// Asks for the cache line `bytes` past `p` ahead of use: a hint, which never faults, so it
// may point past the end of a buffer (the address is formed as an integer for that reason).
// With GCC on x86 an asm statement: GCC 12 at -O2 may delete a loop of __builtin_prefetch
// whose trip count is not a constant (a loop without side effects may be assumed to finish,
// then dropped), and then the lines of a row whose size is known only at run time are never
// asked for.
inline void prefetch_ahead(const void* p, Index bytes) noexcept {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(bytes);
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  __asm__ volatile("prefetcht0 %a0" : : "p"(reinterpret_cast<const void*>(at)));
#elif defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(reinterpret_cast<const void*>(at));
#else
  (void)at;
#endif
}

// How far ahead the plain kernels prefetch rows: 64 lines per stream.
inline constexpr Index row_prefetch_bytes = 4096;

template <class Scalar>
inline void prefetch_cursor<Scalar>::next() noexcept {
  settle();
  if (i >= count) return;
  const Scalar* row = runs[i].rows + t * runs[i].stride;
  for (Index line = 0; line < row_bytes; line += 64) prefetch_ahead(row, line);
  ++t;
}

// For a head_dim of exactly C packets: the queries (in scores) or the outputs (in
// accumulate) of a few rows stay in registers across a whole tile, so a cached row costs C
// loads and rows x C fused multiply-adds, and nothing is stored per token. General matrix
// products would repack every tile for so few rows and spend longer packing than reading.
// With 16 vector registers (AVX2) a row's C = 16 query packets would not fit beside its
// sums, so scores take blocks of 4 tokens x key_rows rows of sums instead, the queries read
// from L1, each key packet converted once for the rows of a pass and the next rows
// prefetched: many independent sums in flight instead of one chain per token (measured on
// x86-64-v3 from DRAM, f32 and f16, one thread: 7% and 25% faster than one row at a time).
// Every path asks for the rows 4 KiB ahead of the one it reads (row_prefetch_bytes), within a
// page tile's runs (row_lead), and decode over a block's tiles also asks for the other stream
// (prefetch_cursor).

// Calls f(std::integral_constant<int, k>{}) for the run-time k in [1, Max]; nothing for others.
template <int Max, class F>
EIGEN_ALWAYS_INLINE void with_count(Index k, F&& f) {
  if constexpr (Max >= 1) {
    if (k == Max) {
      f(std::integral_constant<int, Max>{});
    } else {
      with_count<Max - 1>(k, f);
    }
  }
}

// Calls f(std::integral_constant<int, R>{}, r0) for passes of R rows covering [0, rows):
// passes of Max rows, then one of the rest.
template <int Max, class F>
EIGEN_ALWAYS_INLINE void row_passes(Index rows, F&& f) {
  static_assert(Max >= 1, "row_passes: Max must be at least 1");
  Index r = 0;
  for (; r + Max <= rows; r += Max) f(std::integral_constant<int, Max>{}, r);
  with_count<Max - 1>(rows - r, [&](auto rest) { f(rest, r); });
}

// Keeps a loaded packet in a register: without it GCC 12 may fold the load into every fused
// multiply-add that uses it, loading it again each time.
template <class Packet>
EIGEN_ALWAYS_INLINE void in_register(Packet& p) noexcept {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+v"(p));
#else
  (void)p;
#endif
}

template <class T, int C>
struct fixed_micro_kernel {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;
  // Rows per pass: their C packets each fill half the vector registers.
  static constexpr int rows_per_pass = std::max(1, int(EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS) / 2 / C);
  // Whether scores take blocks of tokens (score_block): too few registers for a row's queries.
  static constexpr bool blocked_scores = int(EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS) / 2 < C;
  static constexpr int key_tokens = 4;
  // key_rows x 4 sums, a query packet per row and a key packet in 16 registers.
  static constexpr int key_rows = 2;
  template <class Scalar>
  static constexpr Index row_bytes_of = C * width * Index(sizeof(Scalar));

  // Asks for the row about row_prefetch_bytes after the one read, a row per step: in a tile
  // of one run (a block's, whose rows go on), past the run's end; in a tile of several runs (a
  // page tile), in the next runs, as the block table lists them, but never past the last: other
  // sequences' pages follow it, which a prefetch would read for nothing.
  template <class Scalar>
  struct row_lead {
    static constexpr Index ahead = std::max<Index>(1, row_prefetch_bytes / row_bytes_of<Scalar>);
    prefetch_cursor<Scalar> cursor;

    row_lead(const row_run<Scalar>* runs, Index count) : cursor{runs, count, row_bytes_of<Scalar>} {
      if (count > 1) cursor.skip(ahead);
    }
    EIGEN_ALWAYS_INLINE void step(const row_run<Scalar>& run, Index t) {
      if (cursor.count > 1) {
        cursor.next();
        return;
      }
      const Index bytes = ahead * run.stride * Index(sizeof(Scalar));
      for (Index line = 0; line < row_bytes_of<Scalar>; line += 64) {
        prefetch_ahead(run.rows + t * run.stride, bytes + line);
      }
    }
  };

  // s[r][t] = q_r . k_t for R rows and the tokens of `count` runs, side by side in s.
  template <int R, class Scalar>
  static void scores_pass(const T* q, Index q_stride, const row_run<Scalar>* runs, Index count,
                          T* s, Index s_stride, prefetch_cursor<Scalar>* also) {
    using namespace Eigen::internal;
    packet qr[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) qr[r][c] = ploadu<packet>(q + r * q_stride + c * width);
    }
    row_lead<Scalar> lead(runs, count);
    Index col = 0;
    for (Index i = 0; i < count; ++i) {
      const row_run<Scalar>& run = runs[i];
      for (Index t = 0; t < run.n; ++t, ++col) {
        const Scalar* kt = run.rows + t * run.stride;
        lead.step(run, t);
        if (also) also->next();
        packet acc[R];
        const packet k0 = widen<T, Scalar>::load(kt);
        for (int r = 0; r < R; ++r) acc[r] = pmul(qr[r][0], k0);
        for (int c = 1; c < C; ++c) {
          const packet kc = widen<T, Scalar>::load(kt + c * width);
          for (int r = 0; r < R; ++r) acc[r] = pmadd(qr[r][c], kc, acc[r]);
        }
        for (int r = 0; r < R; ++r) s[r * s_stride + col] = predux(acc[r]);
      }
    }
  }

  // o_r += sum over t of p[r][t] * v_t for R rows and the tokens of `count` runs.
  template <int R, class Scalar>
  static void accumulate_pass(const T* p, Index p_stride, const row_run<Scalar>* runs,
                              Index count, T* o, Index o_stride, prefetch_cursor<Scalar>* also) {
    using namespace Eigen::internal;
    packet acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = ploadu<packet>(o + r * o_stride + c * width);
    }
    row_lead<Scalar> lead(runs, count);
    Index col = 0;
    for (Index i = 0; i < count; ++i) {
      const row_run<Scalar>& run = runs[i];
      for (Index t = 0; t < run.n; ++t, ++col) {
        const Scalar* vt = run.rows + t * run.stride;
        lead.step(run, t);
        if (also) also->next();
        packet w[R];
        for (int r = 0; r < R; ++r) w[r] = pset1<packet>(p[r * p_stride + col]);
        for (int c = 0; c < C; ++c) {
          const packet vc = widen<T, Scalar>::load(vt + c * width);
          for (int r = 0; r < R; ++r) acc[r][c] = pmadd(w[r], vc, acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) pstoreu(o + r * o_stride + c * width, acc[r][c]);
    }
  }

  // s[r][u] = q_r . k_u for R rows (`q_stride` apart) and U tokens at k[0..U).
  template <int R, int U, class Scalar>
  static EIGEN_ALWAYS_INLINE void score_block(const T* q, Index q_stride, const Scalar* const* k,
                                              T* s, Index s_stride) {
    using namespace Eigen::internal;
    packet acc[R][U];
    for (int u = 0; u < U; ++u) {
      const packet k0 = widen<T, Scalar>::load(k[u]);
      for (int r = 0; r < R; ++r) acc[r][u] = pmul(ploadu<packet>(q + r * q_stride), k0);
    }
    for (int c = 1; c < C; ++c) {
      packet qc[R];
      for (int r = 0; r < R; ++r) {
        qc[r] = ploadu<packet>(q + r * q_stride + c * width);
        in_register(qc[r]);
      }
      for (int u = 0; u < U; ++u) {
        packet kc = widen<T, Scalar>::load(k[u] + c * width);
        in_register(kc);
        for (int r = 0; r < R; ++r) acc[r][u] = pmadd(qc[r], kc, acc[r][u]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (U == 4) {
        lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], T(0), s + r * s_stride);
      } else {
        for (int u = 0; u < U; ++u) s[r * s_stride + u] = predux(acc[r][u]);
      }
    }
  }


  // scores() in blocks of tokens (blocked_scores).
  template <class Scalar>
  static void blocked_scores_of(const T* q, Index q_stride, Index rows, const row_run<Scalar>* runs,
                     Index count, T* s, Index s_stride, prefetch_cursor<Scalar>* also) {
    row_lead<Scalar> lead(runs, count);
    Index col = 0;
    for (Index i = 0; i < count; ++i) {
      const row_run<Scalar>& run = runs[i];
      Index t = 0;
      for (; t + key_tokens <= run.n; t += key_tokens, col += key_tokens) {
        const Scalar* k[key_tokens];
        for (int u = 0; u < key_tokens; ++u) {
          k[u] = run.rows + (t + u) * run.stride;
          lead.step(run, t + u);
          if (also) also->next();
        }
        row_passes<key_rows>(rows, [&](auto r_count, Index r0) {
          score_block<decltype(r_count)::value, key_tokens>(q + r0 * q_stride, q_stride, k,
                                                            s + r0 * s_stride + col, s_stride);
        });
      }
      for (; t < run.n; ++t, ++col) {
        lead.step(run, t);
        if (also) also->next();
        const Scalar* k[1] = {run.rows + t * run.stride};
        row_passes<key_rows>(rows, [&](auto r_count, Index r0) {
          score_block<decltype(r_count)::value, 1>(q + r0 * q_stride, q_stride, k,
                                                   s + r0 * s_stride + col, s_stride);
        });
      }
    }
  }
  // Scores of `rows` query rows against the keys of `count` runs (pages), side by side in s:
  // the queries stay in registers across every run (or blocked_scores). `also`, when given,
  // is stepped a row per token of the first pass.
  template <class Scalar>
  static void scores(const T* q, Index q_stride, Index rows, const row_run<Scalar>* runs,
                     Index count, T* s, Index s_stride, prefetch_cursor<Scalar>* also = nullptr) {
    if constexpr (blocked_scores) {
      blocked_scores_of(q, q_stride, rows, runs, count, s, s_stride, also);
      return;
    }
    Index r = 0;
    for (; r + rows_per_pass <= rows; r += rows_per_pass, also = nullptr) {
      scores_pass<rows_per_pass>(q + r * q_stride, q_stride, runs, count, s + r * s_stride,
                                 s_stride, also);
    }
    for (; r < rows; ++r, also = nullptr) {
      scores_pass<1>(q + r * q_stride, q_stride, runs, count, s + r * s_stride, s_stride, also);
    }
  }
  template <class Scalar>
  static void scores(const T* q, Index q_stride, Index rows, const Scalar* k, Index k_stride,
                     Index n, T* s, Index s_stride, prefetch_cursor<Scalar>* also = nullptr) {
    const row_run<Scalar> run{k, n, k_stride};
    scores(q, q_stride, rows, &run, 1, s, s_stride, also);
  }

  // Accumulates the values of `count` runs weighted by p: the outputs stay in registers
  // across every run; `also` as in scores.
  template <class Scalar>
  static void accumulate(const T* p, Index p_stride, Index rows, const row_run<Scalar>* runs,
                         Index count, T* o, Index o_stride,
                         prefetch_cursor<Scalar>* also = nullptr) {
    Index r = 0;
    for (; r + rows_per_pass <= rows; r += rows_per_pass, also = nullptr) {
      accumulate_pass<rows_per_pass>(p + r * p_stride, p_stride, runs, count, o + r * o_stride,
                                     o_stride, also);
    }
    for (; r < rows; ++r, also = nullptr) {
      accumulate_pass<1>(p + r * p_stride, p_stride, runs, count, o + r * o_stride, o_stride,
                         also);
    }
  }
  template <class Scalar>
  static void accumulate(const T* p, Index p_stride, Index rows, const Scalar* v,
                         Index v_stride, Index n, T* o, Index o_stride,
                         prefetch_cursor<Scalar>* also = nullptr) {
    const row_run<Scalar> run{v, n, v_stride};
    accumulate(p, p_stride, rows, &run, 1, o, o_stride, also);
  }
};

// Calls f(std::integral_constant<int, C>) when head_dim is C packets of T for C in
// {1, 2, 4, 8, 16} and returns true; returns false otherwise (other head dims take the
// general path).
template <class T, class F>
bool with_fixed_chunks(Index head_dim, F&& f) {
  constexpr Index width = fixed_micro_kernel<T, 1>::width;
  if (head_dim % width != 0) return false;
  switch (head_dim / width) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// The same two operations for any head_dim, on rows already in T: packets over the head
// dimension with a scalar tail.
template <class T>
struct micro_kernel {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;

  static void scores(const T* q, Index q_stride, Index rows, const T* k, Index k_stride, Index n,
                     Index d, T* s, Index s_stride) {
    using namespace Eigen::internal;
    const Index dv = d - d % width;
    for (Index t = 0; t < n; ++t) {
      const T* kt = k + t * k_stride;
      for (Index r = 0; r < rows; ++r) {
        const T* qr = q + r * q_stride;
        T sum = T(0);
        if (dv > 0) {
          packet a = pmul(ploadu<packet>(qr), ploadu<packet>(kt));
          for (Index x = width; x < dv; x += width) a = pmadd(ploadu<packet>(qr + x), ploadu<packet>(kt + x), a);
          sum = predux(a);
        }
        for (Index x = dv; x < d; ++x) sum += qr[x] * kt[x];
        s[r * s_stride + t] = sum;
      }
    }
  }

  // Token by token, so value rows stream in order; the output rows stay in L1.
  static void accumulate(const T* p, Index p_stride, Index rows, const T* v, Index v_stride,
                         Index n, Index d, T* o, Index o_stride) {
    using namespace Eigen::internal;
    const Index dv = d - d % width;
    for (Index t = 0; t < n; ++t) {
      const T* vt = v + t * v_stride;
      for (Index r = 0; r < rows; ++r) {
        T* orow = o + r * o_stride;
        const T w = p[r * p_stride + t];
        const packet wp = pset1<packet>(w);
        for (Index x = 0; x < dv; x += width) {
          pstoreu(orow + x, pmadd(wp, ploadu<packet>(vt + x), ploadu<packet>(orow + x)));
        }
        for (Index x = dv; x < d; ++x) orow[x] += w * vt[x];
      }
    }
  }
};

// The same two operations for rows of any width already in T, for up to `max_rows` query
// rows (MLA's 16 heads over one latent of 576): sums of blocks of 4 tokens x a few rows in
// flight over the width (scores), and outputs held in registers a run of packets at a time
// over the tile (accumulate), so that fused multiply-adds, not the latency of one chain, set
// the pace. The tile is read from L2 once per pass of rows (scores) or per run (accumulate).
template <class T>
struct wide_kernel {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  static constexpr Index max_rows = 16;
  static constexpr int key_tokens = 4;
  static constexpr int key_rows = registers >= 32 ? 4 : 2;
  static constexpr int value_rows = 4;

  // s[r][u] = q_r . k_u for R rows and U tokens, d wide (the scalar tail after the packets).
  template <int R, int U>
  static EIGEN_DONT_INLINE void score_block(const T* q, Index q_stride, const T* const* k,
                                              Index d, T* s, Index s_stride) {
    using namespace Eigen::internal;
    const Index dp = d - d % width;
    packet acc[R][U];
    for (int r = 0; r < R; ++r) {
      for (int u = 0; u < U; ++u) acc[r][u] = pset1<packet>(T(0));
    }
    for (Index c = 0; c < dp; c += width) {
      packet qc[R];
      for (int r = 0; r < R; ++r) {
        qc[r] = ploadu<packet>(q + r * q_stride + c);
        in_register(qc[r]);
      }
      for (int u = 0; u < U; ++u) {
        packet kc = ploadu<packet>(k[u] + c);
        in_register(kc);
        for (int r = 0; r < R; ++r) acc[r][u] = pmadd(qc[r], kc, acc[r][u]);
      }
    }
    T tail[R][U] = {};
    for (Index c = dp; c < d; ++c) {
      for (int r = 0; r < R; ++r) {
        for (int u = 0; u < U; ++u) tail[r][u] += q[r * q_stride + c] * k[u][c];
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (U == 4) {
        lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], T(0), s + r * s_stride);
        for (int u = 0; u < U; ++u) s[r * s_stride + u] += tail[r][u];
      } else {
        for (int u = 0; u < U; ++u) s[r * s_stride + u] = predux(acc[r][u]) + tail[r][u];
      }
    }
  }


  // s[r][t] = q_r . k_t for `rows` rows and n keys (rows of k `k_stride` apart), d wide.
  static void scores(const T* q, Index q_stride, Index rows, const T* k, Index k_stride, Index n,
                     Index d, T* s, Index s_stride) {
    Index t = 0;
    for (; t + key_tokens <= n; t += key_tokens) {
      const T* kt[key_tokens];
      for (int u = 0; u < key_tokens; ++u) kt[u] = k + (t + u) * k_stride;
      row_passes<key_rows>(rows, [&](auto r_count, Index r0) {
        score_block<decltype(r_count)::value, key_tokens>(q + r0 * q_stride, q_stride, kt, d,
                                                          s + r0 * s_stride + t, s_stride);
      });
    }
    for (; t < n; ++t) {
      const T* kt[1] = {k + t * k_stride};
      row_passes<key_rows>(rows, [&](auto r_count, Index r0) {
        score_block<decltype(r_count)::value, 1>(q + r0 * q_stride, q_stride, kt, d,
                                                 s + r0 * s_stride + t, s_stride);
      });
    }
  }

  // Columns [c0, c0 + CC * width) of o_r += sum over t of p[r][t] * v_t, for R rows.
  // `also`, when given, asks for one of its rows every 32 tokens.
  template <int R, int CC, class Ahead>
  static EIGEN_ALWAYS_INLINE void value_run(const T* p, Index p_stride, const T* v, Index v_stride,
                                            Index n, Index c0, T* o, Index o_stride, Ahead* also) {
    using namespace Eigen::internal;
    packet acc[R][CC];
    for (int r = 0; r < R; ++r) {
      for (int cc = 0; cc < CC; ++cc) acc[r][cc] = ploadu<packet>(o + r * o_stride + c0 + cc * width);
    }
    const T* vt = v + c0;
    for (Index t = 0; t < n; ++t, vt += v_stride) {
      if (also != nullptr && t % 32 == 0) also->next();
      packet w[R];
      for (int r = 0; r < R; ++r) w[r] = pset1<packet>(p[r * p_stride + t]);
      for (int cc = 0; cc < CC; ++cc) {
        const packet vc = ploadu<packet>(vt + cc * width);
        for (int r = 0; r < R; ++r) acc[r][cc] = pmadd(w[r], vc, acc[r][cc]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int cc = 0; cc < CC; ++cc) pstoreu(o + r * o_stride + c0 + cc * width, acc[r][cc]);
    }
  }

  // o_r += sum over t in [0, n) of p[r][t] * v_t for `rows` rows, dv wide. `also`, when given,
  // walks the rows that the next tile will read, a row every 32 tokens of every pass.
  template <class Ahead>
  static void accumulate(const T* p, Index p_stride, Index rows, const T* v, Index v_stride,
                         Index n, Index dv, T* o, Index o_stride, Ahead* also) {
    const Index dp = dv - dv % width;
    row_passes<value_rows>(rows, [&](auto r_count, Index r0) {
      constexpr int R = decltype(r_count)::value;
      // R x CC accumulators take half the registers.
      constexpr int CC = std::max(1, registers / 2 / R);
      const T* pr = p + r0 * p_stride;
      T* orow = o + r0 * o_stride;
      Index c = 0;
      for (; c + CC * width <= dp; c += CC * width) {
        value_run<R, CC>(pr, p_stride, v, v_stride, n, c, orow, o_stride, also);
      }
      for (; c < dp; c += width) {
        value_run<R, 1>(pr, p_stride, v, v_stride, n, c, orow, o_stride, also);
      }
      for (int r = 0; r < R; ++r) {
        for (Index x = dp; x < dv; ++x) {
          T sum = T(0);
          for (Index t = 0; t < n; ++t) sum += pr[r * p_stride + t] * v[t * v_stride + x];
          orow[r * o_stride + x] += sum;
        }
      }
    });
  }
};

// Rows [t0, t0+n) of stored keys or values as a row-major tile of T: mapped in place when
// stored as T, otherwise converted into `scratch` (one tile, in cache, never the whole cache).
template <class T>
using tile_map = Eigen::Map<const row_matrix<T>, 0, Eigen::OuterStride<>>;

template <class T, class Scalar>
tile_map<T> load_tile(const Scalar* base, Index stride, Index t0, Index n, Index head_dim,
                      row_matrix<T>& scratch) {
  if constexpr (std::is_same_v<T, Scalar>) {
    (void)scratch;
    return tile_map<T>(base + t0 * stride, n, head_dim, Eigen::OuterStride<>(stride));
  } else {
    using w = widen<T, Scalar>;
    const Index dv = head_dim - head_dim % w::width;
    for (Index t = 0; t < n; ++t) {
      const Scalar* src = base + (t0 + t) * stride;
      T* dst = scratch.data() + t * scratch.cols();
      for (Index x = 0; x < dv; x += w::width) Eigen::internal::pstoreu(dst + x, w::load(src + x));
      for (Index x = dv; x < head_dim; ++x) dst[x] = T(src[x]);
    }
    return tile_map<T>(scratch.data(), n, head_dim, Eigen::OuterStride<>(scratch.cols()));
  }
}

}  // namespace kvcache::detail
