// SPDX-License-Identifier: Apache-2.0
// Weights packed once for products with few rows (a decode step's batch): Y = X W^T without
// repacking W at every call, as a general matrix product must.
#pragma once

#include "tiny_decoder/model.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace serve {

using tiny::Index;

/// A weight matrix W (`out x in`, y = W x, as tiny::layer_weights stores it) packed into panels
/// of `width` consecutive outputs, each panel holding, for k = 0 .. in-1, the `width` weights of
/// input k side by side (one SIMD packet), the last panel padded with zeros. A product with a
/// few rows then reads each weight once per group of rows, straight into registers, where a
/// general matrix product copies (packs) all of W at every call: for a decode batch of 16 rows
/// of the tiny model that copy costs about as much as the arithmetic.
class packed_weights {
 public:
  using packet = Eigen::internal::packet_traits<float>::type;
  static constexpr Index width = Eigen::internal::packet_traits<float>::size;
  /// Panels a pass keeps in registers, and rows of X a pass multiplies them with: their
  /// accumulators fill half the vector registers.
  static constexpr Index panels_per_pass = 2;
  static constexpr Index rows_per_pass =
      std::max(1, int(EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS) / 2 / int(panels_per_pass));

  packed_weights() = default;
  explicit packed_weights(const tiny::matrix& w) : out_(w.rows()), in_(w.cols()) {
    panels_ = (out_ + width - 1) / width;
    panels_ += panels_ % panels_per_pass;  // whole passes; the extra panel is zeros
    data_.assign(std::size_t(panels_ * in_ * width), 0.0f);
    for (Index o = 0; o < out_; ++o) {
      float* panel = data_.data() + (o / width) * in_ * width + o % width;
      for (Index k = 0; k < in_; ++k) panel[k * width] = w(o, k);
    }
  }

  Index rows() const { return out_; }  // outputs
  Index cols() const { return in_; }   // inputs

  /// Y = X W^T (or Y += X W^T with `accumulate`): X is `n x in` and Y `n x out`, row-major
  /// (rows `ldx` and `ldy` floats apart). O(n * in * out), in passes of rows_per_pass rows.
  void multiply(const float* x, Index ldx, Index n, float* y, Index ldy, bool accumulate) const {
    // Panels outer, rows inner: a pair of panels is read from memory once, then from L1.
    for (Index p = 0; p < panels_; p += panels_per_pass) {
      for (Index r0 = 0; r0 < n; r0 += rows_per_pass) {
        const Index rows = std::min(rows_per_pass, n - r0);
        dispatch(p, x + r0 * ldx, ldx, rows, y + r0 * ldy, ldy, accumulate,
                 std::integral_constant<Index, rows_per_pass>());
      }
    }
  }

  /// multiply() of an Eigen row-major X into a row-major Y with out() columns.
  template <class X, class Y>
  void multiply(const X& x, Y&& y, bool accumulate) const {
    if (x.cols() != in_ || y.cols() != out_ || y.rows() != x.rows()) {
      throw std::invalid_argument("packed_weights: X is " + std::to_string(x.rows()) + " x " +
                                  std::to_string(x.cols()) + " and Y " + std::to_string(y.rows()) +
                                  " x " + std::to_string(y.cols()) + " for weights " +
                                  std::to_string(out_) + " x " + std::to_string(in_));
    }
    multiply(x.data(), x.outerStride(), x.rows(), y.data(), y.outerStride(), accumulate);
  }

 private:
  // Calls pass<R> for the R = rows that the pass has, R at most `Max`.
  template <Index Max>
  void dispatch(Index p, const float* x, Index ldx, Index rows, float* y, Index ldy,
                bool accumulate, std::integral_constant<Index, Max>) const {
    if constexpr (Max > 1) {
      if (rows < Max) {
        dispatch(p, x, ldx, rows, y, ldy, accumulate, std::integral_constant<Index, Max - 1>());
        return;
      }
    }
    pass<Max>(p, x, ldx, y, ldy, accumulate);
  }

  // Rows [0, R) of X times panels p and p + 1.
  template <Index R>
  void pass(Index p, const float* x, Index ldx, float* y, Index ldy, bool accumulate) const {
    using namespace Eigen::internal;
    {
      const float* w0 = data_.data() + p * in_ * width;
      const float* w1 = w0 + in_ * width;
      packet a0[R], a1[R];
      for (Index r = 0; r < R; ++r) {
        a0[r] = pset1<packet>(0.0f);
        a1[r] = pset1<packet>(0.0f);
      }
      for (Index k = 0; k < in_; ++k) {
        const packet b0 = pload<packet>(w0 + k * width);
        const packet b1 = pload<packet>(w1 + k * width);
        for (Index r = 0; r < R; ++r) {
          const packet xr = pset1<packet>(x[r * ldx + k]);
          a0[r] = pmadd(xr, b0, a0[r]);
          a1[r] = pmadd(xr, b1, a1[r]);
        }
      }
      for (Index r = 0; r < R; ++r) {
        store(a0[r], y + r * ldy, p * width, accumulate);
        store(a1[r], y + r * ldy, (p + 1) * width, accumulate);
      }
    }
  }

  // Writes (or adds) the packet of outputs [o, o + width) of one row, those that exist.
  void store(const packet& v, float* row, Index o, bool accumulate) const {
    using namespace Eigen::internal;
    if (o + width <= out_) {
      float* dst = row + o;
      pstoreu(dst, accumulate ? padd(ploadu<packet>(dst), v) : v);
      return;
    }
    alignas(64) float buf[width];
    pstore(buf, v);
    for (Index i = 0; o + i < out_; ++i) row[o + i] = accumulate ? row[o + i] + buf[i] : buf[i];
  }

  Index out_ = 0, in_ = 0, panels_ = 0;
  std::vector<float, Eigen::aligned_allocator<float>> data_;  // [panel][k][width]
};

}  // namespace serve
