// SPDX-License-Identifier: Apache-2.0
// Operations on one sequence of a paged cache: rollback to nothing, context shift against the
// contiguous cache's, and saving and loading a sequence (io/paged_file.hpp).
#include "common.hpp"

#include <kvcache/io/paged_file.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;

const cache_shape model(2, 8, 2, 16);  // 2 layers, GQA 8/2, head_dim 16
const attention_shape heads = model.heads();

// The keys and values of a sequence: token i of layer l is row i of rows(l, ...).
row_matrix<float> rows(Index l, Index n, unsigned seed) {
  return random_matrix<float>(n, model.kv_width(), seed * 101 + unsigned(l));
}

// ---- rollback ----------------------------------------------------------------------------------

TEST(PagedCrop, ASequenceRolledBackToNothingAppendsAgain) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 8});
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 10, 1), rows(l, 10, 2));
  paged.rollback(seq, 10);
  EXPECT_TRUE(paged.block_table(seq).empty());
  EXPECT_EQ(paged.stats().used, 0);
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 6, 3), rows(l, 6, 4));
  EXPECT_EQ(paged.page_positions(seq), (std::vector<Index>{0, 4}));
  for (Index l = 0; l < model.n_layers(); ++l) {
    EXPECT_EQ(paged.keys(seq, l), rows(l, 6, 3));
    EXPECT_EQ(paged.values(seq, l), rows(l, 6, 4));
  }
}

// ---- context shift -----------------------------------------------------------------------------

struct f32_p4 { using format = plain_format<float>; static format make() { return {}; } static constexpr Index page = 4; };
struct f16_p8 { using format = plain_format<Eigen::half>; static format make() { return {}; } static constexpr Index page = 8; };
struct int8_g4_p8 { using format = quantized_format<8>; static format make() { return format(4, 0); } static constexpr Index page = 8; };
struct int4_g4_r3_p4 { using format = quantized_format<4>; static format make() { return format(4, 3); } static constexpr Index page = 4; };

template <class F>
using contiguous_of = kv_cache<contiguous_layout, typename F::format>;

// Positions of the tokens a view holds, oldest first.
template <class View>
std::vector<Index> positions_of(const View& w) {
  std::vector<Index> out;
  for (Index b = 0; b < w.n_blocks(); ++b) {
    for (Index t = 0; t < w.block(0, b).tokens; ++t) out.push_back(w.position(b) + t);
  }
  return out;
}

// Layer by layer, `seq` of `paged` holds what `ref` holds: the same positions, the same keys and
// values bit for bit, and attention over them agrees.
template <class Format, class Ref>
void expect_same(const paged_kv_cache<Format>& paged, Index seq, const Ref& ref, unsigned seed) {
  using T = compute_t<typename Format::scalar_type>;
  EXPECT_NO_THROW(paged.check_record(paged.record(seq)));  // a state a file could hold
  for (Index l = 0; l < paged.n_layers(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    ASSERT_EQ(paged.position(seq, l), ref.position(l));
    ASSERT_EQ(paged.size(seq, l), ref.size(l));
    EXPECT_EQ(positions_of(paged.view(seq, l)), ref.positions(l));
    EXPECT_EQ(paged.keys(seq, l), ref.keys(l));
    EXPECT_EQ(paged.values(seq, l), ref.values(l));
    if (ref.size(l) == 0) continue;
    const row_vector<T> q = random_matrix<T>(1, heads.q_width(), seed + unsigned(l));
    row_vector<T> a(heads.q_width()), b(heads.q_width());
    decode_attention(heads, q, paged.view(seq, l), a);
    decode_attention(heads, q, ref.view(l), b);
    EXPECT_LE((a - b).cwiseAbs().maxCoeff(), T(1e-5));
  }
}

// Everything observable of some sequences and the pool.
template <class Cache>
std::vector<Index> snapshot(const Cache& c, const std::vector<Index>& seqs) {
  std::vector<Index> s = {c.stats().used, c.stats().free, c.stats().cached, c.n_sequences()};
  for (const Index q : seqs) {
    for (Index l = 0; l < c.n_layers(); ++l) s.push_back(c.position(q, l));
    for (const Index p : c.block_table(q)) s.push_back(p);
    for (const Index p : c.page_positions(q)) s.push_back(p);
  }
  return s;
}

template <class F>
class PagedShift : public ::testing::Test {};
using shift_formats = ::testing::Types<f32_p4, f16_p8, int8_g4_p8, int4_g4_r3_p4>;
TYPED_TEST_SUITE(PagedShift, shift_formats);

// Layer 0 holds two tokens more than layer 1 (a forward pass under way), and another sequence's
// pages interleave with the shifted one's.
constexpr Index shift_tokens = 71;

template <class F, class Paged, class Ref>
void fill_for_shift(Paged& paged, Index seq, Index other, Ref& ref, const rope& r) {
  for (Index at = 0; at < shift_tokens + 2; at += 9) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const Index n = std::min<Index>(9, shift_tokens + (l == 0 ? 2 : 0) - at);
      if (n <= 0) continue;
      row_matrix<float> k = rows(l, shift_tokens + 2, 1).middleRows(at, n);
      r.apply(k, at);
      const row_matrix<float> v = rows(l, shift_tokens + 2, 2).middleRows(at, n);
      paged.append(seq, l, k, v);
      ref.append(l, k, v);
      paged.append(other, l, rows(l, n, 50 + unsigned(at)), rows(l, n, 60 + unsigned(at)));
    }
  }
}

TYPED_TEST(PagedShift, EqualsTheContiguousShift) {
  using F = TypeParam;
  const rope r(model.head_dim());
  for (const auto& [first, last] : {std::pair<Index, Index>{10, 30}, {4, 5}, {37, 40}, {60, 71},
                                    {50, 50}, {0, 3}, {8, 16}, {70, 71}, {0, 71}, {71, 71}}) {
    SCOPED_TRACE("shift [" + std::to_string(first) + ", " + std::to_string(last) + ")");
    paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
    contiguous_of<F> ref(model, {}, F::make());
    const Index seq = paged.create(), other = paged.create();
    fill_for_shift<F>(paged, seq, other, ref, r);
    const auto other_keys = paged.keys(other, 1);
    const Index other_pages = Index(paged.block_table(other).size());
    paged.shift(seq, first, last, r);
    ref.shift(first, last, r);
    expect_same(paged, seq, ref, 3);
    // The table holds the stored tokens' pages and no more; the other sequence is untouched.
    Index stored = 0;
    for (Index l = 0; l < model.n_layers(); ++l) {
      stored = std::max(stored, paged.size(seq, l) - paged.view(seq, l).tail_tokens);
    }
    EXPECT_EQ(Index(paged.block_table(seq).size()), detail::ceil_div(stored, F::page));
    EXPECT_EQ(paged.stats().used, Index(paged.block_table(seq).size()) + other_pages);
    EXPECT_EQ(paged.keys(other, 1), other_keys);
    // Both go on alike.
    for (Index step = 0; step < 3; ++step) {
      for (Index l = 0; l < model.n_layers(); ++l) {
        const auto k = rows(l, 5, 70 + unsigned(step)), v = rows(l, 5, 80 + unsigned(step));
        paged.append(seq, l, k, v);
        ref.append(l, k, v);
      }
    }
    expect_same(paged, seq, ref, 4);
  }
}

TYPED_TEST(PagedShift, LeavesAForkAsItWas) {
  using F = TypeParam;
  const rope r(model.head_dim());
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  contiguous_of<F> ref(model, {}, F::make());
  const Index seq = paged.create(), other = paged.create();
  fill_for_shift<F>(paged, seq, other, ref, r);
  const Index fork = paged.fork(seq);
  const auto table = paged.block_table(fork);
  const contiguous_of<F> fork_ref = ref;
  paged.shift(seq, 21, 33, r);
  ref.shift(21, 33, r);
  expect_same(paged, seq, ref, 5);
  expect_same(paged, fork, fork_ref, 6);
  EXPECT_EQ(paged.block_table(fork), table);
  // The pages wholly before the unit holding position 21 are still shared.
  const Index shared = 21 / 4 * 4 / F::page;
  for (Index i = 0; i < shared; ++i) {
    EXPECT_EQ(paged.block_table(seq)[std::size_t(i)], table[std::size_t(i)]);
  }
  EXPECT_NE(paged.block_table(seq)[std::size_t(shared)], table[std::size_t(shared)]);
  paged.free(fork);
  expect_same(paged, seq, ref, 7);
  // Shifting the fork's former pages again needs no copy now.
  const Index used = paged.stats().used;
  paged.shift(seq, 40, 41, r);
  ref.shift(40, 41, r);
  expect_same(paged, seq, ref, 8);
  EXPECT_LE(paged.stats().used, used);
}

TYPED_TEST(PagedShift, KeepsPublishedPagesForThePrefixIndex) {
  using F = TypeParam;
  const rope r(model.head_dim());
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  contiguous_of<F> ref(model, {}, F::make());
  const Index seq = paged.create(), other = paged.create();
  fill_for_shift<F>(paged, seq, other, ref, r);
  std::vector<std::int32_t> ids(shift_tokens);
  std::iota(ids.begin(), ids.end(), 100);
  const Index published = paged.publish(seq, ids.data(), shift_tokens);
  ASSERT_GT(published, 2);
  const Index hit = paged.match_prefix(ids.data(), shift_tokens);
  const Index adopted = paged.create(ids.data(), shift_tokens);
  const auto adopted_keys = paged.keys(adopted, 0);
  paged.free(adopted);  // its pages stay cached, published
  const Index first = F::page + 3, last = 3 * F::page + 1;
  paged.shift(seq, first, last, r);
  ref.shift(first, last, r);
  expect_same(paged, seq, ref, 9);
  // The index still finds the old prompt's pages, holding what they held.
  EXPECT_EQ(paged.match_prefix(ids.data(), shift_tokens), hit);
  const Index again = paged.create(ids.data(), shift_tokens);
  EXPECT_EQ(paged.keys(again, 0), adopted_keys);
  EXPECT_EQ(paged.block_table(again)[0], paged.block_table(seq)[0]);  // before `first`: shared
  paged.free(again);
  // The shifted sequence publishes its new tokens from the page holding `first` on.
  std::vector<std::int32_t> kept(ids.begin(), ids.begin() + first);
  kept.insert(kept.end(), ids.begin() + last, ids.end());
  EXPECT_EQ(paged.match_prefix(kept.data(), Index(kept.size())), F::page);
  EXPECT_GT(paged.publish(seq, kept.data(), Index(kept.size())), 0);
  Index stored = paged.size(seq, 1) - paged.view(seq, 1).tail_tokens;
  EXPECT_EQ(paged.match_prefix(kept.data(), Index(kept.size())), stored / F::page * F::page);
}

TEST(PagedShiftErrors, RefusesAndChangesNothing) {
  const rope r(model.head_dim());
  paged_kv_cache<plain_format<float>> paged(model, {4, 3});
  const Index a = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(a, l, rows(l, 10, 1), rows(l, 10, 2));
  paged.append(a, 0, rows(0, 1, 3), rows(0, 1, 4));  // layer 0 at 11, layer 1 at 10
  const Index b = paged.fork(a);                      // every page shared, none free
  const auto before = snapshot(paged, {a, b});
  const auto keys = paged.keys(a, 0);
  EXPECT_THROW(paged.shift(7, 1, 2, r), std::out_of_range);
  EXPECT_THROW(paged.shift(a, 3, 2, r), std::out_of_range);
  EXPECT_THROW(paged.shift(a, -1, 2, r), std::out_of_range);
  EXPECT_THROW(paged.shift(a, 5, 11, r), std::out_of_range);  // layer 1 holds 10 tokens
  EXPECT_THROW(paged.shift(a, 1, 2, rope(8)), std::invalid_argument);
  // Position 5 lies in a shared page that keeps tokens: it must be copied, and the shared page
  // after it replaced, but no page is free.
  try {
    paged.shift(a, 5, 6, r);
    ADD_FAILURE() << "shifted without a page";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("needs 2 more pages"), std::string::npos) << e.what();
  }
  EXPECT_EQ(snapshot(paged, {a, b}), before);
  EXPECT_EQ(paged.keys(a, 0), keys);
  // From a page boundary nothing is copied, but the two shared pages after it are replaced.
  EXPECT_THROW(paged.shift(a, 4, 5, r), std::length_error);
  EXPECT_EQ(snapshot(paged, {a, b}), before);
  // Once b is gone, a alone holds its pages and shifts in them.
  paged.free(b);
  const std::vector<Index> table = paged.block_table(a);
  paged.shift(a, 5, 6, r);
  EXPECT_EQ(paged.position(a, 0), 10);
  EXPECT_EQ(paged.position(a, 1), 9);
  EXPECT_EQ(paged.block_table(a), table);
  // Dropping the last page's tokens gives it back.
  paged.shift(a, 5, 9, r);
  EXPECT_EQ(paged.block_table(a).size(), 2u);
  EXPECT_EQ(paged.stats().free, 1);
}

// Windows: a shift after the window gave pages back moves only held tokens and leaves the window
// of the next position whole, as a ring that held every token would.
TEST(PagedShiftWindow, AttendsAsARingThatHeldEveryToken) {
  using T = float;
  const rope r(model.head_dim());
  const Index window = 10, sinks = 3, P = 4;
  const auto make = [&](paged_kv_cache<plain_format<float>>& paged,
                        kv_cache<ring_layout, plain_format<float>>& ring) {
    const Index seq = paged.create();
    for (Index t = 0; t < 60; ++t) {
      for (Index l = 0; l < model.n_layers(); ++l) {
        row_matrix<float> k = rows(l, 1, 100 + unsigned(t));
        r.apply(k, t);
        const auto v = rows(l, 1, 300 + unsigned(t));
        paged.append(seq, l, k, v);
        ring.append(l, k, v);
      }
    }
    return seq;
  };
  const auto same_attention = [&](const paged_kv_cache<plain_format<float>>& paged, Index seq,
                                  const kv_cache<ring_layout, plain_format<float>>& ring,
                                  unsigned seed) {
    ASSERT_NO_THROW(paged.check_record(paged.record(seq)));
    for (Index l = 0; l < model.n_layers(); ++l) {
      ASSERT_EQ(paged.position(seq, l), ring.position(l));
      const row_vector<T> q = random_matrix<T>(1, heads.q_width(), seed + unsigned(l));
      row_vector<T> a(heads.q_width()), b(heads.q_width());
      decode_attention(heads, q, paged.view(seq, l), a);
      decode_attention(heads, q, ring.view(l), b);
      ASSERT_LE((a - b).cwiseAbs().maxCoeff(), 1e-6) << "layer " << l;
    }
  };
  for (const auto& [first, last] : {std::pair<Index, Index>{52, 54}, {49, 50}, {48, 49}, {3, 52}, {4, 60}}) {
    SCOPED_TRACE("shift [" + std::to_string(first) + ", " + std::to_string(last) + ")");
    paged_kv_cache<plain_format<float>> paged(model, {P, 16, window, sinks});
    kv_cache<ring_layout, plain_format<float>> ring(model, {window, sinks, 64});
    const Index seq = make(paged, ring);
    ASSERT_EQ(paged.page_positions(seq), (std::vector<Index>{0, 48, 52, 56}));
    paged.shift(seq, first, last, r);
    ring.shift(first, last, r);
    same_attention(paged, seq, ring, 1);
    if (first <= P) {
      // Rebuilt from the sink page on: the gap is closed, every token held again.
      EXPECT_EQ(paged.size(seq, 0), paged.position(seq, 0));
      EXPECT_EQ(paged.keys(seq, 0), ring.keys(0));
    }
    for (Index t = 0; t < 12; ++t) {
      for (Index l = 0; l < model.n_layers(); ++l) {
        const auto k = rows(l, 1, 500 + unsigned(t)), v = rows(l, 1, 600 + unsigned(t));
        paged.append(seq, l, k, v);
        ring.append(l, k, v);
      }
      same_attention(paged, seq, ring, 10 + unsigned(t));
    }
    EXPECT_LE(Index(paged.block_table(seq).size()), 1 + detail::ceil_div(window, P) + 1);
  }
  paged_kv_cache<plain_format<float>> paged(model, {P, 16, window, sinks});
  kv_cache<ring_layout, plain_format<float>> ring(model, {window, sinks, 64});
  const Index seq = make(paged, ring);
  const auto before = snapshot(paged, {seq});
  EXPECT_THROW(paged.shift(seq, 2, 5, r), std::out_of_range);    // a sink
  EXPECT_THROW(paged.shift(seq, 20, 50, r), std::out_of_range);  // positions 4..47 went
  EXPECT_THROW(paged.shift(seq, 3, 40, r), std::out_of_range);   // 40..47 cannot be moved
  EXPECT_THROW(paged.shift(seq, 52, 55, r), std::out_of_range);  // position 56 sees 47..
  EXPECT_EQ(snapshot(paged, {seq}), before);
}

// ---- saving and loading a sequence ---------------------------------------------------------------

struct f64_p3 { using format = plain_format<double>; static format make() { return {}; } static constexpr Index page = 3; };
struct bf16_p1 { using format = plain_format<Eigen::bfloat16>; static format make() { return {}; } static constexpr Index page = 1; };
struct f16_p16 { using format = plain_format<Eigen::half>; static format make() { return {}; } static constexpr Index page = 16; };

template <class F>
class PagedFile : public ::testing::Test {};
using file_formats = ::testing::Types<f32_p4, f64_p3, f16_p16, bf16_p1, int8_g4_p8, int4_g4_r3_p4>;
TYPED_TEST_SUITE(PagedFile, file_formats);

template <class Format>
std::string saved(const paged_kv_cache<Format>& cache, Index seq) {
  std::stringstream out;
  io::save(cache, seq, out, "test.kvp");
  return out.str();
}

template <class Format>
Index loaded(paged_kv_cache<Format>& cache, const std::string& bytes, const char* name = "test.kvp") {
  std::istringstream in(bytes);
  return io::load(cache, in, name);
}

// Two sequences hold the same tokens at the same positions, bit for bit, in the same block
// structure, and attention over them agrees.
template <class Format>
void expect_same_sequence(const paged_kv_cache<Format>& a, Index sa, const paged_kv_cache<Format>& b,
                          Index sb, unsigned seed) {
  using T = compute_t<typename Format::scalar_type>;
  EXPECT_EQ(a.page_positions(sa), b.page_positions(sb));
  for (Index l = 0; l < a.n_layers(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    ASSERT_EQ(a.position(sa, l), b.position(sb, l));
    ASSERT_EQ(a.size(sa, l), b.size(sb, l));
    EXPECT_EQ(a.view(sa, l).tail_tokens, b.view(sb, l).tail_tokens);
    EXPECT_EQ(positions_of(a.view(sa, l)), positions_of(b.view(sb, l)));
    EXPECT_EQ(a.keys(sa, l), b.keys(sb, l));
    EXPECT_EQ(a.values(sa, l), b.values(sb, l));
    if (a.size(sa, l) == 0) continue;
    const row_vector<T> q = random_matrix<T>(1, heads.q_width(), seed + unsigned(l));
    row_vector<T> x(heads.q_width()), y(heads.q_width());
    decode_attention(heads, q, a.view(sa, l), x);
    decode_attention(heads, q, b.view(sb, l), y);
    // The kernel may gather pages into tiles otherwise where their ids are not adjacent in
    // memory: the same sums, perhaps in another order.
    EXPECT_LE((x - y).cwiseAbs().maxCoeff(), T(1e-6));
  }
}

TYPED_TEST(PagedFile, RoundTripsBitForBitAndGoesOnAlike) {
  using F = TypeParam;
  paged_kv_cache<typename F::format> paged(model, {F::page, 128}, F::make());
  const Index other = paged.create(), seq = paged.create();
  for (Index at = 0; at < 23; at += 6) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const Index n = std::min<Index>(6, (l == 0 ? 23 : 21) - at);  // layer 1 two tokens behind
      paged.append(seq, l, rows(l, 23, 1).middleRows(at, n), rows(l, 23, 2).middleRows(at, n));
      paged.append(other, l, rows(l, n, 3 + unsigned(at)), rows(l, n, 4 + unsigned(at)));
    }
  }
  const Index fork = paged.fork(seq);  // shared pages save as any others
  const std::string bytes = saved(paged, seq);

  // Into a cache of the same shape whose pool is laid out otherwise.
  paged_kv_cache<typename F::format> target(model, {F::page, 100}, F::make());
  const Index busy = target.create();
  for (Index l = 0; l < model.n_layers(); ++l) target.append(busy, l, rows(l, 7, 5), rows(l, 7, 6));
  const auto busy_keys = target.keys(busy, 0);
  const Index id = loaded(target, bytes);
  EXPECT_NE(id, busy);
  EXPECT_EQ(target.n_sequences(), 2);
  expect_same_sequence(paged, seq, target, id, 1);
  EXPECT_EQ(target.stats().used, Index(target.block_table(busy).size() + target.block_table(id).size()));
  EXPECT_EQ(saved(target, id), bytes);  // the same bytes back
  EXPECT_EQ(target.keys(busy, 0), busy_keys) << "the other sequence is untouched";
  // Both go on alike: a token to layer 1, then chunks to every layer.
  paged.append(seq, 1, rows(1, 2, 7), rows(1, 2, 8));
  target.append(id, 1, rows(1, 2, 7), rows(1, 2, 8));
  for (Index step = 0; step < 4; ++step) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      const auto k = rows(l, 3, 9 + unsigned(step)), v = rows(l, 3, 19 + unsigned(step));
      paged.append(seq, l, k, v);
      target.append(id, l, k, v);
    }
    expect_same_sequence(paged, seq, target, id, 2 + unsigned(step));
  }
  expect_same_sequence(paged, fork, target, loaded(target, bytes), 9);

  // An empty sequence round-trips too, and appends from 0.
  const Index empty = paged.create();
  const Index back = loaded(target, saved(paged, empty));
  EXPECT_EQ(target.position(back), 0);
  EXPECT_TRUE(target.block_table(back).empty());
  for (Index l = 0; l < model.n_layers(); ++l) target.append(back, l, rows(l, 5, 1), rows(l, 5, 2));
  EXPECT_EQ(target.position(back), 5);
}

TYPED_TEST(PagedFile, RefusesDamagedFilesAndChangesNothing) {
  using F = TypeParam;
  paged_kv_cache<typename F::format> paged(model, {F::page, 64}, F::make());
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 19, 1), rows(l, 19, 2));
  const std::string bytes = saved(paged, seq);

  paged_kv_cache<typename F::format> target(model, {F::page, 64}, F::make());
  const Index busy = target.create();
  for (Index l = 0; l < model.n_layers(); ++l) target.append(busy, l, rows(l, 5, 3), rows(l, 5, 4));
  const auto before = snapshot(target, {busy});
  const auto keys = target.keys(busy, 1);
  for (std::size_t cut = 0; cut < bytes.size(); cut += 1 + bytes.size() / 97) {
    EXPECT_THROW(loaded(target, bytes.substr(0, cut), "cut.kvp"), io::format_error) << "cut at " << cut;
  }
  for (std::size_t at = 0; at < bytes.size(); at += 1 + bytes.size() / 61) {
    std::string bad = bytes;
    bad[at] = char(bad[at] ^ 0x10);
    EXPECT_THROW(loaded(target, bad, "flipped.kvp"), io::format_error) << "byte " << at;
  }
  EXPECT_EQ(snapshot(target, {busy}), before);
  EXPECT_EQ(target.keys(busy, 1), keys);
}

// A cache of another shape, format, page size or window refuses the file, naming what differs.
TEST(PagedFileErrors, AnotherKindOfCacheIsNamed) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 16, 8, 2});
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 9, 1), rows(l, 9, 2));
  const std::string bytes = saved(paged, seq);
  const auto refused = [&](auto&& cache, const char* field) {
    try {
      loaded(cache, bytes);
      ADD_FAILURE() << "loaded into a cache of another " << field;
    } catch (const io::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("test.kvp"), std::string::npos) << e.what();
    }
    EXPECT_EQ(cache.n_sequences(), 0);
    EXPECT_EQ(cache.stats().used, 0);
  };
  refused(paged_kv_cache<plain_format<float>>(cache_shape(2, 8, 4, 16), {4, 16, 8, 2}), "n_kv_heads");
  refused(paged_kv_cache<plain_format<float>>(cache_shape(3, 8, 2, 16), {4, 16, 8, 2}), "n_layers");
  refused(paged_kv_cache<plain_format<Eigen::half>>(model, {4, 16, 8, 2}), "format");
  refused(paged_kv_cache<plain_format<float>>(model, {8, 16, 8, 2}), "page_size");
  refused(paged_kv_cache<plain_format<float>>(model, {4, 16, 9, 2}), "window");
  refused(paged_kv_cache<plain_format<float>>(model, {4, 16, 8, 1}), "sinks");
  refused(paged_kv_cache<plain_format<float>>(model, {4, 16}), "window");
  refused(paged_kv_cache<quantized_format<8>>(model, {4, 16, 8, 2}, quantized_format<8>(4, 0)), "format");
  refused(paged_kv_cache<quantized_format<8>>(model, {4, 16, 8, 2}, quantized_format<8>(2, 0)), "format");
  // A whole-cache file is not a sequence file, nor the other way round.
  kv_cache<contiguous_layout, plain_format<float>> whole(model);
  std::stringstream file;
  io::save(whole, file, "whole.kv");
  paged_kv_cache<plain_format<float>> target(model, {4, 16, 8, 2});
  EXPECT_THROW(loaded(target, file.str()), io::format_error);
  std::istringstream in(bytes);
  EXPECT_THROW(io::load(whole, in, "test.kvp"), io::format_error);
  EXPECT_EQ(target.n_sequences(), 0);
}

// Group sizes differ, residuals differ: both are named.
TEST(PagedFileErrors, AnotherGroupOrResidualIsNamed) {
  paged_kv_cache<quantized_format<8>> paged(model, {8, 16}, quantized_format<8>(4, 3));
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 9, 1), rows(l, 9, 2));
  const std::string bytes = saved(paged, seq);
  for (const auto& [format, field] : {std::pair<quantized_format<8>, const char*>{quantized_format<8>(8, 3), "group size"},
                                      {quantized_format<8>(4, 0), "residual"}}) {
    paged_kv_cache<quantized_format<8>> other(model, {8, 16}, format);
    try {
      loaded(other, bytes);
      ADD_FAILURE() << "loaded with another " << field;
    } catch (const io::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

TEST(PagedFileErrors, AFullPoolRefusesWithLengthErrorAndCachedPagesServe) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 16});
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 10, 1), rows(l, 10, 2));
  const std::string bytes = saved(paged, seq);  // 3 pages

  paged_kv_cache<plain_format<float>> target(model, {4, 4});
  const Index busy = target.create();
  for (Index l = 0; l < model.n_layers(); ++l) target.append(busy, l, rows(l, 6, 3), rows(l, 6, 4));
  const auto before = snapshot(target, {busy});
  try {
    loaded(target, bytes);
    ADD_FAILURE() << "loaded 3 pages into 2";
  } catch (const std::length_error& e) {
    EXPECT_NE(std::string(e.what()).find("needs 3 pages"), std::string::npos) << e.what();
  }
  EXPECT_EQ(snapshot(target, {busy}), before);
  // Published pages that no sequence holds are cached, and a load may take them.
  const std::vector<std::int32_t> ids = {1, 2, 3, 4, 5, 6};
  target.publish(busy, ids.data(), 6);
  target.free(busy);
  EXPECT_EQ(target.stats().cached, 1);
  EXPECT_EQ(target.stats().free, 3);
  const Index id = loaded(target, bytes);
  expect_same_sequence(paged, seq, target, id, 1);
  EXPECT_EQ(target.stats().free, 0);
}

// A sequence whose window gave pages back loads with its gap, and slides on as the saved one.
template <class Format>
void window_round_trip(Format format, Index P) {
  paged_kv_cache<Format> paged(model, {P, 32, 12, 3}, format);
  const Index seq = paged.create();
  for (Index t = 0; t < 70; t += 5) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      paged.append(seq, l, rows(l, 5, 100 + unsigned(t)), rows(l, 5, 300 + unsigned(t)));
    }
  }
  ASSERT_NE(paged.page_positions(seq)[1], P) << "no gap";
  const std::string bytes = saved(paged, seq);
  paged_kv_cache<Format> target(model, {P, 12, 12, 3}, format);
  const Index id = loaded(target, bytes);
  expect_same_sequence(paged, seq, target, id, 1);
  for (Index t = 0; t < 30; ++t) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      paged.append(seq, l, rows(l, 1, 500 + unsigned(t)), rows(l, 1, 600 + unsigned(t)));
      target.append(id, l, rows(l, 1, 500 + unsigned(t)), rows(l, 1, 600 + unsigned(t)));
    }
    expect_same_sequence(paged, seq, target, id, 10 + unsigned(t));
  }
  EXPECT_THROW(target.crop(id, 20), std::out_of_range);  // given back, as in the original
}

TEST(PagedFileWindow, KeepsTheGapAndSlidesOn) {
  window_round_trip(plain_format<float>(), 4);
  window_round_trip(quantized_format<8>(4, 2), 4);
}

// Files whose checksums hold but whose counts no sequence can have: each refused with
// format_error naming what is wrong, and nothing taken from the pool.
struct record_case {
  const char* what;
  Index table_end;
  std::int64_t gap;
  std::vector<Index> pages;
  std::vector<std::pair<Index, Index>> layers;  // next, tail tokens
  Index extra_bytes = 0;
};

std::string write_record(const record_case& c, Index P, Index window, Index sinks) {
  std::stringstream out;
  io::state_writer w(out, "crafted.kvp");
  w.begin_section(io::fourcc("KVPS"));
  w.put_string("paged");
  w.put_string("int8");
  for (const Index v : {Index(2), Index(8), Index(2), Index(16), Index(4), Index(3), P, window, sinks, Index(4)}) {
    w.put_i64(v);
  }
  w.end_section();
  w.begin_section(io::fourcc("PSEQ"));
  w.put_i64(c.table_end);
  w.put_i64(c.gap);
  w.put_u64(c.pages.size());
  w.put_array(c.pages.data(), Index(c.pages.size()));
  w.end_section();
  const quantized_format<8> f(4, 3);
  const Index unit_bytes = f.unit_bytes(2, 16), tail_bytes = 2 * 32 * 4;
  for (std::size_t l = 0; l < c.layers.size(); ++l) {
    const auto [next, tail] = c.layers[l];
    w.begin_section(io::fourcc("PLYR"));
    w.put_i64(Index(l));
    w.put_i64(next);
    w.put_i64(tail);
    Index units = 0;
    for (const Index pos : c.pages) units += std::clamp<Index>((next - tail - pos) / 4, 0, P / 4);
    const Index n = std::max<Index>(0, units * unit_bytes + std::max<Index>(tail, 0) * tail_bytes +
                                           c.extra_bytes);
    const std::string zeros(static_cast<std::size_t>(std::min<Index>(n, 1 << 20)), '\0');
    w.put_bytes(zeros.data(), Index(zeros.size()));
    w.end_section();
  }
  w.finish();
  return out.str();
}

TEST(PagedFileErrors, RefusesCountsNoSequenceHas) {
  const Index P = 8;
  using L = std::vector<std::pair<Index, Index>>;
  const std::vector<record_case> cases = {
      {"gap is 2", 16, 2, {0, 8}, L{{16, 0}, {16, 0}}},
      {"pages were given back to a window", 16, 1, {0, 8}, L{{16, 0}, {16, 0}}},
      {"page 1 is at position 16, expected 8", 24, 0, {0, 16}, L{{16, 0}, {16, 0}}},
      {"page 0 is at position 8, expected 0", 16, 0, {8}, L{{16, 0}, {16, 0}}},
      {"table end is 24, expected 16", 24, 0, {0, 8}, L{{16, 0}, {16, 0}}},
      {"table end is 8 without pages", 8, 0, {}, L{{0, 0}, {0, 0}}},
      {"table end 12 is not a multiple", 12, 0, {}, L{{0, 0}, {0, 0}}},
      {"table end is -8", -8, 0, {}, L{{0, 0}, {0, 0}}},
      {"layer 1: tail tokens is 7", 16, 0, {0, 8}, L{{16, 0}, {23, 7}}},
      {"layer 0: next position is 2", 16, 0, {0, 8}, L{{2, 3}, {16, 0}}},
      {"layer 1: stored tokens' end is 24", 16, 0, {0, 8}, L{{16, 0}, {24, 0}}},
      {"layer 0: stored tokens' end 14 is not a multiple", 16, 0, {0, 8}, L{{14, 0}, {16, 0}}},
      {"holds no stored token of any layer", 16, 0, {0, 8}, L{{8, 0}, {8, 0}}},
      {"layer 0: next position is 9223372036854775807", 16, 0, {0, 8}, L{{INT64_MAX, 0}, {16, 0}}},
      {"holds 2049 bytes of contents, its counts say 2048", 16, 0, {0, 8}, L{{16, 0}, {16, 0}}, 1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    paged_kv_cache<quantized_format<8>> target(model, {P, 8}, quantized_format<8>(4, 3));
    try {
      std::istringstream in(write_record(c, P, 0, 0));
      io::load(target, in, "crafted.kvp");
      ADD_FAILURE() << "loaded";
    } catch (const io::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(c.what), std::string::npos) << e.what();
    }
    EXPECT_EQ(target.n_sequences(), 0);
    EXPECT_EQ(target.stats().free, 8);
  }
  // With a window of 12 and 2 sinks: the gap's page, the layers past it, the window.
  const std::vector<record_case> windowed = {
      {"page 1 is at position 0, expected 8", 8, 1, {0, 0}, L{{8, 0}, {8, 0}}},
      {"layer 0: stored tokens' end is 16, expected 24..32", 32, 1, {0, 24}, L{{16, 0}, {32, 0}}},
      {"which the window of position 28 would need", 32, 1, {0, 24}, L{{28, 0}, {32, 0}}},
  };
  for (const auto& c : windowed) {
    SCOPED_TRACE(c.what);
    paged_kv_cache<quantized_format<8>> target(model, {P, 8, 12, 2}, quantized_format<8>(4, 3));
    try {
      std::istringstream in(write_record(c, P, 12, 2));
      io::load(target, in, "crafted.kvp");
      ADD_FAILURE() << "loaded";
    } catch (const io::format_error& e) {
      EXPECT_NE(std::string(e.what()).find(c.what), std::string::npos) << e.what();
    }
    EXPECT_EQ(target.n_sequences(), 0);
  }
  // And a good one of each loads.
  paged_kv_cache<quantized_format<8>> target(model, {P, 8, 12, 2}, quantized_format<8>(4, 3));
  std::istringstream in(write_record({"", 40, 1, {0, 24, 32}, L{{41, 5}, {40, 4}}}, P, 12, 2));
  const Index id = io::load(target, in, "crafted.kvp");
  EXPECT_EQ(target.position(id, 0), 41);
  EXPECT_EQ(target.page_positions(id), (std::vector<Index>{0, 24, 32}));
}

// A layer one token behind the others during a forward pass, while the window gave back the page
// it stored last: it holds its sink page and its tail, nothing of the given-back page; and the
// sequence saves and loads in that state.
TEST(PagedWindowLag, ALaggingLayerHoldsItsSinkPageAndItsTail) {
  const quantized_format<8> format(4, 3);  // the tail holds up to 6 tokens
  paged_kv_cache<quantized_format<8>> paged(model, {4, 16, 7, 2}, format);
  const Index seq = paged.create();
  for (Index t = 0; t < 14; ++t) {
    for (Index l = 0; l < model.n_layers(); ++l) {
      paged.append(seq, l, rows(l, 1, 100 + unsigned(t)), rows(l, 1, 300 + unsigned(t)));
    }
  }
  const row_matrix<float> sink_keys = paged.keys(seq, 1).topRows(4);
  paged.append(seq, 0, rows(0, 1, 114), rows(0, 1, 314));  // gives back [4, 8), stores [8, 12)
  ASSERT_EQ(paged.page_positions(seq), (std::vector<Index>{0, 8}));
  const auto w = paged.view(seq, 1);
  EXPECT_EQ(w.size(), 10);
  EXPECT_EQ(positions_of(w), (std::vector<Index>{0, 1, 2, 3, 8, 9, 10, 11, 12, 13}));
  EXPECT_EQ(paged.keys(seq, 1).topRows(4), sink_keys);
  paged_kv_cache<quantized_format<8>> target(model, {4, 16, 7, 2}, format);
  const Index id = loaded(target, saved(paged, seq));
  expect_same_sequence(paged, seq, target, id, 1);
  for (Index t = 14; t < 20; ++t) {
    for (Index l = t == 14 ? 1 : 0; l < model.n_layers(); ++l) {
      paged.append(seq, l, rows(l, 1, 100 + unsigned(t)), rows(l, 1, 300 + unsigned(t)));
      target.append(id, l, rows(l, 1, 100 + unsigned(t)), rows(l, 1, 300 + unsigned(t)));
    }
    expect_same_sequence(paged, seq, target, id, 2 + unsigned(t));
  }
}

// A file may hold a sequence whose window gave back every page after its sink pages, its layers'
// stored tokens ending where the held ones start: it loads, reads its sink page and tails, and a
// crop and the next append go on after the gap.
TEST(PagedFileWindow, OnlySinkPagesLeft) {
  using L = std::vector<std::pair<Index, Index>>;
  paged_kv_cache<quantized_format<8>> target(model, {4, 8, 7, 2}, quantized_format<8>(4, 3));
  std::istringstream in(write_record({"", 12, 1, {0}, L{{18, 6}, {18, 6}}}, 4, 7, 2));
  const Index a = io::load(target, in, "crafted.kvp");
  EXPECT_EQ(positions_of(target.view(a, 0)),
            (std::vector<Index>{0, 1, 2, 3, 12, 13, 14, 15, 16, 17}));
  const Index b = target.fork(a);
  target.crop(a, 18);  // nothing to drop
  for (const Index seq : {a, b}) {
    for (Index l = 0; l < model.n_layers(); ++l) target.append(seq, l, rows(l, 1, 5), rows(l, 1, 6));
    EXPECT_EQ(target.page_positions(seq), (std::vector<Index>{0, 12}));
  }
  EXPECT_EQ(target.keys(a, 1), target.keys(b, 1));
}

}  // namespace
