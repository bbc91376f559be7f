// SPDX-License-Identifier: Apache-2.0
// The tiny decoder's forward pass, written once: with the KV cache (prefill, then one token
// per step) or without it (the whole sequence recomputed at every step).
#pragma once

#include "model.hpp"
#include "project.hpp"

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tiny {

enum class mode { cached, uncached };

/// Runs a model over token sequences, keeping keys and values in a `Cache`: a
/// contiguous_cache (the default), a sliding_window_cache or a quantized_cache. A model with
/// multi-head latent attention (config::mla) keeps one latent row per token and layer in it
/// instead, and attends by weight absorption (kvcache/mla.hpp); uncached, it decompresses each
/// head's keys and values, as a model without absorption does. Buffers are
/// sized once for `seq_len` tokens, so no decode step allocates (the uncached path's reference
/// attention aside, which materializes its scores as generation without a cache does).
template <class Cache = kvcache::contiguous_cache<float>>
class decoder {
 public:
  /// A decoder over a contiguous cache with room for seq_len tokens.
  decoder(const config& c, const weights& w, Index threads = 1)
      : decoder(c, w, Cache(c.cache(), c.seq_len), threads) {
    cache_.reserve(c.seq_len);
  }

  /// A decoder over `cache`. `uncached_mask` is what generation without a cache attends with:
  /// give a sliding window cache's window and sinks here, so both modes compute the same model.
  decoder(const config& c, const weights& w, Cache cache, Index threads,
          kvcache::attention_mask uncached_mask = {})
      : cfg_(c), w_(w), shape_(c.attention()),
        rope_(c.mla() ? c.rope_dim : c.head_dim(), c.rope_theta, kvcache::rope_style::interleaved,
              c.seq_len),
        cache_(std::move(cache)), mask_(uncached_mask) {
    c.validate();
    if (threads > 1) pool_ = std::make_unique<kvcache::thread_pool>(threads);
    opt_.pool = pool_.get();
    const Index n = c.seq_len;
    x_.resize(n, c.dim);
    xb_.resize(n, c.dim);
    q_.resize(n, c.q_dim());
    if (c.mla()) {
      latent_.resize(n, c.kv_lora_rank + c.rope_dim);
    } else {
      k_.resize(n, c.kv_dim());
      v_.resize(n, c.kv_dim());
    }
    att_.resize(n, c.n_heads * c.head_dim());
    hb_.resize(n, c.hidden_dim);
    hb2_.resize(n, c.hidden_dim);
    xn_.resize(c.dim);
    logits_.resize(c.vocab_size);
  }

  const config& cfg() const { return cfg_; }
  const Cache& cache() const { return cache_; }
  /// The cache, to load a saved state into; call resume() after.
  Cache& cache() { return cache_; }
  /// Continues from the cache's position, after a saved cache was loaded into it.
  void resume() { pos_ = cache_.position(); }
  /// Tokens run through the cached path since the last reset: the next token's position.
  Index position() const { return pos_; }

  /// Forgets every cached token.
  void reset() {
    cache_.clear();
    pos_ = 0;
  }
  /// Keeps the oldest n cached tokens (rollback, e.g. of rejected speculative tokens).
  void crop(Index n) {
    cache_.crop(n);
    pos_ = n;
  }

  /// With the cache: runs `tokens` (the prompt, or one new token) at positions position()..,
  /// appending their keys and values, and returns the last token's logits.
  const vector& forward_cached(const std::vector<int>& tokens) {
    return forward(tokens.data(), Index(tokens.size()), pos_, mode::cached);
  }
  /// forward_cached of one token: a decode step.
  const vector& forward_cached(int token) { return forward(&token, 1, pos_, mode::cached); }

  /// Without a cache: runs the whole sequence `tokens` from position 0, as generation without a
  /// cache must at every step, and returns the last token's logits.
  const vector& forward_uncached(const std::vector<int>& tokens) {
    return forward(tokens.data(), Index(tokens.size()), 0, mode::uncached);
  }

 private:
  // Rows [0, n) of the buffers hold the n tokens at positions pos0..pos0+n-1.
  const vector& forward(const int* tokens, Index n, Index pos0, mode m) {
    if (n == 0) throw std::invalid_argument("forward: no tokens");
    if (pos0 + n > cfg_.seq_len) {
      throw std::length_error("forward: " + std::to_string(pos0 + n) +
                              " tokens exceed seq_len = " + std::to_string(cfg_.seq_len));
    }
    embed(tokens, n);
    for (Index l = 0; l < cfg_.n_layers; ++l) {
      const layer_weights& lw = w_.layers[std::size_t(l)];
      rmsnorm(x_.topRows(n), lw.attn_norm, xb_.topRows(n));
      qkv(lw, n);
      rotate(n, pos0);
      attention(lw, l, n, m);
      output(lw, n);  // output projection, residual
      rmsnorm(x_.topRows(n), lw.ffn_norm, xb_.topRows(n));
      mlp(lw, n);  // SwiGLU, residual
    }
    head(n - 1);
    if (m == mode::cached) pos_ += n;
    return logits_;
  }

  void embed(const int* tokens, Index n) {
    for (Index i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size) {
        throw std::out_of_range("embed: token " + std::to_string(tokens[i]) +
                                " out of range [0, " + std::to_string(cfg_.vocab_size) + ")");
      }
      x_.row(i) = w_.token_embedding.row(tokens[i]);
    }
  }

  template <class In, class Out>
  void rmsnorm(const In& in, const vector& weight, Out&& out) const {
    for (Index i = 0; i < in.rows(); ++i) {
      const float inv = 1.0f / std::sqrt(in.row(i).squaredNorm() / float(cfg_.dim) + cfg_.norm_eps);
      out.row(i) = (in.row(i) * inv).cwiseProduct(weight.transpose());
    }
  }

  // Queries, and keys and values; with MLA, queries and the latent rows [c_kv | k_pe]. One
  // token's projections run as one product over the pool; a chunk's split by blocks of rows.
  void qkv(const layer_weights& lw, Index n) {
    pool_type* pool = pool_.get();
    const float* x = xb_.row(0).data();
    if (cfg_.mla()) {
      if (n == 1) {
        project(pool, std::array<projection, 2>{{{&lw.wq, q_.row(0).data()},
                                                 {&lw.w_dkv, latent_.row(0).data()}}}, x);
        return;
      }
      project_rows(pool, lw.wq, xb_.topRows(n), q_.topRows(n), false);
      project_rows(pool, lw.w_dkv, xb_.topRows(n), latent_.topRows(n), false);
      return;
    }
    if (n == 1) {
      project(pool, std::array<projection, 3>{{{&lw.wq, q_.row(0).data()},
                                               {&lw.wk, k_.row(0).data()},
                                               {&lw.wv, v_.row(0).data()}}}, x);
      return;
    }
    project_rows(pool, lw.wq, xb_.topRows(n), q_.topRows(n), false);
    project_rows(pool, lw.wk, xb_.topRows(n), k_.topRows(n), false);
    project_rows(pool, lw.wv, xb_.topRows(n), v_.topRows(n), false);
  }

  // RoPE at positions pos0..: every head of q and k, or with MLA each head's q_pe and k_pe.
  void rotate(Index n, Index pos0) {
    if (!cfg_.mla()) {
      rope_.apply(q_.topRows(n), pos0);
      rope_.apply(k_.topRows(n), pos0);
      return;
    }
    const Index hd = cfg_.head_dim(), dr = cfg_.rope_dim;
    for (Index h = 0; h < cfg_.n_heads; ++h) {
      rope_.apply(q_.block(0, h * (hd + dr) + hd, n, dr), pos0);
    }
    rope_.apply(latent_.block(0, cfg_.kv_lora_rank, n, dr), pos0);
  }

  // Writes att_ rows [0, n): the attention of the n queries over every earlier token.
  void attention(const layer_weights& lw, Index l, Index n, mode m) {
    if (cfg_.mla()) {
      latent_attention(lw, l, n, m);
      return;
    }
    if (m == mode::uncached) {
      att_.topRows(n) = kvcache::reference_attention<float>(shape_, q_.topRows(n), k_.topRows(n),
                                                            v_.topRows(n), mask_);
    } else if (n == 1) {
      cache_.append(l, k_.topRows(1), v_.topRows(1));
      kvcache::decode_attention(shape_, q_.row(0), cache_.view(l), att_.row(0), ws_, opt_);
    } else {
      kvcache::prefill_attention(shape_, q_.topRows(n), k_.topRows(n), v_.topRows(n), cache_, l,
                                 att_.topRows(n), ws_, opt_);
    }
  }

  void latent_attention(const layer_weights& lw, Index l, Index n, mode m) {
    const kvcache::mla_shape s = cfg_.latent();
    if (m == mode::uncached) {
      att_.topRows(n) = kvcache::mla_reference_attention<float>(s, lw.w_uk, lw.w_uv, q_.topRows(n),
                                                                latent_.topRows(n), mask_);
    } else if (n == 1) {
      cache_.append(l, latent_.topRows(1));
      kvcache::mla_decode_attention(s, lw.w_uk, lw.w_uv, q_.row(0), cache_.view(l), att_.row(0),
                                    mla_ws_, opt_);
    } else {
      kvcache::mla_prefill_attention(s, lw.w_uk, lw.w_uv, q_.topRows(n), latent_.topRows(n),
                                     cache_, l, att_.topRows(n), mla_ws_, opt_);
    }
  }

  // x += att wo^T.
  void output(const layer_weights& lw, Index n) {
    if (n == 1) {
      project(pool_.get(), std::array<projection, 1>{{{&lw.wo, x_.row(0).data(), true}}},
              att_.row(0).data());
    } else {
      project_rows(pool_.get(), lw.wo, att_.topRows(n), x_.topRows(n), true);
    }
  }

  void mlp(const layer_weights& lw, Index n) {
    pool_type* pool = pool_.get();
    if (n == 1) {
      project(pool, std::array<projection, 2>{{{&lw.w1, hb_.row(0).data()},
                                               {&lw.w3, hb2_.row(0).data()}}},
              xb_.row(0).data());
    } else {
      project_rows(pool, lw.w1, xb_.topRows(n), hb_.topRows(n), false);
      project_rows(pool, lw.w3, xb_.topRows(n), hb2_.topRows(n), false);
    }
    auto h = hb_.topRows(n).array();
    h = h / (1.0f + (-h).exp()) * hb2_.topRows(n).array();  // silu(w1 x) * (w3 x)
    if (n == 1) {
      project(pool, std::array<projection, 1>{{{&lw.w2, x_.row(0).data(), true}}},
              hb_.row(0).data());
    } else {
      project_rows(pool, lw.w2, hb_.topRows(n), x_.topRows(n), true);
    }
  }

  void head(Index row) {
    rmsnorm(x_.row(row), w_.final_norm, xn_);
    project(pool_.get(), std::array<projection, 1>{{{&w_.classifier, logits_.data()}}},
            xn_.data());
  }

  using pool_type = kvcache::thread_pool;

  config cfg_;
  const weights& w_;
  kvcache::attention_shape shape_;
  kvcache::rope rope_;
  Cache cache_;
  kvcache::attention_mask mask_;
  Index pos_ = 0;
  std::unique_ptr<kvcache::thread_pool> pool_;
  kvcache::attention_options opt_;
  kvcache::attention_workspace<float> ws_;
  kvcache::mla_workspace<float> mla_ws_;
  matrix x_, xb_, q_, k_, v_, att_, hb_, hb2_;  // [token][...] activations of this call
  matrix latent_;                               // [token][kv_lora_rank + rope_dim], MLA
  kvcache::row_vector<float> xn_;               // [dim] the last token, normed
  vector logits_;                               // [vocab] of the last token
};

}  // namespace tiny
