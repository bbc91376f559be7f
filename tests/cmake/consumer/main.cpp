// SPDX-License-Identifier: Apache-2.0
// Consumer smoke test: caches two tokens and attends over them.
#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdio>

int main() {
  const kvcache::attention_shape shape(4, 2, 8);
  kvcache::kv_layer<float> layer(shape.n_kv_heads(), shape.head_dim());
  const kvcache::row_matrix<float> k = kvcache::row_matrix<float>::Ones(2, shape.kv_width());
  layer.append(k, k);
  const kvcache::row_vector<float> q = kvcache::row_vector<float>::Ones(shape.q_width());
  kvcache::row_vector<float> out(shape.q_width());
  kvcache::decode_attention(shape, q, layer, out);
  if (std::abs(out.sum() - float(shape.q_width())) > 1e-4f) {
    std::puts("consumer: wrong attention output");
    return 1;
  }
  std::puts("consumer: ok");
  return 0;
}
