// SPDX-License-Identifier: Apache-2.0
// The tiny encoder-decoder's configuration and weights, and deterministic random weights.
#pragma once

#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace encdec {

using kvcache::Index;
using matrix = kvcache::row_matrix<float>;  // [row][col]
using vector = Eigen::VectorXf;

/// Token ids with a fixed meaning: the decoder starts with bos then the task's token; source
/// tokens are drawn from first_word and up.
inline constexpr int bos = 0, copy_task = 1, reverse_task = 2, first_word = 3;

/// Sizes of the model: a pre-norm transformer encoder and decoder of the same width and heads
/// (as in T5 and Whisper), Llama-style blocks (RMSNorm, RoPE in self-attention, SwiGLU).
struct config {
  Index dim = 256;         // residual stream width
  Index hidden_dim = 768;  // SwiGLU width
  Index encoder_layers = 4;
  Index decoder_layers = 4;
  Index n_heads = 8;
  Index n_kv_heads = 2;
  Index vocab_size = 512;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;

  Index head_dim() const { return dim / n_heads; }
  Index kv_dim() const { return n_kv_heads * head_dim(); }
  kvcache::attention_shape attention() const { return {n_heads, n_kv_heads, head_dim()}; }
  /// The decoder's caches, self-attention and cross-attention alike: one layer each per
  /// decoder layer.
  kvcache::cache_shape decoder_cache() const { return {decoder_layers, attention()}; }

  /// Throws std::invalid_argument, naming the field, unless every size is positive, dim is a
  /// multiple of n_heads with an even head_dim, n_heads a multiple of n_kv_heads and the
  /// vocabulary holds a word beside the special tokens.
  void validate() const {
    const std::pair<const char*, Index> sizes[] = {
        {"dim", dim},
        {"hidden_dim", hidden_dim},
        {"encoder_layers", encoder_layers},
        {"decoder_layers", decoder_layers},
        {"n_heads", n_heads},
        {"n_kv_heads", n_kv_heads}};
    for (const auto& [name, value] : sizes) {
      if (value <= 0) {
        throw std::invalid_argument(std::string("config: ") + name + " must be positive, got " +
                                    std::to_string(value));
      }
    }
    if (vocab_size <= first_word) {
      throw std::invalid_argument("config: vocab_size must be > " + std::to_string(first_word) +
                                  " (bos, copy, reverse and at least one word), got " +
                                  std::to_string(vocab_size));
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
  }
};

/// One attention's projections, stored as PyTorch stores them, `(out_features x in_features)`
/// row-major, so y = W x, and for a batch Y = X W^T.
struct attention_weights {
  matrix wq;  // [n_heads*head_dim][dim]
  matrix wk;  // [n_kv_heads*head_dim][dim]
  matrix wv;  // [n_kv_heads*head_dim][dim]
  matrix wo;  // [dim][n_heads*head_dim]
};

struct mlp_weights {
  matrix w1;  // [hidden_dim][dim] gate
  matrix w2;  // [dim][hidden_dim] down
  matrix w3;  // [hidden_dim][dim] up
};

/// An encoder block: bidirectional self-attention, then the MLP.
struct encoder_layer {
  vector attn_norm;  // [dim]
  attention_weights attn;
  vector ffn_norm;  // [dim]
  mlp_weights mlp;
};

/// A decoder block: causal self-attention, cross-attention over the encoder's output (queries
/// from the decoder, keys and values from the encoder's output), then the MLP.
struct decoder_layer {
  vector self_norm;  // [dim]
  attention_weights self;
  vector cross_norm;  // [dim]
  attention_weights cross;
  vector ffn_norm;  // [dim]
  mlp_weights mlp;
};

struct weights {
  matrix embedding;  // [vocab][dim], shared by the encoder and the decoder
  std::vector<encoder_layer> encoder;
  vector encoder_norm;  // [dim] of the encoder's output, which every cross-attention reads
  std::vector<decoder_layer> decoder;
  vector final_norm;  // [dim]
  matrix classifier;  // [vocab][dim]
};

/// Weights drawn from a seeded generator, scaled so activations stay O(1) through the layers:
/// N(0, 1/fan_in) projections, norms near 1. The same seed gives the same weights on every
/// machine (Box-Muller on the raw output of std::mt19937_64, which the standard specifies).
inline weights random_weights(const config& c, std::uint64_t seed) {
  c.validate();
  std::mt19937_64 gen(seed);
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
  const double in_dim = 1.0 / std::sqrt(double(c.dim));
  const double in_hidden = 1.0 / std::sqrt(double(c.hidden_dim));
  auto attention = [&] {
    return attention_weights{fill(c.n_heads * c.head_dim(), c.dim, in_dim),
                             fill(c.kv_dim(), c.dim, in_dim), fill(c.kv_dim(), c.dim, in_dim),
                             fill(c.dim, c.n_heads * c.head_dim(), in_dim)};
  };
  auto mlp = [&] {
    return mlp_weights{fill(c.hidden_dim, c.dim, in_dim), fill(c.dim, c.hidden_dim, in_hidden),
                       fill(c.hidden_dim, c.dim, in_dim)};
  };
  weights w;
  w.embedding = fill(c.vocab_size, c.dim, 1.0);
  for (Index l = 0; l < c.encoder_layers; ++l) {
    encoder_layer e;
    e.attn_norm = norm_weights(c.dim);
    e.attn = attention();
    e.ffn_norm = norm_weights(c.dim);
    e.mlp = mlp();
    w.encoder.push_back(std::move(e));
  }
  w.encoder_norm = norm_weights(c.dim);
  for (Index l = 0; l < c.decoder_layers; ++l) {
    decoder_layer d;
    d.self_norm = norm_weights(c.dim);
    d.self = attention();
    d.cross_norm = norm_weights(c.dim);
    d.cross = attention();
    d.ffn_norm = norm_weights(c.dim);
    d.mlp = mlp();
    w.decoder.push_back(std::move(d));
  }
  w.final_norm = norm_weights(c.dim);
  w.classifier = fill(c.vocab_size, c.dim, in_dim);
  return w;
}

}  // namespace encdec
