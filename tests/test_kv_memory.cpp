// SPDX-License-Identifier: Apache-2.0
// Tests of the element formats in memory.hpp and of the kv_memory calculator built on them.
#include "kv_memory/calculator.hpp"

#include <kvcache/memory.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using kvcache::kv_dtype;
using args = std::vector<std::string>;
constexpr std::int64_t max64 = std::numeric_limits<std::int64_t>::max();

// The formulas are constexpr: Llama-3-70B in fp16 at 65536 tokens is 20 GiB at compile time.
static_assert(kvcache::kv_bytes_per_token(80, 8, 128, kv_dtype::f16()) == 2 * 80 * 8 * 128 * 2);
static_assert(kvcache::kv_cache_bytes(1, 65536, 80, 8, 128, kv_dtype::f16()) ==
              2LL * 65536 * 80 * 8 * 128 * 2);
static_assert(kv_dtype::int8(32).bits_per_group() == 8 * 32 + 32);  // 9 bits an element
static_assert(kv_dtype::int4(32).bits_per_group() == 4 * 32 + 32);  // 5 bits an element

kv_memory::report report_for(const args& command_line) {
  return kv_memory::make_report(kv_memory::parse_args(command_line));
}

struct run_result {
  int status;
  std::string out;
  std::string err;
};

run_result run(const args& command_line) {
  std::ostringstream out;
  std::ostringstream err;
  const int status = kv_memory::run(command_line, out, err);
  return {status, out.str(), err.str()};
}

TEST(KvDtype, UnquantizedMatchesBytesPerElement) {
  EXPECT_EQ(kvcache::kv_cache_bytes(3, 10, 2, 4, 8, kv_dtype::f32()),
            kvcache::kv_cache_bytes(3, 10, 2, 4, 8, 4));
  EXPECT_EQ(kvcache::kv_cache_bytes(3, 10, 2, 4, 8, kv_dtype::f16()),
            kvcache::kv_cache_bytes(3, 10, 2, 4, 8, 2));
  EXPECT_EQ(kvcache::kv_cache_bytes(3, 10, 2, 4, 8, kv_dtype::bf16()),
            kvcache::kv_cache_bytes(3, 10, 2, 4, 8, 2));
  EXPECT_EQ(kvcache::kv_bytes_per_token(32, 32, 128, kv_dtype::f16()),
            kvcache::kv_bytes_per_token(32, 32, 128, 2));
  EXPECT_EQ(kvcache::kv_cache_bytes(0, 10, 2, 4, 8, kv_dtype::f16()), 0);
}

TEST(KvDtype, QuantizedRatiosAtGroup32) {
  // A group of 32 int8 codes is 32 bytes plus a 2-byte scale and a 2-byte zero point: 36 bytes,
  // 9 bits an element; int4: 16 + 4 = 20 bytes, 5 bits an element.
  EXPECT_EQ(kvcache::kv_element_bytes(32, kv_dtype::int8(32)), 36);
  EXPECT_EQ(kvcache::kv_element_bytes(32, kv_dtype::int4(32)), 20);
  EXPECT_DOUBLE_EQ(kv_dtype::int8(32).bits_per_element(), 9.0);
  EXPECT_DOUBLE_EQ(kv_dtype::int4(32).bits_per_element(), 5.0);
  EXPECT_DOUBLE_EQ(kv_dtype::int8(64).bits_per_element(), 8.5);
  const std::int64_t shapes[][3] = {{32, 32, 128}, {80, 8, 128}, {32, 1, 64}};
  for (const auto& s : shapes) {
    const auto f32 = kvcache::kv_bytes_per_token(s[0], s[1], s[2], kv_dtype::f32());
    const auto int8 = kvcache::kv_bytes_per_token(s[0], s[1], s[2], kv_dtype::int8(32));
    const auto int4 = kvcache::kv_bytes_per_token(s[0], s[1], s[2], kv_dtype::int4(32));
    EXPECT_EQ(int8 * 32, f32 * 9);  // 9/32 = 0.28125 of f32
    EXPECT_EQ(int4 * 32, f32 * 5);  // 5/32 = 0.15625 of f32
    EXPECT_DOUBLE_EQ(static_cast<double>(int8) / static_cast<double>(f32), 0.28125);
    EXPECT_DOUBLE_EQ(static_cast<double>(int4) / static_cast<double>(f32), 0.15625);
  }
  // Llama-3-8B: 2*32*8*128 elements x 9/8 bytes.
  EXPECT_EQ(kvcache::kv_bytes_per_token(32, 8, 128, kv_dtype::int8(32)), 2 * 32 * 8 * 128 * 9 / 8);
}

TEST(KvDtype, ElementBytesRoundUp) {
  EXPECT_EQ(kvcache::kv_element_bytes(0, kv_dtype::int4(32)), 0);
  EXPECT_EQ(kvcache::kv_element_bytes(1, kv_dtype::int4(32)), 1);  // 5 bits
  EXPECT_EQ(kvcache::kv_element_bytes(8, kv_dtype::int4(32)), 5);  // 40 bits
  EXPECT_EQ(kvcache::kv_element_bytes(9, kv_dtype::int4(32)), 6);  // 45 bits
  EXPECT_EQ(kvcache::kv_element_bytes(3, kv_dtype::f16()), 6);
  EXPECT_EQ(kvcache::kv_elements_that_fit(5, kv_dtype::int4(32)), 8);
  EXPECT_EQ(kvcache::kv_elements_that_fit(6, kv_dtype::int4(32)), 9);
  EXPECT_EQ(kvcache::kv_elements_that_fit(7, kv_dtype::f16()), 3);
}

TEST(KvDtype, Inverses) {
  const kv_dtype dtypes[] = {kv_dtype::f32(),    kv_dtype::f16(),    kv_dtype::bf16(),
                             kv_dtype::int8(32), kv_dtype::int4(32), kv_dtype::int8(64),
                             kv_dtype::int4(128)};
  for (const kv_dtype& dtype : dtypes) {
    for (const std::int64_t batch : {1, 3}) {
      for (const std::int64_t n : {1, 17, 4096, 100000}) {
        const auto bytes = kvcache::kv_cache_bytes(batch, n, 32, 8, 128, dtype);
        EXPECT_EQ(kvcache::kv_tokens_that_fit(bytes, batch, 32, 8, 128, dtype), n) << dtype.name;
        EXPECT_EQ(kvcache::kv_tokens_that_fit(bytes - 1, batch, 32, 8, 128, dtype), n - 1);
        EXPECT_EQ(kvcache::kv_batch_that_fits(bytes, n, 32, 8, 128, dtype), batch);
        EXPECT_EQ(kvcache::kv_batch_that_fits(bytes - 1, n, 32, 8, 128, dtype), batch - 1);
      }
    }
  }
  // 24 GB card, 14 GB of weights, Llama-2-7B in fp16: 1e10 / 524288 tokens.
  EXPECT_EQ(kvcache::kv_tokens_that_fit(10'000'000'000LL, 1, 32, 32, 128, kv_dtype::f16()), 19073);
}

TEST(KvDtype, BadInput) {
  // int8(0) has scales but no groups: the fault is the group size, not the scale bits.
  try {
    kvcache::kv_bytes_per_token(32, 8, 128, kv_dtype::int8(0));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("group_size = 0"), std::string::npos) << what;
    EXPECT_NE(what.find("group_size >= 1"), std::string::npos) << what;
  }
  EXPECT_THROW(kvcache::kv_bytes_per_token(32, 8, 128, kv_dtype::int8(-32)), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_bytes_per_token(32, 8, 128, kv_dtype{"none", 0, 0, 0}),
               std::invalid_argument);
  EXPECT_THROW(kvcache::kv_bytes_per_token(0, 8, 128, kv_dtype::f16()), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_cache_bytes(-1, 8, 2, 2, 2, kv_dtype::f16()), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_tokens_that_fit(-1, 1, 2, 2, 2, kv_dtype::f16()), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_tokens_that_fit(10, 0, 2, 2, 2, kv_dtype::f16()), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_batch_that_fits(10, 0, 2, 2, 2, kv_dtype::f16()), std::invalid_argument);
  EXPECT_THROW(kvcache::kv_element_bytes(-1, kv_dtype::f16()), std::invalid_argument);
}

TEST(KvDtype, Overflow) {
  EXPECT_THROW(kvcache::kv_cache_bytes(1LL << 40, 1LL << 40, 2, 2, 2, kv_dtype::f16()),
               std::length_error);
  EXPECT_THROW(kvcache::kv_element_bytes(max64, kv_dtype::f32()), std::length_error);
  // A sub-byte format holds more elements than bytes: 8/5 x 2^63 does not fit.
  EXPECT_THROW(kvcache::kv_elements_that_fit(max64, kv_dtype::int4(32)), std::length_error);
  // Products of the shape are checked too, not only the final byte count.
  for (const kv_dtype& dtype : {kv_dtype::f16(), kv_dtype::int8(32), kv_dtype::int4(48)}) {
    EXPECT_THROW(kvcache::kv_bytes_per_token(max64, 2, 2, dtype), std::length_error);
    EXPECT_THROW(kvcache::kv_bytes_per_token(2, 2, max64, dtype), std::length_error);
    EXPECT_THROW(kvcache::kv_tokens_that_fit(100, 1, 1LL << 32, 1LL << 32, 8, dtype),
                 std::length_error);
    EXPECT_THROW(kvcache::kv_latent_bytes_per_token(3, max64 / 3, max64 / 3, dtype),
                 std::length_error);
  }
  // Counts near the limit that do fit come out exactly, without a wider integer.
  EXPECT_EQ(kvcache::kv_element_bytes(max64 / 8 * 8, kv_dtype::int4(32)), max64 / 8 * 5);
  EXPECT_EQ(kvcache::kv_elements_that_fit(max64, kv_dtype::f16()), max64 / 2);
}

TEST(KvDtype, MulDivIsExact) {
  using kvcache::detail::mul_div;
  // 2^63 - 1 = 7 x 1317624576693539401.
  EXPECT_EQ(mul_div(max64, 3, 7).quotient, 3 * 1317624576693539401LL);
  EXPECT_EQ(mul_div(max64, 3, 7).remainder, 0);
  EXPECT_EQ(mul_div(max64, max64 - 1, max64).quotient, max64 - 1);
  // (m-1)^2 = m(m-2) + 1.
  EXPECT_EQ(mul_div(max64 - 1, max64 - 1, max64).quotient, max64 - 2);
  EXPECT_EQ(mul_div(max64 - 1, max64 - 1, max64).remainder, 1);
  for (std::int64_t a : {0, 1, 7, 1000, 123456789}) {
    for (std::int64_t b : {0, 1, 5, 288, 99991}) {
      for (std::int64_t c : {1, 3, 256, 1000003}) {
        EXPECT_EQ(mul_div(a, b, c).quotient, a * b / c);
        EXPECT_EQ(mul_div(a, b, c).remainder, a * b % c);
      }
    }
  }
  EXPECT_THROW(mul_div(max64, 2, 1), std::length_error);
}

// Groups need not divide head_dim: values keep ceil(head_dim / group) scale and zero points a
// token, keys one per channel per group of tokens.
TEST(KvDtype, GroupsThatDoNotDivideHeadDim) {
  // Llama-2-7B, int8, group 48, per layer and kv head a token: 2 x 128 bytes of codes,
  // ceil(128/48) = 3 value scale pairs of 4 bytes, 128 x 4 / 48 bytes of key scales:
  // 256 + 12 + 10.67 = 278.67 bytes, x 32 x 32 = 285354.67, rounded up.
  EXPECT_EQ(kvcache::kv_bytes_per_token(32, 32, 128, kv_dtype::int8(48)), 285355);
  // int4: 2 x 64 + 12 + 10.67 = 150.67 bytes, x 1024 = 154282.67.
  EXPECT_EQ(kvcache::kv_bytes_per_token(32, 32, 128, kv_dtype::int4(48)), 154283);
  // head_dim 100 in int4 at group 32: 2 x 50 + 4 x 4 + 100 x 4 / 32 = 128.5 bytes a row.
  EXPECT_EQ(kvcache::kv_bytes_per_token(32, 8, 100, kv_dtype::int4(32)), 32896);
  EXPECT_EQ(kvcache::kv_cache_bytes(1, 3, 1, 1, 100, kv_dtype::int4(32)), 386);  // 385.5
  // A group wider than head_dim: one value group, 128 x 4 / 256 = 2 bytes of key scales.
  EXPECT_EQ(kvcache::kv_bytes_per_token(1, 1, 128, kv_dtype::int4(256)), 64 + 64 + 4 + 2);
  // Odd head_dim in int4: each code row is padded to a whole byte.
  EXPECT_EQ(kvcache::kv_bytes_per_token(1, 1, 3, kv_dtype::int4(1)), 2 + 2 + 12 + 12);
  // Dividing groups give what spreading the scales over the elements gives.
  for (const int group : {1, 2, 16, 32, 64, 128}) {
    for (const kv_dtype& dtype : {kv_dtype::int8(group), kv_dtype::int4(group)}) {
      EXPECT_EQ(kvcache::kv_bytes_per_token(32, 8, 128, dtype),
                kvcache::kv_element_bytes(2 * 32 * 8 * 128, dtype))
          << dtype.name << " " << group;
      EXPECT_EQ(kvcache::kv_cache_bytes(3, 1001, 32, 8, 128, dtype),
                kvcache::kv_element_bytes(3LL * 1001 * 2 * 32 * 8 * 128, dtype));
    }
  }
  // Inverses are exact for them too.
  for (const kv_dtype& dtype : {kv_dtype::int8(48), kv_dtype::int4(48), kv_dtype::int4(7),
                                kv_dtype::int8(1000), kv_dtype::int4(1)}) {
    for (const std::int64_t n : {1, 2, 17, 4096, 100000}) {
      SCOPED_TRACE(std::string(dtype.name) + "/" + std::to_string(dtype.group_size) + " " +
                   std::to_string(n));
      const auto bytes = kvcache::kv_cache_bytes(3, n, 32, 8, 100, dtype);
      EXPECT_EQ(kvcache::kv_tokens_that_fit(bytes, 3, 32, 8, 100, dtype), n);
      EXPECT_EQ(kvcache::kv_tokens_that_fit(bytes - 1, 3, 32, 8, 100, dtype), n - 1);
      EXPECT_EQ(kvcache::kv_batch_that_fits(bytes, n, 32, 8, 100, dtype), 3);
      EXPECT_EQ(kvcache::kv_batch_that_fits(bytes - 1, n, 32, 8, 100, dtype), 2);
    }
  }
}

TEST(KvDtype, LatentCaches) {
  // DeepSeek-V2: 60 layers of a 512 latent and 64 RoPE dims.
  EXPECT_EQ(kvcache::kv_latent_bytes_per_token(60, 512, 64, kv_dtype::f16()), 60 * 576 * 2);
  EXPECT_EQ(kvcache::kv_latent_bytes_per_token(60, 512, 64, kv_dtype::int4(32)),
            60 * 576 * 5 / 8);
  // Group 48: the latent keeps ceil(512/48) = 11 groups, the rope dims 2: per layer
  // 256 + 44 + 32 + 8 = 340 bytes in int4.
  EXPECT_EQ(kvcache::kv_latent_bytes_per_token(60, 512, 64, kv_dtype::int4(48)), 60 * 340);
  EXPECT_EQ(kvcache::kv_latent_bytes_per_token(2, 7, 0, kv_dtype::int4(32)), 2 * (4 + 4));
  const auto bytes = kvcache::kv_latent_cache_bytes(2, 777, 60, 512, 64, kv_dtype::int4(48));
  EXPECT_EQ(bytes, 2 * 777 * 60 * 340);
  EXPECT_EQ(kvcache::kv_latent_tokens_that_fit(bytes, 2, 60, 512, 64, kv_dtype::int4(48)), 777);
  EXPECT_EQ(kvcache::kv_latent_tokens_that_fit(bytes - 1, 2, 60, 512, 64, kv_dtype::int4(48)),
            776);
  EXPECT_EQ(kvcache::kv_latent_batch_that_fits(bytes, 777, 60, 512, 64, kv_dtype::int4(48)), 2);
  EXPECT_THROW(kvcache::kv_latent_bytes_per_token(0, 512, 64, kv_dtype::f16()),
               std::invalid_argument);
  EXPECT_THROW(kvcache::kv_latent_bytes_per_token(1, 512, -1, kv_dtype::f16()),
               std::invalid_argument);
  // 2 x 6148914691236517206 wraps to a small number; the sum is checked.
  EXPECT_THROW(kvcache::kv_latent_bytes_per_token(3, 6148914691236517206, 6148914691236517206,
                                                  kv_dtype::f16()),
               std::length_error);
}

// Paged caches (vLLM's PagedAttention): whole pages of page_size tokens of every layer and kv
// head; the last page of a sequence partly filled.
static_assert(kvcache::kv_page_bytes(16, 32, 32, 128, kv_dtype::f16()) == 16 * 524288);
static_assert(kvcache::kv_pages_for_tokens(4100, 16) == 257);

TEST(KvPaged, PagesForTokensRoundUp) {
  EXPECT_EQ(kvcache::kv_pages_for_tokens(0, 16), 0);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(1, 16), 1);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(15, 16), 1);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(16, 16), 1);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(17, 16), 2);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(4096, 16), 256);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(4100, 16), 257);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(7, 1), 7);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(7, 1000), 1);
  // No overflow at the limit: (2^63 - 1) / 2 rounded up is 2^62.
  EXPECT_EQ(kvcache::kv_pages_for_tokens(max64, 1), max64);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(max64, 2), std::int64_t{1} << 62);
  EXPECT_EQ(kvcache::kv_pages_for_tokens(max64, max64), 1);
}

TEST(KvPaged, PageBytesByHand) {
  // Llama-2-7B in f16, 16 tokens a page: 16 x 2 x 32 x 32 x 128 x 2 bytes = 8 MiB.
  EXPECT_EQ(kvcache::kv_page_bytes(16, 32, 32, 128, kv_dtype::f16()), 8388608);
  // Llama-3-8B in f32, one token a page: 2 x 32 x 8 x 128 x 4.
  EXPECT_EQ(kvcache::kv_page_bytes(1, 32, 8, 128, kv_dtype::f32()), 262144);
  // Llama-3-8B in int8 at group 32, 32 tokens a page: per layer and kv head, 32 tokens x
  // (2 x 128 B codes + 4 x 4 B value scales) + 128 x 4 B key scales = 9216 bytes; x 256 rows.
  EXPECT_EQ(kvcache::kv_page_bytes(32, 32, 8, 128, kv_dtype::int8(32)), 9216 * 256);
  EXPECT_EQ(9216 * 256, 32 * 73728);
  // Two key groups a page: 2 x 9216 bytes a row.
  EXPECT_EQ(kvcache::kv_page_bytes(64, 32, 8, 128, kv_dtype::int8(32)), 2 * 9216 * 256);
  // int4 at group 48, which does not divide head_dim: per row 48 x (2 x 64 B codes + 3 x 4 B
  // value scales) + 128 x 4 B key scales = 7232 bytes, where a token alone rounds to 38571.
  EXPECT_EQ(kvcache::kv_page_bytes(48, 32, 8, 128, kv_dtype::int4(48)), 7232 * 256);
  EXPECT_EQ(kvcache::kv_page_bytes(96, 32, 8, 128, kv_dtype::int4(48)), 2 * 7232 * 256);
  // Falcon-7B (MQA), bf16, 256 tokens: 256 x 2 x 32 x 1 x 64 x 2.
  EXPECT_EQ(kvcache::kv_page_bytes(256, 32, 1, 64, kv_dtype::bf16()), 2097152);
  // MLA: DeepSeek-V2 in f16, 16 tokens of 60 x (512 + 64) x 2 bytes.
  EXPECT_EQ(kvcache::kv_latent_page_bytes(16, 60, 512, 64, kv_dtype::f16()), 16 * 69120);
  // MLA groups run along each token's channels: a page of 10 tokens at group 48 is whole
  // groups, 10 x 60 x 340 bytes (see LatentCaches).
  EXPECT_EQ(kvcache::kv_latent_page_bytes(10, 60, 512, 64, kv_dtype::int4(48)), 10 * 60 * 340);
  // A page is what a cache of page_size tokens takes.
  for (const kv_dtype& dtype : {kv_dtype::f32(), kv_dtype::f16(), kv_dtype::int8(16),
                                kv_dtype::int4(32), kv_dtype::int8(48), kv_dtype::int4(7)}) {
    for (const std::int64_t groups : {1, 2, 5}) {
      const std::int64_t page = groups * (dtype.quantized() ? dtype.group_size : 16);
      EXPECT_EQ(kvcache::kv_page_bytes(page, 32, 8, 100, dtype),
                kvcache::kv_cache_bytes(1, page, 32, 8, 100, dtype))
          << dtype.name << "/" << dtype.group_size << " page " << page;
    }
  }
}

TEST(KvPaged, PagedBytesAndWasteByHand) {
  // Llama-3-8B in f16 (131072 bytes a token), 3 sequences of 17 tokens in pages of 16: two pages
  // each, 15 slots of the second unused.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(3, 17, 16, 32, 8, 128, kv_dtype::f16()),
            3 * 2 * 16 * 131072);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(3, 17, 16, 32, 8, 128, kv_dtype::f16()),
            3 * 15 * 131072);
  // Llama-2-7B, one sequence of 4100 tokens in pages of 16: 257 pages of 8 MiB, 12 slots unused.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(1, 4100, 16, 32, 32, 128, kv_dtype::f16()),
            257LL * 8388608);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(1, 4100, 16, 32, 32, 128, kv_dtype::f16()),
            12 * 524288);
  // int8 at group 32, pages of 64: 2 sequences of 100 tokens take 2 pages each, 28 slots unused.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(2, 100, 64, 32, 8, 128, kv_dtype::int8(32)),
            2 * 2 * 64 * 73728);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(2, 100, 64, 32, 8, 128, kv_dtype::int8(32)),
            2 * 28 * 73728);
  // A page size that divides the sequence wastes nothing.
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(5, 4096, 16, 32, 8, 128, kv_dtype::f16()), 0);
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(5, 4096, 16, 32, 8, 128, kv_dtype::int4(16)),
            kvcache::kv_cache_bytes(5, 4096, 32, 8, 128, kv_dtype::int4(16)));
  // A page larger than the sequence: one page, mostly empty.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(1, 1, 1024, 1, 1, 8, kv_dtype::f16()), 1024 * 32);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(1, 1, 1024, 1, 1, 8, kv_dtype::f16()), 1023 * 32);
  // No sequences, or empty ones: no pages.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(0, 100, 16, 32, 8, 128, kv_dtype::f16()), 0);
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(4, 0, 16, 32, 8, 128, kv_dtype::f16()), 0);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(4, 0, 16, 32, 8, 128, kv_dtype::f16()), 0);
  // MLA: DeepSeek-V2 in f16, 2 sequences of 1000 tokens in pages of 64: 16 pages each, 24 slots
  // unused.
  EXPECT_EQ(kvcache::kv_latent_paged_cache_bytes(2, 1000, 64, 60, 512, 64, kv_dtype::f16()),
            2 * 16 * 64 * 69120);
  EXPECT_EQ(kvcache::kv_latent_paged_waste_bytes(2, 1000, 64, 60, 512, 64, kv_dtype::f16()),
            2 * 24 * 69120);
}

TEST(KvPaged, PagedIsPagesTimesPageAndWasteIsUnderAPageASequence) {
  for (const kv_dtype& dtype : {kv_dtype::f32(), kv_dtype::f16(), kv_dtype::bf16(),
                                kv_dtype::int8(32), kv_dtype::int4(32), kv_dtype::int8(48),
                                kv_dtype::int4(7)}) {
    for (const std::int64_t groups : {1, 3, 16}) {
      const std::int64_t page = groups * (dtype.quantized() ? dtype.group_size : 1);
      const std::int64_t page_bytes = kvcache::kv_page_bytes(page, 32, 8, 100, dtype);
      for (const std::int64_t batch : {1, 3}) {
        for (const std::int64_t n : {1, 17, 48, 4096, 100001}) {
          SCOPED_TRACE(std::string(dtype.name) + "/" + std::to_string(dtype.group_size) +
                       " page " + std::to_string(page) + " batch " + std::to_string(batch) +
                       " n " + std::to_string(n));
          const std::int64_t pages = kvcache::kv_pages_for_tokens(n, page);
          const std::int64_t paged =
              kvcache::kv_paged_cache_bytes(batch, n, page, 32, 8, 100, dtype);
          const std::int64_t waste =
              kvcache::kv_paged_waste_bytes(batch, n, page, 32, 8, 100, dtype);
          EXPECT_EQ(paged, batch * pages * page_bytes);
          EXPECT_EQ(waste, paged - kvcache::kv_cache_bytes(batch, n, 32, 8, 100, dtype));
          EXPECT_GE(waste, 0);
          EXPECT_LT(waste, batch * page_bytes);
          if (n % page == 0) {
            EXPECT_EQ(waste, 0);
          }
          // The pages of `batch` sequences are what that budget holds.
          EXPECT_EQ(kvcache::kv_pages_that_fit(paged, page, 32, 8, 100, dtype), batch * pages);
          EXPECT_EQ(kvcache::kv_pages_that_fit(paged - 1, page, 32, 8, 100, dtype),
                    batch * pages - 1);
        }
      }
    }
  }
}

TEST(KvPaged, WhatABudgetHolds) {
  // 24 GB card, 14 GB of weights, Llama-2-7B in f16, pages of 16 tokens (8 MiB): 1e10 / 2^23 =
  // 1192.09 pages, 19072 tokens, one token less than a contiguous cache holds.
  EXPECT_EQ(kvcache::kv_pages_that_fit(10'000'000'000LL, 16, 32, 32, 128, kv_dtype::f16()), 1192);
  EXPECT_EQ(kvcache::kv_paged_tokens_that_fit(10'000'000'000LL, 16, 32, 32, 128, kv_dtype::f16()),
            19072);
  EXPECT_EQ(kvcache::kv_tokens_that_fit(10'000'000'000LL, 1, 32, 32, 128, kv_dtype::f16()), 19073);
  // Exactly one page, one byte short of one, nothing.
  EXPECT_EQ(kvcache::kv_pages_that_fit(8388608, 16, 32, 32, 128, kv_dtype::f16()), 1);
  EXPECT_EQ(kvcache::kv_pages_that_fit(8388607, 16, 32, 32, 128, kv_dtype::f16()), 0);
  EXPECT_EQ(kvcache::kv_paged_tokens_that_fit(8388607, 16, 32, 32, 128, kv_dtype::f16()), 0);
  EXPECT_EQ(kvcache::kv_pages_that_fit(0, 16, 32, 32, 128, kv_dtype::f16()), 0);
  // int4 at group 48 in pages of 96: 1 GiB / (2 x 7232 x 256) = 289.95 pages of 96 tokens.
  EXPECT_EQ(kvcache::kv_pages_that_fit(1LL << 30, 96, 32, 8, 128, kv_dtype::int4(48)), 289);
  EXPECT_EQ(kvcache::kv_paged_tokens_that_fit(1LL << 30, 96, 32, 8, 128, kv_dtype::int4(48)),
            289 * 96);
  // MLA: 1 GB / (16 x 69120) = 904.2 pages.
  EXPECT_EQ(kvcache::kv_latent_pages_that_fit(1'000'000'000, 16, 60, 512, 64, kv_dtype::f16()),
            904);
  EXPECT_EQ(
      kvcache::kv_latent_paged_tokens_that_fit(1'000'000'000, 16, 60, 512, 64, kv_dtype::f16()),
      904 * 16);
  // The largest budget: (2^63 - 1) / 2^23 pages.
  EXPECT_EQ(kvcache::kv_pages_that_fit(max64, 16, 32, 32, 128, kv_dtype::f16()), max64 >> 23);
}

TEST(KvPaged, BadPageSizes) {
  const auto expect_message = [](auto call, std::vector<std::string> parts) {
    try {
      call();
      ADD_FAILURE() << "expected std::invalid_argument";
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      for (const std::string& part : parts) {
        EXPECT_NE(what.find(part), std::string::npos) << "'" << part << "' not in: " << what;
      }
    }
  };
  for (const std::int64_t page : {std::int64_t{0}, std::int64_t{-16}, -max64}) {
    SCOPED_TRACE(page);
    const std::string got = "got " + std::to_string(page);
    expect_message([&] { kvcache::kv_page_bytes(page, 32, 8, 128, kv_dtype::f16()); },
                   {"kv_page_bytes", "page_size", "positive", got});
    expect_message([&] { kvcache::kv_pages_for_tokens(100, page); },
                   {"kv_pages_for_tokens", "page_size", "positive", got});
    expect_message(
        [&] { kvcache::kv_paged_cache_bytes(1, 100, page, 32, 8, 128, kv_dtype::f16()); },
        {"kv_paged_cache_bytes", "page_size", got});
    expect_message(
        [&] { kvcache::kv_paged_waste_bytes(1, 100, page, 32, 8, 128, kv_dtype::int8(32)); },
        {"kv_paged_waste_bytes", "page_size", got});
    expect_message([&] { kvcache::kv_pages_that_fit(1000, page, 32, 8, 128, kv_dtype::f16()); },
                   {"kv_pages_that_fit", "page_size", got});
    expect_message(
        [&] { kvcache::kv_paged_tokens_that_fit(1000, page, 32, 8, 128, kv_dtype::f16()); },
        {"kv_paged_tokens_that_fit", "page_size", got});
    expect_message([&] { kvcache::kv_latent_page_bytes(page, 60, 512, 64, kv_dtype::f16()); },
                   {"kv_latent_page_bytes", "page_size", got});
  }
  // A quantized page holds whole groups of keys.
  expect_message([] { kvcache::kv_page_bytes(48, 32, 8, 128, kv_dtype::int8(32)); },
                 {"kv_page_bytes", "page_size", "multiple", "int8 group of 32", "got 48"});
  expect_message([] { kvcache::kv_page_bytes(16, 32, 8, 128, kv_dtype::int4(32)); },
                 {"page_size", "multiple", "int4 group of 32", "got 16"});
  expect_message([] { kvcache::kv_paged_cache_bytes(1, 64, 64, 32, 8, 128, kv_dtype::int4(48)); },
                 {"kv_paged_cache_bytes", "multiple", "group of 48", "got 64"});
  expect_message([] { kvcache::kv_pages_that_fit(1LL << 30, 1, 32, 8, 128, kv_dtype::int8(2)); },
                 {"kv_pages_that_fit", "multiple", "group of 2", "got 1"});
  // Other arguments are named too.
  expect_message([] { kvcache::kv_pages_for_tokens(-1, 16); }, {"tokens", ">= 0", "got -1"});
  expect_message([] { kvcache::kv_paged_cache_bytes(-1, 10, 16, 32, 8, 128, kv_dtype::f16()); },
                 {"batch and seq_len", "got -1 and 10"});
  expect_message([] { kvcache::kv_paged_waste_bytes(1, -10, 16, 32, 8, 128, kv_dtype::f16()); },
                 {"batch and seq_len", "got 1 and -10"});
  expect_message([] { kvcache::kv_pages_that_fit(-1, 16, 32, 8, 128, kv_dtype::f16()); },
                 {"kv_pages_that_fit", "budget", "got -1"});
  expect_message([] { kvcache::kv_page_bytes(16, 0, 8, 128, kv_dtype::f16()); },
                 {"kv_page_bytes", "layers"});
  expect_message([] { kvcache::kv_page_bytes(16, 32, 8, 128, kv_dtype::int8(-32)); },
                 {"kv_page_bytes", "group_size = -32"});
  expect_message(
      [] { kvcache::kv_latent_paged_cache_bytes(1, 10, 16, 60, 512, -1, kv_dtype::f16()); },
      {"kv_latent_paged_cache_bytes", "rope_dim"});
  // Whole groups: multiples of the group pass.
  EXPECT_NO_THROW(kvcache::kv_page_bytes(96, 32, 8, 128, kv_dtype::int4(48)));
  EXPECT_NO_THROW(kvcache::kv_page_bytes(7, 32, 8, 128, kv_dtype::int4(1)));
  EXPECT_NO_THROW(kvcache::kv_page_bytes(7, 32, 8, 128, kv_dtype::f16()));
}

TEST(KvPaged, Overflow) {
  // A page of 2^45 tokens of 2^19 bytes is 2^64 bytes.
  EXPECT_THROW(kvcache::kv_page_bytes(1LL << 45, 32, 32, 128, kv_dtype::f16()), std::length_error);
  EXPECT_THROW(kvcache::kv_page_bytes(max64, 1, 1, 1, kv_dtype::f16()), std::length_error);
  EXPECT_THROW(kvcache::kv_page_bytes(max64 / 32 * 32, 1, 1, 1, kv_dtype::int4(32)),
               std::length_error);
  EXPECT_THROW(kvcache::kv_latent_page_bytes(1LL << 50, 60, 512, 64, kv_dtype::f16()),
               std::length_error);
  // The tokens fit a contiguous count; one page per token does not.
  EXPECT_EQ(kvcache::kv_cache_bytes(1, 1, 32, 32, 128, kv_dtype::f16()), 524288);
  EXPECT_THROW(kvcache::kv_paged_cache_bytes(1, 1, 1LL << 45, 32, 32, 128, kv_dtype::f16()),
               std::length_error);
  EXPECT_THROW(kvcache::kv_paged_waste_bytes(1, 1, 1LL << 45, 32, 32, 128, kv_dtype::f16()),
               std::length_error);
  // Pages each of which fits, too many of them: batch x pages, then x page bytes.
  EXPECT_THROW(kvcache::kv_paged_cache_bytes(1LL << 40, 1LL << 40, 1, 1, 1, 1, kv_dtype::f16()),
               std::length_error);
  EXPECT_THROW(kvcache::kv_paged_cache_bytes(1LL << 20, 1LL << 30, 16, 32, 32, 128,
                                             kv_dtype::f16()),
               std::length_error);
  EXPECT_THROW(kvcache::kv_latent_paged_cache_bytes(max64, 2, 1, 1, 1, 0, kv_dtype::f16()),
               std::length_error);
  EXPECT_THROW(kvcache::kv_pages_that_fit(max64, 1LL << 45, 32, 32, 128, kv_dtype::f16()),
               std::length_error);
  // Rows of a page: page_size x layers x kv_heads.
  EXPECT_THROW(kvcache::kv_pages_that_fit(100, 1LL << 32, 1LL << 16, 1LL << 16, 1,
                                          kv_dtype::f16()),
               std::length_error);
  // A 1-bit element: 2 bits a token, a page of 8 tokens is 2 bytes; 2^62 - 1 pages fit the
  // largest budget, and their 8 x (2^62 - 1) token slots do not fit 64 bits.
  const kv_dtype one_bit{"b1", 1, 0, 0};
  EXPECT_EQ(kvcache::kv_page_bytes(8, 1, 1, 1, one_bit), 2);
  EXPECT_EQ(kvcache::kv_pages_that_fit(max64, 8, 1, 1, 1, one_bit), max64 / 2);
  EXPECT_THROW(kvcache::kv_paged_tokens_that_fit(max64, 8, 1, 1, 1, one_bit), std::length_error);
  EXPECT_EQ(kvcache::kv_paged_tokens_that_fit(1LL << 60, 8, 1, 1, 1, one_bit), 1LL << 62);
  // Near the limit, exact: 2^63 - 1 tokens in 2^60 pages of 2 bytes; contiguous, their
  // 2^64 - 2 bits round up to the same 2^61 bytes.
  EXPECT_EQ(kvcache::kv_paged_cache_bytes(1, max64, 8, 1, 1, 1, one_bit), 1LL << 61);
  EXPECT_EQ(kvcache::kv_paged_waste_bytes(1, max64, 8, 1, 1, 1, one_bit), 0);
}

TEST(KvMemoryPresets, BytesPerTokenByHand) {
  struct expected {
    const char* model;
    std::int64_t f16, int8, int4;  // int8/int4 at group 32: 9 and 5 bits an element
  };
  const expected table[] = {
      {"llama-2-7b", 2 * 32 * 32 * 128 * 2, 2 * 32 * 32 * 128 * 9 / 8, 2 * 32 * 32 * 128 * 5 / 8},
      {"llama-3-8b", 2 * 32 * 8 * 128 * 2, 2 * 32 * 8 * 128 * 9 / 8, 2 * 32 * 8 * 128 * 5 / 8},
      {"llama-3-70b", 2 * 80 * 8 * 128 * 2, 2 * 80 * 8 * 128 * 9 / 8, 2 * 80 * 8 * 128 * 5 / 8},
      {"mistral-7b", 2 * 32 * 8 * 128 * 2, 2 * 32 * 8 * 128 * 9 / 8, 2 * 32 * 8 * 128 * 5 / 8},
      {"falcon-7b", 2 * 32 * 1 * 64 * 2, 2 * 32 * 1 * 64 * 9 / 8, 2 * 32 * 1 * 64 * 5 / 8},
      // MLA: one latent of 512 + 64 RoPE dims a layer, no K/V pair, no heads.
      {"deepseek-v2", 60 * (512 + 64) * 2, 60 * (512 + 64) * 9 / 8, 60 * (512 + 64) * 5 / 8},
  };
  for (const expected& e : table) {
    SCOPED_TRACE(e.model);
    EXPECT_EQ(report_for({"--model", e.model, "--seq-len", "1"}).bytes_per_token, e.f16);
    EXPECT_EQ(report_for({"--model", e.model, "--seq-len", "1", "--dtype", "int8"}).bytes_per_token,
              e.int8);
    EXPECT_EQ(report_for({"--model", e.model, "--seq-len", "1", "--dtype", "int4"}).bytes_per_token,
              e.int4);
  }
  EXPECT_EQ(kv_memory::presets.size(), std::size(table));
  EXPECT_STREQ(kv_memory::find_preset("llama-2-7b").attention(), "MHA");
  EXPECT_STREQ(kv_memory::find_preset("llama-3-8b").attention(), "GQA");
  EXPECT_STREQ(kv_memory::find_preset("falcon-7b").attention(), "MQA");
  EXPECT_STREQ(kv_memory::find_preset("deepseek-v2").attention(), "MLA");
}

TEST(KvMemory, Llama3_70bAt64kIs20GiB) {
  const auto r = report_for({"--model", "llama-3-70b", "--seq-len", "65536", "--dtype", "f16"});
  EXPECT_EQ(r.bytes_per_token, 320 * 1024);  // 2 x 80 x 8 x 128 x 2
  EXPECT_EQ(r.total_bytes, 2LL * 65536 * 80 * 8 * 128 * 2);
  EXPECT_EQ(r.total_bytes, 20LL << 30);
  EXPECT_EQ(r.total_bytes, 21474836480LL);
}

TEST(KvMemory, SlidingWindowCapsTheCache) {
  const auto long_context = report_for({"--model", "mistral-7b", "--seq-len", "32768"});
  EXPECT_EQ(long_context.cached_tokens, 4096);
  EXPECT_EQ(long_context.total_bytes, 4096LL * 2 * 32 * 8 * 128 * 2);
  const auto short_context = report_for({"--model", "mistral-7b", "--seq-len", "1000"});
  EXPECT_EQ(short_context.cached_tokens, 1000);
  EXPECT_EQ(short_context.total_bytes, 1000LL * 2 * 32 * 8 * 128 * 2);
  // The same shape without a window keeps every token.
  EXPECT_EQ(report_for({"--model", "llama-3-8b", "--seq-len", "32768"}).total_bytes,
            32768LL * 2 * 32 * 8 * 128 * 2);
  EXPECT_EQ(report_for({"--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--window",
                        "1024", "--seq-len", "5000"})
                .total_bytes,
            1024LL * 2 * 32 * 8 * 128 * 2);

  // 10 GB holds the 512 MiB window many times over: any length fits one sequence, and
  // 1e10 / (4096 x 131072) = 18 windows fit side by side.
  const auto roomy = report_for(
      {"--model", "mistral-7b", "--seq-len", "32768", "--device-mem", "24GB", "--weights", "14GB"});
  ASSERT_TRUE(roomy.fit);
  EXPECT_FALSE(roomy.fit->max_seq_len);
  EXPECT_EQ(roomy.fit->max_batch, 18);
  // 100 MiB holds 800 tokens, less than the window: the cap does not apply.
  const auto tight =
      report_for({"--model", "mistral-7b", "--seq-len", "32768", "--device-mem", "100MiB"});
  ASSERT_TRUE(tight.fit);
  ASSERT_TRUE(tight.fit->max_seq_len);
  EXPECT_EQ(*tight.fit->max_seq_len, 100 * 1024 * 1024 / (2 * 32 * 8 * 128 * 2));
  EXPECT_EQ(tight.fit->max_batch, 0);
}

TEST(KvMemory, MultiHeadLatentAttention) {
  const auto r = report_for({"--model", "deepseek-v2", "--seq-len", "65536", "--batch", "2"});
  EXPECT_EQ(r.elements_per_token, 60 * (512 + 64));
  EXPECT_EQ(r.total_bytes, 2LL * 65536 * 60 * (512 + 64) * 2);
  const auto custom = report_for({"--layers", "60", "--latent-dim", "512", "--rope-dim", "64",
                                  "--seq-len", "65536", "--batch", "2"});
  EXPECT_EQ(custom.total_bytes, r.total_bytes);
  EXPECT_STREQ(custom.model.attention(), "MLA");
  // Against full MHA of 128 heads of 128 dims over 60 layers: 2*128*128 / 576 = 56.9x smaller.
  EXPECT_EQ(
      report_for({"--layers", "60", "--kv-heads", "128", "--head-dim", "128", "--seq-len", "1"})
          .bytes_per_token,
      2 * 60 * 128 * 128 * 2);
}

TEST(KvMemory, FitInversesForEveryPreset) {
  for (const kv_memory::model_shape& model : kv_memory::presets) {
    for (const kv_dtype& dtype : {kv_dtype::f16(), kv_dtype::int8(32), kv_dtype::int4(32)}) {
      for (const std::int64_t n : {1, 777, 4096}) {
        SCOPED_TRACE(std::string(model.name) + " " + dtype.name + " " + std::to_string(n));
        const std::int64_t bytes = kv_memory::cache_bytes(model, dtype, 2, n);
        EXPECT_EQ(kv_memory::tokens_that_fit(model, dtype, bytes, 2), n);
        EXPECT_EQ(kv_memory::tokens_that_fit(model, dtype, bytes - 1, 2), n - 1);
        EXPECT_EQ(kv_memory::batch_that_fits(model, dtype, bytes, n), 2);
        EXPECT_EQ(kv_memory::batch_that_fits(model, dtype, bytes - 1, n), 1);
      }
    }
  }
}

TEST(KvMemory, SevenBillionOn24GbCard) {
  // 24 GB - 14 GB = 1e10 bytes for the cache; a token of Llama-2-7B in fp16 takes 2^19.
  const auto one = report_for(
      {"--model", "llama-2-7b", "--seq-len", "4096", "--device-mem", "24GB", "--weights", "14GB"});
  ASSERT_TRUE(one.fit && one.fit->max_seq_len);
  EXPECT_EQ(one.fit->budget_bytes, 10'000'000'000LL);
  EXPECT_EQ(*one.fit->max_seq_len, 10'000'000'000LL / 524288);          // 19073
  EXPECT_EQ(one.fit->max_batch, 10'000'000'000LL / (4096LL * 524288));  // 4
  const auto hundred = report_for({"--model", "llama-2-7b", "--seq-len", "4096", "--batch", "100",
                                   "--device-mem", "24GB", "--weights", "14GB"});
  EXPECT_EQ(*hundred.fit->max_seq_len, 10'000'000'000LL / (100 * 524288));  // 190
  // In binary units the budget is 10 GiB: 20480 tokens, 204 at batch 100.
  const auto binary = report_for({"--model", "llama-2-7b", "--seq-len", "4096", "--batch", "100",
                                  "--device-mem", "24GiB", "--weights", "14GiB"});
  EXPECT_EQ(binary.fit->budget_bytes, 10LL << 30);
  EXPECT_EQ(*binary.fit->max_seq_len, (10LL << 30) / (100 * 524288));

  const auto text = run(
      {"--model", "llama-2-7b", "--seq-len", "4096", "--device-mem", "24GB", "--weights", "14GB"});
  EXPECT_EQ(text.status, 0);
  EXPECT_NE(text.out.find("19073 tokens per sequence at batch 1"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("24000000000 bytes (GB = 10^9 bytes)"), std::string::npos);
}

TEST(KvMemory, SizeParsing) {
  using kv_memory::parse_size;
  EXPECT_EQ(parse_size("--device-mem", "24GB").bytes, 24'000'000'000LL);
  EXPECT_EQ(parse_size("--device-mem", "24GiB").bytes, 24LL << 30);
  EXPECT_EQ(parse_size("--device-mem", "24gib").bytes, 24LL << 30);
  EXPECT_EQ(parse_size("--device-mem", "14e9").bytes, 14'000'000'000LL);
  EXPECT_EQ(parse_size("--device-mem", "512MiB").bytes, 512LL << 20);
  EXPECT_EQ(parse_size("--device-mem", "1.5GiB").bytes, 3LL << 29);
  EXPECT_EQ(parse_size("--device-mem", "1.3GiB").bytes, 1395864371);  // 1.3 x 2^30, floored
  EXPECT_EQ(parse_size("--device-mem", "0.5kB").bytes, 500);
  EXPECT_EQ(parse_size("--device-mem", "2.5e-3GB").bytes, 2'500'000);
  EXPECT_EQ(parse_size("--device-mem", "80").bytes, 80);
  EXPECT_EQ(parse_size("--device-mem", "80B").bytes, 80);
  EXPECT_EQ(parse_size("--device-mem", "24GB").unit, "GB = 10^9 bytes");
  EXPECT_EQ(parse_size("--device-mem", "24GiB").unit, "GiB = 2^30 bytes");
  EXPECT_EQ(parse_size("--device-mem", "24GiB").text, "24GiB");
  for (const char* bad : {"", "GB", "-1GB", "12XB", "1..2GB", "1e", "1e99999", "1e30GB", "24 GB",
                          "99999999999999999999"}) {
    SCOPED_TRACE(bad);
    try {
      parse_size("--weights", bad);
      FAIL() << "expected usage_error";
    } catch (const kv_memory::usage_error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind("--weights: ", 0), 0u) << what;
      EXPECT_NE(what.find(std::string("'") + bad + "'"), std::string::npos) << what;
    }
  }
}

TEST(KvMemory, CountParsing) {
  EXPECT_EQ(kv_memory::parse_count("--seq-len", "65536"), 65536);
  EXPECT_EQ(kv_memory::parse_count("--rope-dim", "0", 0), 0);
  for (const char* bad : {"", "0", "-5", "1e3", "12k", "abc", "99999999999999999999"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW(kv_memory::parse_count("--seq-len", bad), kv_memory::usage_error);
  }
}

TEST(KvMemory, JsonHasTheExactTotal) {
  const auto r = run({"--model", "llama-3-70b", "--seq-len", "65536", "--dtype", "f16", "--json"});
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.err, "");
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.front(), '{');
  EXPECT_EQ(r.out.substr(r.out.size() - 2), "}\n");
  for (const char* field :
       {"\"model\": \"llama-3-70b\"", "\"dtype\": \"f16\"", "\"seq_len\": 65536", "\"batch\": 1",
        "\"bytes_per_token\": 327680", "\"total_bytes\": 21474836480"}) {
    EXPECT_NE(r.out.find(field), std::string::npos) << field << " in\n" << r.out;
  }
  EXPECT_EQ(r.out.find("max_seq_len"), std::string::npos);

  const auto fit = run({"--model", "mistral-7b", "--seq-len", "32768", "--dtype", "int4",
                        "--device-mem", "24GB", "--weights", "14GB", "--json"});
  EXPECT_EQ(fit.status, 0);
  for (const char* field : {"\"group_size\": 32", "\"bits_per_element\": 5", "\"window\": 4096",
                            "\"budget_bytes\": 10000000000", "\"max_seq_len\": null",
                            "\"max_seq_len_unbounded\": true", "\"max_batch\": 59"}) {
    EXPECT_NE(fit.out.find(field), std::string::npos) << field << " in\n" << fit.out;
  }
  // 1e10 bytes / (4096 tokens x 2*32*8*128*5/8 bytes) = 59.6 windows.
  EXPECT_EQ(10'000'000'000LL / (4096LL * (2 * 32 * 8 * 128 * 5 / 8)), 59);
}

TEST(KvMemory, JsonStringsAreEscaped) {
  EXPECT_EQ(kv_memory::json_string("llama-3-8b"), "\"llama-3-8b\"");
  EXPECT_EQ(kv_memory::json_string("a\"b\\c\nd\te\x01"), R"("a\"b\\c\nd\te\u0001")");
}

TEST(KvMemory, BadInputExitsWith2AndNamesTheFlag) {
  struct bad_case {
    args command_line;
    std::vector<std::string> message;
  };
  const bad_case cases[] = {
      {{"--model", "llama-4", "--seq-len", "5"}, {"--model", "'llama-4'", "llama-3-8b"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--frob"}, {"unknown flag", "'--frob'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--dtype", "fp8"}, {"--dtype", "'fp8'"}},
      {{"--model", "llama-3-8b", "--seq-len", "abc"}, {"--seq-len", "'abc'"}},
      {{"--model", "llama-3-8b", "--seq-len", "-5"}, {"--seq-len", "'-5'"}},
      {{"--model", "llama-3-8b", "--seq-len", "4", "--batch", "-2"}, {"--batch", "'-2'"}},
      {{"--model", "llama-3-8b", "--seq-len"}, {"--seq-len is missing its value"}},
      {{"--model", "llama-3-8b", "--seq-len", "--json"}, {"--seq-len is missing its value"}},
      {{"--model", "llama-3-8b"}, {"--seq-len"}},
      {{"--seq-len", "5"}, {"--model"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--device-mem", "24GB", "--weights", "30GB"},
       {"--weights 30GB", "--device-mem 24GB"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--weights", "3GB"}, {"--device-mem"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--device-mem", "24XB"},
       {"--device-mem", "'24XB'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--group", "64"}, {"--group 64", "'f16'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--dtype", "int4", "--group", "0"},
       {"--group", "'0'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--device-mem", "8EiB"},
       {"--device-mem", "too large", "'8EiB'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--weights", "1e30GB", "--device-mem", "1GB"},
       {"--weights", "too large", "'1e30GB'"}},
      {{"--layers", "3", "--latent-dim", "6148914691236517206", "--rope-dim",
        "6148914691236517206", "--seq-len", "1", "--device-mem", "1GB"},
       {"too large to count", "latent_dim + rope_dim"}},
      {{"--layers", "3", "--latent-dim", "4611686018427387904", "--seq-len", "1"},
       {"too large to count"}},
      {{"--list", "--group", "48", "--model", "llama-4"}, {"--list takes only --group", "--model"}},
      {{"--list", "--json"}, {"--list takes only --group", "--json"}},
      {{"--list", "--group", "2000000000"}, {"--group", "too large"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--layers", "3"}, {"--model", "--layers"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--seq-len", "6"}, {"--seq-len given twice"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size", "0"}, {"--page-size", "'0'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size", "-16"}, {"--page-size", "'-16'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size", "abc"}, {"--page-size", "'abc'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size", "1e3"}, {"--page-size", "'1e3'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size=16.5"}, {"--page-size", "'16.5'"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size"},
       {"--page-size is missing its value"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--dtype", "int8", "--page-size", "48"},
       {"--page-size 48 is not a multiple of the group 32", "int8"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--dtype", "int4", "--group", "64",
        "--page-size", "96"},
       {"--page-size 96 is not a multiple of --group 64"}},
      {{"--model", "llama-3-8b", "--seq-len", "5", "--page-size", "9223372036854775807"},
       {"too large to count", "--page-size"}},
      {{"--list", "--page-size", "16"}, {"--list takes only --group", "--page-size"}},
      {{"--layers", "3", "--seq-len", "5"}, {"--kv-heads", "--head-dim"}},
      {{"stray"}, {"'stray'"}},
      {{"--layers", "4000000000", "--kv-heads", "4000000000", "--head-dim", "4000000", "--seq-len",
        "1"},
       {"too large"}},
  };
  for (const bad_case& c : cases) {
    std::string joined;
    for (const std::string& a : c.command_line) joined += a + " ";
    SCOPED_TRACE(joined);
    const auto r = run(c.command_line);
    EXPECT_EQ(r.status, 2);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err.rfind("kv_memory: ", 0), 0u) << r.err;
    for (const std::string& part : c.message) {
      EXPECT_NE(r.err.find(part), std::string::npos) << "'" << part << "' not in: " << r.err;
    }
  }
  EXPECT_THROW(report_for({"--model", "llama-3-8b", "--seq-len", "5", "--device-mem", "1GB",
                           "--weights", "2GB"}),
               kv_memory::usage_error);
}

TEST(KvMemory, GroupsThatDoNotDivideHeadDim) {
  const auto r = run({"--model", "llama-3-8b", "--seq-len", "8", "--dtype", "int4", "--group",
                      "48"});
  EXPECT_EQ(r.status, 0) << r.err;
  // 32 x 8 rows of 2 x 64 B codes + 3 x 4 B value scales + 128 x 4 / 48 B key scales.
  EXPECT_NE(r.out.find("per token  38571 bytes"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("cache      308566 bytes"), std::string::npos) << r.out;
  const auto report = report_for({"--model", "llama-3-8b", "--seq-len", "8", "--dtype", "int4",
                                  "--group", "48"});
  EXPECT_EQ(report.bytes_per_token, kvcache::kv_bytes_per_token(32, 8, 128, kv_dtype::int4(48)));
  EXPECT_NEAR(report.bits_per_element, (1024 + 96 + 128 * 32.0 / 48) / 256, 1e-12);
  // MLA: the latent in 11 groups of up to 48, the rope dims in 2.
  EXPECT_EQ(report_for({"--model", "deepseek-v2", "--seq-len", "1", "--dtype", "int4", "--group",
                        "48"})
                .bytes_per_token,
            60 * (256 + 11 * 4 + 32 + 2 * 4));

  const auto list = run({"--list", "--group", "48"});
  EXPECT_EQ(list.status, 0) << list.err;
  EXPECT_NE(list.out.find("int8/g48"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("524288 |    285355 |    154283 |"), std::string::npos) << list.out;
}

TEST(KvMemory, PagedCache) {
  // Llama-2-7B in f16, 4100 tokens in pages of 16: 257 pages of 16 x 524288 bytes, 12 slots of
  // the last unused. The 1e10-byte budget holds 1192 pages, 19072 tokens: 4 such sequences.
  const auto r = report_for({"--model", "llama-2-7b", "--seq-len", "4100", "--page-size", "16",
                             "--device-mem", "24GB", "--weights", "14GB"});
  ASSERT_TRUE(r.paged);
  EXPECT_EQ(r.paged->page_size, 16);
  EXPECT_EQ(r.paged->page_bytes, 8388608);
  EXPECT_EQ(r.paged->pages_per_sequence, 257);
  EXPECT_EQ(r.paged->total_pages, 257);
  EXPECT_EQ(r.paged->unused_slots, 12);
  EXPECT_EQ(r.paged->paged_bytes, 257LL * 8388608);
  EXPECT_EQ(r.paged->waste_bytes, 12 * 524288);
  EXPECT_EQ(r.paged->paged_bytes - r.paged->waste_bytes, r.total_bytes);
  EXPECT_EQ(r.paged->max_pages, 1192);
  EXPECT_EQ(r.paged->max_tokens, 19072);
  EXPECT_EQ(r.paged->max_batch, 4);

  // Llama-3-8B, batch 64 of 1000 tokens: 63 pages a sequence (1008 slots), 4032 in all. 8e9
  // bytes hold 3814 pages of 2 MiB: 60 sequences of 63 pages, where contiguously 61 fit.
  const auto batch = report_for({"--model", "llama-3-8b", "--seq-len", "1000", "--batch", "64",
                                 "--page-size", "16", "--device-mem", "24GB", "--weights",
                                 "16GB"});
  ASSERT_TRUE(batch.paged && batch.fit);
  EXPECT_EQ(batch.paged->pages_per_sequence, 63);
  EXPECT_EQ(batch.paged->total_pages, 64 * 63);
  EXPECT_EQ(batch.paged->unused_slots, 8);
  EXPECT_EQ(batch.paged->paged_bytes, 64LL * 63 * 16 * 131072);
  EXPECT_EQ(batch.paged->waste_bytes, 64LL * 8 * 131072);
  EXPECT_EQ(batch.paged->max_pages, 8'000'000'000LL / 2097152);  // 3814
  EXPECT_EQ(batch.paged->max_batch, 3814 / 63);                   // 60
  EXPECT_EQ(batch.fit->max_batch, 61);

  // A sliding window: the cached 4096 tokens are paged, not the 32768 of the sequence.
  const auto window =
      report_for({"--model", "mistral-7b", "--seq-len", "32768", "--page-size", "16"});
  ASSERT_TRUE(window.paged);
  EXPECT_EQ(window.paged->pages_per_sequence, 256);
  EXPECT_EQ(window.paged->waste_bytes, 0);
  EXPECT_FALSE(window.paged->max_pages);

  // int4 at group 48 in pages of 96: 2 x 7232 bytes a layer and kv head; 43 pages hold the
  // window, the last with 32 slots unused.
  const auto groups = report_for({"--model", "mistral-7b", "--seq-len", "32768", "--dtype", "int4",
                                  "--group", "48", "--page-size", "96"});
  ASSERT_TRUE(groups.paged);
  EXPECT_EQ(groups.paged->page_bytes, 2 * 7232 * 256);
  EXPECT_EQ(groups.paged->pages_per_sequence, 43);
  EXPECT_EQ(groups.paged->unused_slots, 32);
  EXPECT_EQ(groups.paged->waste_bytes, 43LL * 2 * 7232 * 256 - groups.total_bytes);

  // MLA groups its latents within a token: any page size, here 50 at group 32.
  const auto mla = report_for({"--model", "deepseek-v2", "--seq-len", "1000", "--dtype", "int8",
                               "--page-size", "50"});
  ASSERT_TRUE(mla.paged);
  EXPECT_EQ(mla.paged->page_bytes, 50 * 38880);
  EXPECT_EQ(mla.paged->pages_per_sequence, 20);
  EXPECT_EQ(mla.paged->waste_bytes, 0);

  EXPECT_FALSE(report_for({"--model", "llama-2-7b", "--seq-len", "4100"}).paged);
}

TEST(KvMemory, PagedCacheText) {
  const auto r = run({"--model", "llama-2-7b", "--seq-len", "4100", "--page-size", "16",
                      "--device-mem", "24GB", "--weights", "14GB"});
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* line :
       {"page       8388608 bytes (8 MiB, 8.39 MB) = 16 tokens x 524288 bytes\n",
        "pages      257 a sequence = ceil(4100 tokens / 16), 257 for batch 1\n",
        "paged      2155872256 bytes (2.01 GiB, 2.16 GB) = 257 pages x 8388608 bytes, vs "
        "2149580800 contiguous (+0.29%)\n",
        "waste      6291456 bytes (6 MiB, 6.29 MB) = batch 1 x 12 unused slots in the last page\n",
        "in pages   1192 pages of 16 tokens (9999220736 bytes) = 19072 tokens\n",
        "           batch 4 at seq-len 4100 (1028 pages, 257 a sequence)\n"}) {
    EXPECT_NE(r.out.find(line), std::string::npos) << line << " in\n" << r.out;
  }
  // The page lines follow the cache line, the budget's follow the fit.
  EXPECT_LT(r.out.find("cache "), r.out.find("page "));
  EXPECT_LT(r.out.find("waste "), r.out.find("device "));
  EXPECT_LT(r.out.find("fits "), r.out.find("in pages "));

  const auto whole = run({"--model", "llama-3-8b", "--seq-len", "4096", "--page-size", "16"});
  EXPECT_EQ(whole.status, 0) << whole.err;
  EXPECT_NE(whole.out.find("waste      0 bytes: 16 divides the 4096 cached tokens"),
            std::string::npos)
      << whole.out;
  // Without a budget there is nothing to fit.
  EXPECT_EQ(whole.out.find("in pages"), std::string::npos) << whole.out;
  // Groups that do not tile a vector: a page is whole bytes, a token alone is not.
  const auto groups = run({"--model", "llama-3-8b", "--seq-len", "100", "--dtype", "int4",
                           "--group", "48", "--page-size", "48"});
  EXPECT_EQ(groups.status, 0) << groups.err;
  EXPECT_NE(groups.out.find("page       1851392 bytes (1.77 MiB, 1.85 MB) = 48 tokens x "
                            "38570.67 bytes"),
            std::string::npos)
      << groups.out;
  EXPECT_NE(groups.out.find("= 3 pages x 1851392 bytes"), std::string::npos) << groups.out;

  // Without --page-size, no page lines.
  const auto plain = run({"--model", "llama-2-7b", "--seq-len", "4100", "--device-mem", "24GB",
                          "--weights", "14GB"});
  EXPECT_EQ(plain.status, 0);
  for (const char* label : {"page ", "pages ", "paged ", "waste ", "in pages "}) {
    EXPECT_EQ(plain.out.find(label), std::string::npos) << label << " in\n" << plain.out;
  }
}

TEST(KvMemory, PagedCacheJson) {
  const auto r = run({"--model", "llama-3-8b", "--seq-len", "1000", "--batch", "64",
                      "--page-size", "16", "--device-mem", "24GB", "--weights", "16GB", "--json"});
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* field :
       {"\"page_size\": 16", "\"page_bytes\": 2097152", "\"pages_per_sequence\": 63",
        "\"total_pages\": 4032", "\"unused_slots_per_sequence\": 8",
        "\"paged_bytes\": 8455716864", "\"paged_waste_bytes\": 67108864",
        "\"total_bytes\": 8388608000", "\"max_batch\": 61", "\"max_pages\": 3814",
        "\"max_paged_tokens\": 61024", "\"max_paged_batch\": 60"}) {
    EXPECT_NE(r.out.find(field), std::string::npos) << field << " in\n" << r.out;
  }
  EXPECT_EQ(r.out.substr(r.out.size() - 2), "}\n");
  // Without a budget: the page fields, none of the budget's.
  const auto no_budget =
      run({"--model", "llama-3-8b", "--seq-len", "1000", "--page-size", "16", "--json"});
  EXPECT_NE(no_budget.out.find("\"paged_bytes\": 132120576"), std::string::npos)
      << no_budget.out;
  EXPECT_EQ(no_budget.out.find("max_pages"), std::string::npos) << no_budget.out;
  // Without --page-size: none of them.
  const auto plain = run({"--model", "llama-3-8b", "--seq-len", "1000", "--device-mem", "24GB",
                          "--json"});
  EXPECT_EQ(plain.out.find("page"), std::string::npos) << plain.out;
}

TEST(KvMemory, HugeSizesAreTooLargeNotMalformed) {
  using kv_memory::parse_size;
  EXPECT_EQ(parse_size("--device-mem", "7EiB").bytes, 7LL << 60);
  EXPECT_EQ(parse_size("--device-mem", "9EB").bytes, 9'000'000'000'000'000'000LL);
  EXPECT_EQ(parse_size("--device-mem", "9223372036854775807").bytes, max64);
  EXPECT_EQ(parse_size("--device-mem", "7.99999999999999999EiB").bytes, max64 - 11);
  EXPECT_EQ(parse_size("--device-mem", "0.5000000000000000001EiB").bytes, 1LL << 59);
  EXPECT_EQ(parse_size("--device-mem", "1e-99999GB").bytes, 0);
  for (const char* big : {"8EiB", "9223372036854775808", "10EB", "1e19", "1e99999", "8192PiB",
                          "99999999999999999999GB"}) {
    SCOPED_TRACE(big);
    try {
      parse_size("--device-mem", big);
      FAIL() << "expected usage_error";
    } catch (const kv_memory::usage_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("too large"), std::string::npos) << what;
      EXPECT_EQ(what.find("expected a size such as"), std::string::npos) << what;
    }
  }
}

TEST(KvMemory, HelpListAndNoArguments) {
  const auto help = run({"--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("usage: kv_memory"), std::string::npos);
  const auto none = run({});
  EXPECT_EQ(none.status, 2);
  EXPECT_NE(none.err.find("usage: kv_memory"), std::string::npos);

  const auto list = run({"--list"});
  EXPECT_EQ(list.status, 0);
  for (const kv_memory::model_shape& model : kv_memory::presets) {
    EXPECT_NE(list.out.find(model.name), std::string::npos) << model.name;
  }
  // Llama-2-7B: f16, int8 and int4 bytes a token.
  EXPECT_NE(list.out.find("524288 |    294912 |    163840 |"), std::string::npos) << list.out;
}

}  // namespace
