// SPDX-License-Identifier: Apache-2.0
// Tests of quantized_cache (int8, int4): storage, bytes, groups, crop, decode and prefill.
#include "common.hpp"

#include <kvcache/cache/quantized.hpp>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace kvcache::test {
namespace {

using bit_widths = ::testing::Types<std::integral_constant<int, 8>, std::integral_constant<int, 4>>;

/// Names the typed tests by code width: int8, int4.
struct bits_name {
  template <class B>
  static std::string GetName(int) {
    return "int" + std::to_string(B::value);
  }
};

template <class B>
class QuantizedTest : public ::testing::Test {
 protected:
  static constexpr int bits = B::value;
  using cache = quantized_cache<bits>;
  using layer = quantized_layer<bits>;

  // Largest distance of a dequantized element of a group from the original: half a step
  // of the fp16 scale, plus the fp16 rounding of scale and zero point (relative 2^-11 each,
  // which the clamp to [0, max_code] can expose at the ends of the range). For data in
  // [-1, 1] (group ranges of at most 2): 2 / max_code / 2 + 2e-3.
  static double element_bound() { return 1.0 / ((1 << bits) - 1) + 2e-3; }

  attention_workspace<float> ws_;
};
TYPED_TEST_SUITE(QuantizedTest, bit_widths, bits_name);

// Everything observable about a cache, to prove a throwing call changed nothing.
template <int Bits>
struct snapshot {
  std::vector<Index> sizes, quantized;
  Index bytes, capacity_bytes;
  std::vector<row_matrix<float>> keys, values;
  explicit snapshot(const quantized_cache<Bits>& c)
      : bytes(c.bytes()), capacity_bytes(c.capacity_bytes()) {
    for (Index l = 0; l < c.n_layers(); ++l) {
      sizes.push_back(c.size(l));
      quantized.push_back(c.layer(l).quantized_size());
      keys.push_back(c.dequantized_keys(l));
      values.push_back(c.dequantized_values(l));
    }
  }
  bool operator==(const snapshot& o) const {
    return sizes == o.sizes && quantized == o.quantized && bytes == o.bytes &&
           capacity_bytes == o.capacity_bytes && keys == o.keys && values == o.values;
  }
};

// Tokens quantized after appending n tokens to an empty layer.
Index expected_quantized(Index n, Index group, Index residual) {
  return n >= residual + group ? (n - residual) / group * group : 0;
}

// The double oracle over what layer l of `c` holds (its dequantized keys and values).
template <int Bits>
row_matrix<double> oracle(const attention_shape& s, const quantized_cache<Bits>& c, Index l,
                          const row_matrix<float>& q) {
  return reference_attention<double>(s, q, c.dequantized_keys(l).template cast<double>(),
                                     c.dequantized_values(l).template cast<double>());
}

// Decode of q over layer l of `c` against `want`: only float arithmetic differs from the
// oracle, so common.hpp's kernel tolerance applies.
template <int Bits>
void check_decode(const attention_shape& s, const quantized_cache<Bits>& c, Index l,
                  const row_matrix<float>& q, const row_matrix<double>& want,
                  attention_workspace<float>& ws, const attention_options& opt = {}) {
  row_vector<float> out(s.q_width());
  decode_attention(s, q.row(0), c.view(l), out, ws, opt);
  EXPECT_LT((out.cast<double>() - want).cwiseAbs().maxCoeff(), kernel_tolerance<float>());
}

template <int Bits>
void check_decode(const attention_shape& s, const quantized_cache<Bits>& c, Index l,
                  const row_matrix<float>& q, attention_workspace<float>& ws) {
  check_decode(s, c, l, q, oracle(s, c, l, q), ws);
}

TYPED_TEST(QuantizedTest, RefusesBadGroupAndResidual) {
  using cache = typename TestFixture::cache;
  const cache_shape s(2, 8, 2, 128);
  for (Index group : {0, -32, 8, 24, 48, 256}) {
    SCOPED_TRACE("group " + std::to_string(group));
    EXPECT_THROW(cache(s, group), std::invalid_argument);
  }
  for (Index residual : {-32, 16, 48}) {
    SCOPED_TRACE("residual " + std::to_string(residual));
    EXPECT_THROW(cache(s, 32, residual), std::invalid_argument);
  }
  try {
    cache bad(s, 24);
    FAIL() << "group 24 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "quantized_layer: group_size = 24 must be a positive multiple of 16 "
                           "that divides head_dim = 128");
  }
  try {
    cache bad(s, 32, 16);
    FAIL() << "residual 16 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(),
                 "quantized_layer: residual = 16 must be >= 0 and a multiple of group_size = 32");
  }
  EXPECT_NO_THROW(cache(s, 16, 0));
  EXPECT_NO_THROW(cache(s, 128, 256));
  EXPECT_NO_THROW(cache(cache_shape(1, 4, 2, 32), 32, 0));
}

TYPED_TEST(QuantizedTest, BytesMatchTheMemoryFormula) {
  using cache = typename TestFixture::cache;
  constexpr int bits = TestFixture::bits;
  for (Index L : {1, 3}) {
    for (Index group : {16, 32, 64}) {
      const cache_shape s(L, 8, 2, 128);
      cache c(s, group);
      const kv_dtype dtype = bits == 8 ? kv_dtype::int8(int(group)) : kv_dtype::int4(int(group));
      EXPECT_EQ(c.quantized_bytes_per_token(), kv_bytes_per_token(L, 2, 128, dtype));
      EXPECT_EQ(c.layer(0).quantized_bytes_per_token(), kv_bytes_per_token(1, 2, 128, dtype));
      EXPECT_EQ(c.dtype().bits, bits);
      EXPECT_EQ(c.dtype().group_size, group);
    }
  }
  // At group 32, against float32: 9 / 32 bits for int8, 5 / 32 for int4.
  const cache_shape s(1, 32, 8, 128);
  const cache c(s, 32);
  const double ratio = double(c.quantized_bytes_per_token()) / double(2 * 8 * 128 * 4);
  EXPECT_EQ(ratio, bits == 8 ? 0.28125 : 0.15625);
}

TYPED_TEST(QuantizedTest, BytesHeldAreExact) {
  using cache = typename TestFixture::cache;
  constexpr int bits = TestFixture::bits;
  const Index L = 2, H = 2, d = 64;
  for (Index residual : {0, 32, 64}) {
    cache c(cache_shape(L, 4, H, d), 32, residual);
    EXPECT_EQ(c.bytes(), 0);
    EXPECT_EQ(c.capacity_bytes(), 0);
    const kv_dtype dtype = kv_dtype{"q", bits, 32, 32};
    Index n = 0;
    for (Index add : {1, 30, 1, 1, 64, 100, 7}) {
      for (Index l = 0; l < L; ++l) {
        c.append(l, random_matrix(add, H * d, unsigned(n + l)),
                 random_matrix(add, H * d, unsigned(n + l + 100)));
      }
      n += add;
      const Index Q = expected_quantized(n, 32, residual);
      SCOPED_TRACE("residual " + std::to_string(residual) + " n " + std::to_string(n));
      EXPECT_EQ(c.layer(0).quantized_size(), Q);
      EXPECT_EQ(c.layer(1).residual_size(), n - Q);
      EXPECT_EQ(c.bytes(), kv_cache_bytes(1, Q, L, H, d, dtype) + L * (n - Q) * 2 * 4 * H * d);
      EXPECT_GE(c.capacity_bytes(), c.bytes());
    }
    const Index cap = c.capacity_bytes();
    c.clear();
    EXPECT_EQ(c.size(), 0);
    EXPECT_EQ(c.bytes(), 0);
    EXPECT_EQ(c.capacity_bytes(), cap);
  }
}

// Appending moves the oldest group out of the residual exactly when it reaches
// residual + group tokens, at every boundary; residual tokens stay exact and quantized ones
// within half a step.
TYPED_TEST(QuantizedTest, GroupBoundaries) {
  using cache = typename TestFixture::cache;
  const Index H = 2, d = 128;
  for (Index group : {32, 64}) {
    for (Index residual : {0, 32, 64}) {
      if (residual % group != 0) continue;
      const Index g = group, R = residual;
      for (Index n : {Index(1), g - 1, g, g + 1, R + g - 1, R + g, R + g + 1, 2 * g + R,
                      3 * g + R + 5}) {
        if (n <= 0) continue;
        SCOPED_TRACE("group " + std::to_string(g) + " residual " + std::to_string(R) + " n " +
                     std::to_string(n));
        const auto k = random_matrix(n, H * d, unsigned(n)), v = random_matrix(n, H * d, 7);
        cache c(cache_shape(1, 4, H, d), g, R);
        c.append(0, k, v);
        const Index Q = expected_quantized(n, g, R);
        ASSERT_EQ(c.size(0), n);
        EXPECT_EQ(c.layer(0).quantized_size(), Q);
        EXPECT_EQ(c.layer(0).residual_size(), n - Q);
        EXPECT_GE(n - Q, std::min(n, R));
        EXPECT_LT(n - Q, R + g);
        const auto keys = c.dequantized_keys(0), values = c.dequantized_values(0);
        EXPECT_EQ(keys.bottomRows(n - Q), k.bottomRows(n - Q));
        EXPECT_EQ(values.bottomRows(n - Q), v.bottomRows(n - Q));
        if (Q > 0) {
          EXPECT_LE((keys.topRows(Q) - k.topRows(Q)).cwiseAbs().maxCoeff(),
                    TestFixture::element_bound());
          EXPECT_LE((values.topRows(Q) - v.topRows(Q)).cwiseAbs().maxCoeff(),
                    TestFixture::element_bound());
        }
        const attention_shape s(4, H, d);
        check_decode(s, c, 0, random_matrix(1, s.q_width(), 3), this->ws_);
      }
    }
  }
}

TYPED_TEST(QuantizedTest, ManyAtOnceEqualsOneAtATime) {
  using cache = typename TestFixture::cache;
  const Index H = 3, d = 64, n = 300;
  const auto k = random_matrix(n, H * d, 1), v = random_matrix(n, H * d, 2);
  for (Index residual : {0, 32, 64}) {
    cache bulk(cache_shape(1, 3, H, d), 32, residual), single = bulk, chunked = bulk;
    bulk.append(0, k, v);
    for (Index t = 0; t < n; ++t) single.append(0, k.row(t), v.row(t));
    for (Index t = 0; t < n; t += 37) {
      const Index len = std::min<Index>(37, n - t);
      chunked.append(0, k.middleRows(t, len), v.middleRows(t, len));
    }
    EXPECT_EQ(bulk.dequantized_keys(0), single.dequantized_keys(0));
    EXPECT_EQ(bulk.dequantized_values(0), single.dequantized_values(0));
    EXPECT_EQ(bulk.dequantized_keys(0), chunked.dequantized_keys(0));
    EXPECT_EQ(bulk.dequantized_values(0), chunked.dequantized_values(0));
    EXPECT_EQ(bulk.bytes(), single.bytes());
  }
}

// Data on the quantization grid reads back exactly: checks the code layout (int4's nibble
// order included) and the keys' per-channel, values' per-token grouping.
TYPED_TEST(QuantizedTest, GridDataRoundTripsExactly) {
  using cache = typename TestFixture::cache;
  constexpr int max_code = (1 << TestFixture::bits) - 1;
  const Index H = 2, d = 64, g = 32, n = 2 * g;
  row_matrix<float> k(n, H * d), v(n, H * d);
  for (Index t = 0; t < n; ++t) {
    for (Index x = 0; x < H * d; ++x) {
      // Every key channel and every value group spans codes 0..max_code in steps of 1/16.
      const int kc = int((t * 7 + x * 3) % (max_code + 1));
      const int vc = int((t * 5 + x * 11) % (max_code + 1));
      k(t, x) = float(t % g == 0 ? 0 : t % g == 1 ? max_code : kc) / 16.0f - float(x % 3);
      v(t, x) = float(x % g == 0 ? 0 : x % g == 1 ? max_code : vc) / 16.0f + float(t % 2);
    }
  }
  cache c(cache_shape(1, 2, H, d), g);
  c.append(0, k, v);
  ASSERT_EQ(c.layer(0).quantized_size(), n);
  EXPECT_EQ(c.dequantized_keys(0), k);
  EXPECT_EQ(c.dequantized_values(0), v);
}

// A constant group has scale 0: it must read back exactly, with no division by zero.
TYPED_TEST(QuantizedTest, ConstantGroups) {
  using cache = typename TestFixture::cache;
  const Index H = 2, d = 64, n = 96;
  row_matrix<float> k = random_matrix(n, H * d, 1), v = random_matrix(n, H * d, 2);
  k.col(5).setConstant(0.25f);           // one key channel constant over every group
  k.middleRows(32, 32).setConstant(-0.5f);  // a whole key group constant
  v.row(3).setConstant(0.75f);           // every value group of one token constant
  v.block(40, 32, 1, 32).setZero();       // one value group zero
  cache c(cache_shape(1, 4, H, d), 32);
  c.append(0, k, v);
  ASSERT_EQ(c.layer(0).quantized_size(), n);
  const auto keys = c.dequantized_keys(0), values = c.dequantized_values(0);
  EXPECT_EQ(keys.col(5), k.col(5));
  EXPECT_EQ(keys.middleRows(32, 32), k.middleRows(32, 32));
  EXPECT_EQ(values.row(3), v.row(3));
  EXPECT_EQ(values.block(40, 32, 1, 32), v.block(40, 32, 1, 32));
  EXPECT_TRUE(keys.allFinite());
  EXPECT_TRUE(values.allFinite());
  const attention_shape s(4, H, d);
  check_decode(s, c, 0, random_matrix(1, s.q_width(), 3), this->ws_);

  // All keys and values constant: attention returns the constant value. A constant reads
  // back as its zero point, the fp16 rounding of it: exact for -0.625, not for -0.7.
  cache flat(cache_shape(1, 4, H, d), 32);
  flat.append(0, row_matrix<float>::Constant(64, H * d, 0.3f),
              row_matrix<float>::Constant(64, H * d, -0.625f));
  row_vector<float> out(s.q_width());
  decode_attention(s, random_matrix(1, s.q_width(), 4).row(0), flat.view(0), out, this->ws_);
  EXPECT_LT((out.array() + 0.625f).abs().maxCoeff(), 1e-6);
}

struct quantized_case {
  const char* name;
  Index n_heads, n_kv_heads, head_dim, group;
};

// MHA, GQA and MQA; head dims the register kernels take (32, 64, 128) and ones that take the
// general path (48 and 96: 3 and 6 packets of 16); a group of 16 query heads on one kv head,
// which exceeds the micro-kernels' rows and takes the matrix-product path.
const quantized_case quantized_cases[] = {
    {"mha", 4, 4, 64, 32},       {"gqa", 8, 2, 64, 64},       {"mqa", 8, 1, 128, 32},
    {"gqa_d128", 8, 2, 128, 64}, {"gqa_d32", 4, 2, 32, 32},  {"gqa_d96", 6, 2, 96, 32},
    {"mha_d48", 2, 2, 48, 16},   {"mqa_16", 16, 1, 64, 32},   {"gqa_d128_g16", 8, 2, 128, 16},
};

TYPED_TEST(QuantizedTest, DecodeMatchesReferenceOnDequantized) {
  using cache = typename TestFixture::cache;
  unsigned seed = 10;
  for (const auto& c : quantized_cases) {
    for (Index residual : {Index(0), c.group}) {
      for (Index n : {1, 31, 33, 100, 1000}) {
        SCOPED_TRACE(std::string(c.name) + " residual " + std::to_string(residual) + " n " +
                     std::to_string(n));
        const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
        cache qc(cache_shape(1, s), c.group, residual);
        qc.append(0, random_matrix(n, s.kv_width(), seed), random_matrix(n, s.kv_width(), seed + 1));
        check_decode(s, qc, 0, random_matrix(1, s.q_width(), seed + 2), this->ws_);
        seed += 3;
      }
    }
  }
}

TYPED_TEST(QuantizedTest, DecodeSplitKAndThreads) {
  using cache = typename TestFixture::cache;
  thread_pool two(2);
  unsigned seed = 100;
  for (const attention_shape& s : {attention_shape(8, 2, 64), attention_shape(4, 1, 128)}) {
    for (Index n : {1, 33, 200, 517}) {
      for (Index residual : {0, 64}) {
        cache qc(cache_shape(1, s), 32, residual);
        qc.append(0, random_matrix(n, s.kv_width(), seed), random_matrix(n, s.kv_width(), seed + 1));
        const auto q = random_matrix(1, s.q_width(), seed + 2);
        const auto want = oracle(s, qc, 0, q);
        seed += 3;
        for (Index split : {0, 10, 50}) {
          for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &two}) {
            for (Index tile : {1, 16, 48, 128}) {
              SCOPED_TRACE("n=" + std::to_string(n) + " residual=" + std::to_string(residual) +
                           " split=" + std::to_string(split) + " tile=" + std::to_string(tile) +
                           " threads=" + std::to_string(pool ? pool->size() : 1));
              attention_options opt;
              opt.split_tokens = split;
              opt.pool = pool;
              opt.tile_tokens = tile;
              check_decode(s, qc, 0, q, want, this->ws_, opt);
            }
          }
        }
      }
    }
  }
}

// The quantization error itself, against the original float inputs: GQA 32/8 heads of 128,
// 1000 tokens in [-1, 1]. The output is a near-uniform average of values (scores are small),
// so its norm is small and the relative error is the stringent measure. Measured, residual 0:
// about 4e-3 (int8) and 6e-2 (int4); the bounds leave room for other seeds.
TYPED_TEST(QuantizedTest, RelativeErrorAgainstFloatInputs) {
  using cache = typename TestFixture::cache;
  const attention_shape s(32, 8, 128);
  const Index n = 1000;
  const auto k = random_matrix(n, s.kv_width(), 1), v = random_matrix(n, s.kv_width(), 2);
  const auto q = random_matrix(1, s.q_width(), 3);
  const auto exact = reference_attention<double>(s, q, k, v);
  for (Index residual : {0, 128}) {
    cache qc(cache_shape(1, s), 32, residual);
    qc.append(0, k, v);
    row_vector<float> out(s.q_width());
    decode_attention(s, q.row(0), qc.view(0), out, this->ws_);
    const double rel = (out.cast<double>() - exact).norm() / exact.norm();
    this->RecordProperty("relative_error_residual_" + std::to_string(residual), std::to_string(rel));
    SCOPED_TRACE("residual " + std::to_string(residual) + " relative error " +
                 std::to_string(rel));
    EXPECT_LT(rel, TestFixture::bits == 8 ? 1e-2 : 1e-1);
  }
}

TYPED_TEST(QuantizedTest, PrefillEqualsDecodeStepByStep) {
  using cache = typename TestFixture::cache;
  const attention_shape s(8, 2, 64);
  const Index n = 150;
  const auto q = random_matrix(n, s.q_width(), 1);
  const auto k = random_matrix(n, s.kv_width(), 2), v = random_matrix(n, s.kv_width(), 3);
  thread_pool pool(2);
  attention_options opt;
  opt.pool = &pool;
  opt.tile_tokens = 16;
  opt.split_tokens = 40;
  for (Index residual : {0, 32}) {
    SCOPED_TRACE("residual " + std::to_string(residual));
    cache prefilled(cache_shape(2, s), 32, residual), stepped = prefilled;
    row_matrix<float> out(n, s.q_width());
    // In chunks (a prompt in pieces, or a later turn of a chat), onto layer 1.
    const Index cuts[] = {0, 40, 41, 120, 150};
    for (std::size_t c = 0; c + 1 < std::size(cuts); ++c) {
      const Index a = cuts[c], len = cuts[c + 1] - a;
      row_matrix<float> chunk_out(len, s.q_width());
      prefill_attention(s, q.middleRows(a, len), k.middleRows(a, len), v.middleRows(a, len),
                        prefilled, 1, chunk_out, this->ws_, opt);
      out.middleRows(a, len) = chunk_out;
    }
    EXPECT_EQ(prefilled.size(1), n);
    EXPECT_EQ(prefilled.size(0), 0);
    for (Index i = 0; i < n; ++i) {
      stepped.append(1, k.row(i), v.row(i));
      row_vector<float> want(s.q_width());
      decode_attention(s, q.row(i), stepped.view(1), want, this->ws_, opt);
      EXPECT_EQ(out.row(i), want) << "token " << i;
    }
    EXPECT_EQ(prefilled.dequantized_keys(1), stepped.dequantized_keys(1));
    // Against exact causal attention over the float inputs, as loosely as quantization allows.
    const auto exact = reference_attention<double>(s, q, k, v);
    const double rel = (out.cast<double>() - exact).norm() / exact.norm();
    EXPECT_LT(rel, TestFixture::bits == 8 ? 1e-2 : 1e-1);
  }
}

TYPED_TEST(QuantizedTest, CausalAttentionOverTheView) {
  using cache = typename TestFixture::cache;
  // causal_attention reads any view, quantized ones too (prefill's many-row path).
  const attention_shape s(8, 2, 64);
  const Index n = 200, nq = 50;
  cache qc(cache_shape(1, s), 32, 32);
  qc.append(0, random_matrix(n, s.kv_width(), 1), random_matrix(n, s.kv_width(), 2));
  const auto q = random_matrix(nq, s.q_width(), 3);
  row_matrix<float> out(nq, s.q_width());
  causal_attention(s, q, qc.view(0), n - nq, out, this->ws_);
  const auto want = reference_attention<double>(s, q, qc.dequantized_keys(0).template cast<double>(),
                                                qc.dequantized_values(0).template cast<double>());
  EXPECT_LT((out.cast<double>() - want).cwiseAbs().maxCoeff(), kernel_tolerance<float>());
}

TYPED_TEST(QuantizedTest, CropKeepsWholeGroupsOnly) {
  using cache = typename TestFixture::cache;
  const attention_shape s(4, 2, 64);
  const Index n = 150;
  const auto k = random_matrix(n, s.kv_width(), 1), v = random_matrix(n, s.kv_width(), 2);
  cache c(cache_shape(2, s), 32, 32);
  c.append(0, k, v);
  c.append(1, k, v);
  ASSERT_EQ(c.layer(0).quantized_size(), 96);
  const auto keys = c.dequantized_keys(0), values = c.dequantized_values(0);

  // Into the residual: exact.
  c.crop(120);
  EXPECT_EQ(c.size(), 120);
  EXPECT_EQ(c.dequantized_keys(0), keys.topRows(120));
  EXPECT_EQ(c.dequantized_values(1), values.topRows(120));
  c.crop(96);
  EXPECT_EQ(c.layer(0).residual_size(), 0);
  EXPECT_EQ(c.dequantized_keys(0), keys.topRows(96));

  // Into a quantized group: refused, nothing changes.
  const snapshot<TestFixture::bits> before(c);
  try {
    c.crop(70);
    FAIL() << "crop into a quantized group accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("cuts the quantized group of tokens 64..95"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(c.crop(97), std::out_of_range);
  EXPECT_THROW(c.crop(-1), std::out_of_range);
  EXPECT_TRUE(snapshot<TestFixture::bits>(c) == before);

  // At a group boundary: whole groups go, the rest stays as it was.
  c.crop(64);
  EXPECT_EQ(c.size(), 64);
  EXPECT_EQ(c.dequantized_keys(1), keys.topRows(64));
  // Appending after a crop continues normally.
  c.append(0, k.bottomRows(50), v.bottomRows(50));
  EXPECT_EQ(c.size(0), 114);
  EXPECT_EQ(c.dequantized_keys(0).topRows(64), keys.topRows(64));
  EXPECT_EQ(c.dequantized_keys(0).bottomRows(32), k.bottomRows(32));
  check_decode(s, c, 0, random_matrix(1, s.q_width(), 3), this->ws_);
  c.crop(0);
  EXPECT_EQ(c.size(), 0);
  EXPECT_EQ(c.bytes(), 0);
}

TYPED_TEST(QuantizedTest, BadInputThrowsAndLeavesCacheIntact) {
  using cache = typename TestFixture::cache;
  const attention_shape s(8, 2, 64);
  cache c(cache_shape(2, s), 32, 32);
  row_vector<float> q = row_vector<float>::Zero(s.q_width()), out(s.q_width());
  EXPECT_THROW(decode_attention(s, q, c.view(0), out, this->ws_), std::invalid_argument)
      << "empty cache";
  c.append(0, random_matrix(70, 128, 1), random_matrix(70, 128, 2));
  c.append(1, random_matrix(10, 128, 3), random_matrix(10, 128, 4));
  const snapshot<TestFixture::bits> before(c);

  EXPECT_THROW(c.append(0, random_matrix(2, 127, 5), random_matrix(2, 128, 5)),
               std::invalid_argument);
  EXPECT_THROW(c.append(0, random_matrix(2, 128, 5), random_matrix(2, 129, 5)),
               std::invalid_argument);
  EXPECT_THROW(c.append(0, random_matrix(2, 128, 5), random_matrix(3, 128, 5)),
               std::invalid_argument);
  try {
    c.append(1, random_matrix(1, 96, 5), random_matrix(1, 128, 5));
    FAIL() << "96 columns accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "append: k has 96 columns, expected n_kv_heads*head_dim = 128");
  }
  EXPECT_THROW(c.append(2, random_matrix(1, 128, 5), random_matrix(1, 128, 5)), std::out_of_range);
  EXPECT_THROW(c.append(-1, random_matrix(1, 128, 5), random_matrix(1, 128, 5)),
               std::out_of_range);
  EXPECT_THROW(c.view(2), std::out_of_range);
  EXPECT_THROW(c.size(2), std::out_of_range);
  EXPECT_THROW(c.dequantized_keys(2), std::out_of_range);
  EXPECT_THROW(c.crop(11), std::out_of_range) << "layer 1 holds 10";
  EXPECT_THROW(c.crop(5), std::invalid_argument) << "layer 0 has tokens 0..31 quantized";

  // Decode with shapes that do not fit.
  EXPECT_THROW(decode_attention(s, row_vector<float>::Zero(511), c.view(0), out, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(decode_attention(attention_shape(8, 4, 64), row_vector<float>::Zero(512),
                                c.view(0), out, this->ws_),
               std::invalid_argument);

  // Prefill checks everything before it appends.
  const auto k2 = random_matrix(2, 128, 6), v2 = random_matrix(2, 128, 7);
  row_matrix<float> q2 = row_matrix<float>::Zero(2, 512), out2(2, 512), out_wrong(3, 512);
  EXPECT_THROW(prefill_attention(s, row_matrix<float>(2, 500), k2, v2, c, 0, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, random_matrix(2, 120, 8), v2, c, 0, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, k2, random_matrix(3, 128, 8), c, 0, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, random_matrix(3, 128, 8), random_matrix(3, 128, 8), c,
                                 0, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, k2, v2, c, 0, out_wrong, this->ws_),
               std::invalid_argument);
  row_matrix<float> out_mqa(2, 1024);
  EXPECT_THROW(prefill_attention(attention_shape(8, 1, 128), row_matrix<float>::Zero(2, 1024),
                                 random_matrix(2, 128, 8), random_matrix(2, 128, 8), c, 0, out_mqa,
                                 this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, k2, v2, c, 2, out2, this->ws_), std::out_of_range);
  attention_options zero_tile;
  zero_tile.tile_tokens = 0;
  EXPECT_THROW(prefill_attention(s, q2, k2, v2, c, 0, out2, this->ws_, zero_tile),
               std::invalid_argument);
  EXPECT_TRUE(snapshot<TestFixture::bits>(c) == before);
}

TYPED_TEST(QuantizedTest, CopiesAreDeepAndReserveKeepsContents) {
  using cache = typename TestFixture::cache;
  const attention_shape s(4, 2, 64);
  cache a(cache_shape(1, s), 32, 32);
  a.append(0, random_matrix(100, 128, 1), random_matrix(100, 128, 2));
  const auto keys = a.dequantized_keys(0);
  cache b = a;
  b.append(0, random_matrix(50, 128, 3), random_matrix(50, 128, 4));
  EXPECT_EQ(a.size(), 100);
  EXPECT_EQ(a.dequantized_keys(0), keys);
  EXPECT_EQ(b.dequantized_keys(0).topRows(64), keys.topRows(64));
  a.reserve(5000);
  EXPECT_GE(a.layer(0).capacity(), 4992);
  EXPECT_EQ(a.dequantized_keys(0), keys);
  const Index cap = a.capacity_bytes();
  a.append(0, random_matrix(4000, 128, 5), random_matrix(4000, 128, 6));
  EXPECT_EQ(a.capacity_bytes(), cap) << "no reallocation within the reserved size";
  check_decode(s, a, 0, random_matrix(1, s.q_width(), 7), this->ws_);
}

}  // namespace
}  // namespace kvcache::test
