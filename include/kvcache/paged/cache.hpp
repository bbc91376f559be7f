// SPDX-License-Identifier: Apache-2.0
// The paged KV cache: many sequences on one page pool, with copy-on-write forks, rollback,
// sliding windows over pages, prefix caching and batches for batched attention.
#pragma once

#include "kvcache/attention/prefill.hpp"
#include "kvcache/cache.hpp"
#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/layout/paged.hpp"
#include "kvcache/layout/plan.hpp"
#include "kvcache/paged/pool.hpp"
#include "kvcache/paged/prefix_hash.hpp"
#include "kvcache/paged/view.hpp"
#include "kvcache/rope.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

namespace kvcache {

/// Many sequences' KV caches on one pool of pages (vLLM's PagedAttention, Kwon et al., 2023):
/// each sequence is a block table, the ids of its pages oldest first, of which only the last
/// may be partly filled, so memory follows the tokens held, in steps of one page, whatever the
/// sequences' lengths. Every format works (plain f64/f32/f16/bf16, KIVI int8/int4, whose
/// newest tokens wait in a per-sequence full-precision tail until a group is complete), and
/// attention reads a sequence through view(seq, l) or many at once through batch().
///
/// - Forks share every page; the first write into a shared page copies it (copy-on-write), so
///   beam search and parallel sampling cost a page per branch, not a cache.
/// - Prefix caching (vLLM's automatic prefix caching): publish() names each full page by a
///   chained XXH3-128 hash of its tokens (paged/prefix_hash.hpp), under an extra key that
///   keeps models, adapters or tenants apart; create(tokens) adopts the longest run of cached
///   pages of a prompt, and the caller prefills only the rest. A published page that no
///   sequence holds stays cached until the pool needs it, least recently used first.
/// - With a window (paged_layout), a page that falls wholly out of the window and holds no
///   sink returns to the pool at the sequence's next append.
/// - Rollback (crop), context shift (shift) and saving and loading one sequence
///   (io/paged_file.hpp) work as they do for kv_cache, and never write into a page that another
///   sequence or the prefix index holds.
///
/// Running out of pages is an answer: an append or prefill that needs more pages than are
/// free or cached throws std::length_error before anything changes; free() or crop() a
/// sequence and retry. Every member that throws leaves the cache, its pool and its sequences
/// exactly as they were. Other errors: std::out_of_range for a sequence, layer or position
/// that does not exist, std::invalid_argument for shapes that do not fit.
///
/// Positions: as in kv_cache, each layer of a sequence counts the tokens appended to it, and
/// between the layers of one forward pass their counts differ.
///
/// Thread safety: const members may run concurrently; a non-const member needs the cache to
/// itself. A moved-from cache holds no sequence and no page.
template <class Format>
class paged_kv_cache {
 public:
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using view_type = paged_view<Format>;
  using batch_type = paged_batch<Format>;

  /// A pool of layout.n_pages pages of layout.page_size tokens, allocated now. Throws
  /// std::invalid_argument for a layout that does not fit the format (page_size must be a
  /// multiple of a quantized format's group; a window must be at least a page and at least a
  /// quantized format's residual + group), std::length_error when sizes overflow,
  /// std::bad_alloc when memory is short.
  paged_kv_cache(const cache_shape& shape, const paged_layout& layout, Format format = Format())
      : shape_(shape), layout_(layout.checked()),
        format_(format.with_values_in_keys(shape.values_in_keys())),
        pool_(shape, layout.page_size, layout.n_pages, format_) {
    unit_ = format_.unit_tokens();
    uses_tail_ = unit_ > 1 || format_.residual() > 0;
    tail_cap_ = uses_tail_ ? detail::checked_add(format_.residual(), unit_, "residual") : 0;
    // A window holds at least the page being filled and the full-precision tail, so the page a
    // sequence writes next is never given back.
    if (layout.window > 0 && layout.window < std::max(layout.page_size, tail_cap_)) {
      detail::fail<std::invalid_argument>("paged_kv_cache: window = ", layout.window,
                                          " must be at least page_size = ", layout.page_size,
                                          " and residual + group = ", tail_cap_);
    }
    detail::checked_product({tail_cap_, shape.kv_width(), 2 * Index(sizeof(compute_type)),
                             shape.n_layers()}, "paged_kv_cache: residual");
  }

  paged_kv_cache(const paged_kv_cache&) = delete;
  paged_kv_cache& operator=(const paged_kv_cache&) = delete;
  paged_kv_cache(paged_kv_cache&&) noexcept = default;
  paged_kv_cache& operator=(paged_kv_cache&&) noexcept = default;

  const cache_shape& shape() const noexcept { return shape_; }
  Index n_layers() const noexcept { return shape_.n_layers(); }
  const paged_layout& layout() const noexcept { return layout_; }
  const Format& format() const noexcept { return format_; }
  Index page_size() const noexcept { return layout_.page_size; }
  const page_pool<Format>& pool() const noexcept { return pool_; }
  pool_stats stats() const noexcept { return pool_.stats(); }

  // ---- sequences --------------------------------------------------------------------------

  /// A new, empty sequence; returns its id. Ids of freed sequences are reused. Needs no page.
  Index create() {
    const Index id = new_id();
    sequence& s = seq_ref(id);
    try {
      init(s);
    } catch (...) {
      drop_id(id);
      throw;
    }
    return id;
  }

  /// A new sequence for a prompt of `n` tokens that adopts the longest run of cached full
  /// pages holding the prompt's first tokens under `extra_key` (at most n - 1 tokens, so that
  /// at least the last token is left to compute the next token's logits from). Its layers then
  /// hold prefix_hit(id) tokens at positions 0.. and the caller prefills the rest. The adopted
  /// pages are shared, not copied. Cost: one hash per page of the prompt, a few ns per token.
  /// Throws std::invalid_argument for n < 0 or a null `tokens` with n > 0.
  Index create(const std::int32_t* tokens, Index n, std::string_view extra_key = {}) {
    check_tokens("create", tokens, n);
    std::vector<Index> hit;
    std::vector<page_hash> hashes;
    const page_hash root = prefix_root(extra_key);
    match(tokens, n > 0 ? n - 1 : 0, root, &hit, &hashes);
    const Index id = new_id();
    sequence& s = seq_ref(id);
    try {
      init(s);
      s.pages.reserve(hit.size());
      s.first.reserve(hit.size());
    } catch (...) {
      drop_id(id);
      throw;
    }
    const Index P = page_size();
    for (std::size_t i = 0; i < hit.size(); ++i) {
      pool_.retain(hit[i]);
      s.pages.push_back(hit[i]);
      s.first.push_back(Index(i) * P);
    }
    const Index cached = Index(hit.size()) * P;
    s.table_end = cached;
    s.hashes = std::move(hashes);
    s.root = root;
    s.rooted = true;
    s.prefix_hit = cached;
    for (auto& L : s.layers) L.next = cached;
    return id;
  }

  /// A new sequence sharing every page of `seq` and a copy of its tail: the same tokens at the
  /// same positions (beam search, parallel sampling). Needs no page; the first write of either
  /// into a shared page copies it. Throws std::out_of_range for a sequence that does not exist.
  Index fork(Index seq) {
    seq_at(seq, "fork");
    const Index id = new_id();
    try {
      sequence copy = copy_of(seq_ref(seq));
      seq_ref(id) = std::move(copy);
    } catch (...) {
      drop_id(id);
      throw;
    }
    for (const Index p : seq_ref(id).pages) pool_.retain(p);
    return id;
  }

  /// Ends a sequence: its pages lose a reference (free, or cached when published) and its id
  /// may be reused. Throws std::out_of_range for a sequence that does not exist.
  void free(Index seq) {
    sequence& s = seq_at(seq, "free");
    // Newest first, so that the pages come back oldest first, in order, to the next sequence.
    for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) pool_.release(*it);
    s = sequence{};
    free_ids_.push_back(seq);  // capacity reserved in new_id
  }

  /// Whether `seq` is a live sequence.
  bool contains(Index seq) const noexcept {
    return seq >= 0 && seq < Index(seqs_.size()) && seqs_[static_cast<std::size_t>(seq)].live;
  }
  /// Live sequences.
  Index n_sequences() const noexcept { return Index(seqs_.size() - free_ids_.size()); }

  /// The next token's position in layer l of `seq`: the tokens appended to it.
  Index position(Index seq, Index l) const { return layer_at(seq_at(seq, "position"), l, "position").next; }
  /// The smallest position over the layers of `seq`.
  Index position(Index seq) const {
    const sequence& s = seq_at(seq, "position");
    Index p = s.layers.empty() ? 0 : s.layers.front().next;
    for (const auto& L : s.layers) p = std::min(p, L.next);
    return p;
  }
  /// Tokens layer l of `seq` holds for attention (fewer than its position once a window
  /// dropped pages).
  Index size(Index seq, Index l) const { return view(seq, l).size(); }
  /// Tokens of `seq` that came from the prefix cache when it was created.
  Index prefix_hit(Index seq) const { return seq_at(seq, "prefix_hit").prefix_hit; }
  /// The block table of `seq`: its page ids, oldest first.
  const std::vector<Index>& block_table(Index seq) const { return seq_at(seq, "block_table").pages; }
  /// The position of the first token of each page of block_table(seq).
  const std::vector<Index>& page_positions(Index seq) const {
    return seq_at(seq, "page_positions").first;
  }

  // ---- appending --------------------------------------------------------------------------

  /// Pages an append of `n` more tokens to every layer of `seq` would take from the pool: new
  /// pages, plus one when its last page is shared and must be copied first. Not counting the
  /// pages a window would give back. Throws std::out_of_range for a bad sequence.
  Index pages_needed(Index seq, Index n) const {
    const sequence& s = seq_at(seq, "pages_needed");
    if (n < 0) detail::fail<std::invalid_argument>("pages_needed: n = ", n, " must be >= 0");
    for (const auto& L : s.layers) detail::checked_add(L.next, n, "pages_needed");
    return step_need(s, nullptr, n).first;
  }

  /// Appends `k.rows()` tokens to layer `l` of `seq` at positions position(seq, l).. . `k` and
  /// `v` are `(tokens x n_kv_heads*head_dim)`, heads side by side, of any scalar type
  /// convertible to the compute type. Takes pages from the pool as the layer crosses into
  /// them (the first layer of a forward pass takes them for all layers), copies a shared last
  /// page before writing into it, and with a window first returns the pages no query from
  /// this position on can see. O(tokens) amortized. Throws std::out_of_range for a bad
  /// sequence or layer, std::invalid_argument for a wrong shape, std::length_error when the
  /// pool has too few free or cached pages or positions overflow; nothing changes then.
  template <class DerivedK, class DerivedV>
  void append(Index seq, Index l, const Eigen::MatrixBase<DerivedK>& k,
              const Eigen::MatrixBase<DerivedV>& v) {
    append_rows(seq, l, k, v, false);
  }

  /// Appends `kv.rows()` tokens to a cache whose shape has its values in its keys
  /// (cache_shape::with_values_in_keys; MLA's latent): `kv` is `tokens x n_kv_heads*head_dim`,
  /// each row the key whose first value_dim columns are also the value, stored once. Throws as
  /// append(seq, l, k, v) does, and std::invalid_argument on a cache that stores values apart.
  template <class Derived>
  void append(Index seq, Index l, const Eigen::MatrixBase<Derived>& kv) {
    append_rows(seq, l, kv, kv, true);
  }

  /// Prefill of a chunk of `n` tokens onto layer `l` of `seq`, which may hold tokens already
  /// (chunked prefill; a prompt after a prefix hit): appends `k` and `v` and writes to `out`
  /// (`n x n_heads*head_dim`) the attention of each row of `q` over what the sequence holds
  /// for it, as decode steps at those positions would see it (a quantized format's chunk is
  /// cut where its tail would store a group). Pages are claimed for the whole chunk first.
  /// Throws as append does, and std::invalid_argument for a q or out that does not fit.
  template <class DerivedK, class DerivedV>
  void prefill(const attention_shape& heads, const Eigen::Ref<const row_matrix<compute_type>>& q,
               const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
               Index seq, Index l, Eigen::Ref<row_matrix<compute_type>> out,
               attention_workspace<compute_type>& ws, const attention_options& opt = {}) {
    prefill_rows(heads, q, k, v, seq, l, out, ws, opt, false);
  }

  /// Prefill onto a cache whose values are in its keys: `kv` is appended as append(seq, l, kv)
  /// appends it; otherwise as prefill(heads, q, k, v, ...).
  template <class Derived>
  void prefill(const attention_shape& heads, const Eigen::Ref<const row_matrix<compute_type>>& q,
               const Eigen::MatrixBase<Derived>& kv, Index seq, Index l,
               Eigen::Ref<row_matrix<compute_type>> out, attention_workspace<compute_type>& ws,
               const attention_options& opt = {}) {
    prefill_rows(heads, q, kv, kv, seq, l, out, ws, opt, true);
  }

 private:
  template <class DerivedK, class DerivedV>
  void append_rows(Index seq, Index l, const Eigen::MatrixBase<DerivedK>& k,
                   const Eigen::MatrixBase<DerivedV>& v, bool keys_alone) {
    sequence& s = seq_at(seq, "append");
    layer_state& L = layer_at(s, l, "append");
    detail::check_kv_input("append", shape_, k, v, keys_alone);
    const Index n = k.rows();
    if (n == 0) return;
    const append_plan plan = claim(seq, s, L, n, "append");
    apply(s, plan);
    write(s, L, k, v);
  }

  template <class DerivedK, class DerivedV>
  void prefill_rows(const attention_shape& heads,
                    const Eigen::Ref<const row_matrix<compute_type>>& q,
                    const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                    Index seq, Index l, Eigen::Ref<row_matrix<compute_type>> out,
                    attention_workspace<compute_type>& ws, const attention_options& opt,
                    bool keys_alone) {
    sequence& s = seq_at(seq, "prefill_attention");
    layer_state& L = layer_at(s, l, "prefill_attention");
    detail::check_view("prefill_attention", heads, view_of(s, L));
    detail::check_prefill_input(heads, shape_, q, k, v, out, opt, keys_alone);
    const Index n = q.rows();
    if (n == 0) return;
    {  // a workspace another call holds is refused before anything changes
      const typename attention_workspace<compute_type>::guard free_now(ws, "prefill_attention");
    }
    const append_plan plan = claim(seq, s, L, n, "prefill_attention");
    const bool convert = !std::is_same_v<scalar_type, compute_type>;
    const Index seen = detail::checked_add(view_of(s, L).size(), n);
    prepare_causal(ws, heads, n, seen, convert, opt);
    apply(s, plan);
    for (Index i = 0; i < n;) {
      Index piece = n - i;
      if (uses_tail_) piece = std::min(piece, std::max<Index>(1, tail_cap_ - 1 - L.tail_n));
      write(s, L, k.middleRows(i, piece), v.middleRows(i, piece));
      causal_attention(heads, q.middleRows(i, piece), view_of(s, L), L.next - piece,
                       out.middleRows(i, piece), ws, opt);
      i += piece;
    }
  }

 public:
  // ---- rollback ---------------------------------------------------------------------------

  /// Keeps the first `n` tokens of every layer of `seq` (rollback of rejected speculative
  /// tokens, or of a turn), returning the pages past them. Exact or refused: throws
  /// std::out_of_range when n is negative or beyond position(seq), when a quantized format
  /// would have to cut a stored group (n must then be a multiple of the group, or not below
  /// the stored tokens), or when a window already gave back tokens the new newest position
  /// would see; nothing changes then.
  void crop(Index seq, Index n) {
    sequence& s = seq_at(seq, "crop");
    check_crop(seq, s, n);
    const Index sinks_held = sink_pages(s), window_from = held_from(s);
    const Index sink_end =
        sinks_held > 0 ? s.first[static_cast<std::size_t>(sinks_held - 1)] + page_size() : 0;
    Index stored_end = 0;
    for (auto& L : s.layers) {
      const Index E = L.next - L.tail_n;
      if (n >= E) {
        L.tail_n = n - E;
      } else {
        L.tail_n = 0;
      }
      L.next = n;
      stored_end = std::max(stored_end, L.next - L.tail_n);
    }
    while (!s.pages.empty() && s.first.back() >= stored_end) {
      pool_.release(s.pages.back());
      s.pages.pop_back();
      s.first.pop_back();
    }
    // The next page starts where the kept tokens' last page ends; after a window's gap when
    // every page after it went; at the page holding the stored end when none is left.
    if (s.gap && stored_end <= sink_end) {
      // Cut back into the sink pages: every token left is held, the gap is gone.
      s.gap = false;
      s.table_end = s.pages.empty() ? 0 : s.first.back() + page_size();
    } else if (s.gap && Index(s.pages.size()) <= sinks_held) {
      s.table_end = window_from;
    } else {
      s.table_end = s.pages.empty() ? stored_end / page_size() * page_size()
                                    : s.first.back() + page_size();
    }
    const Index whole = s.pages.empty() ? 0 : stored_end / page_size();
    if (Index(s.hashes.size()) > whole) s.hashes.resize(static_cast<std::size_t>(whole));
  }
  /// Drops the newest `k` tokens of every layer of `seq`: crop(seq, position(seq) - k).
  void rollback(Index seq, Index k) {
    const Index p = position(seq);
    if (k < 0 || k > p) {
      detail::fail<std::out_of_range>("rollback: k = ", k, " must be in [0, ", p, "]");
    }
    crop(seq, p - k);
  }

  // ---- context shift ----------------------------------------------------------------------

  /// Context shift of `seq` (llama.cpp's seq_rm + seq_add; StreamingLLM's re-rotation), as
  /// kv_cache::shift does it: drops the tokens at positions [first, last) of every layer and
  /// moves every later token `last - first` positions back, re-rotating its key by
  /// -(last - first) with `rope`, so generation continues as if the dropped tokens had never
  /// been there. Sinks stay: first must not be below layout().sinks. Tokens before `first` keep
  /// their stored form; a quantized format re-quantizes from the group holding `first` on, so
  /// the sequence ends up holding what kv_cache::shift leaves of the same tokens.
  ///
  /// Pages: the tokens from that group on are read back and appended again. A page is written
  /// in place only when this sequence alone holds it and it is not published; a page shared
  /// with a fork or in the prefix index is copied first when it holds tokens that stay
  /// (copy-on-write), or else left to its other holders and replaced, so other sequences and
  /// the prefix index see no change. Pages no longer needed return to the pool. The sequence
  /// forgets the hashes of its pages from the one holding `first` on (they no longer hold the
  /// same prefix): publish() its new token ids to share them again.
  ///
  /// Cost: reads and rewrites the tokens from `first` on in every layer, with scratch for them
  /// allocated once. Throws std::out_of_range for a sequence that does not exist, unless
  /// sinks <= first <= last <= position(seq, l) for every layer, or when a window already gave
  /// back tokens that the shift would move or that the window of the newest position left would
  /// see (the rebuilt tokens must start within the sink pages, closing the gap, or after it);
  /// std::invalid_argument when rope.head_dim() differs from the cache's (kv_cache::shift says
  /// how values in the keys are rotated); std::length_error
  /// when the pool has too few free or cached pages for the pages to copy and the new ones
  /// (after those the shift gives back that no other sequence holds); nothing changes then.
  void shift(Index seq, Index first, Index last, const rope& rope) {
    sequence& s = seq_at(seq, "shift");
    detail::check_shift_rope(shape_, rope);
    for (Index l = 0; l < n_layers(); ++l) {
      const layer_state& L = s.layers[static_cast<std::size_t>(l)];
      if (first < layout_.sinks || first > last || last > L.next) {
        detail::fail<std::out_of_range>("shift: positions [", first, ", ", last,
                                        ") must lie within [", layout_.sinks, ", ", L.next,
                                        "] of layer ", l, " of sequence ", seq, " (sinks stay)");
      }
    }
    const shift_plan plan = plan_shift(seq, s, first, last);
    // Every token that stays, read back (the moved keys re-rotated) before anything changes.
    const Index delta = last - first, width = shape_.kv_width();
    std::vector<row_matrix<compute_type>> keys(s.layers.size()), values(s.layers.size());
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      const layer_state& L = s.layers[l];
      const Index from = plan.from[l], before = first - from, after = L.next - last;
      keys[l].resize(before + after, width);
      values[l].resize(before + after, width);
      read_tokens(s, L, from, first, keys[l], values[l], 0);
      read_tokens(s, L, last, L.next, keys[l], values[l], before);
      if (after > 0) detail::rotate_keys(shape_, rope, keys[l].bottomRows(after), -delta);
    }
    s.pages.reserve(static_cast<std::size_t>(plan.keep + plan.new_pages));
    s.first.reserve(static_cast<std::size_t>(plan.keep + plan.new_pages));
    // From here on nothing throws: the pool has the pages, the vectors the room.
    // Pages after the kept ones go back newest first, so that they return in order.
    std::size_t r = plan.reuse.size();
    for (Index j = Index(s.pages.size()) - 1; j >= plan.keep; --j) {
      if (r > 0 && plan.reuse[r - 1] == j) {
        --r;
      } else {
        pool_.release(s.pages[static_cast<std::size_t>(j)]);
      }
    }
    for (const Index j : plan.copies) {
      auto& slot = s.pages[static_cast<std::size_t>(j)];
      const Index fresh = pool_.allocate(j > 0 ? s.pages[static_cast<std::size_t>(j - 1)] + 1 : -1);
      pool_.copy_page(fresh, slot);
      pool_.release(slot);
      slot = fresh;
    }
    // The reused pages, in their order, then new ones, each asked for after the one before.
    for (std::size_t i = 0; i < plan.reuse.size(); ++i) {
      s.pages[static_cast<std::size_t>(plan.keep) + i] = s.pages[static_cast<std::size_t>(plan.reuse[i])];
    }
    s.pages.resize(static_cast<std::size_t>(plan.keep) + plan.reuse.size());
    s.first.resize(static_cast<std::size_t>(plan.keep));
    for (Index i = Index(plan.reuse.size()); i < plan.new_pages; ++i) {
      s.pages.push_back(pool_.allocate(s.pages.empty() ? -1 : s.pages.back() + 1));
    }
    for (Index i = 0; i < plan.new_pages; ++i) s.first.push_back(plan.start + i * page_size());
    s.table_end = plan.start + plan.new_pages * page_size();
    if (plan.closes_gap) s.gap = false;
    const Index whole = first / page_size();
    if (Index(s.hashes.size()) > whole) s.hashes.resize(static_cast<std::size_t>(whole));
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      layer_state& L = s.layers[l];
      L.next = plan.from[l];
      L.tail_n = 0;
      write(s, L, keys[l], values[l]);
    }
  }

  // ---- prefix caching ---------------------------------------------------------------------

  /// Tokens of the prompt `tokens[0..n)` held in cached full pages under `extra_key`: the
  /// longest run from the start, a multiple of page_size. Every hit is checked against the
  /// page's stored tokens and parent hash. Changes nothing. Throws std::invalid_argument for
  /// n < 0 or null tokens.
  Index match_prefix(const std::int32_t* tokens, Index n, std::string_view extra_key = {}) const {
    check_tokens("match_prefix", tokens, n);
    return match(tokens, n, prefix_root(extra_key), nullptr, nullptr) * page_size();
  }

  /// Publishes the full pages of `seq` that hold `tokens[0..n)` (the ids of its tokens from
  /// position 0; the pages of a window's gap and after it are not published) under
  /// `extra_key`, so that later sequences find them. Pages published before are skipped;
  /// a page whose hash another page holds already stays private. Returns the pages newly
  /// published. Cost: one hash per new full page. Throws std::out_of_range for a bad sequence,
  /// std::invalid_argument for n < 0 or null tokens.
  Index publish(Index seq, const std::int32_t* tokens, Index n, std::string_view extra_key = {}) {
    sequence& s = seq_at(seq, "publish");
    check_tokens("publish", tokens, n);
    const page_hash root = prefix_root(extra_key);
    if (!s.rooted || s.root != root) {
      s.hashes.clear();
      s.root = root;
      s.rooted = true;
    }
    const Index P = page_size();
    Index stored = n;
    for (const auto& L : s.layers) stored = std::min(stored, L.next - L.tail_n);
    Index full = stored / P;
    for (Index i = 0; i < std::min(full, Index(s.pages.size())); ++i) {
      if (s.first[static_cast<std::size_t>(i)] != i * P) full = i;  // a window's gap
    }
    full = std::min(full, Index(s.pages.size()));
    s.hashes.reserve(static_cast<std::size_t>(std::max<Index>(full, 0)));
    Index published = 0;
    for (Index i = Index(s.hashes.size()); i < full; ++i) {
      const page_hash parent = i == 0 ? root : s.hashes[static_cast<std::size_t>(i - 1)];
      const page_hash h = chain_hash(parent, tokens + i * P, P);
      if (pool_.publish(s.pages[static_cast<std::size_t>(i)], h, parent, tokens + i * P)) {
        ++published;
      }
      s.hashes.push_back(h);
    }
    return published;
  }

  /// The hashes of the first pages of `seq` as create() or publish() chained them under their
  /// extra key, oldest first (fewer than its pages when some are not full or not published).
  /// Throws std::out_of_range for a sequence that does not exist.
  const std::vector<page_hash>& page_hashes(Index seq) const {
    return seq_at(seq, "page_hashes").hashes;
  }

  // ---- pages leaving and entering the pool (offloading tiers) -----------------------------

  /// Calls `handler(page)` before a cached page is evicted for a new allocation, while it still
  /// holds its contents and its hash, parent and tokens (pool().hash_of(page) ...): see
  /// page_pool::set_eviction_handler. Read the page with for_each_page_span. The handler must
  /// not change this cache; a move of the cache does not take it along (the cache moved to has
  /// none). What it throws is dropped and the page evicted all the same: the
  /// cache allocates pages inside steps it cannot undo (an append's, a shift's). An empty
  /// function removes the handler. Throws std::bad_alloc (the handler unchanged then).
  void set_eviction_handler(std::function<void(Index)> handler) {
    if (!handler) {
      pool_.set_eviction_handler(nullptr);
      return;
    }
    pool_.set_eviction_handler([h = std::move(handler)](Index page) noexcept {
      try {
        h(page);
      } catch (...) {  // the page goes either way; only the handler's work is lost
      }
    });
  }

  /// Whether an eviction handler is set (a tiered_prefix_cache over this cache sets one).
  bool has_eviction_handler() const noexcept { return pool_.has_eviction_handler(); }

  /// Calls f(const void* data, std::size_t bytes) over the stored contents of page `page` in
  /// layer l: its page_size / unit tokens units, each array of the format in its order, kv
  /// heads inner (as for_each_span visits one page). Throws std::out_of_range for a page or
  /// layer that does not exist.
  template <class F>
  void for_each_page_span(Index page, Index l, F&& f) const {
    check_pool_page("for_each_page_span", page, l);
    const Index upp = pool_.units_per_page();
    detail::for_each_unit_span<Format>(pool_.storage(l), page * upp, upp, f);
  }

  /// Bytes for_each_page_span visits over every layer of one page: pool().page_bytes().
  Index page_bytes() const noexcept { return pool_.page_bytes(); }

  /// Brings a page back into the prefix cache (a page restored from an offloading tier):
  /// takes a free page (or evicts the least recently used cached one), lets
  /// `fill(Index layer, void* data, std::size_t bytes)` write its contents in
  /// for_each_page_span's order, layer by layer, and publishes it under `hash`, holding
  /// `tokens[0..page_size)` after the prefix that hashed to `parent`, as a cached page that no
  /// sequence holds yet: the next create() of a prompt with that prefix adopts it. Returns the
  /// page, or -1 when a page is published under `hash` already or no page is free or cached;
  /// nothing changes then. The caller vouches for the contents (check them before: a restored
  /// page is used as it is). Throws std::invalid_argument when hash is not chain_hash(parent,
  /// tokens, page_size) or tokens is null; when `fill` throws, the page goes back to the free
  /// list and the exception propagates.
  template <class F>
  Index import_page(const page_hash& hash, const page_hash& parent, const std::int32_t* tokens,
                    F&& fill) {
    if (tokens == nullptr) {
      detail::fail<std::invalid_argument>("import_page: tokens is null");
    }
    if (chain_hash(parent, tokens, page_size()) != hash) {
      detail::fail<std::invalid_argument>("import_page: the hash is not the chained hash of the ",
                                          "parent and the page's tokens");
    }
    if (pool_.find(hash, parent, tokens) >= 0 || pool_.available() == 0) return -1;
    const Index p = pool_.allocate();
    try {
      const Index upp = pool_.units_per_page();
      for (Index l = 0; l < n_layers(); ++l) {
        const auto to = [&](void* data, std::size_t bytes) { fill(l, data, bytes); };
        detail::for_each_unit_span<Format>(pool_.storage(l), p * upp, upp, to);
      }
      if (!pool_.publish(p, hash, parent, tokens)) {
        pool_.release(p);
        return -1;
      }
    } catch (...) {
      pool_.release(p);
      throw;
    }
    pool_.release(p);  // published: onto the LRU list of cached pages
    return p;
  }

  // ---- reading ----------------------------------------------------------------------------

  /// Layer l of `seq` as attention reads it. O(1). Throws std::out_of_range for a bad sequence
  /// or layer.
  view_type view(Index seq, Index l) const {
    const sequence& s = seq_at(seq, "view");
    return view_of(s, layer_at(s, l, "view"));
  }

  /// Fills `out` with layer l of the sequences `seqs` (in that order) as one CSR batch, for
  /// batch_attention. Reuses out's memory. Throws std::out_of_range for a bad sequence or
  /// layer (out is then empty).
  void batch(const std::vector<Index>& seqs, Index l, batch_type& out) const {
    out.clear();
    out.format = format_;
    out.page_size = page_size();
    out.unit = unit_;
    out.kv_heads = shape_.n_kv_heads();
    out.dim = shape_.head_dim();
    out.vdim = shape_.value_dim();
    out.shared_values = keys_only();
    out.mask = layout_.mask();
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>("batch: layer ", l, " out of range [0, ", n_layers(), ")");
    }
    out.storage = &pool_.storage(l);
    for (const Index seq : seqs) {
      if (!contains(seq)) {
        out.clear();
        detail::fail<std::out_of_range>("batch: sequence ", seq, " does not exist");
      }
      const sequence& s = seq_ref(seq);
      const view_type v = view_of(s, s.layers[static_cast<std::size_t>(l)]);
      for (Index i = 0; i < v.n_pages; ++i) {
        out.indices.push_back(v.pages[i]);
        out.page_positions.push_back(v.page_positions[i]);
      }
      out.indptr.push_back(Index(out.indices.size()));
      out.last_page_len.push_back(v.last_page_units * unit_);
      out.end_positions.push_back(v.end);
      out.tail_keys.push_back(v.tail_keys);
      out.tail_values.push_back(v.tail_values);
      out.tail_tokens.push_back(v.tail_tokens);
    }
  }

  /// Every key layer l of `seq` holds, oldest first, as attention reads it (quantized ones
  /// dequantized): `size(seq, l) x n_kv_heads*head_dim`. For tests; allocates.
  row_matrix<compute_type> keys(Index seq, Index l) const { return held_rows(seq, l, true); }
  /// Every value layer l of `seq` holds, as keys().
  row_matrix<compute_type> values(Index seq, Index l) const { return held_rows(seq, l, false); }

  // ---- accounting -------------------------------------------------------------------------

  /// Bytes of the pages in use (each page once, however many sequences share it) plus the
  /// sequences' full-precision tails.
  Index bytes() const noexcept {
    Index tails = 0;
    for (const auto& s : seqs_) {
      for (const auto& L : s.layers) tails += L.tail_n;
    }
    return pool_.stats().used_bytes + tails * tail_token_bytes();
  }
  /// Bytes of the pages `seq` holds, shared ones included, plus its tail: what it would cost
  /// alone.
  Index bytes(Index seq) const {
    const sequence& s = seq_at(seq, "bytes");
    Index tails = 0;
    for (const auto& L : s.layers) tails += L.tail_n;
    return Index(s.pages.size()) * pool_.page_bytes() + tails * tail_token_bytes();
  }

  // ---- saving and loading (io/paged_file.hpp) --------------------------------------------

  /// The counts of one layer of a saved sequence.
  struct layer_record {
    Index next = 0;         // position of the next token
    Index tail_tokens = 0;  // of the tokens, the newest held in the full-precision tail
  };
  /// What places a sequence's tokens, for saving and loading: the position of each page of its
  /// block table (the page ids are the pool's, not saved), where the table ends, whether a
  /// window gave pages back, and each layer's counts. Layer l stores its tokens before
  /// next - tail_tokens in the pages, each page from its position on, in whole units.
  struct sequence_record {
    std::vector<Index> page_positions;
    Index table_end = 0;
    bool gap = false;
    std::vector<layer_record> layers;  // [n_layers]
  };

  /// The record of `seq`. Throws std::out_of_range for a sequence that does not exist.
  sequence_record record(Index seq) const {
    const sequence& s = seq_at(seq, "record");
    sequence_record r;
    r.page_positions = s.first;
    r.table_end = s.table_end;
    r.gap = s.gap;
    r.layers.reserve(s.layers.size());
    for (const auto& L : s.layers) r.layers.push_back({L.next, L.tail_n});
    return r;
  }

  /// Calls f(const void* data, std::size_t bytes) over the contents of layer l of `seq` in a
  /// fixed order: the units it stores in each page of the block table, oldest page first (each
  /// run as Format::for_each_array orders its arrays; none in a page ahead of the layer), then
  /// the tail's keys, then its values (quantized formats). Throws std::out_of_range for a bad
  /// sequence or layer.
  template <class F>
  void for_each_span(Index seq, Index l, F&& f) const {
    const sequence& s = seq_at(seq, "for_each_span");
    const layer_state& L = layer_at(s, l, "for_each_span");
    const Index E = L.next - L.tail_n, upp = pool_.units_per_page();
    for (std::size_t i = 0; i < s.pages.size(); ++i) {
      detail::for_each_unit_span<Format>(pool_.storage(l), s.pages[i] * upp,
                                         units_in_page(s.first[i], E), f);
    }
    if (uses_tail_) {
      const auto bytes = static_cast<std::size_t>(L.tail_n * shape_.kv_width()) * sizeof(compute_type);
      f(static_cast<const void*>(L.tail_k.data()), bytes);
      if (!keys_only()) f(static_cast<const void*>(L.tail_v.data()), bytes);
    }
  }

  /// Bytes for_each_span visits for layer l of a sequence of record `r` (checked with
  /// check_record). Throws std::length_error when the counts overflow.
  Index span_bytes(const sequence_record& r, Index l) const {
    const layer_record& L = r.layers.at(static_cast<std::size_t>(l));
    const Index E = L.next - L.tail_tokens;
    Index units = 0;
    for (const Index pos : r.page_positions) units = detail::checked_add(units, units_in_page(pos, E), "units");
    const Index unit_bytes = format_.unit_bytes(shape_.n_kv_heads(), shape_.head_dim());
    return detail::checked_add(detail::checked_mul(units, unit_bytes, "stored bytes"),
                               detail::checked_mul(L.tail_tokens, tail_token_bytes(), "tail bytes"),
                               "layer bytes");
  }

  /// Refuses (std::invalid_argument naming what is wrong) a record that no sequence of this
  /// cache can have: a layer count other than n_layers(); page positions that are not
  /// multiples of page_size, or not the sink pages from 0 then one run of consecutive pages
  /// (from 0 too unless a window gave pages back); a table end other than one past the last
  /// page (or past the gap, when a window gave back every page after the sink pages); a layer
  /// whose tokens outrun the table, whose stored tokens do not end on a unit or
  /// end in the window's gap, whose tail holds more than the format keeps; a last page that no
  /// layer stores into; a window that would need given-back tokens.
  void check_record(const sequence_record& r) const {
    const Index P = page_size(), n = Index(r.page_positions.size());
    const auto bad = [](const char* what, Index value, Index lo, Index hi) {
      if (value < lo || value > hi) {
        detail::fail<std::invalid_argument>(what, " is ", value, ", expected ", lo, "..", hi);
      }
    };
    if (Index(r.layers.size()) != n_layers()) {
      detail::fail<std::invalid_argument>("the record has ", r.layers.size(), " layers, the cache ",
                                          n_layers());
    }
    if (r.gap && layout_.window == 0) {
      detail::fail<std::invalid_argument>("pages were given back to a window, but the cache has none");
    }
    bad("table end", r.table_end, 0, no_limit / 2);
    if (r.table_end % P != 0) {
      detail::fail<std::invalid_argument>("table end ", r.table_end, " is not a multiple of the page size ", P);
    }
    Index d = 0;  // sink pages
    while (d < n && r.page_positions[static_cast<std::size_t>(d)] < layout_.sinks) ++d;
    for (Index i = 0; i < n; ++i) {
      const Index pos = r.page_positions[static_cast<std::size_t>(i)];
      const Index want = i == 0 ? 0 : r.page_positions[static_cast<std::size_t>(i - 1)] + P;
      if (i == d && r.gap) {
        if (pos < want || pos % P != 0) {
          detail::fail<std::invalid_argument>("page ", i, " after the window's gap is at position ",
                                              pos, ", expected a multiple of ", P, " from ", want,
                                              " on");
        }
      } else if (pos != want) {
        detail::fail<std::invalid_argument>("page ", i, " is at position ", pos, ", expected ", want);
      }
      if (pos >= r.table_end) {
        detail::fail<std::invalid_argument>("page ", i, " is at position ", pos,
                                            ", not before the table end ", r.table_end);
      }
    }
    // The table ends after its last page, or after the gap when a window gave back every
    // page after the sink pages.
    if (n > 0 && r.table_end != r.page_positions.back() + P &&
        !(r.gap && n == d && r.table_end > r.page_positions.back() + P)) {
      detail::fail<std::invalid_argument>("table end is ", r.table_end, ", expected ",
                                          r.page_positions.back() + P, " after the last page");
    }
    if (n == 0 && !r.gap && r.table_end != 0) {
      detail::fail<std::invalid_argument>("table end is ", r.table_end, " without pages, expected 0");
    }
    const Index held = d < n ? r.page_positions[static_cast<std::size_t>(d)] : r.table_end;
    Index stored_max = 0, lowest_next = no_limit;
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const layer_record& L = r.layers[l];
      try {
        bad("tail tokens", L.tail_tokens, 0, uses_tail_ ? tail_cap_ - 1 : 0);
        bad("next position", L.next, L.tail_tokens, no_limit / 2);
        const Index E = L.next - L.tail_tokens;
        bad("stored tokens' end", E, r.gap ? held : 0, r.table_end);
        if (E % unit_ != 0) {
          detail::fail<std::invalid_argument>("stored tokens' end ", E, " is not a multiple of the ",
                                              unit_, "-token unit");
        }
        stored_max = std::max(stored_max, E);
        lowest_next = std::min(lowest_next, L.next);
      } catch (const std::invalid_argument& e) {
        detail::fail<std::invalid_argument>("layer ", l, ": ", e.what());
      }
    }
    if (n > 0 && r.page_positions.back() >= stored_max) {
      detail::fail<std::invalid_argument>("the last page, at position ", r.page_positions.back(),
                                          ", holds no stored token of any layer (they end by ",
                                          stored_max, ")");
    }
    if (r.gap && lowest_next - layout_.window + 1 < held) {
      detail::fail<std::invalid_argument>("the window gave back the tokens before position ", held,
                                          ", which the window of position ", lowest_next,
                                          " would need");
    }
  }

  /// A new sequence of record `r` (checked with check_record first), whose contents
  /// `fill(Index layer, void* data, std::size_t bytes)` writes in for_each_span's order, layer
  /// by layer; returns its id. Takes its pages from the pool: throws std::length_error, before
  /// anything changes, when the pool has fewer free or cached pages than the record has. The
  /// new sequence has no prefix hashes (publish() it to share its pages). When `fill` throws,
  /// the sequence is freed again, though cached pages it evicted stay evicted: io::load checks
  /// every byte before it calls restore for that reason.
  template <class F>
  Index restore(const sequence_record& r, F&& fill) {
    check_record(r);
    const Index n = Index(r.page_positions.size());
    if (n > pool_.available()) {
      detail::fail<std::length_error>("load: the sequence needs ", n, " page", n == 1 ? "" : "s",
                                      " but the pool has ", pool_.available(),
                                      " free or cached of ", pool_.n_pages(),
                                      "; free or preempt a sequence");
    }
    const Index id = new_id();
    try {
      sequence& s = seq_ref(id);
      init(s);
      s.pages.reserve(static_cast<std::size_t>(n));
      s.first = r.page_positions;
    } catch (...) {
      drop_id(id);
      throw;
    }
    sequence& s = seq_ref(id);
    for (Index i = 0; i < n; ++i) {
      s.pages.push_back(pool_.allocate(s.pages.empty() ? -1 : s.pages.back() + 1));
    }
    s.table_end = r.table_end;
    s.gap = r.gap;
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      s.layers[l].next = r.layers[l].next;
      s.layers[l].tail_n = r.layers[l].tail_tokens;
    }
    try {
      const Index upp = pool_.units_per_page();
      for (Index l = 0; l < n_layers(); ++l) {
        layer_state& L = s.layers[static_cast<std::size_t>(l)];
        const Index E = L.next - L.tail_n;
        const auto to = [&](void* data, std::size_t bytes) { fill(l, data, bytes); };
        for (std::size_t i = 0; i < s.pages.size(); ++i) {
          detail::for_each_unit_span<Format>(pool_.storage(l), s.pages[i] * upp,
                                             units_in_page(s.first[i], E), to);
        }
        if (uses_tail_) {
          const auto bytes = static_cast<std::size_t>(L.tail_n * shape_.kv_width()) * sizeof(compute_type);
          fill(l, static_cast<void*>(L.tail_k.data()), bytes);
          if (!keys_only()) fill(l, static_cast<void*>(L.tail_v.data()), bytes);
        }
      }
    } catch (...) {
      free(id);
      throw;
    }
    return id;
  }

 private:
  struct layer_state {
    Index next = 0;    // tokens appended: the next token's position
    Index tail_n = 0;  // of them, the newest not yet stored in pages
    detail::buffer<compute_type> tail_k;  // [tail slot][kv_head * head_dim]
    detail::buffer<compute_type> tail_v;
  };
  struct sequence {
    bool live = false;
    std::vector<Index> pages;  // the block table, oldest first
    std::vector<Index> first;  // [page] position of its first token
    Index table_end = 0;       // one past the last position the table's pages cover
    bool gap = false;          // a window gave pages back
    std::vector<page_hash> hashes;  // chain hashes of the leading full pages
    page_hash root{};
    bool rooted = false;
    Index prefix_hit = 0;
    std::vector<layer_state> layers;
  };
  // What an append of n tokens to one layer takes, decided before anything changes.
  struct append_plan {
    Index drop = 0;       // pages after the sinks the window gives back, from `drop_at`
    Index drop_at = 0;
    Index freed = 0;      // of them, pages no other sequence holds
    Index write_from = 0;  // table pages [write_from, write_to) (before the drop) are written
    Index write_to = 0;
    Index copies = 0;      // of them, pages shared or published, copied first
    Index new_pages = 0;
  };

  // What a shift takes, decided before anything changes.
  struct shift_plan {
    std::vector<Index> from;   // [layer] where it is rebuilt from: the unit holding `first`
    Index keep = 0;            // leading pages that keep tokens in place
    std::vector<Index> copies; // of them, the indices of shared pages to copy before writing
    Index start = 0;           // the position of the first page after them
    Index new_pages = 0;       // pages after them
    std::vector<Index> reuse;  // table indices of pages after them that this sequence alone
                               // holds, ascending: they hold the first new positions
    bool closes_gap = false;   // rebuilt from the sink pages on: the window's gap closes
  };

  // Checks a shift of [first, last) of `s` (positions checked) against the window and the
  // pool, and says which pages it keeps, copies, reuses and takes.
  shift_plan plan_shift(Index seq, const sequence& s, Index first, Index last) const {
    shift_plan plan;
    const Index P = page_size(), delta = last - first;
    plan.from.resize(s.layers.size());
    Index from_max = 0, new_end = 0, lowest_next = no_limit;
    std::vector<Index> ends(s.layers.size());  // [layer] where its stored tokens end after
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      const layer_state& L = s.layers[l];
      const Index E = L.next - L.tail_n;
      const Index from = first < E ? first / unit_ * unit_ : E;
      const Index n = (first - from) + (L.next - last);
      Index flushed = n;
      if (uses_tail_) flushed = n >= tail_cap_ ? ((n - tail_cap_) / unit_ + 1) * unit_ : 0;
      plan.from[l] = from;
      ends[l] = from + flushed;
      from_max = std::max(from_max, from);
      new_end = std::max(new_end, ends[l]);
      lowest_next = std::min(lowest_next, L.next - delta);
    }
    // A window's gap: tokens [sink_end, held) were given back. The shift must read only held
    // tokens and rebuild either within the sink pages (closing the gap) or after it.
    const Index d = sink_pages(s), sink_end = d * P, held = held_from(s);
    if (s.gap) {
      if (first > sink_end && first < held) {
        detail::fail<std::out_of_range>("shift: sequence ", seq, " gave back the tokens of ",
                                        "positions [", sink_end, ", ", held, ") to its window; ",
                                        "first = ", first, " must not lie among them");
      }
      if (first <= sink_end) {
        if (last < held) {
          detail::fail<std::out_of_range>("shift: sequence ", seq, " gave back the tokens of ",
                                          "positions [", sink_end, ", ", held, ") to its window; ",
                                          "the tokens from last = ", last, " on cannot be moved");
        }
        plan.closes_gap = true;
      } else if (lowest_next - layout_.window < held) {
        detail::fail<std::out_of_range>("shift: sequence ", seq, " gave back the tokens before ",
                                        "position ", held, " to its window; dropping [", first,
                                        ", ", last, ") is not exact: the window of position ",
                                        lowest_next - 1, " would need tokens from position ",
                                        std::max(layout_.sinks, lowest_next - layout_.window));
      }
    }
    // Pages that keep tokens in place, then the pages of the rebuilt tokens after them.
    const Index n_pages = Index(s.pages.size());
    while (plan.keep < n_pages && s.first[static_cast<std::size_t>(plan.keep)] < from_max) ++plan.keep;
    plan.start = plan.keep > 0 ? s.first[static_cast<std::size_t>(plan.keep - 1)] + P : 0;
    if (s.gap && !plan.closes_gap && plan.keep <= d) plan.start = held;
    plan.new_pages = new_end > plan.start ? detail::ceil_div(new_end - plan.start, P) : 0;
    for (Index j = 0; j < plan.keep; ++j) {
      const Index pos = s.first[static_cast<std::size_t>(j)];
      bool written = false;
      for (std::size_t l = 0; l < s.layers.size(); ++l) {
        written = written || (pos < ends[l] && pos + P > plan.from[l]);
      }
      if (written && !pool_.writable(s.pages[static_cast<std::size_t>(j)])) plan.copies.push_back(j);
    }
    Index freed = 0;
    for (Index j = plan.keep; j < n_pages; ++j) {
      const Index p = s.pages[static_cast<std::size_t>(j)];
      if (Index(plan.reuse.size()) < plan.new_pages && pool_.writable(p)) {
        plan.reuse.push_back(j);
      } else if (pool_.ref_count(p) == 1) {
        ++freed;
      }
    }
    const Index need = Index(plan.copies.size()) + plan.new_pages - Index(plan.reuse.size());
    if (need > pool_.available() + freed) {
      detail::fail<std::length_error>("shift: sequence ", seq, " needs ", need, " more page",
                                      need == 1 ? "" : "s", " but the pool has ",
                                      pool_.available() + freed, " free or cached of ",
                                      pool_.n_pages(), "; free or preempt a sequence");
    }
    return plan;
  }

  // Reads the tokens at positions [a, b) of layer L of s, which it holds, into rows row.. of
  // k and v: stored units through a scratch of whole units, then the tail.
  void read_tokens(const sequence& s, const layer_state& L, Index a, Index b,
                   row_matrix<compute_type>& k, row_matrix<compute_type>& v, Index row) const {
    const Index E = L.next - L.tail_n, width = shape_.kv_width(), upp = pool_.units_per_page();
    const Index stored_b = std::min(b, E);
    if (a < stored_b) {
      const Index u0 = a / unit_ * unit_, u1 = detail::ceil_div(stored_b, unit_) * unit_;
      row_matrix<compute_type> uk(u1 - u0, width), uv(u1 - u0, width);
      const auto& storage = pool_.storage(layer_index(s, L));
      for (Index pos = u0; pos < u1;) {
        const auto idx = static_cast<std::size_t>(
            std::upper_bound(s.first.begin(), s.first.end(), pos) - s.first.begin() - 1);
        const Index within = (pos - s.first[idx]) / unit_;
        const Index units = std::min(upp - within, (u1 - pos) / unit_);
        format_.read(storage, s.pages[idx] * upp + within, units,
                     uk.middleRows(pos - u0, units * unit_), uv.middleRows(pos - u0, units * unit_));
        pos += units * unit_;
      }
      k.middleRows(row, stored_b - a) = uk.middleRows(a - u0, stored_b - a);
      v.middleRows(row, stored_b - a) = uv.middleRows(a - u0, stored_b - a);
      row += stored_b - a;
      a = stored_b;
    }
    if (a < b) {
      using rows = Eigen::Map<const row_matrix<compute_type>>;
      k.middleRows(row, b - a) = rows(L.tail_k.data() + (a - E) * width, b - a, width);
      const compute_type* values = keys_only() ? L.tail_k.data() : L.tail_v.data();
      v.middleRows(row, b - a) = rows(values + (a - E) * width, b - a, width);
    }
  }

  // Units a layer whose stored tokens end at E holds in the page at position `pos`.
  void check_pool_page(const char* fn, Index page, Index l) const {
    if (page < 0 || page >= pool_.n_pages()) {
      detail::fail<std::out_of_range>(fn, ": page ", page, " does not exist (0..",
                                      pool_.n_pages() - 1, ")");
    }
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " does not exist (0..", n_layers() - 1, ")");
    }
  }
  Index units_in_page(Index pos, Index E) const noexcept {
    return std::clamp<Index>((E - pos) / unit_, 0, pool_.units_per_page());
  }

  // Values read from the keys are not stored: the tail holds keys only.
  bool keys_only() const noexcept { return shape_.values_in_keys(); }
  Index tail_token_bytes() const noexcept {
    return (keys_only() ? 1 : 2) * shape_.kv_width() * Index(sizeof(compute_type));
  }

  Index new_id() {
    if (free_ids_.empty()) {
      seqs_.emplace_back();
      try {
        free_ids_.reserve(seqs_.size());
      } catch (...) {
        seqs_.pop_back();
        throw;
      }
      seqs_.back().live = true;
      return Index(seqs_.size()) - 1;
    }
    const Index id = free_ids_.back();
    free_ids_.pop_back();
    seq_ref(id).live = true;
    return id;
  }
  void drop_id(Index id) noexcept {
    seq_ref(id) = sequence{};
    free_ids_.push_back(id);
  }
  sequence& seq_ref(Index id) noexcept { return seqs_[static_cast<std::size_t>(id)]; }
  const sequence& seq_ref(Index id) const noexcept { return seqs_[static_cast<std::size_t>(id)]; }

  void init(sequence& s) const {
    s.layers.resize(static_cast<std::size_t>(n_layers()));
    if (uses_tail_) {
      const Index n = tail_cap_ * shape_.kv_width();
      for (auto& L : s.layers) {
        L.tail_k = detail::buffer<compute_type>(n);
        if (!keys_only()) L.tail_v = detail::buffer<compute_type>(n);
      }
    }
    s.live = true;
  }

  sequence copy_of(const sequence& from) const {
    sequence s;
    s.live = true;
    s.pages = from.pages;
    s.first = from.first;
    s.table_end = from.table_end;
    s.gap = from.gap;
    s.hashes = from.hashes;
    s.root = from.root;
    s.rooted = from.rooted;
    init(s);
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      const layer_state& a = from.layers[l];
      layer_state& b = s.layers[l];
      b.next = a.next;
      b.tail_n = a.tail_n;
      if (a.tail_n > 0) {
        const auto bytes = static_cast<std::size_t>(a.tail_n * shape_.kv_width()) * sizeof(compute_type);
        std::memcpy(b.tail_k.data(), a.tail_k.data(), bytes);
        if (!keys_only()) std::memcpy(b.tail_v.data(), a.tail_v.data(), bytes);
      }
    }
    return s;
  }

  sequence& seq_at(Index seq, const char* fn) {
    return const_cast<sequence&>(static_cast<const paged_kv_cache&>(*this).seq_at(seq, fn));
  }
  const sequence& seq_at(Index seq, const char* fn) const {
    if (!contains(seq)) detail::fail<std::out_of_range>(fn, ": sequence ", seq, " does not exist");
    return seq_ref(seq);
  }
  layer_state& layer_at(sequence& s, Index l, const char* fn) {
    return const_cast<layer_state&>(layer_at(static_cast<const sequence&>(s), l, fn));
  }
  const layer_state& layer_at(const sequence& s, Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return s.layers[static_cast<std::size_t>(l)];
  }

  static void check_tokens(const char* fn, const std::int32_t* tokens, Index n) {
    if (n < 0 || (n > 0 && tokens == nullptr)) {
      detail::fail<std::invalid_argument>(fn, ": ", n, " tokens at ",
                                          tokens == nullptr ? "null" : "an address",
                                          "; expected n >= 0 tokens");
    }
  }

  // The number of leading pages of tokens[0..n) the prefix index holds under `root`; their
  // ids and hashes when asked for.
  Index match(const std::int32_t* tokens, Index n, const page_hash& root,
              std::vector<Index>* pages, std::vector<page_hash>* hashes) const {
    const Index P = page_size();
    page_hash parent = root;
    Index i = 0;
    for (; (i + 1) * P <= n; ++i) {
      const page_hash h = chain_hash(parent, tokens + i * P, P);
      const Index p = pool_.find(h, parent, tokens + i * P);
      if (p < 0) break;
      if (pages != nullptr) pages->push_back(p);
      if (hashes != nullptr) hashes->push_back(h);
      parent = h;
    }
    return i;
  }

  // Pages at the front of the table that hold a sink.
  Index sink_pages(const sequence& s) const noexcept {
    Index i = 0;
    while (i < Index(s.pages.size()) && s.first[static_cast<std::size_t>(i)] < layout_.sinks) ++i;
    return i;
  }

  // The position from which a sequence holds its tokens after the sink pages: the first page
  // after them, or where the table ends. Below it, a window gave pages back when s.gap is set.
  Index held_from(const sequence& s) const noexcept {
    const Index d = sink_pages(s);
    return d < Index(s.pages.size()) ? s.first[static_cast<std::size_t>(d)] : s.table_end;
  }

  // The index in the table of the page holding stored position `pos` (which lies at or after
  // the window's gap).
  Index page_index(const sequence& s, Index pos) const noexcept {
    const Index P = page_size();
    return Index(s.pages.size()) - 1 - (s.first.back() - pos / P * P) / P;
  }

  append_plan plan_append(const sequence& s, const layer_state& L, Index n) const {
    append_plan plan;
    const Index P = page_size();
    const Index E = L.next - L.tail_n;
    Index flushed = n;  // tokens this append stores in pages
    if (uses_tail_) {
      const Index total = L.tail_n + n;
      flushed = total >= tail_cap_ ? ((total - tail_cap_) / unit_ + 1) * unit_ : 0;
    }
    const Index E2 = E + flushed;
    if (layout_.window > 0) {
      Index oldest_next = L.next;
      for (const auto& M : s.layers) oldest_next = std::min(oldest_next, M.next);
      const Index stale_end = oldest_next - layout_.window;  // last position no query sees
      plan.drop_at = sink_pages(s);
      for (Index i = plan.drop_at; i < Index(s.pages.size()); ++i) {
        if (s.first[static_cast<std::size_t>(i)] + P - 1 > stale_end) break;
        ++plan.drop;
        if (pool_.ref_count(s.pages[static_cast<std::size_t>(i)]) == 1) ++plan.freed;
      }
    }
    // Every page of the table the stored tokens land in is copied first when it is shared or
    // published (copy-on-write), not only the first: a chunk may span several.
    if (flushed > 0 && E < s.table_end) {
      plan.write_from = page_index(s, E);
      plan.write_to = page_index(s, std::min(E2, s.table_end) - 1) + 1;
      plan.copies = copies_in(s, plan, plan.write_from, plan.write_to);
    }
    if (E2 > s.table_end) plan.new_pages = detail::ceil_div(E2 - s.table_end, P);
    return plan;
  }

  // Pages of table indices [from, to) (before the drop) that a write must copy: shared or
  // published ones, the window's dropped pages aside.
  Index copies_in(const sequence& s, const append_plan& plan, Index from, Index to) const {
    Index copies = 0;
    for (Index i = from; i < to; ++i) {
      const bool dropped = i >= plan.drop_at && i < plan.drop_at + plan.drop;
      if (!dropped && !pool_.writable(s.pages[static_cast<std::size_t>(i)])) ++copies;
    }
    return copies;
  }

  // What the rest of a forward pass takes from the pool when every layer at the position of
  // `L` (every layer, without L) appends n tokens: the most new pages any of them takes, plus
  // every shared page any of them writes into (layers can store different numbers of tokens,
  // and the first to write into a page copies it for all). Returns {pages, freed by the drop}.
  std::pair<Index, Index> step_need(const sequence& s, const layer_state* L, Index n) const {
    Index new_pages = 0, from = no_limit, to = 0, freed = 0;
    append_plan any;
    for (const auto& M : s.layers) {
      if (L != nullptr && M.next != L->next) continue;
      const append_plan plan = plan_append(s, M, n);
      any = plan;
      new_pages = std::max(new_pages, plan.new_pages);
      freed = plan.freed;
      if (plan.write_to > plan.write_from) {
        from = std::min(from, plan.write_from);
        to = std::max(to, plan.write_to);
      }
    }
    const Index copies = to > from ? copies_in(s, any, from, to) : 0;
    return {new_pages + copies, freed};
  }

  // Checks that an append of n tokens to layer L of s can be carried out and reserves what
  // could fail to allocate, changing nothing observable.
  append_plan claim(Index seq, sequence& s, const layer_state& L, Index n, const char* fn) {
    detail::checked_add(L.next, n, fn);
    const append_plan plan = plan_append(s, L, n);
    // The layers still to append at this position are counted too, so that a forward pass
    // is refused at its first layer, not halfway.
    const auto [need, freed] = step_need(s, &L, n);
    if (need > pool_.available() + freed) {
      detail::fail<std::length_error>(fn, ": sequence ", seq, " needs ", need, " more page",
                                      need == 1 ? "" : "s", " but the pool has ",
                                      pool_.available() + freed, " free or cached of ",
                                      pool_.n_pages(), "; free or preempt a sequence");
    }
    // Doubling, so that a sequence growing a page at a time allocates O(log pages) times.
    const std::size_t want = s.pages.size() + static_cast<std::size_t>(plan.new_pages);
    if (want > std::min(s.pages.capacity(), s.first.capacity())) {
      const std::size_t grown = std::max(want, 2 * s.pages.capacity());
      s.pages.reserve(grown);
      s.first.reserve(grown);
    }
    return plan;
  }

  // Carries out a claimed plan: gives back the stale pages, copies a shared page, takes new
  // ones. Cannot throw.
  void apply(sequence& s, const append_plan& plan) noexcept {
    const Index P = page_size();
    if (plan.drop > 0) {
      const auto a = s.pages.begin() + plan.drop_at;
      for (auto it = a; it != a + plan.drop; ++it) pool_.release(*it);
      s.pages.erase(a, a + plan.drop);
      s.first.erase(s.first.begin() + plan.drop_at, s.first.begin() + plan.drop_at + plan.drop);
      s.gap = true;
      if (Index(s.hashes.size()) > plan.drop_at) s.hashes.resize(static_cast<std::size_t>(plan.drop_at));
    }
    for (Index i = plan.write_from; i < plan.write_to && plan.copies > 0; ++i) {
      if (i >= plan.drop_at && i < plan.drop_at + plan.drop) continue;
      auto& slot = s.pages[static_cast<std::size_t>(i >= plan.drop_at + plan.drop ? i - plan.drop : i)];
      if (pool_.writable(slot)) continue;
      const Index fresh = pool_.allocate();
      pool_.copy_page(fresh, slot);
      pool_.release(slot);
      slot = fresh;
    }
    for (Index i = 0; i < plan.new_pages; ++i) {
      s.pages.push_back(pool_.allocate(s.pages.empty() ? -1 : s.pages.back() + 1));
      s.first.push_back(s.table_end);
      s.table_end += P;
    }
  }

  // Writes rows whose pages exist, as if one at a time. Cannot throw.
  template <class K, class V>
  void write(sequence& s, layer_state& L, const Eigen::MatrixBase<K>& k,
             const Eigen::MatrixBase<V>& v) {
    const Index n = k.rows(), P = page_size(), upp = pool_.units_per_page();
    auto& storage = pool_.storage(layer_index(s, L));
    if (!uses_tail_) {
      for (Index i = 0; i < n;) {
        const Index pos = L.next + i;
        const Index idx = page_index(s, pos);
        const Index within = pos - s.first[static_cast<std::size_t>(idx)];
        const Index r = std::min(n - i, P - within);
        format_.write(storage, s.pages[static_cast<std::size_t>(idx)] * upp + within,
                      k.middleRows(i, r), v.middleRows(i, r));
        i += r;
      }
      L.next += n;
      return;
    }
    const Index width = shape_.kv_width();
    for (Index i = 0; i < n; ++i) {
      Eigen::Map<row_vector<compute_type>>(L.tail_k.data() + L.tail_n * width, width) =
          k.row(i).template cast<compute_type>();
      if (!keys_only()) {
        Eigen::Map<row_vector<compute_type>>(L.tail_v.data() + L.tail_n * width, width) =
            v.row(i).template cast<compute_type>();
      }
      ++L.tail_n;
      ++L.next;
      if (L.tail_n == tail_cap_) {
        // Store the tail's oldest unit in its page, then drop it from the tail.
        const Index E = L.next - L.tail_n, idx = page_index(s, E);
        const Index within = (E - s.first[static_cast<std::size_t>(idx)]) / unit_;
        using rows = Eigen::Map<const row_matrix<compute_type>>;
        const compute_type* values = keys_only() ? L.tail_k.data() : L.tail_v.data();
        format_.write(storage, s.pages[static_cast<std::size_t>(idx)] * upp + within,
                      rows(L.tail_k.data(), unit_, width), rows(values, unit_, width));
        L.tail_n -= unit_;
        const auto bytes = static_cast<std::size_t>(L.tail_n * width) * sizeof(compute_type);
        std::memmove(L.tail_k.data(), L.tail_k.data() + unit_ * width, bytes);
        if (!keys_only()) std::memmove(L.tail_v.data(), L.tail_v.data() + unit_ * width, bytes);
      }
    }
  }

  Index layer_index(const sequence& s, const layer_state& L) const noexcept {
    return Index(&L - s.layers.data());
  }

  view_type view_of(const sequence& s, const layer_state& L) const noexcept {
    view_type w;
    const Index E = L.next - L.tail_n;
    Index n = Index(s.pages.size());
    while (n > 0 && s.first[static_cast<std::size_t>(n - 1)] >= E) --n;  // pages ahead of l
    w.format = format_;
    w.storage = &pool_.storage(layer_index(s, L));
    w.pages = s.pages.data();
    w.page_positions = s.first.data();
    w.n_pages = n;
    w.units_per_page = pool_.units_per_page();
    w.unit = unit_;
    // Full, unless the stored tokens end in it: a layer behind the others in a forward pass
    // may end them in the gap a window just made, after its sink pages.
    w.last_page_units = n > 0 ? std::min(pool_.units_per_page(),
                                         (E - s.first[static_cast<std::size_t>(n - 1)]) / unit_)
                              : 0;
    w.tail_keys = L.tail_k.data();
    w.tail_values = keys_only() ? L.tail_k.data() : L.tail_v.data();
    w.tail_tokens = L.tail_n;
    w.kv_heads = shape_.n_kv_heads();
    w.dim = shape_.head_dim();
    w.vdim = shape_.value_dim();
    w.shared_values = keys_only();
    w.tokens = (n > 0 ? (n - 1) * page_size() + w.last_page_units * unit_ : 0) + L.tail_n;
    w.end = L.next;
    w.mask_ = layout_.mask();
    return w;
  }

  row_matrix<compute_type> held_rows(Index seq, Index l, bool keys) const {
    const view_type w = view(seq, l);
    const Index width = shape_.kv_width(), upp = pool_.units_per_page();
    row_matrix<compute_type> out(w.size(), width), other(w.size(), width);
    Index row = 0;
    for (Index i = 0; i < w.n_pages; ++i) {
      const Index units = i + 1 < w.n_pages ? upp : w.last_page_units;
      const Index t = units * unit_;
      format_.read(*w.storage, w.pages[i] * upp, units, out.middleRows(row, t),
                   other.middleRows(row, t));
      if (!keys) out.middleRows(row, t) = other.middleRows(row, t);
      row += t;
    }
    if (w.tail_tokens > 0) {
      using rows = Eigen::Map<const row_matrix<compute_type>>;
      out.middleRows(row, w.tail_tokens) =
          rows(keys ? w.tail_keys : w.tail_values, w.tail_tokens, width);
    }
    if (keys || !keys_only()) return out;
    // Values read from the keys: the first value_dim columns of each kv head's key.
    const Index d = shape_.head_dim(), dv = shape_.value_dim();
    row_matrix<compute_type> values(out.rows(), shape_.n_kv_heads() * dv);
    for (Index h = 0; h < shape_.n_kv_heads(); ++h) values.middleCols(h * dv, dv) = out.middleCols(h * d, dv);
    return values;
  }

  void check_crop(Index seq, const sequence& s, Index n) const {
    Index lowest = s.layers.empty() ? 0 : s.layers.front().next;
    for (const auto& L : s.layers) lowest = std::min(lowest, L.next);
    if (n < 0 || n > lowest) {
      detail::fail<std::out_of_range>("crop: n = ", n, " must be in [0, ", lowest,
                                      "] for sequence ", seq);
    }
    for (const auto& L : s.layers) {
      const Index E = L.next - L.tail_n;
      if (n < E && n % unit_ != 0) {
        detail::fail<std::out_of_range>("crop: n = ", n, " would cut a stored group of ", unit_,
                                        " tokens of sequence ", seq, "; n must be a multiple of ",
                                        unit_, " or at least ", E);
      }
    }
    Index highest = 0;
    for (const auto& L : s.layers) highest = std::max(highest, L.next);
    if (s.gap && n < highest) {  // cutting no layer changes nothing
      // The newest position left, n - 1, sees the keys from max(sinks, n - window) on: they
      // must all be held, in the sink pages or after the gap (as they are after n appends).
      const Index from = held_from(s);
      const Index d = sink_pages(s);
      const Index sink_end = d > 0 ? s.first[static_cast<std::size_t>(d - 1)] + page_size() : 0;
      const Index needed_from = std::max(layout_.sinks, n - layout_.window);
      if (n > sink_end && needed_from < from) {
        detail::fail<std::out_of_range>("crop: sequence ", seq, " gave back the tokens before ",
                                        "position ", from, " to its window; it can be cut to at ",
                                        "most ", sink_end, " or at least ", from + layout_.window,
                                        " tokens, not ", n);
      }
    }
  }

  cache_shape shape_;
  paged_layout layout_;
  Format format_;
  page_pool<Format> pool_;
  Index unit_ = 1;
  bool uses_tail_ = false;
  Index tail_cap_ = 0;
  std::vector<sequence> seqs_;
  std::vector<Index> free_ids_;
};

/// prefill_attention for a sequence of a paged cache: paged_kv_cache::prefill.
template <class Format, class DerivedK, class DerivedV>
void prefill_attention(const attention_shape& shape,
                       const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& q,
                       const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                       paged_kv_cache<Format>& cache, Index seq, Index l,
                       Eigen::Ref<row_matrix<compute_t<typename Format::scalar_type>>> out,
                       attention_workspace<compute_t<typename Format::scalar_type>>& ws,
                       const attention_options& opt = {}) {
  cache.prefill(shape, q, k, v, seq, l, out, ws, opt);
}

}  // namespace kvcache
