// SPDX-License-Identifier: Apache-2.0
// Tests of decode and prefill attention against the double-precision reference, and of the
// reference against a loop that spells the definition out.
#include "common.hpp"

#include <cmath>
#include <vector>

namespace kvcache::test {
namespace {

// The definition, one scalar at a time: softmax over visible keys of q.k / sqrt(d), times v.
row_matrix<double> naive_attention(const attention_shape& s, const row_matrix<double>& q,
                                   const row_matrix<double>& k, const row_matrix<double>& v,
                                   Index q_pos0, Index window = 0, Index sinks = 0) {
  const Index d = s.head_dim();
  row_matrix<double> out = row_matrix<double>::Zero(q.rows(), s.q_width());
  for (Index i = 0; i < q.rows(); ++i) {
    const Index p = q_pos0 + i;
    for (Index h = 0; h < s.n_heads(); ++h) {
      const Index kh = h / s.group_size();
      std::vector<double> w;
      std::vector<Index> keys;
      for (Index j = 0; j <= p; ++j) {
        if (window > 0 && j <= p - window && j >= sinks) continue;
        double dot = 0;
        for (Index x = 0; x < d; ++x) dot += q(i, h * d + x) * k(j, kh * d + x);
        w.push_back(dot / std::sqrt(double(d)));
        keys.push_back(j);
      }
      double mx = -1e300, sum = 0;
      for (double x : w) mx = std::max(mx, x);
      for (double& x : w) sum += (x = std::exp(x - mx));
      for (std::size_t n = 0; n < w.size(); ++n) {
        for (Index x = 0; x < d; ++x) out(i, h * d + x) += w[n] / sum * v(keys[n], kh * d + x);
      }
    }
  }
  return out;
}

TEST(Reference, MatchesTheDefinition) {
  for (const auto& c : shape_cases) {
    SCOPED_TRACE(c.name);
    const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
    const auto q = random_matrix<double>(9, s.q_width(), 1);
    const auto k = random_matrix<double>(12, s.kv_width(), 2);
    const auto v = random_matrix<double>(12, s.kv_width(), 3);
    attention_mask causal;  // the 9 queries are the last 9 of 12 tokens
    EXPECT_LT((reference_attention<double>(s, q, k, v, causal) - naive_attention(s, q, k, v, 3))
                  .cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), 1e-12);
    attention_mask windowed;
    windowed.window = 4;
    windowed.sinks = 2;
    EXPECT_LT((reference_attention<double>(s, q, k, v, windowed) -
               naive_attention(s, q, k, v, 3, 4, 2)).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), 1e-12);
  }
}

TEST(Reference, KnownValues) {
  const attention_shape s(1, 1, 2);
  row_matrix<double> k(2, 2), v(2, 2), q(1, 2);
  k << 1, 0, 0, 1;
  v << 10, 0, 0, 20;
  q << std::sqrt(2.0) * std::log(3.0), 0;  // scores log 3 and 0: weights 3/4 and 1/4
  const auto out = reference_attention<double>(s, q, k, v);
  EXPECT_NEAR(out(0, 0), 7.5, 1e-12);
  EXPECT_NEAR(out(0, 1), 5.0, 1e-12);
  attention_mask first_only;
  first_only.q_pos0 = 0;  // the query at position 0 sees only key 0
  EXPECT_NEAR(reference_attention<double>(s, q, k, v, first_only)(0, 0), 10.0, 1e-12);
  EXPECT_THROW(reference_attention<double>(s, row_matrix<double>(1, 3), k, v),
               std::invalid_argument);
}

template <class Scalar>
class AttentionTest : public ::testing::Test {
 protected:
  using T = compute_t<Scalar>;

  // Checks decode of the last of `n` tokens against the oracle, with options `opt`.
  void check_decode(const shape_case& c, Index n, const attention_options& opt, unsigned seed) {
    const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
    const auto k = random_matrix(n, s.kv_width(), seed);
    const auto v = random_matrix(n, s.kv_width(), seed + 1);
    const auto q = random_matrix(1, s.q_width(), seed + 2);
    kv_layer<Scalar> layer(s.n_kv_heads(), s.head_dim());
    layer.append(k, v);
    row_vector<T> out(s.q_width());
    decode_attention(s, q.row(0).template cast<T>(), layer, out, ws_, opt);
    const auto want = reference_attention<double>(s, q, stored<Scalar>(k), stored<Scalar>(v));
    EXPECT_LT((out.template cast<double>() - want).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(), kernel_tolerance<Scalar>());
    const auto exact = reference_attention<double>(s, q, k, v);
    EXPECT_LT((out.template cast<double>() - exact).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
              storage_tolerance<Scalar>());
  }

  attention_workspace<T> ws_;
};
TYPED_TEST_SUITE(AttentionTest, storage_types, scalar_name);

TYPED_TEST(AttentionTest, DecodeMatchesReference) {
  unsigned seed = 10;
  for (const auto& c : shape_cases) {
    for (Index n : {1, 7, 65, 1100}) {
      SCOPED_TRACE(std::string(c.name) + " n=" + std::to_string(n));
      this->check_decode(c, n, {}, seed += 3);
    }
  }
}

TYPED_TEST(AttentionTest, DecodeSplitKAndThreads) {
  thread_pool two(2), three(3);
  const shape_case gqa{"gqa", 8, 2, 64}, mqa{"mqa", 4, 1, 16};
  unsigned seed = 100;
  for (Index n : {1, 2, 3, 63, 64, 65, 200}) {
    for (Index split : {0, 1, 10, 64, 1000}) {
      for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &two, &three}) {
        for (Index tile : {1, 16, 64}) {
          SCOPED_TRACE("n=" + std::to_string(n) + " split=" + std::to_string(split) + " tile=" +
                       std::to_string(tile) + " threads=" +
                       std::to_string(pool ? pool->size() : 1));
          attention_options opt;
          opt.split_tokens = split;
          opt.pool = pool;
          opt.tile_tokens = tile;
          this->check_decode(gqa, n, opt, seed += 3);
          this->check_decode(mqa, n, opt, seed += 3);
        }
      }
    }
  }
}

TYPED_TEST(AttentionTest, PrefillMatchesReference) {
  using T = typename TestFixture::T;
  unsigned seed = 500;
  for (const auto& c : shape_cases) {
    for (Index n : {1, 7, 64, 300}) {
      SCOPED_TRACE(std::string(c.name) + " n=" + std::to_string(n));
      const attention_shape s(c.n_heads, c.n_kv_heads, c.head_dim);
      const auto q = random_matrix(n, s.q_width(), seed += 3);
      const auto k = random_matrix(n, s.kv_width(), seed + 1);
      const auto v = random_matrix(n, s.kv_width(), seed + 2);
      kv_layer<TypeParam> layer(s.n_kv_heads(), s.head_dim());
      row_matrix<T> out(n, s.q_width());
      prefill_attention(s, q.cast<T>(), k, v, layer, out, this->ws_);
      EXPECT_EQ(layer.size(), n);
      const auto want = reference_attention<double>(s, q, stored<TypeParam>(k),
                                                    stored<TypeParam>(v));
      EXPECT_LT((out.template cast<double>() - want).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
                kernel_tolerance<TypeParam>());
    }
  }
}

// Chunked prefill (a prompt in pieces, or a second turn of a chat) and then decode steps
// through prefill_attention with one token must equal attention over the whole sequence.
TYPED_TEST(AttentionTest, ChunkedPrefillThenDecode) {
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 32);
  const Index n = 150;
  const auto q = random_matrix(n, s.q_width(), 1);
  const auto k = random_matrix(n, s.kv_width(), 2);
  const auto v = random_matrix(n, s.kv_width(), 3);
  thread_pool pool(2);
  attention_options opt;
  opt.pool = &pool;
  opt.tile_tokens = 16;
  kv_layer<TypeParam> layer(s.n_kv_heads(), s.head_dim());
  row_matrix<T> out(n, s.q_width());
  const Index cuts[] = {0, 40, 41, 120, 148, 149, 150};  // chunks of 40, 1, 79, 28, 1, 1
  for (std::size_t c = 0; c + 1 < std::size(cuts); ++c) {
    const Index a = cuts[c], len = cuts[c + 1] - a;
    row_matrix<T> chunk_out(len, s.q_width());
    prefill_attention(s, q.middleRows(a, len).template cast<T>(), k.middleRows(a, len),
                      v.middleRows(a, len), layer, chunk_out, this->ws_, opt);
    out.middleRows(a, len) = chunk_out;
  }
  const auto want = reference_attention<double>(s, q, stored<TypeParam>(k), stored<TypeParam>(v));
  EXPECT_LT((out.template cast<double>() - want).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
            kernel_tolerance<TypeParam>());
  // The last row again, through decode over the same cache.
  row_vector<T> last(s.q_width());
  decode_attention(s, q.row(n - 1).template cast<T>(), layer, last, this->ws_, opt);
  EXPECT_LT((last.template cast<double>() - want.row(n - 1)).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
            kernel_tolerance<TypeParam>());
}

TYPED_TEST(AttentionTest, BadInputThrowsAndLeavesCacheIntact) {
  using T = typename TestFixture::T;
  const attention_shape s(8, 2, 16);
  kv_layer<TypeParam> layer(2, 16, /*max_tokens=*/6);
  row_vector<T> q = row_vector<T>::Zero(128), out(128), short_out(127);
  EXPECT_THROW(decode_attention(s, q, layer, out, this->ws_), std::invalid_argument)
      << "empty cache";
  layer.append(random_matrix(4, 32, 1), random_matrix(4, 32, 2));
  const auto keys = read_back(layer, true);
  EXPECT_THROW(decode_attention(s, row_vector<T>::Zero(127), layer, out, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(decode_attention(s, q, layer, short_out, this->ws_), std::invalid_argument);
  EXPECT_THROW(decode_attention(attention_shape(8, 4, 16), q, layer, out, this->ws_),
               std::invalid_argument);
  attention_options zero_tile;
  zero_tile.tile_tokens = 0;
  EXPECT_THROW(decode_attention(s, q, layer, out, this->ws_, zero_tile), std::invalid_argument);
  try {
    decode_attention(s, row_vector<T>::Zero(127), layer, out, this->ws_);
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(),
                 "decode_attention: q has 127 elements, expected n_heads*head_dim = 128");
  }

  row_matrix<T> q2 = row_matrix<T>::Zero(2, 128), out2(2, 128);
  const auto k2 = random_matrix(2, 32, 3), v2 = random_matrix(2, 32, 4);
  EXPECT_THROW(prefill_attention(s, row_matrix<T>::Zero(2, 120), k2, v2, layer, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, random_matrix(2, 31, 5), v2, layer, out2, this->ws_),
               std::invalid_argument);
  EXPECT_THROW(prefill_attention(s, q2, random_matrix(3, 32, 5), random_matrix(3, 32, 5), layer,
                                 out2, this->ws_),
               std::invalid_argument);
  row_matrix<T> out_wrong(3, 128);
  EXPECT_THROW(prefill_attention(s, q2, k2, v2, layer, out_wrong, this->ws_),
               std::invalid_argument);
  const auto k3 = random_matrix(3, 32, 6), v3 = random_matrix(3, 32, 7);
  row_matrix<T> q3 = row_matrix<T>::Zero(3, 128), out3(3, 128);
  EXPECT_THROW(prefill_attention(s, q3, k3, v3, layer, out3, this->ws_), std::length_error)
      << "4 + 3 tokens exceed max_tokens = 6";
  EXPECT_EQ(layer.size(), 4);
  EXPECT_EQ(read_back(layer, true), keys);
  EXPECT_THROW(causal_attention(s, q3, layer.view(), 2, out3, this->ws_), std::out_of_range);
}

TEST(OnlineSoftmax, MergeIsExactAndEmptyIsIdentity) {
  const Index rows = 3, d = 5;
  const row_matrix<double> scores = random_matrix<double>(rows, 40, 1) * 8.0;
  const auto values = random_matrix<double>(40, d, 2);
  auto fold = [&](Index a, Index b) {
    softmax_state<double> st;
    st.reset(rows, d);
    for (Index r = 0; r < rows; ++r) {
      for (Index j = a; j < b; ++j) {
        const double m = std::max(st.m(r), scores(r, j)), alpha = std::exp(st.m(r) - m);
        const double p = std::exp(scores(r, j) - m);
        const double l = st.l(r) * alpha + p;  // o stays normalized by l
        st.o.row(r) = (st.o.row(r) * (st.l(r) * alpha) + p * values.row(j)) / l;
        st.l(r) = l;
        st.m(r) = m;
      }
    }
    return st;
  };
  const auto whole = fold(0, 40);
  auto left = fold(0, 13), right = fold(13, 29), rest = fold(29, 40);
  softmax_state<double> empty;
  empty.reset(rows, d);
  left.merge(empty);
  right.merge(rest);  // (right + rest) first: associativity
  left.merge(right);
  empty.merge(whole);  // identity on the left too
  for (Index r = 0; r < rows; ++r) {
    EXPECT_NEAR(left.m(r), whole.m(r), 1e-12);
    EXPECT_NEAR(left.l(r), whole.l(r), 1e-9 * whole.l(r));
    EXPECT_LT((left.o.row(r) - whole.o.row(r)).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
              1e-12);
    EXPECT_LT((empty.o.row(r) - whole.o.row(r)).cwiseAbs().template maxCoeff<Eigen::PropagateNaN>(),
              1e-12);
  }
}

// The register-blocked products of many-row tiles against Eigen's in double: every block shape
// and remainder (rows not a multiple of the block's, tokens not a multiple of a packet or a
// panel, head_dim not a multiple of a packet, which sends accumulate to Eigen), keys gathered
// from several runs with gaps between their rows, and keys stored as half.
template <class T, class Scalar>
void check_tile_kernel(Index rows, const std::vector<Index>& run_lengths, Index d,
                       unsigned seed) {
  using tiles = detail::tile_kernel<T>;
  Index n = 0;
  for (Index len : run_lengths) n += len;
  const Index gap = 3;  // the runs' rows are `d + gap` apart: not packed
  const row_matrix<double> q = random_matrix<double>(rows, d, seed);
  row_matrix<double> kd = random_matrix<double>(n, d + gap, seed + 1);
  const row_matrix<Scalar> ks = kd.cast<Scalar>();
  const row_matrix<T> vs = random_matrix<double>(n, d + gap, seed + 2).cast<T>();
  kd = ks.template cast<double>();  // what is stored, exactly
  std::vector<detail::row_run<Scalar>> key_runs;
  std::vector<detail::row_run<T>> value_runs;
  Index at = 0;
  for (const Index len : run_lengths) {
    key_runs.push_back({ks.data() + at * ks.cols(), len, ks.cols()});
    value_runs.push_back({vs.data() + at * vs.cols(), len, vs.cols()});
    at += len;
  }
  const row_matrix<T> qt = q.cast<T>();
  row_matrix<T> s = row_matrix<T>::Constant(rows, n + 5, T(7)), kt;
  tiles::scores(qt.data(), qt.cols(), rows, key_runs.data(), Index(key_runs.size()), d, s.data(),
                s.cols(), kt);
  const row_matrix<double> want_s = q * kd.leftCols(d).transpose();
  // Sums of d (then n) terms of at most 1 (then max|s|) each, in T.
  const double eps = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  EXPECT_LT((s.leftCols(n).template cast<double>() - want_s).cwiseAbs().maxCoeff(), eps * d);
  // Columns past the tokens are not written.
  EXPECT_TRUE((s.rightCols(5).array() == T(7)).all());

  const row_matrix<T> o0 = random_matrix<double>(rows, d + 2, seed + 3).cast<T>();
  row_matrix<T> o = o0;
  tiles::accumulate(s.data(), s.cols(), rows, value_runs.data(), Index(value_runs.size()), d,
                    o.data(), o.cols());
  row_matrix<double> want_o = o0.template cast<double>();
  want_o.leftCols(d) += s.leftCols(n).template cast<double>() *
                        vs.leftCols(d).template cast<double>();
  const double s_max = s.leftCols(n).template cast<double>().cwiseAbs().maxCoeff();
  EXPECT_LT((o.template cast<double>() - want_o).cwiseAbs().maxCoeff(), eps * double(n) * s_max);
}

TEST(TileKernel, ProductsEqualEigensForEveryBlockShape) {
  unsigned seed = 900;
  for (Index rows : {1, 5, 6, 7, 13, 24, 37}) {
    for (Index d : {16, 20, 64, 72, 128}) {
      for (const std::vector<Index>& runs : std::vector<std::vector<Index>>{
               {1}, {15}, {16}, {17}, {63}, {64}, {65}, {128}, {16, 16, 16}, {5, 1, 30, 9}}) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " d=" + std::to_string(d) + " runs=" +
                     std::to_string(runs.size()) + " first=" + std::to_string(runs[0]));
        check_tile_kernel<float, float>(rows, runs, d, seed += 4);
        check_tile_kernel<double, double>(rows, runs, d, seed += 4);
        check_tile_kernel<float, Eigen::half>(rows, runs, d, seed += 4);
      }
    }
  }
}

// The vectorized online softmax step equals the step written with Eigen's row expressions
// (taken through a non-contiguous view of the same scores), over tiles whose widths are not a
// multiple of a packet, with masked rows, fully masked rows and a NaN score.
TEST(OnlineSoftmax, VectorizedStepEqualsTheRowExpressions) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  for (Index n : {1, 7, 16, 33, 128}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const Index rows = 9, d = 20;
    softmax_state<float> fast, slow;
    fast.reset(rows, d);
    for (int step = 0; step < 3; ++step) {
      row_matrix<float> s = (random_matrix<double>(rows, n, 40 + step) * 6.0).cast<float>();
      s.row(1).setConstant(float(-inf));                 // a row that sees nothing this tile
      s.row(2).tail((n + 1) / 2).setConstant(float(-inf));  // a causal edge
      if (step == 1) s(3, n / 2) = std::numeric_limits<float>::quiet_NaN();
      if (step == 0) {
        fast.o = random_matrix<double>(rows, d, 50).cast<float>();
        slow = fast;
      }
      // Column-major storage has no contiguous rows: the generic path.
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> s_cols = s;
      auto fast_s = s.topLeftCorner(rows, n);
      auto slow_s = s_cols.topLeftCorner(rows, n);
      detail::online_softmax_update(fast_s, fast);
      detail::online_softmax_update(slow_s, slow);
      for (Index r = 0; r < rows; ++r) {
        SCOPED_TRACE("row " + std::to_string(r) + " step " + std::to_string(step));
        if (r == 3 && step >= 1) {  // NaN from the step that saw it on
          EXPECT_TRUE(fast.o.row(r).array().isNaN().all());
          EXPECT_TRUE(slow.o.row(r).array().isNaN().all());
          continue;
        }
        EXPECT_EQ(fast.m(r), slow.m(r));
        EXPECT_NEAR(fast.l(r), slow.l(r), 1e-5f * slow.l(r));
        EXPECT_LT((fast.o.row(r) - slow.o.row(r)).cwiseAbs().maxCoeff(), 1e-5f);
        EXPECT_LT((s.row(r) - s_cols.row(r)).cwiseAbs().maxCoeff(), 1e-6f);
      }
      EXPECT_TRUE((s.row(1).array() == 0.0f).all());
    }
  }
}

}  // namespace
}  // namespace kvcache::test
