// SPDX-License-Identifier: Apache-2.0
// The whole-model KV cache, written once over a layout and a format: layers, append, view,
// rollback, fork, context shift, accounting; and the prefill that serves every cache.
#pragma once

#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/prefill.hpp"
#include "kvcache/detail/buffer.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/format/units.hpp"
#include "kvcache/layout/plan.hpp"
#include "kvcache/rope.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {

namespace detail {
// Refuses k and v unless both are `tokens x kv_width` of the cache's shape `cache` with the
// same number of rows, naming `fn`. `keys_alone` says the caller passed the keys alone (v is
// k): a cache whose values are in its keys takes only that, every other cache only both.
template <class DerivedK, class DerivedV>
void check_kv_input(const char* fn, const attention_shape& cache,
                    const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                    bool keys_alone) {
  if (cache.values_in_keys() && !keys_alone) {
    fail<std::invalid_argument>(fn, ": this cache's values are the first value_dim = ",
                                cache.value_dim(), " columns of its keys; pass the ",
                                cache.kv_width(), "-wide key rows alone");
  }
  if (!cache.values_in_keys() && keys_alone) {
    fail<std::invalid_argument>(fn, ": this cache stores values apart from keys; pass both");
  }
  const Index width = cache.kv_width();
  if (k.cols() != width) {
    fail<std::invalid_argument>(fn, ": k has ", k.cols(),
                                " columns, expected n_kv_heads*head_dim = ", width);
  }
  if (v.cols() != width) {
    fail<std::invalid_argument>(fn, ": v has ", v.cols(),
                                " columns, expected n_kv_heads*head_dim = ", width);
  }
  if (k.rows() != v.rows()) {
    fail<std::invalid_argument>(fn, ": k has ", k.rows(), " rows (tokens) but v has ", v.rows());
  }
}
// Refuses the inputs of prefill_attention unless q is `n x n_heads*head_dim`, out
// `n x n_heads*value_dim`, k and v `n x n_kv_heads*head_dim` of the cache's shape `cache` (as
// check_kv_input) and the options usable.
template <class Q, class DerivedK, class DerivedV, class Out>
void check_prefill_input(const attention_shape& heads, const attention_shape& cache, const Q& q,
                         const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                         const Out& out, const attention_options& opt, bool keys_alone) {
  if (q.cols() != heads.q_width()) {
    fail<std::invalid_argument>("prefill_attention: q has ", q.cols(),
                                " columns, expected n_heads*head_dim = ", heads.q_width());
  }
  if (k.rows() != q.rows()) {
    fail<std::invalid_argument>("prefill_attention: q has ", q.rows(),
                                " rows (tokens) but k has ", k.rows());
  }
  check_kv_input("prefill_attention", cache, k, v, keys_alone);
  if (out.rows() != q.rows() || out.cols() != heads.out_width()) {
    fail<std::invalid_argument>("prefill_attention: out is ", out.rows(), " x ", out.cols(),
                                ", expected ", q.rows(), " x ", heads.out_width());
  }
  check_options("prefill_attention", opt);
}
// Refuses, naming shift, a rope that does not rotate the keys of shape `s`: head_dim wide, or
// with values in the keys the columns after them (MLA's k_pe: rope_dim wide).
inline void check_shift_rope(const attention_shape& s, const rope& r) {
  const Index want = s.values_in_keys() ? s.head_dim() - s.value_dim() : s.head_dim();
  if (r.head_dim() != want) {
    fail<std::invalid_argument>("shift: rope has head_dim ", r.head_dim(), ", the cache ", want,
                                s.values_in_keys() ? " (the key columns after the values)" : "");
  }
}

// Re-rotates the keys `k` (rows of n_kv_heads*head_dim) of shape `s` by `delta` positions:
// each head whole, or with values in the keys only its columns after value_dim.
template <class K>
void rotate_keys(const attention_shape& s, const rope& r, K&& k, Index delta) {
  if (!s.values_in_keys()) {
    r.rotate(k, delta);
    return;
  }
  const Index d = s.head_dim(), dv = s.value_dim();
  for (Index h = 0; h < s.n_kv_heads(); ++h) r.rotate(k.middleCols(h * d + dv, d - dv), delta);
}
}  // namespace detail

/// One layer of a kv_cache as attention reads it: per kv head up to three runs of the format's
/// stored units (the sinks, then the rolling region in at most two runs where it wrapped) and
/// the full-precision tail, each with the position of its first token. A non-owning, trivially
/// copyable view, valid until the cache is next modified. Every attention function takes it.
template <class Format>
struct cache_view {
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using block_type = layer_block<typename Format::block_type, compute_type>;

  /// `units` stored units from slot `slot` on, the first at `position`.
  struct run {
    Index slot = 0;
    Index units = 0;
    Index position = 0;
  };

  Format format{};
  const typename Format::storage* storage = nullptr;
  const compute_type* tail_keys = nullptr;    // [tail slot][kv_head * head_dim]
  const compute_type* tail_values = nullptr;  // same layout
  Index tail_tokens = 0;
  Index tail_position = 0;
  Index kv_heads = 0;
  Index dim = 0;
  Index vdim = 0;              // width of the values
  bool shared_values = false;  // values are the first vdim columns of the keys
  Index unit = 1;
  Index tokens = 0;
  Index end = 0;
  attention_mask mask_{};
  std::array<run, 3> runs{};
  Index n_runs = 0;

  Index n_kv_heads() const noexcept { return kv_heads; }
  Index head_dim() const noexcept { return dim; }
  Index value_dim() const noexcept { return vdim; }
  bool values_in_keys() const noexcept { return shared_values; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return n_runs + (tail_tokens > 0 ? 1 : 0); }
  Index position(Index i) const noexcept {
    return i < n_runs ? runs[static_cast<std::size_t>(i)].position : tail_position;
  }
  Index end_position() const noexcept { return end; }
  attention_mask mask() const noexcept { return mask_; }
  block_type block(Index h, Index i) const noexcept {
    block_type b;
    if (i < n_runs) {
      const run& r = runs[static_cast<std::size_t>(i)];
      b.stored = format.block(*storage, h, r.slot, r.units);
      b.tokens = r.units * unit;
    } else {
      b.in_tail = true;
      b.tail = {tail_keys + h * dim, tail_values + h * dim, tail_tokens, kv_heads * dim};
      b.tokens = tail_tokens;
    }
    return b;
  }
};

/// A whole model's KV cache: `n_layers` layers of one cache_shape, each storing its tokens'
/// keys and values in `Format` (plain_format<float>, quantized_format<8>, ...) where `Layout`
/// puts them (contiguous_layout, fixed_layout, ring_layout). Every layout works with every
/// format, and attention reads any of them through view(l).
///
/// Positions: each layer counts the tokens appended to it (position(l), the RoPE position of
/// the next token); layers are appended to one at a time as a forward pass reaches them, so
/// between layers of one step their sizes differ.
///
/// Errors: std::out_of_range for a layer that does not exist or a position outside what is
/// held, std::invalid_argument for shapes that do not fit, std::length_error past a capacity or
/// when sizes overflow; every member that throws leaves the cache exactly as it was.
///
/// Thread safety: const members may run concurrently; a non-const member needs the cache to
/// itself. A moved-from cache has no layers (n_layers() == 0) and is otherwise usable.
template <class Layout, class Format>
class kv_cache {
 public:
  using layout_type = Layout;
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using view_type = cache_view<Format>;

  /// An empty cache. Fixed and ring layouts allocate their memory now, a contiguous one at the
  /// first append or reserve. Throws std::invalid_argument for a layout or format that does not
  /// fit the shape, std::length_error when the sizes overflow, std::bad_alloc when memory is
  /// short.
  explicit kv_cache(const cache_shape& shape, Layout layout = Layout(), Format format = Format())
      : shape_(shape), layout_(layout), format_(format.with_values_in_keys(shape.values_in_keys())),
        plan_(layout.plan(format.unit_tokens())) {
    format_.check("kv_cache", shape.head_dim());
    unit_ = format_.unit_tokens();
    uses_tail_ = unit_ > 1 || format_.residual() > 0;
    tail_cap_ = uses_tail_ ? detail::checked_add(format_.residual(), unit_, "residual") : 0;
    // Every size this cache can reach, checked once so that later arithmetic cannot wrap.
    const Index unit_bytes = format_.unit_bytes(shape.n_kv_heads(), shape.head_dim());
    detail::checked_product({tail_cap_, shape.kv_width(), 2 * Index(sizeof(compute_type)),
                             shape.n_layers()}, "kv_cache: residual");
    if (!plan_.grows) {
      const Index slots = detail::checked_add(plan_.sink_units, plan_.ring_units, "kv_cache");
      detail::checked_product({slots, unit_bytes, shape.n_layers()}, "kv_cache: capacity");
    }
    layers_.resize(static_cast<std::size_t>(shape.n_layers()));
    if (!plan_.grows) {
      for (auto& L : layers_) allocate(L, plan_.ring_units);
    }
  }

  kv_cache(const kv_cache& other)
      : shape_(other.shape_), layout_(other.layout_), format_(other.format_), plan_(other.plan_),
        unit_(other.unit_), uses_tail_(other.uses_tail_), tail_cap_(other.tail_cap_) {
    layers_.resize(other.layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) copy_layer(layers_[i], other.layers_[i]);
  }
  kv_cache& operator=(const kv_cache& other) {
    if (this != &other) {
      kv_cache copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  kv_cache(kv_cache&& other) noexcept = default;
  kv_cache& operator=(kv_cache&& other) noexcept = default;
  ~kv_cache() = default;

  /// A copy that continues independently (beam search, parallel sampling): O(size) copy.
  kv_cache fork() const { return kv_cache(*this); }

  const cache_shape& shape() const noexcept { return shape_; }
  const Layout& layout() const noexcept { return layout_; }
  const Format& format() const noexcept { return format_; }
  /// Layers; 0 for a moved-from cache.
  Index n_layers() const noexcept { return Index(layers_.size()); }
  /// Tokens per stored unit of the format (1, or a quantized group).
  Index unit_tokens() const noexcept { return unit_; }

  /// Tokens layer `l` holds now. Throws std::out_of_range for a bad layer.
  Index size(Index l) const { return held(at(l, "size")); }
  /// Tokens every layer holds (the smallest size(l)); 0 without layers.
  Index size() const noexcept {
    if (layers_.empty()) return 0;
    Index n = no_limit;
    for (const auto& L : layers_) n = std::min(n, held(L));
    return n;
  }
  /// Tokens layer `l` holds in the format's stored units (for a quantized format, as codes).
  Index stored_size(Index l) const {
    const layer_state& L = at(l, "stored_size");
    return (L.sink_n + L.ring_n) * unit_;
  }
  /// Tokens layer `l` holds in the full-precision tail (the newest ones).
  Index tail_size(Index l) const { return at(l, "tail_size").tail_n; }
  /// The position of the next token of layer `l`: tokens appended since construction or
  /// clear(), less those rolled back or shifted out. Throws std::out_of_range for a bad layer.
  Index position(Index l) const { return at(l, "position").next; }
  /// The smallest position(l) over layers; 0 without layers.
  Index position() const noexcept {
    if (layers_.empty()) return 0;
    Index p = no_limit;
    for (const auto& L : layers_) p = std::min(p, L.next);
    return p;
  }

  /// Appends `k.rows()` tokens to layer `l` at positions position(l).. . `k` and `v` are
  /// `(tokens x n_kv_heads*head_dim)`, one row per token with the heads side by side (the layout
  /// a K or V projection produces), of any scalar type convertible to the compute type. The
  /// result equals appending the rows one at a time. Amortized O(1) per token; a contiguous
  /// layout reallocates (doubling) only when full. Throws std::out_of_range for a bad layer,
  /// std::invalid_argument for a wrong shape, std::length_error past the layout's capacity or
  /// when positions overflow; nothing changes when it throws.
  template <class DerivedK, class DerivedV>
  void append(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    append_rows(l, k, v, false);
  }

  /// Appends `kv.rows()` tokens to a cache whose shape has its values in its keys
  /// (cache_shape::with_values_in_keys; MLA's latent): `kv` is `tokens x n_kv_heads*head_dim`,
  /// each row the key whose first value_dim columns are also the value, stored once. Throws as
  /// append(l, k, v) does, and std::invalid_argument on a cache that stores values apart.
  template <class Derived>
  void append(Index l, const Eigen::MatrixBase<Derived>& kv) {
    append_rows(l, kv, kv, true);
  }

  /// Makes room for `tokens` tokens in every layer without further allocation, all or nothing.
  /// Only a growing layout allocates. Throws std::length_error past max_tokens or for a count
  /// memory cannot address, std::bad_alloc when memory is short.
  void reserve(Index tokens) {
    if (!plan_.grows) return;
    check_reserve(tokens);
    std::vector<layer_state> grown(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      if (needs_room(layers_[i], tokens)) {
        regrow(grown[i], layers_[i], std::max(units_for(tokens), layers_[i].ring_slots));
      }
    }
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      if (needs_room(layers_[i], tokens)) layers_[i] = std::move(grown[i]);
    }
  }

  /// A copy of this cache with room for `tokens` tokens in every layer, allocated once per
  /// layer (a growing layout; others are copied as they are). Throws as reserve does.
  kv_cache reserved(Index tokens) const {
    if (!plan_.grows) return *this;
    check_reserve(tokens);
    kv_cache out(shape_, layout_, format_);
    out.layers_.resize(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      regrow(out.layers_[i], layers_[i], std::max(units_for(tokens), layers_[i].ring_slots));
    }
    return out;
  }

  /// `torch.cat` semantics for layer `l` of a growing layout: the layer is replaced by a newly
  /// allocated one of exactly its old tokens plus the new ones, copying every cached token (the
  /// O(size) per call that append avoids). Throws as append does.
  template <class DerivedK, class DerivedV>
  void concat(Index l, const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v) {
    assign_concatenated(l, *this, k, v);
  }

  /// `torch.cat` semantics into this cache: layer `l` becomes a newly allocated copy of layer
  /// `l` of `src` (a cache of the same shape, layout and format) followed by `k` and `v`.
  /// Throws as concat does, std::invalid_argument when `src` differs in shape or format.
  template <class DerivedK, class DerivedV>
  void assign_concatenated(Index l, const kv_cache& src, const Eigen::MatrixBase<DerivedK>& k,
                           const Eigen::MatrixBase<DerivedV>& v) {
    static_assert(Layout::grows, "kvcache: concat needs a growing (contiguous) layout");
    if (src.shape_ != shape_ || src.format_ != format_) {
      detail::fail<std::invalid_argument>("concat: the source cache differs in shape or format");
    }
    layer_state& L = at(l, "concat");
    const layer_state& S = src.at(l, "concat");
    detail::check_kv_input("concat", shape_, k, v, false);
    check_room("concat", l, S, k.rows());
    layer_state fresh;
    regrow(fresh, S, units_for(held(S) + k.rows()));
    write(fresh, k, v);
    L = std::move(fresh);
  }

  /// Frees the capacity of a growing layout beyond what every layer holds. O(size) copy.
  void shrink_to_fit() {
    if (!plan_.grows) return;
    std::vector<layer_state> shrunk(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      regrow(shrunk[i], layers_[i], layers_[i].ring_n);
    }
    layers_.swap(shrunk);
  }

  /// Rollback: keeps the tokens at positions below `n` in every layer and drops the rest, so
  /// the cache is as if they had never been appended (speculative decoding rejecting drafted
  /// tokens). Exact, or refused: a ring keeps max_rollback tokens beyond its window for this,
  /// and a quantized format can give back only tokens it still holds in full precision
  /// (beyond its residual; with residual 0 also any whole group). Throws std::out_of_range,
  /// changing nothing, when n is outside [0, position(l)] for some layer or the rollback
  /// cannot be exact, saying how far back it can go.
  void crop(Index n) {
    for (Index l = 0; l < n_layers(); ++l) check_crop(l, n);
    for (auto& L : layers_) drop_from(L, n);
  }

  /// crop(position() - k): forgets the newest k tokens.
  void rollback(Index k) {
    if (k < 0 || k > position()) {
      detail::fail<std::out_of_range>("rollback: k = ", k, " out of range [0, ", position(), "]");
    }
    crop(position() - k);
  }

  /// Drops every token of every layer; positions restart at 0 and memory stays allocated.
  void clear() noexcept {
    for (auto& L : layers_) {
      L.sink_n = L.ring_start = L.ring_n = L.tail_n = L.next = 0;
    }
  }

  /// Context shift (llama.cpp's seq_rm + seq_add; StreamingLLM's re-rotation): drops the
  /// cached tokens at positions [first, last) of every layer and moves every later token
  /// `last - first` positions back, re-rotating its key by -(last - first) with `rope`, so
  /// generation continues as if the dropped tokens had never been there. Sinks stay: first
  /// must not be below the layout's sinks. Tokens before `first` keep their stored form; a
  /// quantized format re-quantizes the groups from the one holding `first` on.
  /// Cost: reads and rewrites the tokens from `first` on. Allocates scratch for them once.
  /// Throws std::out_of_range unless sinks <= first <= last <= position(l) for every layer, or
  /// when a ring would be left without the window's tokens (it cannot give back evicted ones),
  /// std::invalid_argument when rope.head_dim() differs from the cache's (with values in the
  /// keys, as MLA's latent rows [c_kv | k_pe], only the columns after them are rotated, and
  /// rope.head_dim() must be their width, rope_dim); nothing changes then.
  void shift(Index first, Index last, const rope& rope) {
    detail::check_shift_rope(shape_, rope);
    Index most = 0;
    for (Index l = 0; l < n_layers(); ++l) {
      const layer_state& L = layers_[static_cast<std::size_t>(l)];
      if (first < plan_.mask.sinks || first > last || last > L.next) {
        detail::fail<std::out_of_range>("shift: positions [", first, ", ", last,
                                        ") must lie within [", plan_.mask.sinks, ", ", L.next,
                                        "] of layer ", l, " (sinks stay)");
      }
      // A ring cannot give back evicted tokens: the kept ones must still fill the window of
      // the new newest position.
      const Index ring_begin = L.next - L.tail_n - L.ring_n * unit_;
      const Index begin_after = ring_begin < first ? ring_begin
                                : ring_begin < last ? first : ring_begin - (last - first);
      const Index end_after = L.next - (last - first);
      const Index need_from = plan_.mask.window > 0
                                  ? std::max(plan_.mask.sinks, end_after - plan_.mask.window)
                                  : Index(0);
      if (L.ring_n > 0 && begin_after > L.sink_n * unit_ && need_from < begin_after &&
          end_after > need_from) {
        detail::fail<std::out_of_range>(
            "shift: dropping [", first, ", ", last, ") from layer ", l, " is not exact: the window "
            "of position ", end_after - 1, " would need tokens from position ", need_from,
            " that the ring no longer holds");
      }
      // Rewriting starts at the unit that holds `first`; when that is a sink unit, the tokens
      // after it must not have a gap (evicted ones), or units could not be formed again.
      const Index from = rebuild_from(L, first);
      if (from < L.sink_n * unit_ && ring_begin > L.sink_n * unit_ && L.ring_n > 0) {
        detail::fail<std::out_of_range>(
            "shift: dropping [", first, ", ", last, ") from layer ", l, " is not exact: it "
            "would rebuild the sink group [0, ", L.sink_n * unit_, ") after the ring evicted "
            "tokens from position ", L.sink_n * unit_, "; first must be >= ", L.sink_n * unit_);
      }
      most = std::max(most, L.next - from);
    }
    row_matrix<compute_type> k(most, shape_.kv_width()), v(most, shape_.kv_width());
    for (auto& L : layers_) shift_layer(L, first, last, rope, k, v);
  }

  /// Bytes held by the cached tokens, summed over layers: the stored units (codes and scales
  /// included) plus the full-precision tail.
  Index bytes() const noexcept {
    Index total = 0;
    for (const auto& L : layers_) {
      total += (L.sink_n + L.ring_n) * unit_bytes() + L.tail_n * tail_token_bytes();
    }
    return total;
  }
  /// Bytes allocated for keys and values, used or not.
  Index capacity_bytes() const noexcept {
    Index total = 0;
    for (const auto& L : layers_) {
      total += L.units.slots * unit_bytes() + (L.tail_k.size() + L.tail_v.size()) *
                                                  Index(sizeof(compute_type));
    }
    return total;
  }
  /// Bytes of one stored unit of every kv head of one layer.
  Index unit_bytes() const noexcept {
    return format_.unit_bytes(shape_.n_kv_heads(), shape_.head_dim());
  }
  /// Tokens layer `l` can hold before it reallocates (growing layouts) or at all (others).
  Index capacity(Index l) const {
    const layer_state& L = at(l, "capacity");
    const Index room = (plan_.sink_units + L.ring_slots) * unit_ + (uses_tail_ ? tail_cap_ - 1 : 0);
    return plan_.evicts ? room : std::min(room, plan_.max_tokens);
  }

  /// Layer `l` as attention reads it: `decode_attention(shape, q, cache.view(l), out, ws)`.
  /// O(1). Throws std::out_of_range for a bad layer.
  view_type view(Index l) const { return view_of(at(l, "view")); }

  /// Every key layer `l` holds, oldest first, as attention reads it (quantized ones
  /// dequantized): `size(l) x n_kv_heads*head_dim`. For tests and error analysis; allocates.
  row_matrix<compute_type> keys(Index l) const { return held_rows(at(l, "keys"), true); }
  /// Every value layer `l` holds, as keys(l): `size(l) x n_kv_heads*value_dim` (the first
  /// value_dim columns of each key when the values are in the keys).
  row_matrix<compute_type> values(Index l) const { return held_rows(at(l, "values"), false); }
  /// The position of every token layer `l` holds, oldest first.
  std::vector<Index> positions(Index l) const {
    const view_type w = view(l);
    std::vector<Index> out;
    for (Index b = 0; b < w.n_blocks(); ++b) {
      for (Index t = 0; t < w.block(0, b).tokens; ++t) out.push_back(w.position(b) + t);
    }
    return out;
  }

  /// Sizes `ws` and reserves room so that prefill_attention of `tokens` more tokens onto any
  /// layer and decode after it allocate nothing. Throws as reserve does.
  void prepare(attention_workspace<compute_type>& ws, const attention_shape& heads, Index tokens,
               const attention_options& opt = {}) {
    const Index total = detail::checked_add(size(), tokens, "prepare");
    reserve(std::min(total, plan_.max_tokens));
    const Index seen = max_view_tokens(total);
    prepare_causal(ws, heads, tokens, seen, convert, opt);
    prepare_decode(ws, heads, seen, convert, opt);
  }

  /// Prefill of a chunk of `n` tokens onto layer `l`; see the free function prefill_attention.
  template <class DerivedK, class DerivedV>
  void prefill(const attention_shape& heads, const Eigen::Ref<const row_matrix<compute_type>>& q,
               const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v, Index l,
               Eigen::Ref<row_matrix<compute_type>> out, attention_workspace<compute_type>& ws,
               const attention_options& opt) {
    prefill_rows(heads, q, k, v, l, out, ws, opt, false);
  }

  /// Prefill onto a cache whose values are in its keys: `kv` is appended as append(l, kv)
  /// appends it; otherwise as prefill(heads, q, k, v, ...).
  template <class Derived>
  void prefill(const attention_shape& heads, const Eigen::Ref<const row_matrix<compute_type>>& q,
               const Eigen::MatrixBase<Derived>& kv, Index l,
               Eigen::Ref<row_matrix<compute_type>> out, attention_workspace<compute_type>& ws,
               const attention_options& opt) {
    prefill_rows(heads, q, kv, kv, l, out, ws, opt, true);
  }

 private:
  template <class DerivedK, class DerivedV>
  void append_rows(Index l, const Eigen::MatrixBase<DerivedK>& k,
                   const Eigen::MatrixBase<DerivedV>& v, bool keys_alone) {
    layer_state& L = at(l, "append");
    detail::check_kv_input("append", shape_, k, v, keys_alone);
    check_room("append", l, L, k.rows());
    reserve_layer(L, held(L) + k.rows());
    write(L, k, v);
  }

  template <class DerivedK, class DerivedV>
  void prefill_rows(const attention_shape& heads,
                    const Eigen::Ref<const row_matrix<compute_type>>& q,
                    const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
                    Index l, Eigen::Ref<row_matrix<compute_type>> out,
                    attention_workspace<compute_type>& ws, const attention_options& opt,
                    bool keys_alone) {
    layer_state& L = at(l, "prefill_attention");
    detail::check_view("prefill_attention", heads, view_of(L));
    detail::check_prefill_input(heads, shape_, q, k, v, out, opt, keys_alone);
    const Index n = q.rows();
    if (n == 0) return;
    check_room("prefill_attention", l, L, n);
    // Room and scratch first, so nothing can throw once the layer has changed.
    const Index seen = max_view_tokens(held(L) + n);
    prepare_causal(ws, heads, n, seen, convert, opt);
    prepare_decode(ws, heads, seen, convert, opt);
    reserve_layer(L, held(L) + n);
    for (Index i = 0; i < n;) {
      const Index piece = piece_length(L, n - i);
      write(L, k.middleRows(i, piece), v.middleRows(i, piece));
      causal_attention(heads, q.middleRows(i, piece), view_of(L), L.next - piece,
                       out.middleRows(i, piece), ws, opt);
      i += piece;
    }
  }

 public:
  /// The counts that place a layer's tokens, for saving and loading (io/cache_file.hpp).
  struct layer_record {
    Index next = 0;       // position of the next token
    Index sink_units = 0;  // sink units held
    Index ring_units = 0;  // rolling units held
    Index first_run = 0;   // rolling units in the first run (before the ring wraps)
    Index tail_tokens = 0;
  };

  /// Layer `l`'s record. Throws std::out_of_range for a bad layer.
  layer_record record(Index l) const {
    const layer_state& L = at(l, "record");
    return {L.next, L.sink_n, L.ring_n, std::min(L.ring_n, L.ring_slots - L.ring_start), L.tail_n};
  }

  /// Calls f(const void* data, std::size_t bytes) over layer `l`'s held contents in a fixed
  /// order: the sink units, the rolling units' first run then second (each as
  /// Format::for_each_array orders its arrays), the tail's keys, then its values.
  template <class F>
  void for_each_span(Index l, F&& f) const {
    const layer_state& L = at(l, "for_each_span");
    const layer_record r = record(l);
    detail::for_each_unit_span<Format>(L.units, 0, L.sink_n, f);
    detail::for_each_unit_span<Format>(L.units, plan_.sink_units + L.ring_start, r.first_run, f);
    detail::for_each_unit_span<Format>(L.units, plan_.sink_units, L.ring_n - r.first_run, f);
    const auto bytes = static_cast<std::size_t>(L.tail_n * shape_.kv_width()) * sizeof(compute_type);
    f(static_cast<const void*>(L.tail_k.data()), bytes);
    if (!keys_only()) f(static_cast<const void*>(L.tail_v.data()), bytes);
  }

  /// Bytes for_each_span visits for a layer of record `r`.
  /// Throws std::length_error when the counts overflow.
  Index span_bytes(const layer_record& r) const {
    const Index units = detail::checked_add(r.sink_units, r.ring_units, "units");
    return detail::checked_add(detail::checked_mul(units, unit_bytes(), "stored bytes"),
                               detail::checked_mul(r.tail_tokens, tail_token_bytes(), "tail bytes"),
                               "layer bytes");
  }

  /// Refuses (std::invalid_argument naming what is wrong) a record this cache cannot hold.
  void check_record(const layer_record& r) const {
    const auto bad = [](const char* what, Index value, Index lo, Index hi) {
      if (value < lo || value > hi) {
        detail::fail<std::invalid_argument>(what, " is ", value, ", expected ", lo, "..", hi);
      }
    };
    bad("sink units", r.sink_units, 0, plan_.sink_units);
    bad("rolling units", r.ring_units, 0, plan_.grows ? units_for(plan_.max_tokens) : plan_.ring_units);
    bad("tail tokens", r.tail_tokens, 0, uses_tail_ ? tail_cap_ - 1 : 0);
    if (r.ring_units > 0 && r.sink_units < plan_.sink_units) {
      detail::fail<std::invalid_argument>("rolling units held before the sinks are full");
    }
    const Index ring_slots = plan_.grows ? r.ring_units : plan_.ring_units;
    bad("first run", r.first_run, std::min<Index>(r.ring_units, 1), std::min(r.ring_units, ring_slots));
    if (r.ring_units > 0 && plan_.grows && r.first_run != r.ring_units) {
      detail::fail<std::invalid_argument>("a growing layout's units are one run");
    }
    const Index held_tokens = (r.sink_units + r.ring_units) * unit_ + r.tail_tokens;
    if (!plan_.evicts) bad("tokens held", held_tokens, 0, plan_.max_tokens);
    bad("next position", r.next, held_tokens, no_limit / 2);
    if (!plan_.evicts && r.next != held_tokens) {
      detail::fail<std::invalid_argument>("next position is ", r.next, " but ", held_tokens,
                                          " tokens are held by a layout that never drops any");
    }
  }

  /// Replaces layer `l` by one of record `r` (checked with check_record first), whose contents
  /// `fill(void* data, std::size_t bytes)` writes in for_each_span's order. Reuses the layer's
  /// memory when it has the room (a fixed or ring layout always has). When `fill` throws, the
  /// layer is left empty; io::load restores into a scratch cache for that reason.
  template <class F>
  void restore_layer(Index l, const layer_record& r, F&& fill) {
    layer_state& L = at(l, "restore_layer");
    check_record(r);
    const Index ring_slots = plan_.grows ? std::max(r.ring_units, Index(1)) : plan_.ring_units;
    layer_state fresh;
    if (L.ring_slots == ring_slots && L.units.slots != 0) {
      fresh = std::move(L);
      L = layer_state{};
      fresh.sink_n = fresh.ring_start = fresh.ring_n = fresh.tail_n = fresh.next = 0;
    } else {
      allocate(fresh, ring_slots);
    }
    detail::for_each_unit_span<Format>(fresh.units, 0, r.sink_units, fill);
    detail::for_each_unit_span<Format>(fresh.units, plan_.sink_units, r.first_run, fill);
    detail::for_each_unit_span<Format>(fresh.units, plan_.sink_units + r.first_run, r.ring_units - r.first_run,
                          fill);
    const auto bytes = static_cast<std::size_t>(r.tail_tokens * shape_.kv_width()) * sizeof(compute_type);
    if (uses_tail_) {
      fill(static_cast<void*>(fresh.tail_k.data()), bytes);
      if (!keys_only()) fill(static_cast<void*>(fresh.tail_v.data()), bytes);
    }
    fresh.sink_n = r.sink_units;
    fresh.ring_n = r.ring_units;
    fresh.tail_n = r.tail_tokens;
    fresh.next = r.next;
    L = std::move(fresh);
  }

  /// The layout's decisions, as the cache applies them.
  const layout_plan& plan() const noexcept { return plan_; }

 private:
  static constexpr bool convert = !std::is_same_v<scalar_type, compute_type>;

  struct layer_state {
    typename Format::storage units;      // sink slots, then ring_slots rolling slots
    Index ring_slots = 0;
    Index sink_n = 0;                    // sink units held
    Index ring_start = 0;                // rolling slot of the oldest rolling unit
    Index ring_n = 0;                    // rolling units held
    detail::buffer<compute_type> tail_k;  // [tail slot][kv_head * head_dim]
    detail::buffer<compute_type> tail_v;  // same layout
    Index tail_n = 0;                    // tail tokens, the newest
    Index next = 0;                      // position of the next token
  };

  const layer_state& at(Index l, const char* fn) const {
    if (l < 0 || l >= n_layers()) {
      detail::fail<std::out_of_range>(fn, ": layer ", l, " out of range [0, ", n_layers(), ")");
    }
    return layers_[static_cast<std::size_t>(l)];
  }
  layer_state& at(Index l, const char* fn) {
    return const_cast<layer_state&>(static_cast<const kv_cache&>(*this).at(l, fn));
  }

  Index held(const layer_state& L) const noexcept { return (L.sink_n + L.ring_n) * unit_ + L.tail_n; }
  // Values read from the keys are not stored: the tail holds keys only.
  bool keys_only() const noexcept { return shape_.values_in_keys(); }
  Index tail_token_bytes() const noexcept {
    return (keys_only() ? 1 : 2) * shape_.kv_width() * Index(sizeof(compute_type));
  }
  // Rolling units needed to hold `tokens` tokens of a growing layout.
  Index units_for(Index tokens) const noexcept { return tokens / unit_; }
  // The most tokens a view can hold once `tokens` tokens have been appended.
  Index max_view_tokens(Index tokens) const noexcept {
    if (!plan_.evicts) return tokens;
    return std::min(tokens, (plan_.sink_units + plan_.ring_units) * unit_ + tail_cap_);
  }

  void check_reserve(Index tokens) const {
    if (tokens > plan_.max_tokens) {
      detail::fail<std::length_error>("reserve: ", tokens, " tokens exceed max_tokens = ",
                                      plan_.max_tokens);
    }
  }

  // Throws std::length_error when `n` more tokens do not fit layer l or its positions.
  void check_room(const char* fn, Index l, const layer_state& L, Index n) const {
    detail::checked_add(L.next, n, "append: position");
    if (plan_.evicts) return;
    const Index h = held(L);
    if (n > plan_.max_tokens - h) {
      if (plan_.grows) {
        detail::fail<std::length_error>(fn, ": ", detail::checked_add(h, n), " tokens exceed max_tokens = ",
                                        plan_.max_tokens);
      }
      detail::fail<std::length_error>(fn, ": layer ", l, " holds ", h, " tokens, ", n,
                                      " more exceed capacity = ", plan_.max_tokens);
    }
    if (plan_.grows) {
      detail::checked_mul(units_for(h + n) + 1, unit_bytes(), "append: cache size");
    }
  }

  void allocate(layer_state& L, Index ring_slots) const {
    L.units = format_.allocate(shape_.n_kv_heads(), shape_.head_dim(),
                               plan_.sink_units + ring_slots);
    L.ring_slots = ring_slots;
    if (uses_tail_) {
      L.tail_k = detail::buffer<compute_type>(tail_cap_ * shape_.kv_width());
      if (!keys_only()) L.tail_v = detail::buffer<compute_type>(tail_cap_ * shape_.kv_width());
    }
  }

  // `out` becomes a copy of `L` with `ring_slots` rolling slots (>= its units).
  void regrow(layer_state& out, const layer_state& L, Index ring_slots) const {
    layer_state fresh;
    allocate(fresh, ring_slots);
    fresh.sink_n = L.sink_n;
    fresh.next = L.next;
    fresh.tail_n = L.tail_n;
    detail::copy_units<Format>(fresh.units, 0, L.units, 0, L.sink_n);
    // The rolling units, oldest first, from slot 0 of the new rolling region.
    const Index a = std::min(L.ring_n, L.ring_slots - L.ring_start);
    detail::copy_units<Format>(fresh.units, plan_.sink_units, L.units, plan_.sink_units + L.ring_start, a);
    detail::copy_units<Format>(fresh.units, plan_.sink_units + a, L.units, plan_.sink_units, L.ring_n - a);
    fresh.ring_n = L.ring_n;
    if (L.tail_n > 0) {
      const auto bytes = static_cast<std::size_t>(L.tail_n * shape_.kv_width()) * sizeof(compute_type);
      std::memcpy(fresh.tail_k.data(), L.tail_k.data(), bytes);
      if (!keys_only()) std::memcpy(fresh.tail_v.data(), L.tail_v.data(), bytes);
    }
    out = std::move(fresh);
  }

  void copy_layer(layer_state& out, const layer_state& L) const {
    if (L.units.slots == 0 && L.tail_k.size() == 0) {
      out = layer_state{};
      out.next = L.next;
      return;
    }
    regrow(out, L, L.ring_slots);
  }

  // Whether layer L of a growing layout must grow to hold `tokens` tokens.
  bool needs_room(const layer_state& L, Index tokens) const noexcept {
    return units_for(tokens) > L.ring_slots || (uses_tail_ && tokens > 0 && L.tail_k.size() == 0);
  }

  // Grows layer L (a growing layout) to hold `tokens` tokens; strong guarantee.
  void reserve_layer(layer_state& L, Index tokens) {
    if (!plan_.grows || !needs_room(L, tokens)) return;
    const Index needed = units_for(tokens);
    // Doubling from at least 16 tokens, clamped to max_tokens, never below what is needed.
    const Index max_units = units_for(plan_.max_tokens);
    const Index doubled = L.ring_slots > max_units / 2 ? max_units : 2 * L.ring_slots;
    const Index target =
        std::max(needed, std::min(max_units, std::max(doubled, detail::ceil_div(16, unit_))));
    layer_state grown;
    regrow(grown, L, std::max(target, L.ring_slots));
    L = std::move(grown);
  }

  // The slot for the next unit: a sink slot while there is room, else the rolling region,
  // whose oldest unit leaves when it is full (room was checked before for other layouts).
  Index place_unit(layer_state& L) noexcept {
    if (L.sink_n < plan_.sink_units) return L.sink_n++;
    if (L.ring_n == L.ring_slots) {  // only an evicting layout gets here full
      L.ring_start = (L.ring_start + 1) % L.ring_slots;
      --L.ring_n;
    }
    const Index slot = plan_.sink_units + (L.ring_start + L.ring_n) % L.ring_slots;
    ++L.ring_n;
    return slot;
  }

  // Writes checked rows whose room exists, as if one at a time. Cannot throw.
  template <class K, class V>
  void write(layer_state& L, const Eigen::MatrixBase<K>& k, const Eigen::MatrixBase<V>& v) {
    const Index n = k.rows(), width = shape_.kv_width();
    if (!uses_tail_) {
      // Units are tokens: the sinks first, then runs of consecutive rolling slots.
      const Index to_sinks = std::min(n, plan_.sink_units - L.sink_n);
      if (to_sinks > 0) {
        format_.write(L.units, L.sink_n, k.topRows(to_sinks), v.topRows(to_sinks));
        L.sink_n += to_sinks;
      }
      Index i = to_sinks;
      // Rows a longer chunk would overwrite itself are never written.
      const Index skip = plan_.evicts ? std::max<Index>(0, n - i - L.ring_slots) : 0;
      advance_ring(L, skip);
      i += skip;
      while (i < n) {
        const Index pos = (L.ring_start + L.ring_n) % L.ring_slots;  // the oldest when full
        const Index r = std::min(n - i, L.ring_slots - pos);
        format_.write(L.units, plan_.sink_units + pos, k.middleRows(i, r), v.middleRows(i, r));
        advance_ring(L, r);
        i += r;
      }
      L.next += n;
      return;
    }
    for (Index i = 0; i < n; ++i) {
      Eigen::Map<row_vector<compute_type>>(L.tail_k.data() + L.tail_n * width, width) =
          k.row(i).template cast<compute_type>();
      if (!keys_only()) {
        Eigen::Map<row_vector<compute_type>>(L.tail_v.data() + L.tail_n * width, width) =
            v.row(i).template cast<compute_type>();
      }
      ++L.tail_n;
      ++L.next;
      if (L.tail_n == tail_cap_) flush(L);
    }
  }

  // Counts `r` units placed in the rolling region after its newest: they fill its free slots,
  // then take the oldest ones' (an evicting layout only).
  static void advance_ring(layer_state& L, Index r) noexcept {
    if (r <= 0) return;
    const Index added = std::min(r, L.ring_slots - L.ring_n);
    L.ring_n += added;
    L.ring_start = (L.ring_start + (r - added)) % L.ring_slots;
  }

  // Stores the tail's oldest unit and drops it from the tail.
  void flush(layer_state& L) {
    const Index width = shape_.kv_width();
    using rows = Eigen::Map<const row_matrix<compute_type>>;
    const compute_type* values = keys_only() ? L.tail_k.data() : L.tail_v.data();
    format_.write(L.units, place_unit(L), rows(L.tail_k.data(), unit_, width),
                  rows(values, unit_, width));
    L.tail_n -= unit_;
    const auto bytes = static_cast<std::size_t>(L.tail_n * width) * sizeof(compute_type);
    std::memmove(L.tail_k.data(), L.tail_k.data() + unit_ * width, bytes);
    if (!keys_only()) std::memmove(L.tail_v.data(), L.tail_v.data() + unit_ * width, bytes);
  }

  // Tokens of a prefill chunk that can be appended and attended in one causal pass, so that
  // every query sees the cache exactly as a decode step at its position would: no unit is
  // stored from the tail within the pass (a pass ends at the token that stores one), and no
  // key an earlier query of the pass needs is evicted.
  Index piece_length(const layer_state& L, Index remaining) const noexcept {
    Index limit = remaining;
    Index tail_room = 0;
    if (uses_tail_) {
      tail_room = tail_cap_ - 1 - L.tail_n;
      limit = std::min(limit, std::max<Index>(1, tail_room));
    }
    if (plan_.evicts) {
      const Index free_units = (plan_.sink_units - L.sink_n) + (L.ring_slots - L.ring_n);
      // Rolling units wholly older than the window of the pass's first query may go too.
      const Index start = L.next - L.tail_n - L.ring_n * unit_;
      const Index stale_end = L.next - plan_.mask.window + 1;
      const Index stale = std::clamp<Index>((stale_end - start) / unit_, 0, L.ring_n);
      limit = std::min(limit, std::max<Index>(1, (free_units + stale) * unit_ + tail_room));
    }
    return limit;
  }

  view_type view_of(const layer_state& L) const noexcept {
    view_type w;
    w.format = format_;
    w.storage = &L.units;
    w.tail_keys = L.tail_k.data();
    w.tail_values = keys_only() ? L.tail_k.data() : L.tail_v.data();
    w.tail_tokens = L.tail_n;
    w.tail_position = L.next - L.tail_n;
    w.kv_heads = shape_.n_kv_heads();
    w.dim = shape_.head_dim();
    w.vdim = shape_.value_dim();
    w.shared_values = keys_only();
    w.unit = unit_;
    w.tokens = held(L);
    w.end = L.next;
    w.mask_ = plan_.mask;
    const auto add = [&w](Index slot, Index units, Index position) {
      if (units <= 0) return;
      if (w.n_runs > 0) {  // runs on from the previous one, in slots and positions
        auto& last = w.runs[static_cast<std::size_t>(w.n_runs - 1)];
        if (last.slot + last.units == slot && last.position + last.units * w.unit == position) {
          last.units += units;
          return;
        }
      }
      w.runs[static_cast<std::size_t>(w.n_runs++)] = {slot, units, position};
    };
    add(0, L.sink_n, 0);
    if (L.ring_n > 0) {
      const Index start = L.next - L.tail_n - L.ring_n * unit_;
      const Index a = std::min(L.ring_n, L.ring_slots - L.ring_start);
      add(plan_.sink_units + L.ring_start, a, start);
      add(plan_.sink_units, L.ring_n - a, start + a * unit_);
    }
    return w;
  }

  row_matrix<compute_type> held_rows(const layer_state& L, bool keys) const {
    const view_type w = view_of(L);
    row_matrix<compute_type> out(held(L), shape_.kv_width()), other(held(L), shape_.kv_width());
    Index row = 0;
    for (Index r = 0; r < w.n_runs; ++r) {
      const auto& run = w.runs[static_cast<std::size_t>(r)];
      const Index n = run.units * unit_;
      format_.read(L.units, run.slot, run.units, out.middleRows(row, n), other.middleRows(row, n));
      if (!keys) out.middleRows(row, n) = other.middleRows(row, n);
      row += n;
    }
    const auto& tail = keys || keys_only() ? L.tail_k : L.tail_v;
    out.bottomRows(L.tail_n) =
        Eigen::Map<const row_matrix<compute_type>>(tail.data(), L.tail_n, shape_.kv_width());
    if (keys || !keys_only()) return out;
    // Values read from the keys: the first value_dim columns of each kv head's key.
    const Index d = shape_.head_dim(), dv = shape_.value_dim();
    row_matrix<compute_type> values(out.rows(), shape_.n_kv_heads() * dv);
    for (Index h = 0; h < shape_.n_kv_heads(); ++h) values.middleCols(h * dv, dv) = out.middleCols(h * d, dv);
    return values;
  }

  // Crop: the checks of crop(n) for layer l (see there).
  void check_crop(Index l, Index n) const {
    const layer_state& L = layers_[static_cast<std::size_t>(l)];
    if (n < 0 || n > L.next) {
      detail::fail<std::out_of_range>("crop: n = ", n, " out of range [0, ", L.next, "] of layer ",
                                      l);
    }
    const Index R = format_.residual(), tail_start = L.next - L.tail_n;
    // The tail a cache that never saw the tokens from n on would hold starts at the oldest unit
    // boundary b with n < b + unit + residual (units are stored from the tail when it reaches
    // residual + unit tokens); its tokens [b, n) must be in our tail, in full precision.
    const bool nothing_stored = L.sink_n + L.ring_n == 0;
    if (uses_tail_ && n > 0 && !nothing_stored && n < tail_start + R &&
        !(R == 0 && (tail_start - n) % unit_ == 0)) {
      detail::fail<std::out_of_range>(
          "crop: rolling layer ", l, " back to n = ", n, " is not exact: the tokens before "
          "position ", tail_start, " are stored quantized; it rolls back exactly to positions >= ",
          tail_start + R,
          R == 0 ? " or to a group boundary" : "", " (", format_.name(), ", group ", unit_,
          ", residual ", R, ")");
    }
    // The tokens a query at n - 1 sees must still be held: sinks, and the window.
    const Index ring_begin = L.next - L.tail_n - L.ring_n * unit_;
    const Index sink_end = L.sink_n * unit_;
    const Index need_from = plan_.mask.window > 0
                                ? std::max(plan_.mask.sinks, n - plan_.mask.window)
                                : Index(0);
    if (ring_begin > sink_end && need_from < ring_begin && need_from >= sink_end && n > need_from) {
      detail::fail<std::out_of_range>(
          "crop: rolling layer ", l, " back to n = ", n, " is not exact: it needs tokens from "
          "position ", need_from, " that the ring no longer holds; it rolls back exactly to positions >= ",
          ring_begin + (plan_.mask.window > 0 ? plan_.mask.window : 0),
          " (raise max_rollback to keep more)");
    }
  }

  // The position from which shift(first, ...) rewrites layer L: the start of the stored unit
  // that holds `first`, or of the tail.
  Index rebuild_from(const layer_state& L, Index first) const noexcept {
    const view_type w = view_of(L);
    for (Index r = 0; r < w.n_runs; ++r) {
      const auto& run = w.runs[static_cast<std::size_t>(r)];
      const Index end = run.position + run.units * unit_;
      if (end > first) return run.position + std::max<Index>(0, (first - run.position) / unit_) * unit_;
    }
    return w.tail_position;
  }

  void shift_layer(layer_state& L, Index first, Index last, const rope& rope,
                   row_matrix<compute_type>& k, row_matrix<compute_type>& v) {
    const Index from = rebuild_from(L, first), delta = last - first;
    // Read back every held token at or after `from`, with its position.
    const view_type w = view_of(L);
    Index n = 0, pos0 = -1;
    for (Index r = 0; r < w.n_runs; ++r) {
      const auto& run = w.runs[static_cast<std::size_t>(r)];
      const Index end = run.position + run.units * unit_;
      if (end <= from) continue;
      const Index skip = std::max<Index>(0, from - run.position) / unit_;
      const Index units = run.units - skip;
      if (pos0 < 0) pos0 = run.position + skip * unit_;
      format_.read(L.units, run.slot + skip, units, k.middleRows(n, units * unit_),
                   v.middleRows(n, units * unit_));
      n += units * unit_;
    }
    if (pos0 < 0) pos0 = w.tail_position;
    const Index width = shape_.kv_width();
    k.middleRows(n, L.tail_n) = Eigen::Map<const row_matrix<compute_type>>(L.tail_k.data(), L.tail_n, width);
    const compute_type* tail_values = keys_only() ? L.tail_k.data() : L.tail_v.data();
    v.middleRows(n, L.tail_n) = Eigen::Map<const row_matrix<compute_type>>(tail_values, L.tail_n, width);
    n += L.tail_n;
    // Drop them from the layer, then append back the kept ones at their new positions.
    drop_from(L, from);
    const Index keep_before = std::clamp<Index>(first - pos0, 0, n);
    // The first token appended back: the oldest kept one, at its new position (past evicted
    // tokens, if any, which only an emptied ring can skip).
    if (L.ring_n == 0 && L.tail_n == 0) L.next = keep_before > 0 ? pos0 : std::max(pos0, last) - delta;
    const Index dropped = std::clamp<Index>(last - pos0, keep_before, n) - keep_before;
    const Index after = n - keep_before - dropped;
    if (after > 0) detail::rotate_keys(shape_, rope, k.middleRows(keep_before + dropped, after), -delta);
    write(L, k.topRows(keep_before), v.topRows(keep_before));
    write(L, k.middleRows(keep_before + dropped, after), v.middleRows(keep_before + dropped, after));
  }

  // Drops every held token at or after position `from`, a unit boundary or a position in the
  // tail (crop checks before that the result is exact; shift rebuilds what follows).
  void drop_from(layer_state& L, Index from) noexcept {
    const Index tail_start = L.next - L.tail_n;
    if (from >= tail_start) {
      L.tail_n = from - tail_start;
      L.next = from;
      return;
    }
    L.tail_n = 0;
    const Index ring_begin = tail_start - L.ring_n * unit_;
    if (from >= ring_begin) {
      L.ring_n = (from - ring_begin) / unit_;
    } else {
      L.ring_n = 0;
      L.sink_n = std::min(L.sink_n, from / unit_);
    }
    if (L.ring_n == 0) L.ring_start = 0;
    L.next = from;
  }

  cache_shape shape_;
  Layout layout_;
  Format format_;
  layout_plan plan_;
  Index unit_ = 1;
  bool uses_tail_ = false;
  Index tail_cap_ = 0;
  std::vector<layer_state> layers_;
};

/// Prefill of a chunk of `n` tokens onto layer `l` of any cache, which may already hold tokens
/// (chunked prefill, a later turn of a chat): appends `k` and `v` (`n x n_kv_heads*head_dim`)
/// and writes to `out` (`n x n_heads*head_dim`) the attention of each query row of `q`
/// (`n x n_heads*head_dim`) over what the cache holds for it, reading keys and values as
/// stored, exactly as decode steps at those positions would: the chunk is cut into passes
/// that each append and attend in one causal pass, ending where the layout would evict a key
/// an earlier query needs or the format would store a unit from its tail (a full ring then
/// goes a token at a time, a quantized format a group at a time).
///
/// Everything is checked, room reserved and `ws` sized before anything is written: throws
/// std::out_of_range for a bad layer, std::invalid_argument for shapes or options that do not
/// fit, std::length_error past the cache's capacity, std::bad_alloc when memory is short; the
/// cache is unchanged when it throws.
template <class Layout, class Format, class DerivedK, class DerivedV>
void prefill_attention(
    const attention_shape& shape,
    const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& q,
    const Eigen::MatrixBase<DerivedK>& k, const Eigen::MatrixBase<DerivedV>& v,
    kv_cache<Layout, Format>& cache, Index l,
    Eigen::Ref<row_matrix<compute_t<typename Format::scalar_type>>> out,
    attention_workspace<compute_t<typename Format::scalar_type>>& ws,
    const attention_options& opt = {}) {
  cache.prefill(shape, q, k, v, l, out, ws, opt);
}

}  // namespace kvcache
