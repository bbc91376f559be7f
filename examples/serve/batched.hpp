// SPDX-License-Identifier: Apache-2.0
// The tiny decoder's forward pass over a batch of sequences on one paged KV cache: the rows of
// every sequence of a step (one decode token each, or a chunk of a prompt) stacked into one
// matrix, so each weight matrix is read once a step whatever the batch.
#pragma once

#include "packed.hpp"
#include "tiny_decoder/model.hpp"

#include <kvcache/kvcache.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace serve {

using tiny::Index;
using paged_cache = kvcache::paged_kv_cache<kvcache::plain_format<float>>;

/// One forward pass of several sequences: sequence b of the step runs its tokens
/// tokens[qo_indptr[b] .. qo_indptr[b+1]) at positions positions[b].., and wants the logits of
/// its last row when logits[b] is set. Filled by the scheduler, reused from step to step.
struct step {
  std::vector<Index> seqs;            // [B] sequence ids in the cache
  std::vector<Index> qo_indptr;       // [B + 1] rows of each sequence
  std::vector<Index> positions;       // [B] position of each sequence's first row
  std::vector<unsigned char> logits;  // [B] whether its last row's logits are wanted
  std::vector<std::int32_t> tokens;   // [rows]

  Index size() const { return Index(seqs.size()); }
  Index rows() const { return Index(tokens.size()); }
  void clear() {
    seqs.clear();
    qo_indptr.assign(1, 0);
    positions.clear();
    logits.clear();
    tokens.clear();
  }
  void reserve(Index max_seqs, Index max_rows) {
    seqs.reserve(std::size_t(max_seqs));
    qo_indptr.reserve(std::size_t(max_seqs + 1));
    positions.reserve(std::size_t(max_seqs));
    logits.reserve(std::size_t(max_seqs));
    tokens.reserve(std::size_t(max_rows));
  }
  /// Adds `n` tokens of sequence `seq` at positions `pos`...
  void add(Index seq, Index pos, const std::int32_t* t, Index n, bool want_logits) {
    seqs.push_back(seq);
    positions.push_back(pos);
    logits.push_back(want_logits ? 1 : 0);
    tokens.insert(tokens.end(), t, t + n);
    qo_indptr.push_back(Index(tokens.size()));
  }
};

/// Where a forward pass spends its time, in milliseconds, summed over calls.
struct forward_profile {
  double embed_norm = 0;  // embedding and RMS norms
  double qkv = 0;         // the q/k/v projection
  double rope_append = 0; // rotary embeddings and the appends to the cache
  double attention = 0;   // the cache's batch and batch_attention
  double out_proj = 0;    // the output projection
  double mlp = 0;         // SwiGLU
  double head = 0;        // the final norm and the classifier of the rows that need logits
  double total() const {
    return embed_norm + qkv + rope_append + attention + out_proj + mlp + head;
  }
};

/// The tiny model (tiny_decoder/model.hpp) over a paged cache, for a batch of sequences at
/// once. Its buffers are sized for `max_rows` rows and `max_seqs` sequences a step when it is
/// made; a step stays within them and allocates nothing once the attention workspace has seen
/// a step as large. Per layer: one RMS norm of all rows, ONE matrix product for q, k and v of
/// all rows (wq, wk and wv stacked), rope at each sequence's own positions, the new keys and
/// values appended to each sequence, batched attention over every sequence of the step, the
/// output projection, and the MLP (w1 and w3 stacked: one product for both). The weights are
/// packed once (packed.hpp), so a product reads each weight once a step, straight into SIMD
/// registers, instead of copying the whole matrix first as a general matrix product does.
class batched_decoder {
 public:
  batched_decoder(const tiny::config& c, const tiny::weights& w, Index max_rows, Index max_seqs,
                  kvcache::thread_pool* pool)
      : cfg_(c), w_(w), shape_(c.attention()),
        rope_(c.head_dim(), c.rope_theta, kvcache::rope_style::interleaved, c.seq_len),
        max_rows_(max_rows), max_seqs_(max_seqs) {
    c.validate();
    if (max_rows < 1 || max_seqs < 1) {
      throw std::invalid_argument("batched_decoder: max_rows and max_seqs must be >= 1");
    }
    opt_.pool = pool;
    qw_ = c.n_heads * c.head_dim();
    kvw_ = c.kv_dim();
    for (const auto& lw : w.layers) {
      tiny::matrix qkv(qw_ + 2 * kvw_, c.dim);
      qkv << lw.wq, lw.wk, lw.wv;
      tiny::matrix w13(2 * c.hidden_dim, c.dim);
      w13 << lw.w1, lw.w3;
      layers_.push_back({packed_weights(qkv), packed_weights(lw.wo), packed_weights(w13),
                         packed_weights(lw.w2)});
    }
    classifier_ = packed_weights(w.classifier);
    x_.resize(max_rows, c.dim);
    xb_.resize(max_rows, c.dim);
    qkv_.resize(max_rows, qw_ + 2 * kvw_);
    att_.resize(max_rows, qw_);
    h13_.resize(max_rows, 2 * c.hidden_dim);
    hb_.resize(max_rows, c.hidden_dim);
    xn_.resize(max_seqs, c.dim);
    logits_.resize(max_seqs, c.vocab_size);
    batch_.clear();
    batch_.indptr.reserve(std::size_t(max_seqs + 1));
    batch_.last_page_len.reserve(std::size_t(max_seqs));
    batch_.end_positions.reserve(std::size_t(max_seqs));
    batch_.tail_keys.reserve(std::size_t(max_seqs));
    batch_.tail_values.reserve(std::size_t(max_seqs));
    batch_.tail_tokens.reserve(std::size_t(max_seqs));
  }

  const tiny::config& cfg() const { return cfg_; }
  Index max_rows() const { return max_rows_; }
  Index max_seqs() const { return max_seqs_; }
  const forward_profile& profile() const { return prof_; }
  void reset_profile() { prof_ = {}; }

  /// Runs step `s` through the model, appending every row's keys and values to its sequence in
  /// `cache`. Row i of logits() then holds the logits of the last row of the i-th sequence of
  /// the step that wants them. Throws std::length_error, as append would, when the pool has
  /// fewer free or cached pages than the step's sequences need (the sum of their
  /// pages_needed), before anything changes: the caller frees or preempts a sequence and
  /// retries.
  void forward(paged_cache& cache, const step& s) {
    const Index n = s.rows(), B = s.size();
    if (n == 0 || n > max_rows_ || B > max_seqs_) {
      throw std::invalid_argument("batched_decoder: a step of " + std::to_string(n) + " rows and " +
                                  std::to_string(B) + " sequences; expected 1.." +
                                  std::to_string(max_rows_) + " rows and at most " +
                                  std::to_string(max_seqs_) + " sequences");
    }
    check_pages(cache, s);
    auto t = clock::now();
    embed(s.tokens.data(), n);
    for (Index l = 0; l < cfg_.n_layers; ++l) {
      const tiny::layer_weights& lw = w_.layers[std::size_t(l)];
      rmsnorm(x_.topRows(n), lw.attn_norm, xb_.topRows(n));
      lap(t, prof_.embed_norm);
      const packed_layer& pl = layers_[std::size_t(l)];
      pl.qkv.multiply(xb_.topRows(n), qkv_.topRows(n), /*accumulate=*/false);
      lap(t, prof_.qkv);
      for (Index b = 0; b < B; ++b) {
        const Index r0 = s.qo_indptr[std::size_t(b)], m = s.qo_indptr[std::size_t(b + 1)] - r0;
        const Index pos = s.positions[std::size_t(b)];
        rope_.apply(qkv_.block(r0, 0, m, qw_), pos);
        rope_.apply(qkv_.block(r0, qw_, m, kvw_), pos);
      }
      append(cache, s, l);
      lap(t, prof_.rope_append);
      cache.batch(s.seqs, l, batch_);
      kvcache::batch_attention(shape_, qkv_.topRows(n).leftCols(qw_), s.qo_indptr, batch_,
                               att_.topRows(n), ws_, opt_);
      lap(t, prof_.attention);
      pl.wo.multiply(att_.topRows(n), x_.topRows(n), /*accumulate=*/true);  // output, residual
      lap(t, prof_.out_proj);
      rmsnorm(x_.topRows(n), lw.ffn_norm, xb_.topRows(n));
      lap(t, prof_.embed_norm);
      mlp(pl, n);
      lap(t, prof_.mlp);
    }
    Index m = 0;
    for (Index b = 0; b < B; ++b) {
      if (s.logits[std::size_t(b)] == 0) continue;
      const Index last = s.qo_indptr[std::size_t(b + 1)] - 1;
      rmsnorm(x_.row(last), w_.final_norm, xn_.row(m));
      ++m;
    }
    if (m > 0) classifier_.multiply(xn_.topRows(m), logits_.topRows(m), /*accumulate=*/false);
    lap(t, prof_.head);
  }

  /// [wanted][vocab] the logits of the last step's sequences that wanted them, in order.
  const tiny::matrix& logits() const { return logits_; }

 private:
  struct packed_layer {
    packed_weights qkv;  // wq, wk, wv stacked: [q_width + 2 kv_width][dim]
    packed_weights wo;
    packed_weights w13;  // w1, w3 stacked: [2 hidden_dim][dim]
    packed_weights w2;
  };
  using clock = std::chrono::steady_clock;
  static void lap(clock::time_point& t, double& into) {
    const auto now = clock::now();
    into += std::chrono::duration<double, std::milli>(now - t).count();
    t = now;
  }

  void embed(const std::int32_t* tokens, Index n) {
    for (Index i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size) {
        throw std::out_of_range("embed: token " + std::to_string(tokens[i]) +
                                " out of range [0, " + std::to_string(cfg_.vocab_size) + ")");
      }
      x_.row(i) = w_.token_embedding.row(tokens[i]);
    }
  }

  template <class In, class Out>
  void rmsnorm(const In& in, const tiny::vector& weight, Out&& out) const {
    for (Index i = 0; i < in.rows(); ++i) {
      const float inv = 1.0f / std::sqrt(in.row(i).squaredNorm() / float(cfg_.dim) + cfg_.norm_eps);
      out.row(i) = (in.row(i) * inv).cwiseProduct(weight.transpose());
    }
  }

  // The pages the step takes, all in the first layer's appends (a page holds every layer): the
  // sum over its sequences of pages_needed, which counts new pages and copies of shared ones.
  static void check_pages(const paged_cache& cache, const step& s) {
    Index need = 0;
    for (Index b = 0; b < s.size(); ++b) {
      const Index rows = s.qo_indptr[std::size_t(b + 1)] - s.qo_indptr[std::size_t(b)];
      need += cache.pages_needed(s.seqs[std::size_t(b)], rows);
    }
    const kvcache::pool_stats ps = cache.stats();
    if (need > ps.free + ps.cached) {
      throw std::length_error("batched_decoder: the step needs " + std::to_string(need) +
                              " pages but the pool has " + std::to_string(ps.free + ps.cached) +
                              " free or cached of " + std::to_string(ps.total));
    }
  }

  // Appends each sequence's new keys and values to layer l. check_pages made sure the first
  // layer finds its pages; a short pool here would leave the step half appended.
  void append(paged_cache& cache, const step& s, Index l) {
    try {
      for (Index b = 0; b < s.size(); ++b) {
        const Index r0 = s.qo_indptr[std::size_t(b)], m = s.qo_indptr[std::size_t(b + 1)] - r0;
        cache.append(s.seqs[std::size_t(b)], l, qkv_.block(r0, qw_, m, kvw_),
                     qkv_.block(r0, qw_ + kvw_, m, kvw_));
      }
    } catch (const std::length_error& e) {
      throw std::logic_error(std::string("batched_decoder: pages ran out after the check: ") +
                             e.what());
    }
  }

  void mlp(const packed_layer& pl, Index n) {
    const Index H = cfg_.hidden_dim;
    pl.w13.multiply(xb_.topRows(n), h13_.topRows(n), /*accumulate=*/false);
    auto h = h13_.topRows(n).leftCols(H).array();
    hb_.topRows(n).array() = h / (1.0f + (-h).exp()) * h13_.topRows(n).rightCols(H).array();
    pl.w2.multiply(hb_.topRows(n), x_.topRows(n), /*accumulate=*/true);  // down, residual
  }

  tiny::config cfg_;
  const tiny::weights& w_;
  kvcache::attention_shape shape_;
  kvcache::rope rope_;
  Index max_rows_, max_seqs_;
  Index qw_ = 0, kvw_ = 0;
  std::vector<packed_layer> layers_;
  packed_weights classifier_;
  kvcache::attention_options opt_;
  kvcache::attention_workspace<float> ws_;
  paged_cache::batch_type batch_;
  tiny::matrix x_, xb_, qkv_, att_, h13_, hb_;  // [row][...] the step's activations
  tiny::matrix xn_, logits_;                    // [wanted][...] the rows that need logits
  forward_profile prof_;
};

}  // namespace serve
