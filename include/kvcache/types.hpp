// SPDX-License-Identifier: Apache-2.0
// Storage scalars the caches accept, the type arithmetic runs in, and matrix aliases.
#pragma once

#include <Eigen/Core>

#include <type_traits>

namespace kvcache {

using Index = Eigen::Index;

/// Row-major dynamic matrix: one row per token, the layout projections produce.
template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic row vector: one token's activations.
template <class T>
using row_vector = Eigen::Matrix<T, 1, Eigen::Dynamic>;

namespace detail {
template <class T>
inline constexpr bool always_false = false;
}  // namespace detail

/// Traits of a storage scalar. Supported: float, double, Eigen::half, Eigen::bfloat16.
/// `compute` is the type arithmetic runs in: double for double, float otherwise.
template <class Scalar>
struct scalar_traits {
  static_assert(detail::always_false<Scalar>,
                "kvcache: unsupported storage scalar; use float, double, Eigen::half or "
                "Eigen::bfloat16");
};

template <>
struct scalar_traits<float> {
  using compute = float;
  static constexpr const char* name = "f32";
};

template <>
struct scalar_traits<double> {
  using compute = double;
  static constexpr const char* name = "f64";
};

template <>
struct scalar_traits<Eigen::half> {
  using compute = float;
  static constexpr const char* name = "f16";
};

template <>
struct scalar_traits<Eigen::bfloat16> {
  using compute = float;
  static constexpr const char* name = "bf16";
};

/// The type arithmetic on a cache of `Scalar` runs in.
template <class Scalar>
using compute_t = typename scalar_traits<Scalar>::compute;

}  // namespace kvcache
