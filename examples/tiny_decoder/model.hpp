// SPDX-License-Identifier: Apache-2.0
// The tiny Llama-style decoder's configuration and weights, and deterministic random weights.
#pragma once

#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace tiny {

using kvcache::Index;
using matrix = kvcache::row_matrix<float>;  // [row][col]
using vector = Eigen::VectorXf;

/// Sizes of the model, as in a llama2.c checkpoint header.
struct config {
  Index dim = 256;         // residual stream width
  Index hidden_dim = 768;  // SwiGLU width
  Index n_layers = 4;
  Index n_heads = 8;
  Index n_kv_heads = 2;
  Index vocab_size = 512;
  Index seq_len = 2048;  // longest sequence (prompt + generated)
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  // Multi-head latent attention (DeepSeek-V2) in place of GQA when kv_lora_rank > 0: per layer
  // and token the cache holds a latent of kv_lora_rank and a RoPE key of rope_dim; each head's
  // query is [q_nope | q_pe] (head_dim + rope_dim), its value head_dim wide. n_kv_heads is
  // then unused.
  Index kv_lora_rank = 0;
  Index rope_dim = 0;

  Index head_dim() const { return dim / n_heads; }
  Index kv_dim() const { return n_kv_heads * head_dim(); }
  bool mla() const { return kv_lora_rank > 0; }
  /// The MLA layer's sizes: qk_nope_dim and v_head_dim are head_dim.
  kvcache::mla_shape latent() const {
    return {n_heads, kv_lora_rank, head_dim(), rope_dim, head_dim()};
  }
  /// The attention the cache serves: n_heads over n_kv_heads of head_dim, or with MLA the
  /// absorbed attention over one latent head.
  kvcache::attention_shape attention() const {
    return mla() ? latent().attention() : kvcache::attention_shape(n_heads, n_kv_heads, head_dim());
  }
  kvcache::cache_shape cache() const { return {n_layers, attention()}; }
  /// Width of a token's queries.
  Index q_dim() const { return mla() ? latent().q_width() : n_heads * head_dim(); }

  /// Throws std::invalid_argument, naming the field, unless every size is positive, dim is a
  /// multiple of n_heads with an even head_dim, and n_heads a multiple of n_kv_heads.
  void validate() const {
    const std::pair<const char*, Index> sizes[] = {
        {"dim", dim},         {"hidden_dim", hidden_dim}, {"n_layers", n_layers},
        {"n_heads", n_heads}, {"n_kv_heads", n_kv_heads}, {"vocab_size", vocab_size},
        {"seq_len", seq_len}};
    for (const auto& [name, value] : sizes) {
      if (value <= 0) {
        throw std::invalid_argument(std::string("config: ") + name + " must be positive, got " +
                                    std::to_string(value));
      }
    }
    if (dim % n_heads != 0 || head_dim() % 2 != 0) {
      throw std::invalid_argument("config: dim = " + std::to_string(dim) +
                                  " must be n_heads = " + std::to_string(n_heads) +
                                  " times an even head_dim");
    }
    if (n_heads % n_kv_heads != 0) {
      throw std::invalid_argument("config: n_heads = " + std::to_string(n_heads) +
                                  " is not a multiple of n_kv_heads = " +
                                  std::to_string(n_kv_heads));
    }
    if (kv_lora_rank < 0 || (mla() && (rope_dim < 2 || rope_dim % 2 != 0))) {
      throw std::invalid_argument("config: MLA needs kv_lora_rank >= 1 and an even rope_dim >= 2, "
                                  "got " + std::to_string(kv_lora_rank) + " and " +
                                  std::to_string(rope_dim));
    }
    if (mla()) (void)latent();  // its sizes checked
  }
};

/// One transformer block. Projections are stored as PyTorch and llama2.c store them,
/// `(out_features x in_features)` row-major, so y = W x, and for a batch Y = X W^T.
struct layer_weights {
  vector attn_norm;  // [dim]
  matrix wq;         // [n_heads*head_dim][dim]; MLA: [n_heads*(head_dim + rope_dim)][dim]
  matrix wk;         // [n_kv_heads*head_dim][dim] (GQA)
  matrix wv;         // [n_kv_heads*head_dim][dim] (GQA)
  matrix w_dkv;      // MLA: [kv_lora_rank + rope_dim][dim], down to [c_kv | k_pe]
  matrix w_uk;       // MLA: [n_heads*head_dim][kv_lora_rank], c_kv up to each head's key
  matrix w_uv;       // MLA: [n_heads*head_dim][kv_lora_rank], c_kv up to each head's value
  matrix wo;         // [dim][n_heads*head_dim]
  vector ffn_norm;   // [dim]
  matrix w1;         // [hidden_dim][dim] gate
  matrix w2;         // [dim][hidden_dim] down
  matrix w3;         // [hidden_dim][dim] up
};

struct weights {
  matrix token_embedding;  // [vocab][dim]
  std::vector<layer_weights> layers;
  vector final_norm;  // [dim]
  matrix classifier;  // [vocab][dim]; equal to token_embedding when shared
  bool shared_classifier = true;
};

/// Weights drawn from a seeded generator, scaled like a trained model's so activations stay
/// O(1) through the layers: N(0, 1/fan_in) projections, norms near 1, an untied classifier. The same seed gives the
/// same weights on every machine (the generator and its use are fully specified).
inline weights random_weights(const config& c, std::uint64_t seed) {
  c.validate();
  std::mt19937_64 gen(seed);
  // Box-Muller on the generator's raw output: std::normal_distribution is not specified
  // bit-for-bit across standard libraries.
  auto normal = [&gen]() {
    const double u1 = (double(gen() >> 11) + 0.5) * 0x1.0p-53;
    const double u2 = double(gen() >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  };
  auto fill = [&](Index rows, Index cols, double stddev) {
    matrix m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(normal() * stddev);
    return m;
  };
  auto norm_weights = [&](Index n) {
    vector v(n);
    for (Index i = 0; i < n; ++i) v(i) = float(1.0 + 0.1 * normal());
    return v;
  };
  const double in_dim = 1.0 / std::sqrt(double(c.dim)), in_hidden = 1.0 / std::sqrt(double(c.hidden_dim));
  weights w;
  w.token_embedding = fill(c.vocab_size, c.dim, 1.0);
  for (Index l = 0; l < c.n_layers; ++l) {
    layer_weights lw;
    lw.attn_norm = norm_weights(c.dim);
    lw.wq = fill(c.q_dim(), c.dim, in_dim);
    if (c.mla()) {
      const double in_rank = 1.0 / std::sqrt(double(c.kv_lora_rank));
      lw.w_dkv = fill(c.kv_lora_rank + c.rope_dim, c.dim, in_dim);
      lw.w_uk = fill(c.n_heads * c.head_dim(), c.kv_lora_rank, in_rank);
      lw.w_uv = fill(c.n_heads * c.head_dim(), c.kv_lora_rank, in_rank);
    } else {
      lw.wk = fill(c.kv_dim(), c.dim, in_dim);
      lw.wv = fill(c.kv_dim(), c.dim, in_dim);
    }
    lw.wo = fill(c.dim, c.n_heads * c.head_dim(), in_dim);
    lw.ffn_norm = norm_weights(c.dim);
    lw.w1 = fill(c.hidden_dim, c.dim, in_dim);
    lw.w2 = fill(c.dim, c.hidden_dim, in_hidden);
    lw.w3 = fill(c.hidden_dim, c.dim, in_dim);
    w.layers.push_back(std::move(lw));
  }
  w.final_norm = norm_weights(c.dim);
  // An untied classifier: tied to the embedding, a random model's residual stream points at the
  // current token and greedy decoding repeats it forever.
  w.classifier = fill(c.vocab_size, c.dim, in_dim);
  w.shared_classifier = false;
  return w;
}

}  // namespace tiny
