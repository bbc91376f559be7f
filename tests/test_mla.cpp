// SPDX-License-Identifier: Apache-2.0
// Multi-head latent attention: the latent cache in every layout and format, decode and prefill
// by weight absorption against a naive MLA in double (keys and values decompressed per head),
// bytes against memory.hpp's latent formula, and refused inputs.
#include "common.hpp"

#include <kvcache/io/cache_file.hpp>
#include <kvcache/io/paged_file.hpp>
#include <kvcache/mla.hpp>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;

// ---- the oracle -----------------------------------------------------------------------------

// Naive MLA in double of one query row `q` (heads [q_nope | q_pe]) at position p over latent
// rows `rows` at `positions`, through `mask`: for every head, decompress each token's key
// [W_UK_h c | k_pe] and value W_UV_h c, then softmax attention with scale
// 1/sqrt(qk_nope_dim + rope_dim).
row_vector<double> naive_mla(const mla_shape& s, const row_matrix<double>& w_uk,
                             const row_matrix<double>& w_uv, const row_vector<double>& q,
                             const row_matrix<double>& rows, const std::vector<Index>& positions,
                             Index p, const attention_mask& mask) {
  const Index dn = s.qk_nope_dim(), dr = s.rope_dim(), dc = s.kv_lora_rank(), dv = s.v_head_dim();
  row_vector<double> out(s.out_width());
  for (Index h = 0; h < s.n_heads(); ++h) {
    const auto W_UK = w_uk.middleRows(h * dn, dn);  // [qk_nope_dim][kv_lora_rank]
    const auto W_UV = w_uv.middleRows(h * dv, dv);  // [v_head_dim][kv_lora_rank]
    std::vector<double> score;
    std::vector<Index> seen;
    for (std::size_t t = 0; t < positions.size(); ++t) {
      const Index kp = positions[t];
      const bool visible =
          kp <= p && (mask.window == 0 || kp > p - mask.window || kp < mask.sinks);
      if (!visible) continue;
      const row_vector<double> c = rows.row(Index(t)).head(dc);
      row_vector<double> key(dn + dr);
      key.head(dn) = c * W_UK.transpose();
      key.tail(dr) = rows.row(Index(t)).tail(dr);
      score.push_back(q.segment(h * (dn + dr), dn + dr).dot(key) / std::sqrt(double(dn + dr)));
      seen.push_back(Index(t));
    }
    const double m = *std::max_element(score.begin(), score.end());
    double l = 0;
    for (double& x : score) l += (x = std::exp(x - m));
    row_vector<double> o = row_vector<double>::Zero(dv);
    for (std::size_t i = 0; i < seen.size(); ++i) {
      o += score[i] / l * (rows.row(seen[i]).head(dc) * W_UV.transpose());
    }
    out.segment(h * dv, dv) = o;
  }
  return out;
}

// Positions of the tokens a view holds, oldest first.
template <class View>
std::vector<Index> positions_of(const View& v) {
  std::vector<Index> out;
  for (Index b = 0; b < v.n_blocks(); ++b) {
    for (Index t = 0; t < v.block(0, b).tokens; ++t) out.push_back(v.position(b) + t);
  }
  return out;
}

// ---- what is tested: every layout with every format ------------------------------------------

struct f64 { using type = plain_format<double>; static type make() { return {}; } static kv_dtype dtype() { return {"f64", 64, 0, 0}; } };
struct f32 { using type = plain_format<float>; static type make() { return {}; } static kv_dtype dtype() { return kv_dtype::f32(); } };
struct f16 { using type = plain_format<Eigen::half>; static type make() { return {}; } static kv_dtype dtype() { return kv_dtype::f16(); } };
struct bf16 { using type = plain_format<Eigen::bfloat16>; static type make() { return {}; } static kv_dtype dtype() { return kv_dtype::bf16(); } };
struct int8_g8 { using type = quantized_format<8>; static type make() { return type(8, 0); } static kv_dtype dtype() { return kv_dtype::int8(8); } };
struct int8_g16_r8 { using type = quantized_format<8>; static type make() { return type(16, 8); } static kv_dtype dtype() { return kv_dtype::int8(16); } };
struct int4_g8 { using type = quantized_format<4>; static type make() { return type(8, 0); } static kv_dtype dtype() { return kv_dtype::int4(8); } };

// A kv_cache of a layout and a format, seen through the calls the tests make.
template <class L, class F>
struct flat {
  using format = typename F::type;
  using T = compute_t<typename format::scalar_type>;
  using cache_type = kv_cache<typename L::type, format>;
  static constexpr bool lossless = format::lossless;
  static kv_dtype dtype() { return F::dtype(); }
  static attention_mask mask() { return L::mask(); }
  static std::string name() { return std::string(L::name) + "_" + F::make().name(); }

  cache_type c;
  explicit flat(const cache_shape& s) : c(s, L::make(), F::make()) {}
  template <class R>
  void append(Index l, const R& rows) { c.append(l, rows); }
  auto view(Index l) const { return c.view(l); }
  row_matrix<double> rows(Index l) const { return c.keys(l).template cast<double>(); }
  Index bytes() const { return c.bytes(); }
  void prefill(const mla_shape& s, const row_matrix<T>& w_uk, const row_matrix<T>& w_uv,
               const row_matrix<T>& q, const row_matrix<T>& latent, Index l, row_matrix<T>& out,
               mla_workspace<T>& ws) {
    mla_prefill_attention(s, w_uk, w_uv, q, latent, c, l, out, ws);
  }
};

// A sequence of a paged cache.
template <class L, class F>
struct paged {
  using format = typename F::type;
  using T = compute_t<typename format::scalar_type>;
  using cache_type = paged_kv_cache<format>;
  static constexpr bool lossless = format::lossless;
  static kv_dtype dtype() { return F::dtype(); }
  static attention_mask mask() { return L::make().mask(); }
  static std::string name() { return std::string(L::name) + "_" + F::make().name(); }

  cache_type c;
  Index seq;
  explicit paged(const cache_shape& s) : c(s, L::make(), F::make()), seq(c.create()) {}
  template <class R>
  void append(Index l, const R& rows) { c.append(seq, l, rows); }
  auto view(Index l) const { return c.view(seq, l); }
  row_matrix<double> rows(Index l) const { return c.keys(seq, l).template cast<double>(); }
  Index bytes() const { return c.bytes(seq); }
  void prefill(const mla_shape& s, const row_matrix<T>& w_uk, const row_matrix<T>& w_uv,
               const row_matrix<T>& q, const row_matrix<T>& latent, Index l, row_matrix<T>& out,
               mla_workspace<T>& ws) {
    mla_prefill_attention(s, w_uk, w_uv, q, latent, c, seq, l, out, ws);
  }
};

struct contiguous {
  static constexpr const char* name = "contiguous";
  using type = contiguous_layout;
  static type make() { return {}; }
  static attention_mask mask() { return {}; }
};
struct fixed200 {
  static constexpr const char* name = "fixed200";
  using type = fixed_layout;
  static type make() { return {200}; }
  static attention_mask mask() { return {}; }
};
struct ring {
  static constexpr const char* name = "ring";
  using type = ring_layout;
  static type make() { return {40, 4, 0}; }
  static attention_mask mask() { return {true, -1, 40, 4}; }
};
struct pages16 {
  static constexpr const char* name = "pages16";
  static paged_layout make() { return paged_layout(16, 64); }
};
struct pages16_window {
  static constexpr const char* name = "pages16_window";
  static paged_layout make() { return paged_layout(16, 64, 48, 4); }
};

template <class T>
class Mla : public ::testing::Test {};

using kinds = ::testing::Types<
    flat<contiguous, f64>, flat<contiguous, f32>, flat<contiguous, f16>, flat<contiguous, bf16>,
    flat<contiguous, int8_g8>, flat<contiguous, int8_g16_r8>, flat<contiguous, int4_g8>,
    flat<fixed200, f32>, flat<fixed200, int8_g8>, flat<ring, f32>, flat<ring, bf16>,
    flat<ring, int8_g8>, paged<pages16, f32>, paged<pages16, f16>, paged<pages16, bf16>,
    paged<pages16, int8_g8>, paged<pages16, int4_g8>, paged<pages16_window, f32>,
    paged<pages16_window, int8_g16_r8>>;
// Test names: the layout's, the format's and the kind's index (two int8 kinds differ in group).
struct kind_name {
  template <class K>
  static std::string GetName(int i) {
    return K::name() + "_" + std::to_string(i);
  }
};
TYPED_TEST_SUITE(Mla, kinds, kind_name);

// Tolerance of the absorbed kernel against the naive double MLA over the same stored rows:
// float arithmetic, and the absorbed query and output projections add a sum of kv_lora_rank
// products each (outputs are O(1)); 2e-4 leaves a margin of ten over what is seen.
template <class T>
double kernel_tol() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-4;
}
// Against the naive MLA over the rows as given, before storage: adds the storage rounding
// (common.hpp's for plain scalars; for int8 a step of (max - min) / 255 of each channel's
// group, for int4 of / 15).
template <class Kind>
double storage_tol() {
  using S = typename Kind::format::scalar_type;
  if constexpr (std::is_same_v<S, quantized_code<8>>) return 0.05;
  if constexpr (std::is_same_v<S, quantized_code<4>>) return 0.6;
  if constexpr (std::is_same_v<S, double>) return 1e-10;
  return storage_tolerance<S>() * 2;
}

struct model {
  mla_shape s;
  row_matrix<double> w_uk, w_uv;
};

// Weights N-free uniform in [-1, 1] / sqrt(kv_lora_rank), so that keys and outputs are O(1).
model make_model(const mla_shape& s, unsigned seed) {
  const double k = 1.0 / std::sqrt(double(s.kv_lora_rank()));
  return {s, random_matrix<double>(s.n_heads() * s.qk_nope_dim(), s.kv_lora_rank(), seed) * k,
          random_matrix<double>(s.n_heads() * s.v_head_dim(), s.kv_lora_rank(), seed + 1) * k};
}

// Shapes: 4 heads (the micro-kernel path, rows <= 8) with a latent row of 40 (not a whole
// number of SIMD packets), and 16 heads (the general matrix product path) with 80.
const mla_shape shapes[] = {mla_shape(4, 32, 16, 8, 16), mla_shape(16, 64, 24, 16, 32)};

TYPED_TEST(Mla, DecodeMatchesNaiveMlaEveryStep) {
  using T = typename TypeParam::T;
  for (const mla_shape& s : shapes) {
    const model m = make_model(s, 11);
    const row_matrix<T> w_uk = m.w_uk.cast<T>(), w_uv = m.w_uv.cast<T>();
    TypeParam cache(s.cache(2));
    const Index n = 90;
    const row_matrix<double> latent = random_matrix<double>(n, s.latent_dim(), 3);
    const row_matrix<double> queries = random_matrix<double>(n, s.q_width(), 4);
    mla_workspace<T> ws;
    row_vector<T> out(s.out_width());
    std::vector<Index> all;
    for (Index t = 0; t < n; ++t) {
      all.push_back(t);
      for (Index l = 0; l < 2; ++l) cache.append(l, latent.row(t).cast<T>());
      const row_vector<T> q = queries.row(t).cast<T>();
      mla_decode_attention(s, w_uk, w_uv, q, cache.view(1), out, ws);
      // Over the rows as stored (dequantized as the kernel reads them), at their positions.
      const auto v = cache.view(1);
      const row_vector<double> want = naive_mla(s, m.w_uk, m.w_uv, queries.row(t), cache.rows(1),
                                                positions_of(v), t, TypeParam::mask());
      ASSERT_LT((out.template cast<double>() - want).cwiseAbs().maxCoeff(), kernel_tol<T>())
          << "step " << t << " heads " << s.n_heads();
      // Over the rows as given, before storage, every token with the layout's mask.
      const row_vector<double> given = naive_mla(s, m.w_uk, m.w_uv, queries.row(t),
                                                 latent.topRows(t + 1), all, t, TypeParam::mask());
      ASSERT_LT((out.template cast<double>() - given).cwiseAbs().maxCoeff(), storage_tol<TypeParam>())
          << "step " << t;
    }
  }
}

TYPED_TEST(Mla, PrefillEqualsDecodeStepsAndNaiveMla) {
  using T = typename TypeParam::T;
  for (const mla_shape& s : shapes) {
    const model m = make_model(s, 21);
    const row_matrix<T> w_uk = m.w_uk.cast<T>(), w_uv = m.w_uv.cast<T>();
    const Index n = 75;
    const row_matrix<T> latent = random_matrix<double>(n, s.latent_dim(), 5).cast<T>();
    const row_matrix<T> queries = random_matrix<double>(n, s.q_width(), 6).cast<T>();
    // Chunked prefill: 37 tokens, then 1, then 37.
    TypeParam pre(s.cache(1)), dec(s.cache(1));
    mla_workspace<T> ws;
    row_matrix<T> out(n, s.out_width());
    for (const auto& [a, b] : {std::pair<Index, Index>{0, 37}, {37, 38}, {38, n}}) {
      row_matrix<T> chunk(b - a, s.out_width());
      pre.prefill(s, w_uk, w_uv, queries.middleRows(a, b - a), latent.middleRows(a, b - a), 0,
                  chunk, ws);
      out.middleRows(a, b - a) = chunk;
    }
    std::vector<Index> all;
    row_vector<T> step(s.out_width());
    for (Index t = 0; t < n; ++t) {
      all.push_back(t);
      dec.append(0, latent.row(t));
      mla_decode_attention(s, w_uk, w_uv, queries.row(t), dec.view(0), step, ws);
      // As decode steps at those positions see the cache.
      ASSERT_LT((out.row(t) - step).template cast<double>().cwiseAbs().maxCoeff(), kernel_tol<T>())
          << "token " << t;
      const row_vector<double> given =
          naive_mla(s, m.w_uk, m.w_uv, queries.row(t).template cast<double>(),
                    latent.topRows(t + 1).template cast<double>(), all, t, TypeParam::mask());
      ASSERT_LT((out.row(t).template cast<double>() - given).cwiseAbs().maxCoeff(),
                storage_tol<TypeParam>())
          << "token " << t;
    }
    EXPECT_EQ((pre.rows(0) - dec.rows(0)).cwiseAbs().maxCoeff(), 0.0);
  }
}

TYPED_TEST(Mla, StoresOneLatentRowPerTokenAndLayer) {
  using T = typename TypeParam::T;
  const mla_shape s(4, 32, 16, 16, 16);  // groups of 8 and 16 divide both widths
  const Index layers = 3;
  TypeParam cache(s.cache(layers));
  const Index n = 32;  // a whole number of pages and of groups
  const row_matrix<T> latent = random_matrix<double>(n, s.latent_dim(), 7).cast<T>();
  for (Index l = 0; l < layers; ++l) cache.append(l, latent);
  ASSERT_EQ(cache.view(0).size(), n);
  if (cache.view(0).tail_tokens == 0) {
    // The formula kv_memory uses for deepseek-v2: layers x (kv_lora_rank + rope_dim) a token
    // at the dtype. Quantized, the group divides both widths, so the scales of groups of
    // tokens per channel cost what the formula's groups of channels per token do.
    EXPECT_EQ(cache.bytes(),
              kv_latent_cache_bytes(1, n, layers, s.kv_lora_rank(), s.rope_dim(), TypeParam::dtype()));
  } else {
    // The newest tokens wait in float: the formula for the stored ones, plus the tail.
    const Index tail = cache.view(0).tail_tokens;
    EXPECT_EQ(cache.bytes(), kv_latent_cache_bytes(1, n - tail, layers, s.kv_lora_rank(),
                                                   s.rope_dim(), TypeParam::dtype()) +
                                 layers * tail * s.latent_dim() * Index(sizeof(float)));
  }
}

TEST(MlaBytes, DeepSeekV2PresetMatchesKvMemory) {
  // DeepSeek-V2: 60 layers, 128 heads, kv_lora_rank 512, rope 64: 576 elements a token.
  const mla_shape s(128, 512, 128, 64, 128);
  EXPECT_EQ(s.latent_dim(), 576);
  const Index layers = 2, n = 64;  // 2 of the 60 layers keep the test small
  const row_matrix<float> latent = random_matrix(n, s.latent_dim(), 8);
  kv_cache<contiguous_layout, plain_format<Eigen::half>> f16(s.cache(layers));
  kv_cache<contiguous_layout, quantized_format<8>> i8(s.cache(layers), {}, quantized_format<8>(32));
  paged_kv_cache<plain_format<Eigen::bfloat16>> pg(s.cache(layers), paged_layout(16, 8));
  const Index seq = pg.create();
  for (Index l = 0; l < layers; ++l) {
    f16.append(l, latent);
    i8.append(l, latent);
    pg.append(seq, l, latent);
  }
  EXPECT_EQ(f16.bytes(), kv_latent_cache_bytes(1, n, layers, 512, 64, kv_dtype::f16()));
  EXPECT_EQ(f16.bytes(), layers * 576 * 2 * n);
  EXPECT_EQ(i8.bytes(), kv_latent_cache_bytes(1, n, layers, 512, 64, kv_dtype::int8(32)));
  EXPECT_EQ(pg.pool().page_bytes(), kv_latent_page_bytes(16, layers, 512, 64, kv_dtype::bf16()));
  EXPECT_EQ(pg.bytes(seq), kv_latent_paged_cache_bytes(1, n, 16, layers, 512, 64, kv_dtype::bf16()));
  // The MHA that MLA replaces: 2 x 128 heads x 128 = 32768 elements a token and layer.
  EXPECT_EQ(kv_latent_bytes_per_token(1, 512, 64, kv_dtype::f16()) * 32768,
            kv_bytes_per_token(1, 128, 128, kv_dtype::f16()) * 576);
}

TEST(MlaKernel, ThreadsAndSplitsMatchOneThread) {
  const mla_shape s(8, 64, 16, 16, 16);
  const model m = make_model(s, 31);
  const row_matrix<float> w_uk = m.w_uk.cast<float>(), w_uv = m.w_uv.cast<float>();
  kv_cache<contiguous_layout, plain_format<Eigen::half>> cache(s.cache(1));
  cache.append(0, random_matrix(700, s.latent_dim(), 9));
  const row_vector<float> q = random_matrix(1, s.q_width(), 10);
  mla_workspace<float> ws;
  row_vector<float> one(s.out_width()), many(s.out_width());
  mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), one, ws);
  thread_pool pool(3);
  attention_options opt;
  opt.pool = &pool;
  opt.split_tokens = 100;
  opt.tile_tokens = 64;
  mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), many, ws, opt);
  EXPECT_LT((one - many).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(MlaKernel, BatchedPagedDecodeMatchesEachSequence) {
  const mla_shape s(4, 32, 16, 8, 16);
  const model m = make_model(s, 41);
  const row_matrix<float> w_uk = m.w_uk.cast<float>(), w_uv = m.w_uv.cast<float>();
  paged_kv_cache<quantized_format<8>> cache(s.cache(1), paged_layout(16, 32), quantized_format<8>(16, 4));
  std::vector<Index> seqs;
  for (Index b = 0; b < 3; ++b) {
    seqs.push_back(cache.create());
    cache.append(seqs.back(), 0, random_matrix(20 + 37 * b, s.latent_dim(), unsigned(12 + b)));
  }
  const row_matrix<float> q = random_matrix(3, s.q_width(), 15);
  paged_batch<quantized_format<8>> batch;
  cache.batch(seqs, 0, batch);
  mla_workspace<float> ws;
  row_matrix<float> out(3, s.out_width());
  mla_batch_decode_attention(s, w_uk, w_uv, q, batch, out, ws);
  for (Index b = 0; b < 3; ++b) {
    row_vector<float> one(s.out_width());
    mla_decode_attention(s, w_uk, w_uv, q.row(b), cache.view(seqs[std::size_t(b)], 0), one, ws);
    EXPECT_LT((out.row(b) - one).cwiseAbs().maxCoeff(), 1e-5) << "sequence " << b;
  }
}

TEST(MlaKernel, ReferenceEqualsTheNaiveOracle) {
  const mla_shape s(3, 20, 12, 6, 10);
  const model m = make_model(s, 51);
  const row_matrix<double> latent = random_matrix<double>(30, s.latent_dim(), 16);
  const row_matrix<double> q = random_matrix<double>(30, s.q_width(), 17);
  const row_matrix<double> got = mla_reference_attention<double>(s, m.w_uk, m.w_uv, q, latent);
  std::vector<Index> all;
  for (Index t = 0; t < 30; ++t) {
    all.push_back(t);
    const row_vector<double> want =
        naive_mla(s, m.w_uk, m.w_uv, q.row(t), latent.topRows(t + 1), all, t, {});
    EXPECT_LT((got.row(t) - want).cwiseAbs().maxCoeff(), 1e-12);
  }
}

TEST(MlaKernel, RollbackThenDecodeEqualsNeverAppended) {
  const mla_shape s(4, 32, 16, 8, 16);
  const model m = make_model(s, 61);
  const row_matrix<float> w_uk = m.w_uk.cast<float>(), w_uv = m.w_uv.cast<float>();
  const row_matrix<float> latent = random_matrix(50, s.latent_dim(), 18);
  kv_cache<contiguous_layout, quantized_format<8>> a(s.cache(1), {}, quantized_format<8>(8, 8));
  auto b = a;
  a.append(0, latent);
  a.crop(48);  // the newest residual tokens are exact, so rollback into them is exact
  b.append(0, latent.topRows(48));
  const row_vector<float> q = random_matrix(1, s.q_width(), 19);
  mla_workspace<float> ws;
  row_vector<float> x(s.out_width()), y(s.out_width());
  mla_decode_attention(s, w_uk, w_uv, q, a.view(0), x, ws);
  mla_decode_attention(s, w_uk, w_uv, q, b.view(0), y, ws);
  EXPECT_EQ((x - y).cwiseAbs().maxCoeff(), 0.0f);
}

// Context shift of latent rows re-rotates k_pe (the columns after kv_lora_rank) and nothing
// else: the kept rows equal rows written at their new positions in the first place, in a
// contiguous cache, a quantized one (re-quantized from the group holding `first`) and a paged one.
template <class Cache, class Append, class Shift, class Keys>
void check_shift(Cache& moved, Cache& fresh, Append append, Shift shift, Keys keys, double tol) {
  const mla_shape s(4, 32, 16, 8, 16);
  const rope r(s.rope_dim());
  const Index n = 60, first = 20, last = 27, delta = last - first;
  row_matrix<float> rows = random_matrix(n, s.latent_dim(), 26);
  row_matrix<float> at_new = rows;
  r.apply(rows.rightCols(s.rope_dim()), 0);  // k_pe rotated at its position
  // Kept rows at their positions after the shift: 0..first-1, then first.. for those after last.
  row_matrix<float> kept(n - delta, s.latent_dim());
  kept.topRows(first) = rows.topRows(first);
  kept.bottomRows(n - last) = at_new.bottomRows(n - last);
  r.apply(kept.bottomRows(n - last).rightCols(s.rope_dim()), first);
  append(moved, rows);
  shift(moved, first, last, r);
  append(fresh, kept);
  EXPECT_LT((keys(moved) - keys(fresh)).cwiseAbs().maxCoeff(), tol);
}

TEST(MlaKernel, ContextShiftRotatesTheRopeColumnsAlone) {
  const mla_shape s(4, 32, 16, 8, 16);
  using f32_cache = kv_cache<contiguous_layout, plain_format<float>>;
  f32_cache a(s.cache(1)), b(s.cache(1));
  const auto append = [](auto& c, const row_matrix<float>& rows) { c.append(0, rows); };
  const auto shift = [](auto& c, Index first, Index last, const rope& r) { c.shift(first, last, r); };
  const auto keys = [](const auto& c) { return row_matrix<float>(c.keys(0)); };
  check_shift(a, b, append, shift, keys, 1e-5);
  using int8_cache = kv_cache<contiguous_layout, quantized_format<8>>;
  int8_cache qa(s.cache(1), {}, quantized_format<8>(8, 4)), qb(s.cache(1), {}, quantized_format<8>(8, 4));
  // Tokens 16..19 share the rebuilt group with the moved ones: quantized twice, within a step
  // (2 / 255) of quantizing once.
  check_shift(qa, qb, append, shift, keys, 0.03);
  paged_kv_cache<plain_format<Eigen::half>> pa(s.cache(1), paged_layout(16, 16)),
      pb(s.cache(1), paged_layout(16, 16));
  const Index sa = pa.create(), sb = pb.create();
  check_shift(
      pa, pb, [&](auto& c, const row_matrix<float>& rows) { c.append(&c == &pa ? sa : sb, 0, rows); },
      [&](auto& c, Index first, Index last, const rope& r) { c.shift(&c == &pa ? sa : sb, first, last, r); },
      [&](const auto& c) { return row_matrix<float>(c.keys(&c == &pa ? sa : sb, 0)); }, 4e-3);
}

// A latent cache saved and loaded back is bit-identical; a cache that stores values apart
// refuses its file, naming the format.
TEST(MlaKernel, SaveAndLoad) {
  const mla_shape s(4, 32, 16, 8, 16);
  kv_cache<contiguous_layout, quantized_format<8>> a(s.cache(2), {}, quantized_format<8>(8, 4));
  for (Index l = 0; l < 2; ++l) a.append(l, random_matrix(29, s.latent_dim(), unsigned(27 + l)));
  std::stringstream file;
  io::save(a, file);
  auto b = kv_cache<contiguous_layout, quantized_format<8>>(s.cache(2), {}, quantized_format<8>(8, 4));
  io::load(b, file);
  EXPECT_EQ(b.keys(1), a.keys(1));
  EXPECT_EQ(b.bytes(), a.bytes());
  file.clear();
  file.seekg(0);
  kv_cache<contiguous_layout, quantized_format<8>> apart(cache_shape(2, 4, 1, s.latent_dim()), {},
                                                          quantized_format<8>(8, 4));
  try {
    io::load(apart, file);
    FAIL() << "a cache of keys and values loaded a latent cache";
  } catch (const io::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("int8 keys only"), std::string::npos) << e.what();
  }
  // One sequence of a paged latent cache.
  paged_kv_cache<plain_format<Eigen::bfloat16>> p(s.cache(1), paged_layout(16, 8));
  const Index seq = p.create();
  p.append(seq, 0, random_matrix(37, s.latent_dim(), 30));
  std::stringstream one;
  io::save(p, seq, one);
  const Index copy = io::load(p, one);
  EXPECT_EQ(p.keys(copy, 0), p.keys(seq, 0));
}

// ---- refused inputs -------------------------------------------------------------------------

TEST(MlaErrors, ShapesAreChecked) {
  EXPECT_THROW(mla_shape(0, 32, 16, 8, 16), std::invalid_argument);
  EXPECT_THROW(mla_shape(4, 0, 16, 8, 16), std::invalid_argument);
  EXPECT_THROW(mla_shape(4, 32, 0, 8, 16), std::invalid_argument);
  EXPECT_THROW(mla_shape(4, 32, 16, -1, 16), std::invalid_argument);
  EXPECT_THROW(mla_shape(4, 32, 16, 8, 0), std::invalid_argument);
  EXPECT_THROW(mla_shape(4, INT64_MAX, 16, 8, 16), std::length_error);
  EXPECT_THROW(mla_shape(INT64_MAX / 2, 32, 16, 8, 16), std::length_error);
  EXPECT_NO_THROW(mla_shape(4, 32, 16, 0, 16));
  EXPECT_THROW(attention_shape(4, 1, 40).with_values_in_keys(0), std::invalid_argument);
  EXPECT_THROW(attention_shape(4, 1, 40).with_values_in_keys(41), std::invalid_argument);
  EXPECT_EQ(attention_shape(4, 1, 40).with_values_in_keys(32).out_width(), 4 * 32);
  EXPECT_NE(attention_shape(4, 1, 40).with_values_in_keys(32), attention_shape(4, 1, 40));
}

TEST(MlaErrors, LatentCachesTakeRowsAloneAndLeaveTheCacheUnchanged) {
  const mla_shape s(4, 32, 16, 8, 16);
  kv_cache<contiguous_layout, plain_format<float>> latent(s.cache(1));
  const row_matrix<float> rows = random_matrix(3, s.latent_dim(), 20);
  latent.append(0, rows);
  try {
    latent.append(0, rows, rows);
    FAIL() << "a latent cache took keys and values apart";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("columns of its keys"), std::string::npos) << e.what();
  }
  EXPECT_THROW(latent.append(0, random_matrix(2, s.latent_dim() + 1, 21)), std::invalid_argument);
  EXPECT_EQ(latent.size(0), 3);
  EXPECT_EQ(latent.keys(0), rows);
  EXPECT_EQ(latent.values(0), rows.leftCols(32));
  // A cache of keys and values apart refuses rows alone.
  kv_cache<contiguous_layout, plain_format<float>> plain(cache_shape(1, 4, 1, 40));
  EXPECT_THROW(plain.append(0, rows), std::invalid_argument);
  EXPECT_EQ(plain.size(0), 0);
  // Context shift rotates k_pe alone: a rope of rope_dim, not of the whole row.
  EXPECT_THROW(latent.shift(1, 2, rope(s.latent_dim())), std::invalid_argument);
  EXPECT_EQ(latent.keys(0), rows);
  paged_kv_cache<plain_format<float>> pg(s.cache(1), paged_layout(16, 4));
  const Index seq = pg.create();
  EXPECT_THROW(pg.append(seq, 0, rows, rows), std::invalid_argument);
  EXPECT_EQ(pg.size(seq, 0), 0);
}

TEST(MlaErrors, AttentionInputsAreChecked) {
  const mla_shape s(4, 32, 16, 8, 16);
  const model m = make_model(s, 71);
  const row_matrix<float> w_uk = m.w_uk.cast<float>(), w_uv = m.w_uv.cast<float>();
  kv_cache<contiguous_layout, plain_format<float>> cache(s.cache(1));
  mla_workspace<float> ws;
  row_vector<float> q = random_matrix(1, s.q_width(), 22), out(s.out_width());
  // Empty cache.
  EXPECT_THROW(mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), out, ws), std::invalid_argument);
  cache.append(0, random_matrix(5, s.latent_dim(), 23));
  row_vector<float> short_q(s.q_width() - 1), short_out(s.out_width() - 1);
  EXPECT_THROW(mla_decode_attention(s, w_uk, w_uv, short_q, cache.view(0), out, ws),
               std::invalid_argument);
  EXPECT_THROW(mla_decode_attention(s, w_uk, w_uv, q, cache.view(0), short_out, ws),
               std::invalid_argument);
  const row_matrix<float> wrong = row_matrix<float>::Zero(w_uk.rows() + 1, w_uk.cols());
  EXPECT_THROW(mla_decode_attention(s, wrong, w_uv, q, cache.view(0), out, ws), std::invalid_argument);
  EXPECT_THROW(mla_decode_attention(s, w_uk, wrong, q, cache.view(0), out, ws), std::invalid_argument);
  // A cache of another shape, and plain decode over a latent view with a shape of keys and
  // values apart.
  const mla_shape other(4, 24, 16, 16, 16);
  EXPECT_THROW(mla_decode_attention(other, row_matrix<float>(64, 24), row_matrix<float>(64, 24), q,
                                    cache.view(0), out, ws),
               std::invalid_argument);
  row_vector<float> q40(4 * 40), o40(4 * 40);
  EXPECT_THROW(decode_attention(attention_shape(4, 1, 40), q40, cache.view(0), o40),
               std::invalid_argument);
  // Prefill refuses before anything is appended.
  row_matrix<float> qs = random_matrix(3, s.q_width(), 24), outs(3, s.out_width());
  EXPECT_THROW(mla_prefill_attention(s, w_uk, w_uv, qs, random_matrix(2, s.latent_dim(), 25),
                                     cache, 0, outs, ws),
               std::invalid_argument);
  EXPECT_THROW(mla_prefill_attention(s, w_uk, w_uv, qs, random_matrix(3, s.latent_dim(), 25),
                                     cache, 1, outs, ws),
               std::out_of_range);
  EXPECT_EQ(cache.size(0), 5);
}

}  // namespace
