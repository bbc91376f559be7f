// SPDX-License-Identifier: Apache-2.0
// Sampling and the generation loop: prefill, then one token per step, timed.
#pragma once

#include "forward.hpp"
#include "quantile.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace tiny {

/// Picks the next token: greedy argmax at temperature 0, otherwise a draw from the softmax of
/// logits / temperature restricted to the smallest set of tokens whose probability reaches
/// top_p (nucleus sampling). Draws come from a seeded xorshift generator, the same everywhere.
class sampler {
 public:
  sampler(float temperature = 0.0f, float top_p = 1.0f, std::uint64_t seed = 42)
      : temperature_(temperature), top_p_(top_p), state_(seed == 0 ? 0x9e3779b97f4a7c15ULL : seed) {
    if (!(temperature >= 0.0f)) throw std::invalid_argument("sampler: temperature must be >= 0");
    if (!(top_p > 0.0f && top_p <= 1.0f)) {
      throw std::invalid_argument("sampler: top_p must be in (0, 1]");
    }
  }

  int operator()(const vector& logits) {
    Index best = 0;
    logits.maxCoeff(&best);
    if (temperature_ == 0.0f) return int(best);
    probs_ = ((logits.array() - logits(best)) / temperature_).exp();
    probs_ /= probs_.sum();
    order_.resize(std::size_t(logits.size()));
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [&](int a, int b) { return probs_(a) > probs_(b); });
    float kept = 0.0f;
    std::size_t n = 0;
    while (n < order_.size() && (n == 0 || kept < top_p_)) kept += probs_(order_[n++]);
    float r = uniform() * kept;
    for (std::size_t i = 0; i < n; ++i) {
      r -= probs_(order_[i]);
      if (r <= 0.0f) return order_[i];
    }
    return order_[n - 1];
  }

 private:
  float uniform() {  // [0, 1)
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return float((state_ * 0x2545F4914F6CDD1DULL) >> 40) / float(1 << 24);
  }

  float temperature_, top_p_;
  std::uint64_t state_;
  Eigen::ArrayXf probs_;
  std::vector<int> order_;
};

/// What one generation run did.
struct run_result {
  std::vector<int> tokens;           // generated, in order
  std::vector<vector> logits;        // [step] logits each token was drawn from
  double prefill_ms = 0;             // the prompt's forward pass
  std::vector<double> decode_ms;     // [step] each later forward pass
  Index kv_bytes = 0;                // bytes the cache holds at the end (0 without a cache)
  Index tokens_cached = 0;           // tokens that went through the cache (some may be evicted)
};

/// Where a cached run keeps the cache of its prompt: all of it but the last token, whose forward
/// pass then gives the first token's logits (the cache holds keys and values, not logits).
/// `save` is called with the cache after that prefill; `load`, when set, replaces the prefill
/// and must leave the cache at position prompt.size() - 1.
template <class Cache>
struct prompt_cache_io {
  std::function<void(const Cache&)> save;
  std::function<void(Cache&)> load;
};

/// Generates `n_gen` tokens after `prompt`: one forward pass over the prompt gives the first
/// token, then each of n_gen - 1 steps runs one more forward pass (one token with the cache,
/// the whole sequence so far without it). `on_step(done)` is called after each token. With
/// `forced`, the tokens fed back are forced[0], forced[1], ... instead of the sampled ones
/// (teacher forcing, to compare two caches' distributions on the same sequence). With
/// `prompt_io` (cached mode), the prompt's cache is saved or loaded as prompt_cache_io says;
/// prefill_ms is then the time to the first token's logits, saving excluded.
template <class Cache>
run_result generate(decoder<Cache>& dec, const std::vector<int>& prompt, Index n_gen, mode m,
                    sampler pick, const std::function<void(Index)>& on_step = {},
                    const std::vector<int>* forced = nullptr,
                    const prompt_cache_io<Cache>* prompt_io = nullptr) {
  using clock = std::chrono::steady_clock;
  const auto ms = [](clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt is empty");
  if (n_gen < 1) throw std::invalid_argument("generate: n_gen must be >= 1");
  if (forced != nullptr && Index(forced->size()) < n_gen) {
    throw std::invalid_argument("generate: fewer forced tokens than n_gen");
  }
  run_result r;
  dec.reset();
  std::vector<int> seq = prompt;
  auto t0 = clock::now();
  const vector* logits = nullptr;
  if (m == mode::cached && prompt_io != nullptr) {
    double saving_ms = 0;
    if (prompt_io->load) {
      prompt_io->load(dec.cache());
      dec.resume();
      if (dec.position() != Index(prompt.size()) - 1) {
        throw std::invalid_argument("generate: the loaded cache holds " +
                                    std::to_string(dec.position()) + " tokens, the prompt less its "
                                    "last token " + std::to_string(prompt.size() - 1));
      }
    } else {
      if (prompt.size() > 1) dec.forward_cached(std::vector<int>(prompt.begin(), prompt.end() - 1));
      const auto s0 = clock::now();
      if (prompt_io->save) prompt_io->save(dec.cache());
      saving_ms = ms(clock::now() - s0);
    }
    logits = &dec.forward_cached(prompt.back());
    r.prefill_ms = ms(clock::now() - t0) - saving_ms;
  } else {
    logits = m == mode::cached ? &dec.forward_cached(prompt) : &dec.forward_uncached(seq);
    r.prefill_ms = ms(clock::now() - t0);
  }
  for (Index step = 0;; ++step) {
    r.logits.push_back(*logits);
    const int picked = pick(*logits);
    r.tokens.push_back(forced != nullptr ? (*forced)[std::size_t(step)] : picked);
    seq.push_back(r.tokens.back());
    if (on_step) on_step(step + 1);
    if (step + 1 == n_gen) break;
    t0 = clock::now();
    logits = m == mode::cached ? &dec.forward_cached(r.tokens.back()) : &dec.forward_uncached(seq);
    r.decode_ms.push_back(ms(clock::now() - t0));
  }
  if (m == mode::cached) {
    r.kv_bytes = dec.cache().bytes();
    r.tokens_cached = dec.position();
  }
  return r;
}

}  // namespace tiny
