// SPDX-License-Identifier: Apache-2.0
// The quantile the examples report timings by (tiny_decoder, serve, encoder_decoder).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace tiny {

/// The q-quantile (0..1) of `v`, by nearest rank; 0 for an empty vector.
inline double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double rank = std::clamp(std::ceil(q * double(v.size())) - 1.0, 0.0, double(v.size() - 1));
  return v[std::size_t(rank)];
}

}  // namespace tiny
