// SPDX-License-Identifier: Apache-2.0
// Greedy generation of the tiny encoder-decoder for one source, timed step by step.
#pragma once

#include "forward.hpp"
#include "tiny_decoder/quantile.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace encdec {

/// What one generation run did.
struct run_result {
  std::vector<int> tokens;        // generated, in order
  std::vector<vector> logits;     // [step] the logits each token was picked from
  double cross_fill_ms = 0;       // filling the cross-attention cache (cached mode)
  double prefill_ms = 0;          // the decoder prompt's forward pass
  std::vector<double> decode_ms;  // [step] each later forward pass
  Index self_bytes = 0;           // bytes the self-attention cache holds at the end
  Index cross_bytes = 0;          // bytes the cross-attention cache holds at the end
  Index self_tokens = 0;          // tokens in the self-attention cache at the end
};

/// Generates `n_gen` tokens greedily after the decoder prompt `prompt` for the encoder output
/// `encoded`: one forward pass over the prompt gives the first token, then each of n_gen - 1
/// steps runs one more (one token with the self-attention cache, the whole sequence so far
/// without it).
template <class Format>
run_result generate(decoder<Format>& dec, const matrix& encoded, const std::vector<int>& prompt,
                    Index n_gen, mode m) {
  using clock = std::chrono::steady_clock;
  const auto ms = [](clock::duration d) {
    return std::chrono::duration<double, std::milli>(d).count();
  };
  if (prompt.empty()) throw std::invalid_argument("generate: the decoder prompt is empty");
  if (n_gen < 1) throw std::invalid_argument("generate: n_gen must be >= 1");
  run_result r;
  auto t0 = clock::now();
  dec.start(encoded, m);
  r.cross_fill_ms = ms(clock::now() - t0);
  std::vector<int> seq = prompt;
  t0 = clock::now();
  const vector* logits = m == mode::uncached
                             ? &dec.forward_uncached(seq)
                             : &dec.forward_cached(prompt.data(), Index(prompt.size()), m);
  r.prefill_ms = ms(clock::now() - t0);
  for (Index step = 0;; ++step) {
    r.logits.push_back(*logits);
    Index best = 0;
    logits->maxCoeff(&best);
    r.tokens.push_back(int(best));
    seq.push_back(int(best));
    if (step + 1 == n_gen) break;
    t0 = clock::now();
    logits = m == mode::uncached ? &dec.forward_uncached(seq)
                                 : &dec.forward_cached(&seq.back(), 1, m);
    r.decode_ms.push_back(ms(clock::now() - t0));
  }
  r.self_bytes = dec.self().bytes();
  r.cross_bytes = dec.cross().bytes();
  r.self_tokens = dec.self().size();
  return r;
}

using tiny::quantile;

}  // namespace encdec
