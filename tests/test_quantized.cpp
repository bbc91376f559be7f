// SPDX-License-Identifier: Apache-2.0
// Tests of quantized_cache (int8, int4): storage, bytes, groups, crop, non-finite input, decode
// and prefill.
#include "common.hpp"

#include <kvcache/cache/contiguous.hpp>
#include <kvcache/cache/quantized.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
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

  // Largest distance of a dequantized element of a group from the original: half a step
  // of the fp16 scale, plus the fp16 rounding of scale and zero point (relative 2^-11 each,
  // which the clamp to [0, max_code] can expose at the ends of the range). For data in
  // [-1, 1] (group ranges of at most 2): 2 / max_code / 2 + 2e-3.
  static double element_bound() { return 1.0 / ((1 << bits) - 1) + 2e-3; }
  // Relative error of decode against exact attention over the float inputs (see
  // RelativeErrorAgainstFloatInputs).
  static double relative_bound() { return bits == 8 ? 1e-2 : 1e-1; }

  attention_workspace<float> ws_;
};
TYPED_TEST_SUITE(QuantizedTest, bit_widths, bits_name);

// Everything observable about a cache, to prove a throwing call changed nothing.
template <int Bits>
struct snapshot {
  std::vector<Index> sizes, stored, tails, positions;
  Index bytes, capacity_bytes;
  std::vector<row_matrix<float>> keys, values;
  explicit snapshot(const quantized_cache<Bits>& c)
      : bytes(c.bytes()), capacity_bytes(c.capacity_bytes()) {
    for (Index l = 0; l < c.n_layers(); ++l) {
      sizes.push_back(c.size(l));
      stored.push_back(c.stored_size(l));
      tails.push_back(c.tail_size(l));
      positions.push_back(c.position(l));
      keys.push_back(c.dequantized_keys(l));
      values.push_back(c.dequantized_values(l));
    }
  }
  bool operator==(const snapshot& o) const {
    // Sizes first: the matrices are compared only when their shapes agree.
    return sizes == o.sizes && stored == o.stored && tails == o.tails &&
           positions == o.positions && bytes == o.bytes && capacity_bytes == o.capacity_bytes &&
           keys == o.keys && values == o.values;
  }
};

// Tokens quantized after appending n tokens to an empty layer.
Index expected_quantized(Index n, Index group, Index residual) {
  return n >= residual + group ? (n - residual) / group * group : 0;
}

// Value groups per token and kv head: ceil(head_dim / group).
Index value_groups(Index d, Index group) { return (d + group - 1) / group; }

// Runs f, which must throw E with `part` in its message.
template <class E, class F>
void expect_message_contains(F&& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one containing \"" << part << "\"";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
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
  for (Index group : {0, -1, -32}) {
    SCOPED_TRACE("group " + std::to_string(group));
    EXPECT_THROW(cache(s, group), std::invalid_argument);
    EXPECT_THROW(cache(s, group, 32), std::invalid_argument);
  }
  for (Index residual : {-1, -32}) {
    SCOPED_TRACE("residual " + std::to_string(residual));
    EXPECT_THROW(cache(s, 32, residual), std::invalid_argument);
  }
  try {
    cache bad(s, 0);
    FAIL() << "group 0 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "quantized_format: group_size must be >= 1, got 0");
  }
  try {
    cache bad(s, -32);
    FAIL() << "group -32 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "quantized_format: group_size must be >= 1, got -32");
  }
  try {
    cache bad(s, 32, -16);
    FAIL() << "residual -16 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "quantized_format: residual must be >= 0, got -16");
  }
  // Any group >= 1 (dividing head_dim or not, longer than it or not) and any residual >= 0.
  for (Index group : {1, 8, 16, 20, 24, 32, 48, 100, 128, 256}) {
    for (Index residual : {0, 1, 7, 16, 32, 48, 256}) {
      SCOPED_TRACE("group " + std::to_string(group) + " residual " + std::to_string(residual));
      EXPECT_NO_THROW(cache(s, group, residual));
    }
  }
  EXPECT_NO_THROW(cache(cache_shape(1, 4, 2, 32), 32, 0));
  EXPECT_NO_THROW(cache(cache_shape(1, 4, 2, 7), 32, 3));
  const cache c(s, 24, 5);
  EXPECT_EQ(c.group_size(), 24);
  EXPECT_EQ(c.residual(), 5);
  EXPECT_EQ(c.unit_tokens(), 24);
  // residual + group_size must not overflow.
  EXPECT_THROW(cache(s, 32, std::numeric_limits<Index>::max() - 8), std::length_error);
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
      EXPECT_EQ(c.unit_bytes() % c.group_size(), 0);
      EXPECT_EQ(c.unit_bytes() / c.group_size(), kv_bytes_per_token(1, 2, 128, dtype));
      EXPECT_EQ(c.dtype().bits, bits);
      EXPECT_EQ(c.dtype().group_size, group);
    }
  }
  // At group 32, against float32: 9 / 32 bits for int8, 5 / 32 for int4.
  const cache_shape s(1, 32, 8, 128);
  const cache c(s, 32);
  const double ratio = double(c.quantized_bytes_per_token()) / double(2 * 8 * 128 * 4);
  EXPECT_EQ(ratio, bits == 8 ? 0.28125 : 0.15625);

  // Groups that need not divide head_dim: per kv head, a group of g tokens stores g * head_dim
  // codes of keys and of values (int4: ceil(head_dim / 2) bytes per token), an fp16 scale and
  // zero point per key channel, and one per value group of each token, the last value group
  // shorter when g does not divide head_dim.
  const std::pair<Index, Index> shapes[] = {{40, 32}, {72, 32}, {100, 32}, {100, 20},
                                            {128, 48}, {64, 1},  {64, 100}, {7, 3}};
  for (const auto& dg : shapes) {
    const Index d = dg.first, g = dg.second, H = 3;
    SCOPED_TRACE("head_dim " + std::to_string(d) + " group " + std::to_string(g));
    const cache q(cache_shape(2, 6, H, d), g, 5);
    const Index row = bits == 8 ? d : (d + 1) / 2;
    const Index per_head = 2 * g * row + 4 * d + 4 * g * value_groups(d, g);
    EXPECT_EQ(q.unit_bytes(), H * per_head);
    EXPECT_EQ(q.quantized_bytes_per_token(), 2 * H * per_head / g);
  }
}

TYPED_TEST(QuantizedTest, BytesHeldAreExact) {
  using cache = typename TestFixture::cache;
  constexpr int bits = TestFixture::bits;
  const Index L = 2, H = 2, d = 64;
  for (Index residual : {0, 5, 32, 64}) {
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
      EXPECT_EQ(c.stored_size(0), Q);
      EXPECT_EQ(c.tail_size(1), n - Q);
      EXPECT_EQ(c.bytes(), kv_cache_bytes(1, Q, L, H, d, dtype) + L * (n - Q) * 2 * 4 * H * d);
      EXPECT_GE(c.capacity_bytes(), c.bytes());
    }
    const Index cap = c.capacity_bytes();
    c.clear();
    EXPECT_EQ(c.size(), 0);
    EXPECT_EQ(c.position(), 0);
    EXPECT_EQ(c.bytes(), 0);
    EXPECT_EQ(c.capacity_bytes(), cap);
  }
}

// Appending moves the oldest group out of the residual exactly when it reaches
// residual + group tokens, at every boundary, for any group and residual; residual tokens stay
// exact and quantized ones within half a step.
TYPED_TEST(QuantizedTest, GroupBoundaries) {
  using cache = typename TestFixture::cache;
  const Index H = 2, d = 128;
  for (Index group : {1, 20, 32, 64}) {
    for (Index residual : {0, 1, 13, 32, 64}) {
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
        EXPECT_EQ(c.position(0), n);
        EXPECT_EQ(c.stored_size(0), Q);
        EXPECT_EQ(c.tail_size(0), n - Q);
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
  for (Index group : {20, 32}) {
    for (Index residual : {0, 5, 32, 64}) {
      SCOPED_TRACE("group " + std::to_string(group) + " residual " + std::to_string(residual));
      cache bulk(cache_shape(1, 3, H, d), group, residual), single = bulk, chunked = bulk;
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
      EXPECT_EQ(bulk.stored_size(0), single.stored_size(0));
      EXPECT_EQ(bulk.stored_size(0), chunked.stored_size(0));
      EXPECT_EQ(bulk.bytes(), single.bytes());
    }
  }
}

// Data on the quantization grid reads back exactly: checks the code layout (int4's nibble
// order included) and the keys' per-channel, values' per-token grouping, with the last value
// group shorter where the group does not divide head_dim.
TYPED_TEST(QuantizedTest, GridDataRoundTripsExactly) {
  using cache = typename TestFixture::cache;
  constexpr int max_code = (1 << TestFixture::bits) - 1;
  const Index H = 2;
  const std::pair<Index, Index> shapes[] = {{64, 32}, {40, 32}, {72, 32}, {100, 20}, {100, 32}};
  for (const auto& dg : shapes) {
    const Index d = dg.first, g = dg.second, n = 2 * g;
    SCOPED_TRACE("head_dim " + std::to_string(d) + " group " + std::to_string(g));
    row_matrix<float> k(n, H * d), v(n, H * d);
    for (Index t = 0; t < n; ++t) {
      for (Index x = 0; x < H * d; ++x) {
        // Every key channel and every value group spans codes 0..max_code in steps of 1/16.
        const Index c = x % d;  // the channel within its head
        const int kc = int((t * 7 + x * 3) % (max_code + 1));
        const int vc = int((t * 5 + x * 11) % (max_code + 1));
        k(t, x) = float(t % g == 0 ? 0 : t % g == 1 ? max_code : kc) / 16.0f - float(x % 3);
        v(t, x) = float(c % g == 0 ? 0 : c % g == 1 ? max_code : vc) / 16.0f + float(t % 2);
      }
    }
    cache qc(cache_shape(1, 2, H, d), g);
    qc.append(0, k, v);
    ASSERT_EQ(qc.stored_size(0), n);
    EXPECT_EQ(qc.dequantized_keys(0), k);
    EXPECT_EQ(qc.dequantized_values(0), v);
  }
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
  ASSERT_EQ(c.stored_size(0), n);
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

// A NaN or infinite element makes its whole group read back NaN (a NaN scale), so attention
// over it is NaN for the query heads of that kv head, as over a float cache; the other kv
// heads, groups and tokens are untouched.
TYPED_TEST(QuantizedTest, NonFiniteElementsMakeTheirGroupNaN) {
  using cache = typename TestFixture::cache;
  const attention_shape s(4, 2, 64);  // query heads 0, 1 read kv head 0; 2, 3 kv head 1
  const Index d = 64, g = 32, n = 80;  // tokens 0..63 quantized, 64..79 in the tail
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct bad_element {
    const char* name;
    bool key;
    Index token, column;
    float value;
  };
  const bad_element cases[] = {
      {"nan_key_stored", true, 10, 3, nan},         {"nan_key_stored_head1", true, 40, 64 + 7, nan},
      {"nan_key_tail", true, 70, 5, nan},           {"inf_key_stored", true, 33, 64 + 2, inf},
      {"minus_inf_key_stored", true, 5, 9, -inf},   {"nan_value_stored", false, 20, 64 + 35, nan},
      {"inf_value_stored", false, 50, 12, inf},     {"nan_value_tail", false, 75, 40, nan},
  };
  const auto q = random_matrix(1, s.q_width(), 3);
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.name);
    row_matrix<float> k = random_matrix(n, s.kv_width(), 1), v = random_matrix(n, s.kv_width(), 2);
    (bad.key ? k : v)(bad.token, bad.column) = bad.value;
    cache c(cache_shape(1, s), g, 0);
    c.append(0, k, v);
    ASSERT_EQ(c.stored_size(0), 64);

    // What reads back NaN: the element's group, or the element alone in the tail.
    const Index h = bad.column / d, x = bad.column % d;
    row_matrix<bool> want_nan = row_matrix<bool>::Constant(n, s.kv_width(), false);
    if (bad.token >= 64) {
      want_nan(bad.token, bad.column) = true;
    } else if (bad.key) {  // one key channel over the group's tokens
      want_nan.block(bad.token / g * g, bad.column, g, 1).setConstant(true);
    } else {  // the value group of channels holding x, of that token
      const Index x0 = x / g * g;
      want_nan.block(bad.token, h * d + x0, 1, std::min(g, d - x0)).setConstant(true);
    }
    const auto read = bad.key ? c.dequantized_keys(0) : c.dequantized_values(0);
    const auto other = bad.key ? c.dequantized_values(0) : c.dequantized_keys(0);
    const bool tail_inf = bad.token >= 64 && std::isinf(bad.value);
    if (!tail_inf) {
      EXPECT_TRUE((read.array().isNaN() == want_nan.array()).all())
          << "NaN elements read back: " << read.array().isNaN().count();
    }
    EXPECT_TRUE(other.allFinite());

    // Decode: a NaN key makes every output of the query heads of kv head h NaN; a NaN value
    // the output channels that read it (its whole value group when stored). The rest stays
    // finite.
    row_vector<float> out(s.q_width());
    decode_attention(s, q.row(0), c.view(0), out, this->ws_);
    row_vector<bool> want_out = row_vector<bool>::Constant(s.q_width(), false);
    for (Index qh = 0; qh < s.n_heads(); ++qh) {
      if (qh / s.group_size() != h) continue;
      for (Index y = 0; y < d; ++y) {
        want_out(qh * d + y) = bad.key || want_nan.col(h * d + y).any();
      }
    }
    EXPECT_TRUE((out.array().isNaN() == want_out.array()).all())
        << "NaN outputs: " << out.array().isNaN().count() << ", expected "
        << want_out.count();
    EXPECT_EQ(out.array().isFinite().count(), s.q_width() - want_out.count());
    if (std::isnan(bad.value)) {
      // As over a float cache: the same outputs for a key; for a value, the float cache's NaN
      // outputs (channel x) and those of the rest of its value group when stored.
      contiguous_cache<float> plain(cache_shape(1, s));
      plain.append(0, k, v);
      row_vector<float> plain_out(s.q_width());
      decode_attention(s, q.row(0), plain.view(0), plain_out, this->ws_);
      const auto q_nan = out.array().isNaN(), f_nan = plain_out.array().isNaN();
      EXPECT_GT(f_nan.count(), 0);
      if (bad.key || bad.token >= 64) {
        EXPECT_TRUE((q_nan == f_nan).all())
            << "quantized: " << q_nan.count() << " NaN outputs, float: " << f_nan.count();
      } else {
        EXPECT_TRUE((q_nan || !f_nan).all())
            << "quantized: " << q_nan.count() << " NaN outputs, float: " << f_nan.count();
      }
    }
  }
}

struct quantized_case {
  const char* name;
  Index n_heads, n_kv_heads, head_dim, group;
};

// MHA, GQA and MQA; head dims the register kernels take (32, 64, 128) and ones that take the
// general path (48 and 96: 3 and 6 packets of 16; 40, 72, 100); a group of 16 query heads on
// one kv head, which exceeds the micro-kernels' rows and takes the matrix-product path; groups
// that do not divide head_dim (the last value group shorter), of one token, and longer than
// head_dim.
const quantized_case quantized_cases[] = {
    {"mha", 4, 4, 64, 32},         {"gqa", 8, 2, 64, 64},           {"mqa", 8, 1, 128, 32},
    {"gqa_d128", 8, 2, 128, 64},   {"gqa_d32", 4, 2, 32, 32},       {"gqa_d96", 6, 2, 96, 32},
    {"mha_d48", 2, 2, 48, 16},     {"mqa_16", 16, 1, 64, 32},       {"gqa_d128_g16", 8, 2, 128, 16},
    {"gqa_d40", 8, 2, 40, 32},     {"gqa_d72", 8, 2, 72, 32},       {"mha_d100", 4, 4, 100, 32},
    {"gqa_d100_g20", 8, 2, 100, 20}, {"gqa_d64_g48", 8, 2, 64, 48}, {"gqa_d64_g1", 4, 2, 64, 1},
    {"mqa_d64_g100", 4, 1, 64, 100},
};

TYPED_TEST(QuantizedTest, DecodeMatchesReferenceOnDequantized) {
  using cache = typename TestFixture::cache;
  unsigned seed = 10;
  for (const auto& c : quantized_cases) {
    for (Index residual : {Index(0), Index(5), c.group}) {
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

// Groups that do not divide head_dim (40, 72 and 100 at group 32) and one that does at a
// group that is not a power of two (100 at 20): every element within half a step of its
// input, decode against the double reference over the read-back keys and values and, within
// the int8/int4 bounds of RelativeErrorAgainstFloatInputs, over the float inputs.
TYPED_TEST(QuantizedTest, GroupsThatDoNotDivideHeadDim) {
  using cache = typename TestFixture::cache;
  const quantized_case cases[] = {
      {"gqa_d40", 8, 2, 40, 32}, {"gqa_d72", 8, 2, 72, 32}, {"gqa_d100", 8, 2, 100, 32},
      {"gqa_d100_g20", 8, 2, 100, 20}, {"mha_d72", 4, 4, 72, 32},
  };
  const Index n = 1000;
  unsigned seed = 500;
  for (const auto& c : cases) {
    for (Index residual : {0, 7}) {
      SCOPED_TRACE(std::string(c.name) + " residual " + std::to_string(residual));
      const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
      const auto k = random_matrix(n, s.kv_width(), seed), v = random_matrix(n, s.kv_width(), seed + 1);
      const auto q = random_matrix(1, s.q_width(), seed + 2);
      seed += 3;
      cache qc(cache_shape(1, s), c.group, residual);
      qc.append(0, k, v);
      ASSERT_EQ(qc.stored_size(0), expected_quantized(n, c.group, residual));
      EXPECT_LE((qc.dequantized_keys(0) - k).cwiseAbs().maxCoeff(), TestFixture::element_bound());
      EXPECT_LE((qc.dequantized_values(0) - v).cwiseAbs().maxCoeff(),
                TestFixture::element_bound());
      check_decode(s, qc, 0, q, this->ws_);
      row_vector<float> out(s.q_width());
      decode_attention(s, q.row(0), qc.view(0), out, this->ws_);
      const auto exact = reference_attention<double>(s, q, k, v);
      const double rel = (out.cast<double>() - exact).norm() / exact.norm();
      SCOPED_TRACE("relative error " + std::to_string(rel));
      EXPECT_LT(rel, TestFixture::relative_bound());
    }
  }
}

TYPED_TEST(QuantizedTest, DecodeSplitKAndThreads) {
  using cache = typename TestFixture::cache;
  thread_pool two(2);
  unsigned seed = 100;
  for (const attention_shape& s : {attention_shape(8, 2, 64), attention_shape(4, 1, 128)}) {
    for (Index n : {1, 33, 200, 517}) {
      for (Index residual : {0, 5, 64}) {
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
  for (Index residual : {0, 100, 128}) {
    cache qc(cache_shape(1, s), 32, residual);
    qc.append(0, k, v);
    row_vector<float> out(s.q_width());
    decode_attention(s, q.row(0), qc.view(0), out, this->ws_);
    const double rel = (out.cast<double>() - exact).norm() / exact.norm();
    this->RecordProperty("relative_error_residual_" + std::to_string(residual), std::to_string(rel));
    SCOPED_TRACE("residual " + std::to_string(residual) + " relative error " +
                 std::to_string(rel));
    EXPECT_LT(rel, TestFixture::relative_bound());
  }
}

TYPED_TEST(QuantizedTest, PrefillEqualsDecodeStepByStep) {
  using cache = typename TestFixture::cache;
  struct prefill_case {
    Index n_heads, n_kv_heads, head_dim, group, residual;
  };
  const prefill_case cases[] = {
      {8, 2, 64, 32, 0}, {8, 2, 64, 32, 32}, {8, 2, 64, 32, 5}, {8, 2, 40, 32, 0},
      {4, 2, 100, 20, 7}, {8, 2, 64, 1, 0},
  };
  const Index n = 150;
  thread_pool pool(2);
  attention_options opt;
  opt.pool = &pool;
  opt.tile_tokens = 16;
  opt.split_tokens = 40;
  for (const auto& pc : cases) {
    const attention_shape s(pc.n_heads, pc.n_kv_heads, pc.head_dim);
    SCOPED_TRACE("head_dim " + std::to_string(pc.head_dim) + " group " +
                 std::to_string(pc.group) + " residual " + std::to_string(pc.residual));
    const auto q = random_matrix(n, s.q_width(), 1);
    const auto k = random_matrix(n, s.kv_width(), 2), v = random_matrix(n, s.kv_width(), 3);
    cache prefilled(cache_shape(2, s), pc.group, pc.residual), stepped = prefilled;
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
    // Each query sees the cache exactly as a decode step at its position: the same stored and
    // full-precision tokens. Prefill attends in causal passes and decode token by token, so
    // only float arithmetic differs: kernel tolerance against the decode step and against the
    // double oracle over what the step's cache holds.
    for (Index i = 0; i < n; ++i) {
      stepped.append(1, k.row(i), v.row(i));
      row_vector<float> want(s.q_width());
      decode_attention(s, q.row(i), stepped.view(1), want, this->ws_, opt);
      EXPECT_LT((out.row(i) - want).cwiseAbs().maxCoeff(), kernel_tolerance<float>())
          << "token " << i;
      const auto seen = oracle(s, stepped, 1, row_matrix<float>(q.middleRows(i, 1)));
      EXPECT_LT((out.row(i).cast<double>() - seen).cwiseAbs().maxCoeff(),
                kernel_tolerance<float>())
          << "token " << i;
    }
    EXPECT_EQ(prefilled.dequantized_keys(1), stepped.dequantized_keys(1));
    EXPECT_EQ(prefilled.dequantized_values(1), stepped.dequantized_values(1));
    EXPECT_EQ(prefilled.stored_size(1), stepped.stored_size(1));
    // Against exact causal attention over the float inputs, as loosely as quantization allows.
    const auto exact = reference_attention<double>(s, q, k, v);
    const double rel = (out.cast<double>() - exact).norm() / exact.norm();
    EXPECT_LT(rel, TestFixture::relative_bound());
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

// Rollback is exact or refused: it may go back to positions whose tail would still be in full
// precision (n >= the tail's first position + residual) or, with residual 0, to any group
// boundary; elsewhere it throws std::out_of_range ("is not exact") and changes nothing.
TYPED_TEST(QuantizedTest, CropIsExactOrRefused) {
  using cache = typename TestFixture::cache;
  const attention_shape s(4, 2, 64);
  const Index n = 150;
  const auto k = random_matrix(n, s.kv_width(), 1), v = random_matrix(n, s.kv_width(), 2);
  cache c(cache_shape(2, s), 32, 32);
  c.append(0, k, v);
  c.append(1, k, v);
  ASSERT_EQ(c.stored_size(0), 96);
  ASSERT_EQ(c.tail_size(0), 54);  // tokens 96..149
  const auto keys = c.dequantized_keys(0), values = c.dequantized_values(0);

  // Within the tail, at least residual tokens after its first: exact.
  c.crop(140);
  EXPECT_EQ(c.size(), 140);
  EXPECT_EQ(c.position(), 140);
  EXPECT_EQ(c.dequantized_keys(0), keys.topRows(140));
  EXPECT_EQ(c.dequantized_values(1), values.topRows(140));
  c.rollback(0);
  EXPECT_EQ(c.size(), 140);
  c.rollback(12);
  EXPECT_EQ(c.size(), 128);
  EXPECT_EQ(c.stored_size(0), 96);
  EXPECT_EQ(c.tail_size(0), 32);
  EXPECT_EQ(c.dequantized_keys(0), keys.topRows(128));
  EXPECT_EQ(c.dequantized_values(0), values.topRows(128));

  // Further back, a cache that never saw the dropped tokens would hold tokens 96.. (or more)
  // in full precision, which this one has quantized: refused, nothing changes.
  const snapshot<TestFixture::bits> before(c);
  for (Index to : {127, 100, 97, 96, 95, 70, 64, 32, 1}) {
    SCOPED_TRACE("crop to " + std::to_string(to));
    expect_message_contains<std::out_of_range>([&] { c.crop(to); }, "is not exact");
  }
  expect_message_contains<std::out_of_range>([&] { c.crop(70); }, "positions >= 128");
  expect_message_contains<std::out_of_range>([&] { c.rollback(1); }, "is not exact");
  EXPECT_THROW(c.crop(129), std::out_of_range);
  EXPECT_THROW(c.crop(-1), std::out_of_range);
  EXPECT_THROW(c.rollback(129), std::out_of_range);
  EXPECT_THROW(c.rollback(-1), std::out_of_range);
  EXPECT_TRUE(snapshot<TestFixture::bits>(c) == before);

  // Appending after a crop continues as if the dropped tokens had never been appended.
  c.append(0, k.bottomRows(22), v.bottomRows(22));
  c.append(1, k.bottomRows(22), v.bottomRows(22));
  EXPECT_EQ(c.size(), n);
  EXPECT_EQ(c.dequantized_keys(0), keys);
  EXPECT_EQ(c.dequantized_values(1), values);
  check_decode(s, c, 0, random_matrix(1, s.q_width(), 3), this->ws_);

  // Residual 0: also back to any group boundary, where whole groups go.
  cache z(cache_shape(1, s), 32, 0);
  z.append(0, k, v);
  ASSERT_EQ(z.stored_size(0), 128);
  const auto zkeys = z.dequantized_keys(0), zvalues = z.dequantized_values(0);
  z.crop(140);
  z.crop(128);
  EXPECT_EQ(z.tail_size(0), 0);
  EXPECT_EQ(z.dequantized_keys(0), zkeys.topRows(128));
  expect_message_contains<std::out_of_range>([&] { z.crop(70); }, "is not exact");
  expect_message_contains<std::out_of_range>([&] { z.crop(127); }, "group boundary");
  z.crop(64);
  EXPECT_EQ(z.size(), 64);
  EXPECT_EQ(z.stored_size(0), 64);
  EXPECT_EQ(z.dequantized_keys(0), zkeys.topRows(64));
  EXPECT_EQ(z.dequantized_values(0), zvalues.topRows(64));
  z.append(0, k.bottomRows(50), v.bottomRows(50));
  EXPECT_EQ(z.size(0), 114);
  EXPECT_EQ(z.dequantized_keys(0).topRows(64), zkeys.topRows(64));
  EXPECT_EQ(z.dequantized_keys(0).bottomRows(18), k.bottomRows(18));
  check_decode(s, z, 0, random_matrix(1, s.q_width(), 3), this->ws_);
  z.crop(0);
  EXPECT_EQ(z.size(), 0);
  EXPECT_EQ(z.position(), 0);
  EXPECT_EQ(z.bytes(), 0);
}

// Every crop target of caches of several groups and residuals: a crop the rule allows
// succeeds, and appending after it gives exactly the cache that never saw the rolled-back
// (drafted) tokens: the same keys and values read back, the same stored and tail sizes, the
// same decode output. A crop that cannot be exact throws std::out_of_range and changes
// nothing.
TYPED_TEST(QuantizedTest, CropThenAppendEqualsNeverAppended) {
  using cache = typename TestFixture::cache;
  const attention_shape s(4, 2, 40);
  const Index width = s.kv_width(), extra = 45;
  const std::pair<Index, Index> formats[] = {{32, 0}, {32, 32}, {32, 5}, {20, 7},
                                             {16, 40}, {1, 0},  {1, 3}};
  const auto q = random_matrix(1, s.q_width(), 9);
  for (const auto& gr : formats) {
    const Index g = gr.first, R = gr.second;
    // Held before the crop: all in the tail, then some groups stored too.
    for (Index m : {R + g - 1, 3 * g + R + 4}) {
      if (m <= 0) continue;
      const Index T = expected_quantized(m, g, R);  // the tail's first position
      const auto k = random_matrix(m + extra, width, unsigned(m + 1));
      const auto v = random_matrix(m + extra, width, unsigned(m + 2));
      const auto draft_k = random_matrix(m, width, unsigned(m + 3));
      const auto draft_v = random_matrix(m, width, unsigned(m + 4));
      for (Index n = 0; n <= m; ++n) {
        SCOPED_TRACE("group " + std::to_string(g) + " residual " + std::to_string(R) +
                     " held " + std::to_string(m) + " crop to " + std::to_string(n));
        cache rolled(cache_shape(2, s), g, R);
        for (Index l = 0; l < 2; ++l) {
          rolled.append(l, k.topRows(n), v.topRows(n));
          rolled.append(l, draft_k.middleRows(n, m - n), draft_v.middleRows(n, m - n));
        }
        ASSERT_EQ(rolled.stored_size(0), T);
        // Allowed by the rule: the tail a cache of n tokens holds is still in full precision.
        const bool allowed = n >= T + R || (R == 0 && (T - n) % g == 0);
        // Exact: the tokens this cache keeps stored are those a cache of n tokens stores.
        const bool exact = n >= T ? expected_quantized(n, g, R) == T
                                  : n % g == 0 && expected_quantized(n, g, R) == n;
        ASSERT_TRUE(exact || !allowed) << "the test's rule allows an inexact crop";
        const snapshot<TestFixture::bits> before(rolled);
        bool cropped = false;
        if (allowed) {
          ASSERT_NO_THROW(rolled.crop(n));
          cropped = true;
        } else if (!exact) {
          expect_message_contains<std::out_of_range>([&] { rolled.crop(n); }, "is not exact");
          EXPECT_TRUE(snapshot<TestFixture::bits>(rolled) == before);
        } else {
          // Exact, but outside the rule (residual > 0 and n == 0, or nothing stored yet and
          // n < residual): either answer is consistent with "exact or refused".
          try {
            rolled.crop(n);
            cropped = true;
          } catch (const std::out_of_range&) {
            EXPECT_TRUE(snapshot<TestFixture::bits>(rolled) == before);
          }
        }
        if (!cropped) continue;
        EXPECT_EQ(rolled.size(), n);
        EXPECT_EQ(rolled.position(), n);
        cache straight(cache_shape(2, s), g, R);
        for (Index l = 0; l < 2; ++l) {
          straight.append(l, k.topRows(n + extra), v.topRows(n + extra));
          rolled.append(l, k.middleRows(n, extra), v.middleRows(n, extra));
        }
        for (Index l = 0; l < 2; ++l) {
          EXPECT_EQ(rolled.size(l), straight.size(l));
          EXPECT_EQ(rolled.position(l), straight.position(l));
          EXPECT_EQ(rolled.stored_size(l), straight.stored_size(l));
          EXPECT_EQ(rolled.tail_size(l), straight.tail_size(l));
          EXPECT_EQ(rolled.keys(l), straight.keys(l));
          EXPECT_EQ(rolled.values(l), straight.values(l));
          row_vector<float> a(s.q_width()), b(s.q_width());
          decode_attention(s, q.row(0), rolled.view(l), a, this->ws_);
          decode_attention(s, q.row(0), straight.view(l), b, this->ws_);
          EXPECT_EQ(a, b);
        }
        EXPECT_EQ(rolled.bytes(), straight.bytes());
      }
    }
  }
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
  EXPECT_THROW(c.stored_size(2), std::out_of_range);
  EXPECT_THROW(c.tail_size(-1), std::out_of_range);
  EXPECT_THROW(c.capacity(2), std::out_of_range);
  EXPECT_THROW(c.dequantized_keys(2), std::out_of_range);
  EXPECT_THROW(c.dequantized_values(-1), std::out_of_range);
  EXPECT_THROW(c.crop(11), std::out_of_range) << "layer 1 holds 10";
  // Layer 0 has tokens 0..31 stored quantized and 32..69 in its tail.
  expect_message_contains<std::out_of_range>([&] { c.crop(5); }, "is not exact");

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
  const auto forked = a.fork();
  EXPECT_EQ(forked.keys(0), keys);
  EXPECT_EQ(forked.values(0), a.dequantized_values(0));

  // A moved-from cache has no layers and holds nothing; it can be assigned to again.
  const auto b_keys = b.dequantized_keys(0);
  cache moved(std::move(b));
  EXPECT_EQ(moved.size(), 150);
  EXPECT_EQ(moved.dequantized_keys(0), b_keys);
  EXPECT_EQ(b.n_layers(), 0);  // NOLINT(bugprone-use-after-move): the moved-from state is tested
  EXPECT_EQ(b.size(), 0);
  EXPECT_EQ(b.position(), 0);
  EXPECT_EQ(b.bytes(), 0);
  EXPECT_THROW(b.view(0), std::out_of_range);
  cache assigned(cache_shape(1, s), 32, 32);
  assigned = std::move(moved);
  EXPECT_EQ(assigned.size(), 150);
  EXPECT_EQ(moved.n_layers(), 0);  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(moved.size(), 0);
  b = assigned;
  EXPECT_EQ(b.n_layers(), 1);
  EXPECT_EQ(b.dequantized_keys(0), b_keys);

  a.reserve(5000);
  EXPECT_GE(a.capacity(0), 5000);
  EXPECT_EQ(a.dequantized_keys(0), keys);
  const Index cap = a.capacity_bytes();
  a.append(0, random_matrix(4000, 128, 5), random_matrix(4000, 128, 6));
  EXPECT_EQ(a.capacity_bytes(), cap) << "no reallocation within the reserved size";
  check_decode(s, a, 0, random_matrix(1, s.q_width(), 7), this->ws_);
}

// The rows of codes the decode kernels ask for ahead of their reads: 4 KiB of rows ahead
// within a block; when the block read next is known (a paged cache's next page), at most a
// block ahead and then that block's rows, never the bytes after this block in memory (another
// page, often another sequence's); nothing past the last block.
TEST(QuantizedCodeLead, AsksForTheNextBlockNotTheBytesAfterThisOne) {
  std::vector<std::uint8_t> page(64 * 128), next(64 * 128);
  const auto expect_rows = [](detail::code_lead<128>& lead, const std::uint8_t* first, Index n,
                              const char* what) {
    for (Index t = 0; t < n; ++t) {
      ASSERT_EQ(lead.row, first + t * 128) << what << ", row " << t;
      lead.ask<1>();
    }
  };
  // int8 codes of head_dim 128 (rows of 128 bytes), pages of 32 tokens: the lead is a page.
  detail::code_lead<128> from_start(page.data(), 32, next.data(), 32, 0);
  expect_rows(from_start, next.data(), 32, "from the page's first row");
  EXPECT_EQ(from_start.row, nullptr) << "nothing after the next page";

  detail::code_lead<128> from_middle(page.data(), 32, next.data(), 32, 8);
  expect_rows(from_middle, next.data() + 8 * 128, 24, "from row 8");
  EXPECT_EQ(from_middle.row, nullptr);

  // A block longer than the lead (32 rows of 128 bytes): its own rows first, then the next's.
  detail::code_lead<128> long_block(page.data(), 64, next.data(), 16, 4);
  expect_rows(long_block, page.data() + 36 * 128, 28, "within the long block");
  expect_rows(long_block, next.data(), 16, "into the next block");
  EXPECT_EQ(long_block.row, nullptr);

  // No next block (a contiguous cache's stored run): rows of this block only.
  detail::code_lead<128> alone(page.data(), 64, nullptr, 0, 0);
  expect_rows(alone, page.data() + 32 * 128, 32, "alone");
  EXPECT_EQ(alone.row, nullptr);

  // Blocks asked for in steps of 4 rows, as the key kernels do.
  detail::code_lead<128> steps(page.data(), 32, next.data(), 32, 0);
  for (Index t = 0; t < 32; t += 4) {
    ASSERT_EQ(steps.row, next.data() + t * 128) << "row " << t;
    steps.ask<4>();
  }
  EXPECT_EQ(steps.row, nullptr);

  // int4 codes (64-byte rows): a lead of 64 rows, cut to the 32-row page when a next is given.
  detail::code_lead<64> int4_page(page.data(), 32, next.data(), 32, 0);
  EXPECT_EQ(int4_page.row, next.data());
  detail::code_lead<64> int4_alone(page.data(), 128, nullptr, 0, 0);
  EXPECT_EQ(int4_alone.row, page.data() + 64 * 64);
}

}  // namespace
}  // namespace kvcache::test
