// SPDX-License-Identifier: Apache-2.0
// Shared test helpers: seeded random inputs, tolerances per scalar type, cache read-back.
#pragma once

#include <kvcache/kvcache.hpp>

#include <gtest/gtest.h>

#include <random>
#include <string>

namespace kvcache::test {

using storage_types = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;

/// Names the typed tests by storage type: f32, f64, f16, bf16.
struct scalar_name {
  template <class T>
  static std::string GetName(int) {
    return scalar_traits<T>::name;
  }
};

/// Uniform values in [-1, 1] from a fixed seed, so every run sees the same inputs.
template <class T = float>
row_matrix<T> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  row_matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = T(dist(gen));
  }
  return m;
}

/// `m` rounded to Scalar and back: what a cache of Scalar stores of it.
template <class Scalar>
row_matrix<double> stored(const row_matrix<float>& m) {
  return m.cast<Scalar>().template cast<double>();
}

/// Tolerance of a kernel against the double oracle when both read the same stored keys and
/// values: only the arithmetic differs, float (24-bit mantissa, ~6e-8 per rounding) for the
/// 16- and 32-bit storage types and double for double. Outputs are convex combinations of
/// values in [-1, 1]; errors of a few thousand float roundings in the softmax sum and the
/// output accumulation stay below 2e-5 in practice, so 1e-4 leaves a margin of five.
template <class Scalar>
double kernel_tolerance() {
  return std::is_same_v<Scalar, double> ? 1e-12 : 1e-4;
}

/// Tolerance against the oracle on the unrounded float inputs: adds the storage rounding.
/// Relative rounding of f16 is 2^-11 (4.9e-4) and of bf16 2^-8 (3.9e-3); with scores of up
/// to sqrt(head_dim) in magnitude the probabilities move by a few times that, so 5e-3 for
/// f16 and 4e-2 for bf16. f32 and f64 store the inputs exactly.
template <class Scalar>
double storage_tolerance() {
  if constexpr (std::is_same_v<Scalar, Eigen::half>) return 5e-3;
  if constexpr (std::is_same_v<Scalar, Eigen::bfloat16>) return 4e-2;
  return kernel_tolerance<Scalar>();
}

/// All cached keys (or values) of a layer as `size x n_kv_heads*head_dim` doubles, the
/// layout the reference takes.
template <class Scalar>
row_matrix<double> read_back(const kv_layer<Scalar>& layer, bool keys) {
  const Index d = layer.head_dim();
  row_matrix<double> out(layer.size(), layer.kv_width());
  for (Index h = 0; h < layer.n_kv_heads(); ++h) {
    out.middleCols(h * d, d) = (keys ? layer.keys(h) : layer.values(h)).template cast<double>();
  }
  return out;
}

/// Keys (or values) that layer `l` of any cache holds, oldest first, as doubles.
template <class Layout, class Format>
row_matrix<double> read_back(const kv_cache<Layout, Format>& cache, Index l, bool keys) {
  return (keys ? cache.keys(l) : cache.values(l)).template cast<double>();
}

/// The model shapes the attention tests run over.
struct shape_case {
  const char* name;
  Index n_heads, n_kv_heads, head_dim;
};

inline const shape_case shape_cases[] = {
    {"mha", 4, 4, 64},  {"gqa", 8, 2, 64},   {"mqa", 8, 1, 128},
    {"gqa_d7", 6, 2, 7}, {"mha_d1", 3, 3, 1}, {"gqa_d128", 8, 2, 128},
};

}  // namespace kvcache::test
