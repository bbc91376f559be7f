// SPDX-License-Identifier: Apache-2.0
// The tiny decoder's projections over a thread pool: output rows split between the threads,
// one token's matrix-vector products streaming row-major weights, the same sums on any number
// of threads.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <kvcache/thread_pool.hpp>

#include "model.hpp"

namespace tiny {

/// One projection of a step: y = W x, or y += W x with `add` (a residual).
struct projection {
  const matrix* w = nullptr;  // [out][in], row-major
  float* y = nullptr;         // [out]
  bool add = false;
};

namespace detail {

// Writes y_r (+)= sum + the scalar tail [packets, cols) of row r.
template <class T>
void finish_row(const projection& p, const T* x, Index r, T sum, Index packets) {
  const T* wr = p.w->data() + r * p.w->outerStride();
  for (Index c = packets; c < p.w->cols(); ++c) sum += wr[c] * x[c];
  p.y[r] = p.add ? p.y[r] + sum : sum;
}

// y_r (+)= w_r . x for rows [r0, r1) of one projection. Each row sums its even packets in one
// accumulator and its odd ones in another (the leftover packet into the first), adds the two,
// then the scalar tail: the same order whichever rows share a pass, so a row's result does not
// depend on how the rows were split between threads. Four rows a pass: eight chains of FMAs in flight, x loaded
// once for four rows.
template <class T>
struct matvec {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<packet>::size;

  static void rows(const projection& p, const T* x, Index r0, Index r1) {
    using namespace Eigen::internal;
    const Index n = p.w->cols(), stride = p.w->outerStride();
    const Index pairs = n / (2 * width) * (2 * width), packets = n / width * width;
    const T* w = p.w->data();
    Index r = r0;
    for (; r + 4 <= r1; r += 4) {
      const T* w0 = w + r * stride;
      const T* w1 = w0 + stride;
      const T* w2 = w1 + stride;
      const T* w3 = w2 + stride;
      packet a00 = pset1<packet>(T(0)), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
             a30 = a00, a31 = a00;
      for (Index c = 0; c < pairs; c += 2 * width) {
        const packet x0 = ploadu<packet>(x + c), x1 = ploadu<packet>(x + c + width);
        a00 = pmadd(ploadu<packet>(w0 + c), x0, a00);
        a10 = pmadd(ploadu<packet>(w1 + c), x0, a10);
        a20 = pmadd(ploadu<packet>(w2 + c), x0, a20);
        a30 = pmadd(ploadu<packet>(w3 + c), x0, a30);
        a01 = pmadd(ploadu<packet>(w0 + c + width), x1, a01);
        a11 = pmadd(ploadu<packet>(w1 + c + width), x1, a11);
        a21 = pmadd(ploadu<packet>(w2 + c + width), x1, a21);
        a31 = pmadd(ploadu<packet>(w3 + c + width), x1, a31);
      }
      if (packets > pairs) {  // one whole packet left
        const packet xl = ploadu<packet>(x + pairs);
        a00 = pmadd(ploadu<packet>(w0 + pairs), xl, a00);
        a10 = pmadd(ploadu<packet>(w1 + pairs), xl, a10);
        a20 = pmadd(ploadu<packet>(w2 + pairs), xl, a20);
        a30 = pmadd(ploadu<packet>(w3 + pairs), xl, a30);
      }
      finish_row(p, x, r, predux(padd(a00, a01)), packets);
      finish_row(p, x, r + 1, predux(padd(a10, a11)), packets);
      finish_row(p, x, r + 2, predux(padd(a20, a21)), packets);
      finish_row(p, x, r + 3, predux(padd(a30, a31)), packets);
    }
    for (; r < r1; ++r) {
      const T* wr = w + r * stride;
      packet a0 = pset1<packet>(T(0)), a1 = a0;
      for (Index c = 0; c < pairs; c += 2 * width) {
        a0 = pmadd(ploadu<packet>(wr + c), ploadu<packet>(x + c), a0);
        a1 = pmadd(ploadu<packet>(wr + c + width), ploadu<packet>(x + c + width), a1);
      }
      if (packets > pairs) a0 = pmadd(ploadu<packet>(wr + pairs), ploadu<packet>(x + pairs), a0);
      finish_row(p, x, r, predux(padd(a0, a1)), packets);
    }
  }
};

}  // namespace detail

/// Up to three projections of the same input x (`in` floats each), run as one: their rows, side
/// by side, are cut into contiguous runs that the threads of `pool` take in turn, a few runs a
/// thread so that a thread the system preempts holds up no one (the calling thread alone when
/// `pool` is null, or when all the weights together are below `min_parallel` floats: waking a
/// thread costs more than a small product). Reads every weight once; allocates nothing.
/// Results are the same on any number of threads.
template <std::size_t N>
void project(kvcache::thread_pool* pool, const std::array<projection, N>& ps, const float* x,
             Index min_parallel = Index(1) << 16) {
  static_assert(N >= 1 && N <= 3, "tiny: project runs one to three projections");
  Index rows = 0, floats = 0;
  for (const projection& p : ps) {
    rows += p.w->rows();
    floats += p.w->size();
  }
  const Index workers = pool == nullptr || floats < min_parallel ? 1 : pool->size();
  const Index parts = workers == 1 ? 1 : std::max<Index>(workers, std::min<Index>(4 * workers, rows / 16));
  // Runs a multiple of 4 rows long, so that only a run's end takes rows one at a time.
  const auto bound = [&](Index part) {
    return part == parts ? rows : (rows * part / parts) / 4 * 4;
  };
  auto run = [&](Index part, Index) {
    Index lo = bound(part), hi = bound(part + 1), first = 0;
    for (const projection& p : ps) {
      const Index end = first + p.w->rows();
      const Index a = std::max(lo, first), b = std::min(hi, end);
      if (a < b) detail::matvec<float>::rows(p, x, a - first, b - first);
      first = end;
    }
  };
  if (parts == 1) {
    run(0, 0);
  } else {
    pool->parallel_for(parts, run);
  }
}

/// Y = X W^T (or Y += X W^T with `add`) for a chunk of tokens X ([tokens][in]), the columns of
/// Y cut into blocks of `block` rows of W shared out over `pool`: the same blocks on any number
/// of threads, so the same results.
template <class X, class Y>
void project_rows(kvcache::thread_pool* pool, const matrix& w, const X& x, Y&& y, bool add,
                  Index block = 128) {
  const Index blocks = (w.rows() + block - 1) / block;
  auto run = [&](Index i, Index) {
    const Index r0 = i * block, nr = std::min(block, w.rows() - r0);
    if (add) {
      y.middleCols(r0, nr).noalias() += x * w.middleRows(r0, nr).transpose();
    } else {
      y.middleCols(r0, nr).noalias() = x * w.middleRows(r0, nr).transpose();
    }
  };
  if (pool == nullptr) {
    for (Index i = 0; i < blocks; ++i) run(i, 0);
  } else {
    pool->parallel_for(blocks, run);
  }
}

}  // namespace tiny
