// SPDX-License-Identifier: Apache-2.0
// The tiny encoder-decoder's forward passes: the encoder, run once per source, and the decoder,
// with both caches, with the self-attention cache only, or without any cache.
#pragma once

#include "model.hpp"

#include <kvcache/kvcache.hpp>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace encdec {

/// How the decoder reaches its keys and values.
enum class mode {
  /// Self-attention keys and values in a kv cache, one token appended per step; the
  /// cross-attention keys and values of every layer projected from the encoder's output once,
  /// into a cross_attention_cache.
  cached,
  /// The self-attention cache as above, but every step projects the cross-attention keys and
  /// values from the encoder's output again (then attends with the same kernel).
  self_cache_only,
  /// No cache: every step runs the decoder over its whole sequence again and projects the
  /// cross-attention keys and values from the encoder's output again.
  uncached,
};

inline const char* name(mode m) {
  return m == mode::cached ? "cached" : m == mode::self_cache_only ? "self_cache_only" : "uncached";
}

namespace detail {

// out = in / rms(in) * weight, row by row.
template <class In, class Out>
void rmsnorm(const In& in, const vector& weight, float eps, Out&& out) {
  for (Index i = 0; i < in.rows(); ++i) {
    const float inv = 1.0f / std::sqrt(in.row(i).squaredNorm() / float(in.cols()) + eps);
    out.row(i) = (in.row(i) * inv).cwiseProduct(weight.transpose());
  }
}

// x += W2 (silu(W1 xb) * W3 xb) for the n rows of xb (SwiGLU), hb and hb2 as scratch.
inline void mlp(const mlp_weights& w, Index n, const matrix& xb, matrix& hb, matrix& hb2,
                matrix& x) {
  hb.topRows(n).noalias() = xb.topRows(n) * w.w1.transpose();
  hb2.topRows(n).noalias() = xb.topRows(n) * w.w3.transpose();
  auto h = hb.topRows(n).array();
  h = h / (1.0f + (-h).exp()) * hb2.topRows(n).array();
  x.topRows(n).noalias() += hb.topRows(n) * w.w2.transpose();
}

}  // namespace detail

/// The encoder: bidirectional self-attention over the source tokens, run once per source. Its
/// attention is a cross_attention over the layer's own keys and values (a one-layer
/// cross_attention_cache refilled at each layer): every source token sees every other.
class encoder {
 public:
  encoder(const config& c, const weights& w, Index max_source,
          const kvcache::attention_options& opt)
      : cfg_(c), w_(w), shape_(c.attention()),
        rope_(c.head_dim(), c.rope_theta, kvcache::rope_style::interleaved, max_source),
        kv_(kvcache::cache_shape(1, shape_), max_source), opt_(opt) {
    c.validate();
    x_.resize(max_source, c.dim);
    xb_.resize(max_source, c.dim);
    q_.resize(max_source, c.n_heads * c.head_dim());
    k_.resize(max_source, c.kv_dim());
    v_.resize(max_source, c.kv_dim());
    att_.resize(max_source, c.n_heads * c.head_dim());
    hb_.resize(max_source, c.hidden_dim);
    hb2_.resize(max_source, c.hidden_dim);
  }

  /// The encoder's output over `source` (`source.size() x dim`, after the final norm): what
  /// every decoder layer's cross-attention projects to its keys and values.
  matrix run(const std::vector<int>& source) {
    const Index n = Index(source.size());
    if (n == 0 || n > x_.rows()) {
      throw std::length_error("encoder: " + std::to_string(n) + " source tokens, expected 1 to " +
                              std::to_string(x_.rows()));
    }
    for (Index i = 0; i < n; ++i) x_.row(i) = w_.embedding.row(source[std::size_t(i)]);
    for (const encoder_layer& lw : w_.encoder) {
      detail::rmsnorm(x_.topRows(n), lw.attn_norm, cfg_.norm_eps, xb_.topRows(n));
      q_.topRows(n).noalias() = xb_.topRows(n) * lw.attn.wq.transpose();
      k_.topRows(n).noalias() = xb_.topRows(n) * lw.attn.wk.transpose();
      v_.topRows(n).noalias() = xb_.topRows(n) * lw.attn.wv.transpose();
      rope_.apply(q_.topRows(n), 0);
      rope_.apply(k_.topRows(n), 0);
      kv_.clear();
      kv_.fill(0, k_.topRows(n), v_.topRows(n));
      kvcache::cross_attention(shape_, q_.topRows(n), kv_, 0, att_.topRows(n), ws_, opt_);
      x_.topRows(n).noalias() += att_.topRows(n) * lw.attn.wo.transpose();
      detail::rmsnorm(x_.topRows(n), lw.ffn_norm, cfg_.norm_eps, xb_.topRows(n));
      detail::mlp(lw.mlp, n, xb_, hb_, hb2_, x_);
    }
    matrix out(n, cfg_.dim);
    detail::rmsnorm(x_.topRows(n), w_.encoder_norm, cfg_.norm_eps, out);
    return out;
  }

 private:
  config cfg_;
  const weights& w_;
  kvcache::attention_shape shape_;
  kvcache::rope rope_;
  kvcache::cross_attention_cache<kvcache::plain_format<float>> kv_;  // this layer's own K and V
  kvcache::attention_options opt_;
  kvcache::attention_workspace<float> ws_;
  matrix x_, xb_, q_, k_, v_, att_, hb_, hb2_;  // [source token][...]
};

/// The decoder, with its caches stored in `Format` (plain_format<Scalar> or
/// quantized_format<Bits>): a kv_cache over a fixed layout for self-attention (room for
/// max_target tokens) and a cross_attention_cache for cross-attention (room for max_source
/// encoder tokens). Buffers are sized once, so no cached step allocates.
template <class Format>
class decoder {
  static_assert(std::is_same_v<kvcache::compute_t<typename Format::scalar_type>, float>,
                "encdec: the decoder computes in float: f32, f16, bf16, int8 or int4 storage");

 public:
  using self_cache = kvcache::kv_cache<kvcache::fixed_layout, Format>;
  using cross_cache = kvcache::cross_attention_cache<Format>;

  decoder(const config& c, const weights& w, const Format& format, Index max_source,
          Index max_target, const kvcache::attention_options& opt)
      : cfg_(c), w_(w), shape_(c.attention()),
        rope_(c.head_dim(), c.rope_theta, kvcache::rope_style::interleaved, max_target),
        self_(c.decoder_cache(), kvcache::fixed_layout{max_target}, format),
        cross_(c.decoder_cache(), max_source, format),
        scratch_(kvcache::cache_shape(1, shape_), max_source, format), opt_(opt) {
    c.validate();
    x_.resize(max_target, c.dim);
    xb_.resize(max_target, c.dim);
    q_.resize(max_target, c.n_heads * c.head_dim());
    k_.resize(max_target, c.kv_dim());
    v_.resize(max_target, c.kv_dim());
    att_.resize(max_target, c.n_heads * c.head_dim());
    hb_.resize(max_target, c.hidden_dim);
    hb2_.resize(max_target, c.hidden_dim);
    cross_k_.resize(max_source, c.kv_dim());
    cross_v_.resize(max_source, c.kv_dim());
    xn_.resize(c.dim);
    logits_.resize(c.vocab_size);
  }

  const self_cache& self() const { return self_; }
  const cross_cache& cross() const { return cross_; }
  /// The position of the next token of a cached run.
  Index position() const { return pos_; }

  /// Starts a new target for the encoder output `encoded` (`source tokens x dim`): forgets the
  /// cached tokens and, in cached mode, fills the cross-attention cache, each layer's keys and
  /// values projected from `encoded` once. `encoded` must outlive the run.
  void start(const matrix& encoded, mode m) {
    if (encoded.rows() == 0 || encoded.rows() > cross_k_.rows() || encoded.cols() != cfg_.dim) {
      throw std::invalid_argument("decoder: the encoder output is " +
                                  std::to_string(encoded.rows()) + " x " +
                                  std::to_string(encoded.cols()) + ", expected 1 to " +
                                  std::to_string(cross_k_.rows()) + " rows of " +
                                  std::to_string(cfg_.dim));
    }
    encoded_ = &encoded;
    self_.clear();
    cross_.clear();
    pos_ = 0;
    if (m != mode::cached) return;
    for (Index l = 0; l < cfg_.decoder_layers; ++l) {
      project_cross(l);
      cross_.fill(l, cross_k_.topRows(encoded.rows()), cross_v_.topRows(encoded.rows()));
    }
  }

  /// Cached and self_cache_only modes: runs `n` tokens at positions position().., appending
  /// their self-attention keys and values, and returns the last token's logits.
  const vector& forward_cached(const int* tokens, Index n, mode m) {
    return forward(tokens, n, pos_, m);
  }
  /// Uncached mode: runs the whole sequence `tokens` from position 0, as decoding without a
  /// cache must at every step, and returns the last token's logits.
  const vector& forward_uncached(const std::vector<int>& tokens) {
    return forward(tokens.data(), Index(tokens.size()), 0, mode::uncached);
  }

 private:
  // Rows [0, n) of the buffers hold the n tokens at positions pos0..pos0+n-1.
  const vector& forward(const int* tokens, Index n, Index pos0, mode m) {
    if (encoded_ == nullptr) throw std::logic_error("decoder: start() first");
    if (n == 0 || pos0 + n > x_.rows()) {
      throw std::length_error("decoder: " + std::to_string(pos0 + n) +
                              " target tokens, expected 1 to " + std::to_string(x_.rows()));
    }
    embed(tokens, n);
    for (Index l = 0; l < cfg_.decoder_layers; ++l) {
      const decoder_layer& lw = w_.decoder[std::size_t(l)];
      detail::rmsnorm(x_.topRows(n), lw.self_norm, cfg_.norm_eps, xb_.topRows(n));
      q_.topRows(n).noalias() = xb_.topRows(n) * lw.self.wq.transpose();
      k_.topRows(n).noalias() = xb_.topRows(n) * lw.self.wk.transpose();
      v_.topRows(n).noalias() = xb_.topRows(n) * lw.self.wv.transpose();
      rope_.apply(q_.topRows(n), pos0);
      rope_.apply(k_.topRows(n), pos0);
      self_attention(l, n, m);
      x_.topRows(n).noalias() += att_.topRows(n) * lw.self.wo.transpose();
      detail::rmsnorm(x_.topRows(n), lw.cross_norm, cfg_.norm_eps, xb_.topRows(n));
      q_.topRows(n).noalias() = xb_.topRows(n) * lw.cross.wq.transpose();
      cross_attention(l, n, m);
      x_.topRows(n).noalias() += att_.topRows(n) * lw.cross.wo.transpose();
      detail::rmsnorm(x_.topRows(n), lw.ffn_norm, cfg_.norm_eps, xb_.topRows(n));
      detail::mlp(lw.mlp, n, xb_, hb_, hb2_, x_);
    }
    detail::rmsnorm(x_.row(n - 1), w_.final_norm, cfg_.norm_eps, xn_);
    logits_.noalias() = w_.classifier * xn_.transpose();
    if (m != mode::uncached) pos_ += n;
    return logits_;
  }

  void embed(const int* tokens, Index n) {
    for (Index i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size) {
        throw std::out_of_range("embed: token " + std::to_string(tokens[i]) +
                                " out of range [0, " + std::to_string(cfg_.vocab_size) + ")");
      }
      x_.row(i) = w_.embedding.row(tokens[i]);
    }
  }

  // att_ rows [0, n): causal self-attention of the n queries.
  void self_attention(Index l, Index n, mode m) {
    if (m == mode::uncached) {
      att_.topRows(n) = kvcache::reference_attention<float>(shape_, q_.topRows(n), k_.topRows(n),
                                                            v_.topRows(n));
    } else if (n == 1) {
      self_.append(l, k_.topRows(1), v_.topRows(1));
      kvcache::decode_attention(shape_, q_.row(0), self_.view(l), att_.row(0), ws_, opt_);
    } else {
      kvcache::prefill_attention(shape_, q_.topRows(n), k_.topRows(n), v_.topRows(n), self_, l,
                                 att_.topRows(n), ws_, opt_);
    }
  }

  // cross_k_, cross_v_ rows [0, source tokens): layer l's cross-attention keys and values.
  void project_cross(Index l) {
    const decoder_layer& lw = w_.decoder[std::size_t(l)];
    const Index s = encoded_->rows();
    cross_k_.topRows(s).noalias() = *encoded_ * lw.cross.wk.transpose();
    cross_v_.topRows(s).noalias() = *encoded_ * lw.cross.wv.transpose();
  }

  // att_ rows [0, n): cross-attention of the n queries over every encoder token.
  void cross_attention(Index l, Index n, mode m) {
    if (m == mode::cached) {
      kvcache::cross_attention(shape_, q_.topRows(n), cross_, l, att_.topRows(n), ws_, opt_);
      return;
    }
    project_cross(l);
    const Index s = encoded_->rows();
    if (m == mode::self_cache_only) {
      scratch_.clear();
      scratch_.fill(0, cross_k_.topRows(s), cross_v_.topRows(s));
      kvcache::cross_attention(shape_, q_.topRows(n), scratch_, 0, att_.topRows(n), ws_, opt_);
      return;
    }
    kvcache::attention_mask everything;
    everything.causal = false;
    att_.topRows(n) = kvcache::reference_attention<float>(
        shape_, q_.topRows(n), cross_k_.topRows(s), cross_v_.topRows(s), everything);
  }

  config cfg_;
  const weights& w_;
  kvcache::attention_shape shape_;
  kvcache::rope rope_;
  self_cache self_;
  cross_cache cross_;
  cross_cache scratch_;  // self_cache_only: one layer's keys and values of the current step
  const matrix* encoded_ = nullptr;
  Index pos_ = 0;
  kvcache::attention_options opt_;
  kvcache::attention_workspace<float> ws_;
  matrix x_, xb_, q_, k_, v_, att_, hb_, hb2_;  // [target token][...] activations of this call
  matrix cross_k_, cross_v_;                     // [source token][kv_dim] recomputed projections
  kvcache::row_vector<float> xn_;                // [dim] the last token, normed
  vector logits_;                                // [vocab] of the last token
};

}  // namespace encdec
