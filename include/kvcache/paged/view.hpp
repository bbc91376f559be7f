// SPDX-License-Identifier: Apache-2.0
// What attention reads of a paged cache: one sequence's layer as positioned pages, and a batch
// of sequences as FlashInfer lays it out (CSR: indptr into page ids, last-page lengths).
#pragma once

#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <vector>

namespace kvcache {

/// One layer of one sequence of a paged cache: its pages, oldest first, each a block whose
/// first token's position is known, then the full-precision tail of a quantized format.
/// A non-owning, trivially copyable view, valid until the cache is next modified.
template <class Format>
struct paged_view {
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using block_type = layer_block<typename Format::block_type, compute_type>;

  Format format{};
  const typename Format::storage* storage = nullptr;  // the pool's storage of this layer
  const Index* pages = nullptr;           // [page] ids, the block table
  const Index* page_positions = nullptr;  // [page] position of each page's first token
  Index n_pages = 0;
  Index units_per_page = 1;
  Index unit = 1;                 // tokens per stored unit
  Index last_page_units = 0;      // units stored in the last page
  const compute_type* tail_keys = nullptr;    // [tail slot][kv_head * head_dim]
  const compute_type* tail_values = nullptr;  // same layout
  Index tail_tokens = 0;
  Index kv_heads = 0;
  Index dim = 0;
  Index vdim = 0;              // width of the values
  bool shared_values = false;  // values are the first vdim columns of the keys
  Index tokens = 0;
  Index end = 0;
  attention_mask mask_{};

  Index n_kv_heads() const noexcept { return kv_heads; }
  Index head_dim() const noexcept { return dim; }
  Index value_dim() const noexcept { return vdim; }
  bool values_in_keys() const noexcept { return shared_values; }
  Index size() const noexcept { return tokens; }
  Index n_blocks() const noexcept { return n_pages + (tail_tokens > 0 ? 1 : 0); }
  Index position(Index i) const noexcept {
    return i < n_pages ? page_positions[i] : end - tail_tokens;
  }
  Index end_position() const noexcept { return end; }
  attention_mask mask() const noexcept { return mask_; }
  block_type block(Index h, Index i) const noexcept {
    block_type b;
    if (i < n_pages) {
      const Index units = i + 1 < n_pages ? units_per_page : last_page_units;
      b.stored = format.block(*storage, h, pages[i] * units_per_page, units);
      b.tokens = units * unit;
    } else {
      b.in_tail = true;
      b.tail = {tail_keys + h * dim, tail_values + h * dim, tail_tokens, kv_heads * dim};
      b.tokens = tail_tokens;
    }
    return b;
  }
};

/// One layer of many sequences of a paged cache, laid out as FlashInfer's paged_kv_t: sequence
/// b holds pages indices[indptr[b]] .. indices[indptr[b+1] - 1], oldest first, the last of them
/// holding last_page_len[b] tokens (the others are full), so b holds
/// (pages - 1) * page_size + last_page_len[b] stored tokens (0 without pages). To that layout
/// it adds what positions and formats need: the position of each listed page's first token
/// (page_positions, parallel to indices; pages that a sliding window dropped leave gaps), one
/// past each sequence's newest position (end_positions), and each sequence's full-precision
/// tail (quantized formats; none for plain ones).
///
/// Filled by paged_kv_cache::batch, which reuses its vectors: refilling a batch of the same or
/// a smaller size allocates nothing. Valid until the cache is next modified.
template <class Format>
struct paged_batch {
  using format_type = Format;
  using scalar_type = typename Format::scalar_type;
  using compute_type = compute_t<scalar_type>;
  using view_type = paged_view<Format>;

  std::vector<Index> indptr;          // [B + 1]
  std::vector<Index> indices;         // [indptr[B]] page ids
  std::vector<Index> page_positions;  // [indptr[B]] position of each page's first token
  std::vector<Index> last_page_len;   // [B] tokens in each sequence's last page
  std::vector<Index> end_positions;   // [B] one past each sequence's newest position
  std::vector<const compute_type*> tail_keys;    // [B] [tail slot][kv_head * head_dim]
  std::vector<const compute_type*> tail_values;  // [B]
  std::vector<Index> tail_tokens;                // [B]
  Format format{};
  const typename Format::storage* storage = nullptr;
  Index page_size = 1;
  Index unit = 1;
  Index kv_heads = 0;
  Index dim = 0;
  Index vdim = 0;
  bool shared_values = false;
  attention_mask mask{};

  /// Sequences in the batch.
  Index size() const noexcept { return Index(end_positions.size()); }

  /// Sequence b as attention reads it. O(1).
  view_type sequence(Index b) const noexcept {
    const auto i = static_cast<std::size_t>(b);
    view_type v;
    v.format = format;
    v.storage = storage;
    v.pages = indices.data() + indptr[i];
    v.page_positions = page_positions.data() + indptr[i];
    v.n_pages = indptr[i + 1] - indptr[i];
    v.units_per_page = page_size / unit;
    v.unit = unit;
    v.last_page_units = last_page_len[i] / unit;
    v.tail_keys = tail_keys[i];
    v.tail_values = tail_values[i];
    v.tail_tokens = tail_tokens[i];
    v.kv_heads = kv_heads;
    v.dim = dim;
    v.vdim = vdim;
    v.shared_values = shared_values;
    v.tokens = (v.n_pages > 0 ? (v.n_pages - 1) * page_size + last_page_len[i] : 0) + v.tail_tokens;
    v.end = end_positions[i];
    v.mask_ = mask;
    return v;
  }

  /// Empties the batch, keeping its memory.
  void clear() noexcept {
    indptr.assign(1, 0);
    indices.clear();
    page_positions.clear();
    last_page_len.clear();
    end_positions.clear();
    tail_keys.clear();
    tail_values.clear();
    tail_tokens.clear();
  }
};

}  // namespace kvcache
