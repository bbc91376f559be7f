// SPDX-License-Identifier: Apache-2.0
// Tests of the KV-cache byte formula and its inverses.
#include <kvcache/detail/buffer.hpp>
#include <kvcache/memory.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

namespace kvcache {
namespace {

// Llama-2-7B: 32 layers, 32 kv heads of 128, fp16: 512 KiB a token, 2 GiB at 4096 tokens.
static_assert(kv_bytes_per_token(32, 32, 128, 2) == 524288);
static_assert(kv_cache_bytes(1, 4096, 32, 32, 128, 2) == 2147483648LL);

TEST(Memory, Formula) {
  // Llama-3-70B: 80 layers, 8 kv heads of 128, fp16, 65536 tokens: 2*65536*80*8*128*2.
  EXPECT_EQ(kv_cache_bytes(1, 65536, 80, 8, 128, 2), 21474836480LL);
  EXPECT_EQ(kv_cache_bytes(3, 10, 2, 4, 8, 4), 2LL * 3 * 10 * 2 * 4 * 8 * 4);
  EXPECT_EQ(kv_cache_bytes(0, 10, 2, 4, 8, 4), 0);
}

TEST(Memory, Inverses) {
  // 24 GB card, 14 GB of weights: 10 GB for the cache of a 7B MHA model in fp16.
  const std::int64_t budget = 10'000'000'000LL;
  EXPECT_EQ(kv_tokens_that_fit(budget, 1, 32, 32, 128, 2), 19073);  // 1e10 / 524288
  EXPECT_EQ(kv_tokens_that_fit(budget, 100, 32, 32, 128, 2), 190);
  EXPECT_EQ(kv_batch_that_fits(budget, 4096, 32, 32, 128, 2), 4);
  for (std::int64_t n : {1, 17, 4096}) {
    const auto fit = kv_tokens_that_fit(kv_cache_bytes(2, n, 3, 4, 8, 2), 2, 3, 4, 8, 2);
    EXPECT_EQ(fit, n);
  }
}

TEST(Memory, BadInput) {
  EXPECT_THROW(kv_cache_bytes(-1, 10, 2, 4, 8, 4), std::invalid_argument);
  EXPECT_THROW(kv_cache_bytes(1, 10, 0, 4, 8, 4), std::invalid_argument);
  EXPECT_THROW(kv_bytes_per_token(1, 1, 1, 0), std::invalid_argument);
  EXPECT_THROW(kv_tokens_that_fit(-5, 1, 1, 1, 1, 1), std::invalid_argument);
  EXPECT_THROW(kv_tokens_that_fit(5, 0, 1, 1, 1, 1), std::invalid_argument);
  EXPECT_THROW(kv_batch_that_fits(5, 0, 1, 1, 1, 1), std::invalid_argument);
  EXPECT_THROW(kv_cache_bytes(1LL << 40, 1LL << 40, 2, 2, 2, 2), std::length_error);
}

// 2 * layers was formed before any check: at 2^62 layers it wrapped to a negative count.
TEST(Memory, EveryProductIsChecked) {
  constexpr std::int64_t max64 = std::numeric_limits<std::int64_t>::max();
  for (const std::int64_t layers : {std::int64_t{1} << 62, max64 / 2 + 1, max64}) {
    EXPECT_THROW(kv_bytes_per_token(layers, 1, 1, 1), std::length_error) << layers;
    EXPECT_THROW(kv_cache_bytes(1, 1, layers, 1, 1, 1), std::length_error) << layers;
    EXPECT_THROW(kv_tokens_that_fit(1000, 1, layers, 1, 1, 1), std::length_error) << layers;
    EXPECT_THROW(kv_batch_that_fits(1000, 1, layers, 1, 1, 1), std::length_error) << layers;
  }
  try {
    kv_bytes_per_token(std::int64_t{1} << 62, 1, 1, 1);
    FAIL() << "expected std::length_error";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("kv_bytes_per_token"), std::string::npos) << e.what();
  }
  EXPECT_EQ(kv_bytes_per_token(std::int64_t{1} << 61, 1, 1, 1), std::int64_t{1} << 62);
  // A batch too large for the budget is no overflow: nothing fits.
  EXPECT_EQ(kv_tokens_that_fit(1000, max64, 1, 1, 1, 1), 0);
  EXPECT_EQ(kv_batch_that_fits(1000, max64, 1, 1, 1, 1), 0);
  EXPECT_EQ(kv_tokens_that_fit(max64, 1, 1, 1, 1, 1), max64 / 2);
}

// The storage under every cache: 64-byte aligned, 2 MiB aligned from 8 MiB on (huge pages);
// a size whose bytes exceed the largest object is std::length_error, not std::bad_alloc.
TEST(Buffer, AlignsAndRefusesSizesNoObjectCanHave) {
  const auto address = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  detail::buffer<float> small(1000);
  EXPECT_EQ(small.size(), 1000);
  EXPECT_EQ(address(small.data()) % 64, 0u);
  detail::buffer<float> large(Index(2) << 20);
  EXPECT_EQ(address(large.data()) % (std::uintptr_t(2) << 20), 0u);
  large.data()[(Index(2) << 20) - 1] = 1.5f;
  detail::buffer<float> moved(std::move(large));
  EXPECT_EQ(moved.data()[(Index(2) << 20) - 1], 1.5f);
  EXPECT_EQ(large.size(), 0);
  EXPECT_EQ(large.data(), nullptr);
  EXPECT_THROW(detail::buffer<double>(std::numeric_limits<Index>::max() / 4), std::length_error);
  EXPECT_THROW(detail::buffer<float>(-1), std::length_error);
}

}  // namespace
}  // namespace kvcache
