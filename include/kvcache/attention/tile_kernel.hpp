// SPDX-License-Identifier: Apache-2.0
// The two products of a tile with many query rows (prefill, and decode of long query chunks):
// S = Q K^T and O += P V, register-blocked. A block of rows x packets of sums stays in
// registers while the shared dimension streams past it, as in the micro-kernels of a general
// matrix product (Goto and van de Geijn, "Anatomy of high-performance matrix multiplication",
// 2008), with only the keys packed: the queries, probabilities and values are read where they
// lie.
#pragma once

#include "kvcache/attention/micro_kernel.hpp"

#include <algorithm>
#include <type_traits>

namespace kvcache::detail {

template <class T>
struct tile_kernel {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int width = Eigen::internal::unpacket_traits<packet>::size;
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  // A block is block_rows x block_packets sums, plus a packet per column of the block and one
  // broadcast: 6 x 4 + 4 + 1 = 29 of 32 registers (AVX-512), 6 x 2 + 2 + 1 = 15 of 16 (AVX2).
  static constexpr int block_rows = 6;
  static constexpr int block_packets = registers >= 32 ? 4 : 2;

  // n rounded up to whole packets: the columns of the packed keys.
  static constexpr Index padded(Index n) noexcept { return (n + width - 1) / width * width; }

  // kt[c][j] = k_j[c] for the n rows of a run (c < d): keys transposed so that the scores'
  // blocks read a packet of tokens at once. Square blocks of a packet's width are transposed
  // in registers.
  template <class Scalar>
  static void pack_keys(const row_run<Scalar>& run, Index d, T* kt, Index kt_stride) {
    using namespace Eigen::internal;
    Index j = 0;
    if constexpr (width > 1) {
      const Index dp = d - d % width;
      for (; j + width <= run.n; j += width) {
        const Scalar* k = run.rows + j * run.stride;
        for (Index c = 0; c < dp; c += width) {
#if defined(__GNUC__)
#pragma GCC diagnostic push
// PacketBlock of an intrinsic vector type: the attributes dropped are only its alignment.
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
          PacketBlock<packet, width> b;
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
          for (int i = 0; i < width; ++i) {
            b.packet[i] = widen<T, Scalar>::load(k + i * run.stride + c);
          }
          ptranspose(b);
          for (int i = 0; i < width; ++i) pstoreu(kt + (c + i) * kt_stride + j, b.packet[i]);
        }
        for (Index c = dp; c < d; ++c) {
          for (int i = 0; i < width; ++i) kt[c * kt_stride + j + i] = T(k[i * run.stride + c]);
        }
      }
    }
    for (; j < run.n; ++j) {
      const Scalar* k = run.rows + j * run.stride;
      for (Index c = 0; c < d; ++c) kt[c * kt_stride + j] = T(k[c]);
    }
  }

  // s[r][j] = sum over c < d of q[r][c] * kt[c][j], for R rows and the first `cols` columns of
  // P packets (cols > (P - 1) * width; columns past it are computed but not stored).
  template <int R, int P>
  static EIGEN_DONT_INLINE void scores_block(const T* q, Index q_stride, const T* kt,
                                             Index kt_stride, Index d, T* s, Index s_stride,
                                             Index cols) {
    using namespace Eigen::internal;
    packet acc[R][P];
    for (int r = 0; r < R; ++r) {
      for (int p = 0; p < P; ++p) acc[r][p] = pset1<packet>(T(0));
    }
    for (Index c = 0; c < d; ++c, kt += kt_stride) {
      packet k[P];
      for (int p = 0; p < P; ++p) {
        k[p] = ploadu<packet>(kt + p * width);
        in_register(k[p]);
      }
      for (int r = 0; r < R; ++r) {
        packet b = pset1<packet>(q[r * q_stride + c]);
        in_register(b);
        for (int p = 0; p < P; ++p) acc[r][p] = pmadd(b, k[p], acc[r][p]);
      }
    }
    store_block<R, P>(acc, s, s_stride, cols);
  }

  // o[r][x] += sum over the runs' tokens t of p[r][t] * v_t[x], for R rows and the P packets of
  // columns from x = 0 (o and the runs' rows already offset to the block's first column).
  template <int R, int P>
  static EIGEN_DONT_INLINE void accumulate_block(const T* p, Index p_stride,
                                                 const row_run<T>* runs, Index count, Index c0,
                                                 T* o, Index o_stride) {
    using namespace Eigen::internal;
    packet acc[R][P];
    for (int r = 0; r < R; ++r) {
      for (int x = 0; x < P; ++x) acc[r][x] = ploadu<packet>(o + r * o_stride + x * width);
    }
    for (Index i = 0; i < count; ++i) {
      const T* vt = runs[i].rows + c0;
      for (Index t = 0; t < runs[i].n; ++t, vt += runs[i].stride, ++p) {
        packet v[P];
        for (int x = 0; x < P; ++x) {
          v[x] = ploadu<packet>(vt + x * width);
          in_register(v[x]);
        }
        for (int r = 0; r < R; ++r) {
          packet b = pset1<packet>(p[r * p_stride]);
          in_register(b);
          for (int x = 0; x < P; ++x) acc[r][x] = pmadd(b, v[x], acc[r][x]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int x = 0; x < P; ++x) pstoreu(o + r * o_stride + x * width, acc[r][x]);
    }
  }

  // S (rows x the runs' tokens, side by side, `s_stride` apart) = Q K^T for the queries q
  // (rows x d, `q_stride` apart) and the keys of `count` runs, packed into `kt` first (grown to
  // d x padded(tokens) when smaller: attention_workspace::prepare sizes it for its tiles).
  template <class Scalar>
  static void scores(const T* q, Index q_stride, Index rows, const row_run<Scalar>* runs,
                     Index count, Index d, T* s, Index s_stride, row_matrix<T>& kt) {
    Index n = 0;
    for (Index i = 0; i < count; ++i) n += runs[i].n;
    const Index cols = padded(n);
    if (kt.rows() < d || kt.cols() < cols) {
      kt.resize(std::max(kt.rows(), d), std::max(kt.cols(), cols));
    }
    const Index kt_stride = kt.cols();
    Index j = 0;
    for (Index i = 0; i < count; ++i) {
      pack_keys(runs[i], d, kt.data() + j, kt_stride);
      j += runs[i].n;
    }
    // The last packet's columns past the tokens are computed, never stored: zeros, not garbage.
    for (Index c = 0; c < d && n < cols; ++c) {
      std::fill(kt.data() + c * kt_stride + n, kt.data() + c * kt_stride + cols, T(0));
    }
    // Keys of each panel of block_packets stay in L1 while every row block passes over them.
    for (Index j0 = 0; j0 < n; j0 += block_packets * width) {
      const Index panel = std::min<Index>(block_packets * width, n - j0);
      const T* ktp = kt.data() + j0;
      with_count<block_packets>((panel + width - 1) / width, [&](auto packets) {
        constexpr int P = decltype(packets)::value;
        row_passes<block_rows>(rows, [&](auto r_count, Index r) {
          scores_block<decltype(r_count)::value, P>(q + r * q_stride, q_stride, ktp, kt_stride, d,
                                                    s + r * s_stride + j0, s_stride, panel);
        });
      });
    }
  }

  // O (rows x dv, `o_stride` apart) += P V for the probabilities p (rows x the runs' tokens,
  // side by side, `p_stride` apart) and the value rows of `count` runs. A dv of whole packets
  // takes the blocks; another, Eigen's product, run by run.
  static void accumulate(const T* p, Index p_stride, Index rows, const row_run<T>* runs,
                         Index count, Index dv, T* o, Index o_stride) {
    if (dv % width != 0) {
      using stride = Eigen::OuterStride<>;
      Eigen::Map<row_matrix<T>, 0, stride> O(o, rows, dv, stride(o_stride));
      Index col = 0;
      for (Index i = 0; i < count; ++i) {
        const Eigen::Map<const row_matrix<T>, 0, stride> P(p + col, rows, runs[i].n,
                                                            stride(p_stride));
        const Eigen::Map<const row_matrix<T>, 0, stride> V(runs[i].rows, runs[i].n, dv,
                                                            stride(runs[i].stride));
        O.noalias() += P * V;
        col += runs[i].n;
      }
      return;
    }
    // Values of each panel of block_packets stay in L1 while every row block passes over them.
    for (Index c0 = 0; c0 < dv; c0 += block_packets * width) {
      with_count<block_packets>(std::min<Index>(block_packets, (dv - c0) / width), [&](auto n) {
        constexpr int P = decltype(n)::value;
        row_passes<block_rows>(rows, [&](auto r_count, Index r) {
          accumulate_block<decltype(r_count)::value, P>(p + r * p_stride, p_stride, runs, count,
                                                        c0, o + r * o_stride + c0, o_stride);
        });
      });
    }
  }

 private:
  template <int R, int P>
  static EIGEN_ALWAYS_INLINE void store_block(const packet (&acc)[R][P], T* s, Index s_stride,
                                              Index cols) {
    using namespace Eigen::internal;
    for (int r = 0; r < R; ++r) {
      for (int p = 0; p < P; ++p) {
        T* at = s + r * s_stride + p * width;
        const Index left = cols - Index(p) * width;
        if (left >= width) {
          pstoreu(at, acc[r][p]);
        } else {
          alignas(64) T buf[width];
          pstore(buf, acc[r][p]);
          for (Index x = 0; x < left; ++x) at[x] = buf[x];
        }
      }
    }
  }
};

}  // namespace kvcache::detail
