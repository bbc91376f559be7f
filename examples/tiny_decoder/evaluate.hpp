// SPDX-License-Identifier: Apache-2.0
// Teacher-forced evaluation of a cache: the loss of a model over a text when its keys and
// values live in that cache, and how far its next-token distributions move from a reference
// decoder's (an f32 cache holding every token).
#pragma once

#include "forward.hpp"

#include <cmath>
#include <functional>
#include <stdexcept>
#include <vector>

namespace tiny {

/// The score of one predicted token.
struct token_score {
  Index index;     // in the evaluated token sequence
  Index position;  // in its chunk: 1 for the first token after the BOS (at 0)
  int token;
  double nll;      // -log p(token), in nats
  double kl;       // KL(reference || evaluated) of the distributions it was drawn from, in nats
};

/// What evaluate() measured over a whole text.
struct eval_result {
  Index tokens = 0;       // tokens predicted
  Index chunks = 0;
  double nll = 0;         // summed over the tokens, in nats
  double kl = 0;          // summed over the tokens, in nats
  Index kv_bytes = 0;     // the cache's bytes at the end of the longest chunk
  Index kv_positions = 0; // positions that chunk ran through the cache (BOS included)

  double mean_nll() const { return tokens > 0 ? nll / double(tokens) : 0.0; }
  double perplexity() const { return std::exp(mean_nll()); }
  double mean_kl() const { return tokens > 0 ? kl / double(tokens) : 0.0; }
};

/// -log softmax(logits)[target] and KL(softmax(ref) || softmax(logits)), in nats, in double.
inline std::pair<double, double> nll_and_kl(const vector& logits, const vector& ref, int target) {
  const Eigen::ArrayXd q = logits.cast<double>().array(), p = ref.cast<double>().array();
  const Eigen::ArrayXd lq = q - (q.maxCoeff() + std::log((q - q.maxCoeff()).exp().sum()));
  const Eigen::ArrayXd lp = p - (p.maxCoeff() + std::log((p - p.maxCoeff()).exp().sum()));
  return {-lq(target), (lp.exp() * (lp - lq)).sum()};
}

/// Runs `tokens` (a text's tokens, without BOS) through `dec` in chunks of BOS + up to
/// chunk - 1 tokens, one decode step per token, the cache reset between chunks, and scores
/// each token by the logits that predict it: the teacher-forced loss of the model over the
/// text with this cache, every token scored once. `ref` runs the
/// same steps beside it to give the KL divergence (pass a decoder whose cache is f32 and holds
/// every token). `on_token`, when set, is called with each token's score.
/// Throws std::invalid_argument if chunk < 2 or exceeds either decoder's seq_len, or if a
/// token is outside the vocabulary.
template <class Cache, class RefCache>
eval_result evaluate(decoder<Cache>& dec, decoder<RefCache>& ref, const std::vector<int>& tokens,
                     Index chunk, int bos,
                     const std::function<void(const token_score&)>& on_token = {}) {
  if (chunk < 2 || chunk > dec.cfg().seq_len || chunk > ref.cfg().seq_len) {
    throw std::invalid_argument("evaluate: chunk = " + std::to_string(chunk) +
                                ", expected 2..seq_len = " + std::to_string(dec.cfg().seq_len));
  }
  for (const int t : tokens) {
    if (t < 0 || Index(t) >= dec.cfg().vocab_size) {
      throw std::invalid_argument("evaluate: token " + std::to_string(t) +
                                  " is outside the vocabulary of " +
                                  std::to_string(dec.cfg().vocab_size));
    }
  }
  eval_result r;
  const Index n = Index(tokens.size());
  for (Index start = 0; start < n; start += chunk - 1) {
    const Index end = std::min(n, start + chunk - 1);
    dec.reset();
    ref.reset();
    int input = bos;
    for (Index i = start; i < end; ++i) {
      const vector& logits = dec.forward_cached(input);
      const vector& ref_logits = ref.forward_cached(input);
      const int target = tokens[std::size_t(i)];
      const auto [nll, kl] = nll_and_kl(logits, ref_logits, target);
      r.nll += nll;
      r.kl += kl;
      ++r.tokens;
      if (on_token) on_token({i, i - start + 1, target, nll, kl});
      input = target;
    }
    if (dec.position() >= r.kv_positions) {
      r.kv_positions = dec.position();
      r.kv_bytes = dec.cache().bytes();
    }
    ++r.chunks;
  }
  return r;
}

}  // namespace tiny
