// SPDX-License-Identifier: Apache-2.0
// Decode steps allocate nothing once warm: global operator new is counted around them, and
// Eigen's own allocations (which bypass operator new) are forbidden while they run.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  do {                   \
    if (!(x)) throw std::logic_error("Eigen assertion failed: " #x); \
  } while (false)

#include "tiny_decoder/forward.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>

// GCC pairs the replaced operators with malloc/free and warns at every inlined delete.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  const auto align = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(align, (n + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using kvcache::Index;

TEST(NoAllocation, TheCountersSeeAllocations) {
  const long before = allocations.load();
  auto p = std::make_unique<kvcache::kv_layer<float>>(1, 4);
  p->reserve(8);
  EXPECT_GE(allocations.load() - before, 2);  // the object, and its aligned buffers
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_THROW(Eigen::MatrixXf m(10, 10), std::logic_error);
  Eigen::internal::set_is_malloc_allowed(true);
}

TEST(NoAllocation, DecodeStepsAfterWarmUp) {
  for (kvcache::Index threads : {1, 2}) {
    tiny::config cfg;
    cfg.dim = 64;
    cfg.hidden_dim = 96;
    cfg.n_layers = 2;
    cfg.n_heads = 8;
    cfg.n_kv_heads = 2;
    cfg.vocab_size = 50;
    cfg.seq_len = 300;
    const tiny::weights w = tiny::random_weights(cfg, 3);
    tiny::decoder<> dec(cfg, w, threads);
    dec.forward_cached(std::vector<int>{1, 2, 3, 4, 5});
    dec.forward_cached(6);  // warm-up: the workspace takes its size
    const long before = allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    int token = 7;
    EXPECT_NO_THROW(for (int step = 0; step < 200; ++step) {
      Index best = 0;
      dec.forward_cached(token).maxCoeff(&best);
      token = int(best);
    }) << "Eigen allocated";
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_EQ(allocations.load() - before, 0) << "threads = " << threads;
    EXPECT_EQ(dec.cache().size(), 206);
  }
}

TEST(NoAllocation, DecodeAttentionWithSplitK) {
  const kvcache::attention_shape s(8, 2, 64);
  kvcache::kv_layer<Eigen::half> layer(2, 64);
  layer.append(kvcache::row_matrix<float>::Random(5000, 128),
               kvcache::row_matrix<float>::Random(5000, 128));
  kvcache::thread_pool pool(2);
  kvcache::attention_options opt;
  opt.pool = &pool;
  opt.split_tokens = 512;
  kvcache::attention_workspace<float> ws;
  const kvcache::row_vector<float> q = kvcache::row_vector<float>::Random(512);
  kvcache::row_vector<float> out(512);
  kvcache::decode_attention(s, q, layer, out, ws, opt);
  const long before = allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_NO_THROW(for (int i = 0; i < 10; ++i) kvcache::decode_attention(s, q, layer, out, ws, opt));
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0);
}

// Cross-attention of one decoder row (decode_attention) and of a chunk (batch_attention) over
// an int8 cross cache, on one thread and on two.
TEST(NoAllocation, CrossAttentionAfterWarmUp) {
  const kvcache::attention_shape s(8, 2, 64);
  kvcache::cross_attention_cache<kvcache::quantized_format<8>> cross(kvcache::cache_shape(1, s),
                                                                     1500);
  cross.fill(0, kvcache::row_matrix<float>::Random(1500, 128),
             kvcache::row_matrix<float>::Random(1500, 128));
  kvcache::thread_pool pool(2);
  for (kvcache::thread_pool* threads : {static_cast<kvcache::thread_pool*>(nullptr), &pool}) {
    kvcache::attention_options opt;
    opt.pool = threads;
    kvcache::attention_workspace<float> ws;
    const kvcache::row_matrix<float> q = kvcache::row_matrix<float>::Random(6, 512);
    kvcache::row_matrix<float> out(6, 512);
    kvcache::cross_attention(s, q.topRows(1), cross, 0, out.topRows(1), ws, opt);
    kvcache::cross_attention(s, q, cross, 0, out, ws, opt);
    const long before = allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    EXPECT_NO_THROW(for (int i = 0; i < 10; ++i) {
      kvcache::cross_attention(s, q.topRows(1), cross, 0, out.topRows(1), ws, opt);
      kvcache::cross_attention(s, q, cross, 0, out, ws, opt);
    });
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_EQ(allocations.load() - before, 0) << (threads != nullptr ? "2 threads" : "1 thread");
  }
}

// MLA decode over latent rows: absorbed queries, the attention of 16 heads over one latent kv
// head (more rows than the micro-kernels take), the value projection; and the decoder with MLA.
TEST(NoAllocation, LatentDecodeAfterWarmUp) {
  kvcache::thread_pool pool(2);
  // A small latent, and DeepSeek-V2-Lite's (512 + 64, heads of 128), whose tiles of latent rows
  // are the largest matrix products the kernel runs.
  for (const kvcache::mla_shape& s : {kvcache::mla_shape(16, 64, 32, 16, 32),
                                      kvcache::mla_shape(16, 512, 128, 64, 128)}) {
  kvcache::kv_cache<kvcache::contiguous_layout, kvcache::plain_format<Eigen::half>> cache(s.cache(1));
  cache.append(0, kvcache::row_matrix<float>::Random(1000, s.latent_dim()));
  const kvcache::row_matrix<float> w_uk =
      kvcache::row_matrix<float>::Random(s.n_heads() * s.qk_nope_dim(), s.kv_lora_rank());
  const kvcache::row_matrix<float> w_uv =
      kvcache::row_matrix<float>::Random(s.n_heads() * s.v_head_dim(), s.kv_lora_rank());
  const kvcache::row_vector<float> q = kvcache::row_vector<float>::Random(s.q_width());
  kvcache::row_vector<float> out(s.out_width());
  kvcache::mla_workspace<float> ws;
  for (kvcache::thread_pool* p : {static_cast<kvcache::thread_pool*>(nullptr), &pool}) {
    kvcache::attention_options opt;
    opt.pool = p;
    kvcache::mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), out, ws, opt);
    const long before = allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    EXPECT_NO_THROW(for (int i = 0; i < 5; ++i) {
      kvcache::mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), out, ws, opt);
    }) << "Eigen allocated";
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_EQ(allocations.load() - before, 0) << "latent " << s.latent_dim();
  }
  }
  tiny::config cfg;
  cfg.dim = 64;
  cfg.hidden_dim = 96;
  cfg.n_layers = 2;
  cfg.n_heads = 16;
  cfg.vocab_size = 50;
  cfg.seq_len = 300;
  cfg.kv_lora_rank = 32;
  cfg.rope_dim = 8;
  const tiny::weights w = tiny::random_weights(cfg, 3);
  tiny::decoder<> dec(cfg, w, 1);
  dec.forward_cached(std::vector<int>{1, 2, 3, 4, 5});
  dec.forward_cached(6);
  const long before = allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_NO_THROW(for (int step = 0; step < 100; ++step) dec.forward_cached(7)) << "Eigen allocated";
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(allocations.load() - before, 0);
}

}  // namespace
