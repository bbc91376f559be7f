// SPDX-License-Identifier: Apache-2.0
// The serve example's parts: packed weights multiply as Eigen does, the batched forward pass
// over a paged cache gives the tiny decoder's logits for a step mixing a prefill chunk and a
// decode token, a pool too small changes nothing, and the scheduler's tokens equal
// generating each request alone.
#include "serve/scheduler.hpp"

#include <gtest/gtest.h>

#include <random>

namespace serve {
namespace {

// As in test_tiny_decoder: logits are O(10) and differ by float rounding near 1e-5 relative.
constexpr double logit_tolerance = 2e-3;

TEST(PackedWeights, MultiplyEqualsEigenForEveryShape) {
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const Index out : {1, 5, 16, 17, 33, 100}) {
    for (const Index in : {1, 3, 32, 70}) {
      tiny::matrix w(out, in);
      for (Index i = 0; i < w.size(); ++i) w.data()[i] = u(gen);
      const packed_weights p(w);
      for (Index n = 1; n <= 21; n += 4) {
        tiny::matrix x(n, in), y(n, out), base(n, out);
        for (Index i = 0; i < x.size(); ++i) x.data()[i] = u(gen);
        for (Index i = 0; i < base.size(); ++i) base.data()[i] = u(gen);
        const tiny::matrix want = x * w.transpose();
        p.multiply(x, y, /*accumulate=*/false);
        EXPECT_LT((y - want).cwiseAbs().maxCoeff(), 1e-4f) << out << " x " << in << ", n " << n;
        y = base;
        p.multiply(x, y, /*accumulate=*/true);
        EXPECT_LT((y - base - want).cwiseAbs().maxCoeff(), 1e-4f) << out << " x " << in;
      }
      tiny::matrix wrong(2, in + 1), y(2, out);
      EXPECT_THROW(p.multiply(wrong, y, false), std::invalid_argument);
    }
  }
}

tiny::config small_config() {
  tiny::config c;
  c.dim = 64;
  c.hidden_dim = 128;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 97;
  c.seq_len = 64;
  return c;
}

std::vector<std::int32_t> random_prompt(Index n, std::uint64_t seed, Index vocab) {
  std::mt19937_64 gen(seed);
  std::vector<std::int32_t> t;
  for (Index i = 0; i < n; ++i) t.push_back(std::int32_t(gen() % std::uint64_t(vocab)));
  return t;
}

// One step runs sequence a's first 9 prompt tokens (a chunk) beside sequence b's decode token,
// after b's prompt ran in an earlier step: each last row's logits equal the tiny decoder's.
TEST(BatchedDecoder, MixedStepGivesTheDecodersLogits) {
  const tiny::config cfg = small_config();
  const tiny::weights w = tiny::random_weights(cfg, 11);
  batched_decoder model(cfg, w, 32, 4, nullptr);
  paged_cache cache(cfg.cache(), kvcache::paged_layout{4, 32});
  const auto a = random_prompt(9, 1, cfg.vocab_size), b = random_prompt(13, 2, cfg.vocab_size);
  const Index sa = cache.create(), sb = cache.create();
  step s;
  s.clear();
  s.add(sb, 0, b.data(), 12, false);
  model.forward(cache, s);
  s.clear();
  s.add(sa, 0, a.data(), 9, true);
  s.add(sb, 12, b.data() + 12, 1, true);
  model.forward(cache, s);
  EXPECT_EQ(cache.position(sa), 9);
  EXPECT_EQ(cache.position(sb), 13);

  tiny::decoder<> dec(cfg, w);
  const tiny::vector want_a = dec.forward_cached(std::vector<int>(a.begin(), a.end()));
  dec.reset();
  dec.forward_cached(std::vector<int>(b.begin(), b.end() - 1));
  const tiny::vector want_b = dec.forward_cached(int(b.back()));
  EXPECT_LT((model.logits().row(0).transpose() - want_a).cwiseAbs().maxCoeff(), logit_tolerance);
  EXPECT_LT((model.logits().row(1).transpose() - want_b).cwiseAbs().maxCoeff(), logit_tolerance);
}

// With too few pages the step throws std::length_error and changes nothing.
TEST(BatchedDecoder, ShortPoolChangesNothing) {
  const tiny::config cfg = small_config();
  const tiny::weights w = tiny::random_weights(cfg, 11);
  batched_decoder model(cfg, w, 32, 4, nullptr);
  paged_cache cache(cfg.cache(), kvcache::paged_layout{4, 3});
  const auto t = random_prompt(12, 5, cfg.vocab_size);
  const Index s0 = cache.create(), s1 = cache.create();
  step s;
  s.clear();
  s.add(s0, 0, t.data(), 6, false);
  s.add(s1, 0, t.data(), 6, false);  // 2 + 2 pages of 4 tokens: one too many
  EXPECT_THROW(model.forward(cache, s), std::length_error);
  for (const Index seq : {s0, s1}) {
    for (Index l = 0; l < cfg.n_layers; ++l) EXPECT_EQ(cache.position(seq, l), 0);
  }
  EXPECT_EQ(cache.stats().used, 0);
  s.clear();
  s.add(s0, 0, t.data(), 6, true);
  EXPECT_NO_THROW(model.forward(cache, s));
}

// Five requests sharing a prompt, two at a time, on a pool that runs out: preemptions,
// prefix hits, and the tokens of each request alone.
TEST(BatchScheduler, TokensEqualEachRequestAlone) {
  tiny::config cfg = small_config();
  const tiny::weights w = tiny::random_weights(cfg, 4);
  const auto shared = random_prompt(20, 9, cfg.vocab_size);
  const Index gen = 10;
  std::vector<request> reqs;
  for (int i = 0; i < 5; ++i) {
    request r;
    r.tokens = shared;
    const auto own = random_prompt(3, 100 + std::uint64_t(i), cfg.vocab_size);
    r.tokens.insert(r.tokens.end(), own.begin(), own.end());
    r.prompt_len = Index(r.tokens.size());
    r.gen = gen;
    reqs.push_back(r);
  }
  batched_decoder model(cfg, w, 2 + 6, 2, nullptr);
  paged_cache cache(cfg.cache(), kvcache::paged_layout{4, 10});
  scheduler_options opt;
  opt.max_batch = 2;
  opt.chunk = 6;
  scheduler sched(model, cache, opt);
  const serve_stats st = sched.run(reqs);
  EXPECT_GT(st.preemptions, 0);
  EXPECT_GT(st.prefix_hit_tokens, 0);
  EXPECT_LE(st.max_rows, 8);
  EXPECT_EQ(cache.n_sequences(), 0);
  EXPECT_EQ(cache.stats().used, 0);

  tiny::decoder<> dec(cfg, w);
  for (const request& r : reqs) {
    const std::vector<int> prompt(r.tokens.begin(), r.tokens.begin() + r.prompt_len);
    const auto alone = tiny::generate(dec, prompt, gen, tiny::mode::cached, tiny::sampler());
    EXPECT_EQ(std::vector<int>(r.tokens.begin() + r.prompt_len, r.tokens.end()), alone.tokens);
    EXPECT_GE(r.first_token_ms, 0.0);
  }
}

}  // namespace
}  // namespace serve
