// SPDX-License-Identifier: Apache-2.0
// The tiny decoder generates the same tokens with and without the cache.
#include "tiny_decoder/generate.hpp"
#include "tiny_decoder/llama2c.hpp"
#include "tiny_decoder/project.hpp"

#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

namespace tiny {
namespace {

struct decoder_case {
  const char* name;
  Index n_heads, n_kv_heads;
};

// Cached and uncached logits differ only by float rounding in a different order of
// summation (tiled online softmax against materialized scores; one-row against batched
// products). Logits here are O(10) (unit-variance embeddings as the classifier times a normed
// state); float rounding over 4 layers stays near 1e-5 relative, so 2e-3 absolute is a margin
// of about ten while any real divergence (a wrong position, a missing token) moves logits by O(1).
constexpr double logit_tolerance = 2e-3;

// One token's projections split over threads: each row's sum is taken in one order whichever
// thread runs it, so 1, 2 and 3 threads agree exactly, and with Eigen's product to float
// rounding (sums of at most 75 products of O(1) terms: 1e-4 is a margin of about ten).
TEST(Project, SameOnAnyThreadsAndAsEigen) {
  for (const Index in : {1, 7, 16, 45, 75}) {
    const matrix a = matrix::Random(37, in), b = matrix::Random(5, in), c = matrix::Random(130, in);
    const matrix x = matrix::Random(1, in);
    vector y1[3];
    for (Index threads : {1, 2, 3}) {
      kvcache::thread_pool pool(threads);
      vector ya = vector::Zero(37), yb = vector::Ones(5), yc = vector::Zero(130);
      project(&pool, std::array<projection, 3>{{{&a, ya.data()}, {&b, yb.data(), true},
                                                 {&c, yc.data()}}}, x.data(), 0);
      EXPECT_LT((ya - a * x.transpose()).cwiseAbs().maxCoeff(), 1e-4) << in;
      EXPECT_LT((yb - (b * x.transpose()).array().matrix() - vector::Ones(5)).cwiseAbs().maxCoeff(), 1e-4) << in;
      EXPECT_LT((yc - c * x.transpose()).cwiseAbs().maxCoeff(), 1e-4) << in;
      if (threads == 1) {
        y1[0] = ya, y1[1] = yb, y1[2] = yc;
      } else {
        EXPECT_EQ(ya, y1[0]) << in << " on " << threads << " threads";
        EXPECT_EQ(yb, y1[1]) << in << " on " << threads << " threads";
        EXPECT_EQ(yc, y1[2]) << in << " on " << threads << " threads";
      }
    }
  }
}

// A chunk's projections, by blocks of rows: the same blocks on any number of threads.
TEST(Project, RowsSameOnAnyThreads) {
  const matrix w = matrix::Random(300, 45), x = matrix::Random(9, 45);
  matrix base = matrix::Random(9, 300);
  matrix one = base, two = base;
  project_rows(nullptr, w, x, one, true, 64);
  kvcache::thread_pool pool(2);
  project_rows(&pool, w, x, two, true, 64);
  EXPECT_EQ(one, two);
  EXPECT_LT((one - base - x * w.transpose()).cwiseAbs().maxCoeff(), 1e-4);
}

// A model whose projections are large enough to be split: 1 and 2 threads pick the same
// tokens with the same logits, step by step.
TEST(Project, DecoderSameOnOneAndTwoThreads) {
  config cfg;
  cfg.dim = 256;
  cfg.hidden_dim = 520;
  cfg.n_layers = 2;
  cfg.vocab_size = 301;
  cfg.seq_len = 40;
  const weights w = random_weights(cfg, 3);
  const std::vector<int> prompt = {1, 5, 9, 200};
  decoder<> one(cfg, w, 1), two(cfg, w, 2);
  const auto a = generate(one, prompt, 20, mode::cached, sampler());
  const auto b = generate(two, prompt, 20, mode::cached, sampler());
  EXPECT_EQ(a.tokens, b.tokens);
  for (std::size_t s = 0; s < a.logits.size(); ++s) {
    EXPECT_LT((a.logits[s] - b.logits[s]).cwiseAbs().maxCoeff(), 1e-4) << "step " << s;
  }
}

class CachedEqualsUncached : public ::testing::TestWithParam<std::tuple<decoder_case, Index>> {};

TEST_P(CachedEqualsUncached, SameTokensAndLogits) {
  const auto [c, prompt_len] = GetParam();
  config cfg;
  cfg.dim = 64;
  cfg.hidden_dim = 128;
  cfg.n_layers = 2;
  cfg.n_heads = c.n_heads;
  cfg.n_kv_heads = c.n_kv_heads;
  cfg.vocab_size = 97;
  const Index gen = 24;
  cfg.seq_len = prompt_len + gen;
  const weights w = random_weights(cfg, 7);
  std::vector<int> prompt;
  for (Index i = 0; i < prompt_len; ++i) prompt.push_back(int((i * 37 + 11) % cfg.vocab_size));

  for (Index threads : {1, 2}) {
    decoder<> dec(cfg, w, threads);
    const auto cached = generate(dec, prompt, gen, mode::cached, sampler());
    const auto uncached = generate(dec, prompt, gen, mode::uncached, sampler());
    EXPECT_EQ(cached.tokens, uncached.tokens);
    ASSERT_EQ(cached.logits.size(), std::size_t(gen));
    for (std::size_t s = 0; s < cached.logits.size(); ++s) {
      EXPECT_LT((cached.logits[s] - uncached.logits[s]).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), logit_tolerance)
          << "step " << s;
    }
    EXPECT_EQ(cached.tokens_cached, prompt_len + gen - 1);
    EXPECT_EQ(cached.kv_bytes, kvcache::kv_cache_bytes(1, prompt_len + gen - 1, cfg.n_layers,
                                                       cfg.n_kv_heads, cfg.head_dim(), 4));
    EXPECT_EQ(uncached.kv_bytes, 0);
    // Sampling with a seed is reproducible and agrees too.
    const auto a = generate(dec, prompt, gen, mode::cached, sampler(0.8f, 0.9f, 3));
    const auto b = generate(dec, prompt, gen, mode::uncached, sampler(0.8f, 0.9f, 3));
    EXPECT_EQ(a.tokens, b.tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CachedEqualsUncached,
    ::testing::Combine(::testing::Values(decoder_case{"mha", 4, 4}, decoder_case{"gqa", 8, 2},
                                         decoder_case{"mqa", 4, 1}),
                       ::testing::Values(Index(1), Index(7), Index(64))),
    [](const auto& info) {
      return std::string(std::get<0>(info.param).name) + "_prompt" +
             std::to_string(std::get<1>(info.param));
    });

// Multi-head latent attention: the cached decoder (weight absorption over one latent row per
// token and layer) picks the tokens of the uncached one (each head's keys and values
// decompressed), with the same logit tolerance, in a contiguous cache and in a ring with the
// window's mask; the cache holds what kv_latent_cache_bytes counts.
TEST(Decoder, LatentAttentionCachedEqualsUncached) {
  config cfg;
  cfg.dim = 64;
  cfg.hidden_dim = 128;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.vocab_size = 97;
  cfg.kv_lora_rank = 24;
  cfg.rope_dim = 8;
  const Index gen = 24;
  for (const Index prompt_len : {Index(1), Index(7), Index(40)}) {
    cfg.seq_len = prompt_len + gen;
    const weights w = random_weights(cfg, 9);
    std::vector<int> prompt;
    for (Index i = 0; i < prompt_len; ++i) prompt.push_back(int((i * 37 + 11) % cfg.vocab_size));
    for (const Index threads : {1, 2}) {
      decoder<> dec(cfg, w, threads);
      const auto cached = generate(dec, prompt, gen, mode::cached, sampler());
      const auto uncached = generate(dec, prompt, gen, mode::uncached, sampler());
      EXPECT_EQ(cached.tokens, uncached.tokens) << "prompt " << prompt_len;
      for (std::size_t s = 0; s < cached.logits.size(); ++s) {
        EXPECT_LT((cached.logits[s] - uncached.logits[s]).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
                  logit_tolerance)
            << "step " << s;
      }
      EXPECT_EQ(cached.kv_bytes, kvcache::kv_latent_cache_bytes(1, prompt_len + gen - 1, cfg.n_layers,
                                                                24, 8, kvcache::kv_dtype::f32()));
    }
  }
  // A sliding window over the latents equals recomputation with the window's mask.
  cfg.seq_len = 90;
  const weights w = random_weights(cfg, 10);
  const std::vector<int> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  using ring_f32 = kvcache::kv_cache<kvcache::ring_layout, kvcache::plain_format<float>>;
  const kvcache::attention_mask mask{true, -1, 20, 3};
  decoder<ring_f32> ring(cfg, w, ring_f32(cfg.cache(), kvcache::ring_layout{20, 3}), 1, mask);
  const auto cached = generate(ring, prompt, 60, mode::cached, sampler());
  const auto uncached = generate(ring, prompt, 60, mode::uncached, sampler());
  EXPECT_EQ(cached.tokens, uncached.tokens);
}

config small_gqa(Index seq_len) {
  config cfg;
  cfg.dim = 64;
  cfg.hidden_dim = 128;
  cfg.n_layers = 2;
  cfg.n_heads = 8;
  cfg.n_kv_heads = 2;
  cfg.vocab_size = 97;
  cfg.seq_len = seq_len;
  return cfg;
}

// A sliding window cache computes the windowed model: the same tokens as recomputing the whole
// sequence with the window and sinks mask, past the point where the ring wraps.
TEST(Decoder, SlidingWindowCacheEqualsMaskedRecomputation) {
  const config cfg = small_gqa(120);
  const weights w = random_weights(cfg, 5);
  const std::vector<int> prompt = {5, 17, 33, 2, 90, 41, 7, 7, 64, 11};
  for (const auto& [window, sinks] : {std::pair<Index, Index>{16, 0}, {16, 4}, {1, 0}}) {
    kvcache::attention_mask mask;
    mask.window = window;
    mask.sinks = sinks;
    decoder<kvcache::sliding_window_cache<float>> dec(
        cfg, w, kvcache::sliding_window_cache<float>(cfg.cache(), window, sinks), 2, mask);
    const auto cached = generate(dec, prompt, 100, mode::cached, sampler());
    const auto uncached = generate(dec, prompt, 100, mode::uncached, sampler());
    EXPECT_EQ(cached.tokens, uncached.tokens) << "window " << window << " sinks " << sinks;
    for (std::size_t s = 0; s < cached.logits.size(); ++s) {
      ASSERT_LT((cached.logits[s] - uncached.logits[s]).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
                logit_tolerance)
          << "step " << s;
    }
    // Memory stays constant once the window is full.
    EXPECT_EQ(cached.kv_bytes, kvcache::kv_cache_bytes(1, window + sinks, cfg.n_layers,
                                                       cfg.n_kv_heads, cfg.head_dim(), 4));
  }
}

// A ring of int8 groups computes the windowed model up to quantization: teacher-forced on the
// windowed f32 model's tokens, its logits stay close, past the point where the ring wraps.
TEST(Decoder, QuantizedSlidingWindowStaysCloseToTheWindowedModel) {
  const config cfg = small_gqa(120);
  const weights w = random_weights(cfg, 5);
  const std::vector<int> prompt = {5, 17, 33, 2, 90, 41, 7, 7, 64, 11};
  kvcache::attention_mask mask;
  mask.window = 24;
  mask.sinks = 4;
  using ring_f32 = kvcache::kv_cache<kvcache::ring_layout, kvcache::plain_format<float>>;
  using ring_int8 = kvcache::kv_cache<kvcache::ring_layout, kvcache::quantized_format<8>>;
  decoder<ring_f32> f32(cfg, w, ring_f32(cfg.cache(), kvcache::ring_layout{24, 4}), 1, mask);
  const auto reference = generate(f32, prompt, 100, mode::cached, sampler());
  decoder<ring_int8> int8(cfg, w,
                          ring_int8(cfg.cache(), kvcache::ring_layout{24, 4},
                                    kvcache::quantized_format<8>(8, 4)),
                          1, mask);
  const auto r = generate(int8, prompt, 100, mode::cached, sampler(), {}, &reference.tokens);
  double worst = 0;
  for (std::size_t s = 0; s < r.logits.size(); ++s) {
    worst = std::max(worst, double((r.logits[s] - reference.logits[s]).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>()));
  }
  // int8 steps of 1/255 of each group's range, through a few layers: about 0.01 here.
  EXPECT_LT(worst, 0.1);
  EXPECT_GT(worst, 0.0) << "an int8 cache that matches f32 exactly is not quantizing";
  EXPECT_LT(r.kv_bytes, reference.kv_bytes);
}

// 16-bit caches are the f32 model up to storage rounding.
TEST(Decoder, HalfPrecisionCachesStayClose) {
  const config cfg = small_gqa(80);
  const weights w = random_weights(cfg, 6);
  const std::vector<int> prompt = {1, 2, 3, 4, 5, 6, 7, 8};
  decoder<> f32(cfg, w);
  const auto reference = generate(f32, prompt, 60, mode::cached, sampler());
  auto check = [&](auto scalar, double tolerance) {
    using S = decltype(scalar);
    kvcache::contiguous_cache<S> cache(cfg.cache(), cfg.seq_len);
    decoder<kvcache::contiguous_cache<S>> dec(cfg, w, std::move(cache), 1);
    const auto r = generate(dec, prompt, 60, mode::cached, sampler(), {}, &reference.tokens);
    double worst = 0;
    for (std::size_t s = 0; s < r.logits.size(); ++s) {
      worst = std::max(worst, double((r.logits[s] - reference.logits[s]).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>()));
    }
    EXPECT_LT(worst, tolerance) << kvcache::scalar_traits<S>::name;
    EXPECT_GT(worst, 0.0) << "a 16-bit cache that matches f32 exactly is not storing 16 bits";
    EXPECT_EQ(r.kv_bytes, reference.kv_bytes / 2);
  };
  // Logits are O(1); storage rounding of 2^-11 (f16) and 2^-8 (bf16) relative moves them by
  // about that much times a few layers of amplification.
  check(Eigen::half(), 0.02);
  check(Eigen::bfloat16(), 0.15);
}

TEST(Decoder, TheCacheChangesTheWork) {
  // A decode step that ignored the cache would give the logits of the lone token; check the
  // cached step's logits differ from those and equal the full recomputation.
  config cfg;
  cfg.dim = 32;
  cfg.hidden_dim = 64;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.vocab_size = 50;
  cfg.seq_len = 16;
  const weights w = random_weights(cfg, 1);
  decoder<> dec(cfg, w);
  dec.forward_cached(std::vector<int>{1, 2, 3});
  const vector step = dec.forward_cached(4);
  const vector full = dec.forward_uncached({1, 2, 3, 4});
  const vector alone = dec.forward_uncached({4});
  EXPECT_LT((step - full).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), logit_tolerance);
  EXPECT_GT((step - alone).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), 0.1);
}

TEST(Decoder, BadInput) {
  config cfg;
  cfg.dim = 32;
  cfg.hidden_dim = 64;
  cfg.n_layers = 1;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.vocab_size = 10;
  cfg.seq_len = 4;
  const weights w = random_weights(cfg, 1);
  decoder<> dec(cfg, w);
  EXPECT_THROW(dec.forward_cached(10), std::out_of_range);
  EXPECT_THROW(dec.forward_cached(std::vector<int>{1, 2, 3, 4, 5}), std::length_error);
  EXPECT_EQ(dec.cache().size(), 0);
  config bad = cfg;
  bad.n_kv_heads = 3;
  EXPECT_THROW(random_weights(bad, 1), std::invalid_argument);
  bad = cfg;
  bad.dim = 30;
  EXPECT_THROW(bad.validate(), std::invalid_argument);
  EXPECT_THROW(sampler(-1.0f), std::invalid_argument);
  EXPECT_THROW(sampler(1.0f, 0.0f), std::invalid_argument);
}

// A model written in llama2.c's format and read back computes exactly what the original does.
TEST(Decoder, CheckpointReproducesTheModel) {
  config cfg;
  cfg.dim = 48;
  cfg.hidden_dim = 80;
  cfg.n_layers = 2;
  cfg.n_heads = 6;
  cfg.n_kv_heads = 2;
  cfg.vocab_size = 60;
  cfg.seq_len = 40;
  const weights w = random_weights(cfg, 11);
  const std::string file = ::testing::TempDir() + "kvcache_reproduce_" +
                           std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + ".bin";
  save_checkpoint(file, cfg, w);
  const model loaded = load_checkpoint(file);
  decoder<> original(cfg, w), reloaded(loaded.cfg, loaded.w);
  const std::vector<int> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  const auto a = generate(original, prompt, 16, mode::cached, sampler());
  const auto b = generate(reloaded, prompt, 16, mode::cached, sampler());
  EXPECT_EQ(a.tokens, b.tokens);
  for (std::size_t s = 0; s < a.logits.size(); ++s) EXPECT_EQ(a.logits[s], b.logits[s]) << s;

  // Cut short by one float, the same file is refused, naming itself.
  {
    std::ifstream in(file, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size() - 4));
  }
  try {
    (void)load_checkpoint(file);
    ADD_FAILURE() << "a truncated checkpoint loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
  std::remove(file.c_str());
}

TEST(Sampler, GreedyAndNucleus) {
  vector logits(4);
  logits << 0.0f, 3.0f, 1.0f, -2.0f;
  sampler greedy;
  EXPECT_EQ(greedy(logits), 1);
  sampler tight(1.0f, 0.01f, 5);  // top-p this small keeps only the most likely token
  for (int i = 0; i < 20; ++i) EXPECT_EQ(tight(logits), 1);
  sampler loose(1.0f, 1.0f, 5);
  std::vector<int> counts(4);
  for (int i = 0; i < 4000; ++i) ++counts[std::size_t(loose(logits))];
  // softmax(0, 3, 1, -2) = 0.042, 0.844, 0.114, 0.002
  EXPECT_NEAR(counts[1] / 4000.0, 0.844, 0.03);
  EXPECT_NEAR(counts[2] / 4000.0, 0.114, 0.03);
}

}  // namespace
}  // namespace tiny
