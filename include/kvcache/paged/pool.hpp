// SPDX-License-Identifier: Apache-2.0
// The page pool of a paged KV cache: fixed-size pages of every layer in one format, reference
// counts, a free list, and the prefix index of published pages with its LRU of cached ones.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/format/units.hpp"
#include "kvcache/paged/prefix_hash.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvcache {

/// What a page pool holds, in pages and bytes.
struct pool_stats {
  Index total = 0;       ///< pages in the pool
  Index used = 0;        ///< pages referenced by at least one sequence
  Index free = 0;        ///< pages on the free list
  Index cached = 0;      ///< published pages no sequence references: kept for prefix hits,
                         ///< evicted least recently used first when the free list is empty
  Index page_bytes = 0;  ///< bytes of one page: page_size tokens of every layer and kv head
  Index used_bytes = 0;  ///< used * page_bytes
  Index total_bytes = 0; ///< total * page_bytes, allocated up front
  Index evictions = 0;   ///< cached pages taken back for new allocations so far
};

/// A pool of `n_pages` pages, each holding `page_size` tokens of every layer and kv head in
/// `Format` (vLLM's PagedAttention block pool; FlashInfer's paged KV data). The memory is
/// allocated once, in the constructor, and a page never moves: page p of layer l and kv head h
/// is units [p * units_per_page, (p + 1) * units_per_page) of kv head h in storage(l).
///
/// Pages are reference-counted. A page whose count falls to 0 goes back to the free list, or,
/// when it is published in the prefix index, to the LRU list of cached pages, from which it is
/// taken again by a prefix hit or, when the free list is empty, evicted for a new allocation.
/// allocate, retain, release, publish and the lookups are O(1) (the index is a hash map).
///
/// Thread safety: const members may run concurrently; a non-const member needs the pool to
/// itself. The pool is normally owned by a paged_kv_cache, which keeps these rules for it.
template <class Format>
class page_pool {
 public:
  using format_type = Format;
  using storage_type = typename Format::storage;

  /// Throws std::invalid_argument unless page_size >= 1 is a multiple of the format's
  /// unit_tokens() (a quantized format stores whole groups) and n_pages >= 1,
  /// std::length_error when the pool's bytes overflow, std::bad_alloc when memory is short.
  page_pool(const cache_shape& shape, Index page_size, Index n_pages, Format format = Format())
      : shape_(shape), format_(format), page_size_(page_size), n_pages_(n_pages) {
    format_.check("page_pool", shape.head_dim());
    const Index unit = format_.unit_tokens();
    if (page_size < 1 || page_size % unit != 0) {
      detail::fail<std::invalid_argument>("page_pool: page_size must be a positive multiple of ",
                                          "the format's ", unit, "-token unit, got ", page_size);
    }
    if (n_pages < 1) {
      detail::fail<std::invalid_argument>("page_pool: n_pages must be >= 1, got ", n_pages);
    }
    upp_ = page_size / unit;
    const Index unit_bytes = format_.unit_bytes(shape.n_kv_heads(), shape.head_dim());
    page_bytes_ = detail::checked_product({upp_, unit_bytes, shape.n_layers()}, "page_pool: page bytes");
    detail::checked_mul(page_bytes_, n_pages, "page_pool: pool bytes");
    const Index slots = detail::checked_mul(n_pages, upp_, "page_pool: slots");
    detail::checked_mul(n_pages, page_size, "page_pool: token ids");
    storage_.reserve(static_cast<std::size_t>(shape.n_layers()));
    for (Index l = 0; l < shape.n_layers(); ++l) {
      storage_.push_back(format_.allocate(shape.n_kv_heads(), shape.head_dim(), slots));
    }
    const auto n = static_cast<std::size_t>(n_pages);
    refs_.assign(n, 0);
    published_.assign(n, 0);
    hash_.assign(n, page_hash{});
    parent_.assign(n, page_hash{});
    tokens_.assign(static_cast<std::size_t>(n_pages * page_size), 0);
    // Two circular lists through sentinels: cached pages (LRU, oldest first) and free pages.
    prev_.resize(n + 2);
    next_.resize(n + 2);
    for (const Index list : {lru_list(), free_list()}) {
      prev_[at(list)] = next_[at(list)] = list;
    }
    for (Index p = 0; p < n_pages; ++p) push_back(free_list(), p);  // page 0 is taken first
    free_n_ = n_pages;
    index_.reserve(n);
  }

  page_pool(const page_pool&) = delete;
  page_pool& operator=(const page_pool&) = delete;
  /// A moved-from pool has no pages. The eviction handler does not move: it belongs to the
  /// object it was set on (a tiered_prefix_cache holds a reference to its cache), so the pool
  /// moved to has none until one is set on it.
  page_pool(page_pool&& other) noexcept
      : shape_(other.shape_), format_(other.format_), page_size_(other.page_size_),
        n_pages_(std::exchange(other.n_pages_, 0)), upp_(other.upp_),
        page_bytes_(other.page_bytes_), storage_(std::move(other.storage_)),
        refs_(std::move(other.refs_)), published_(std::move(other.published_)),
        hash_(std::move(other.hash_)), parent_(std::move(other.parent_)),
        tokens_(std::move(other.tokens_)), prev_(std::move(other.prev_)),
        next_(std::move(other.next_)), free_n_(std::exchange(other.free_n_, 0)),
        cached_(std::exchange(other.cached_, 0)), evictions_(std::exchange(other.evictions_, 0)),
        index_(std::move(other.index_)) {
    other.clear_moved();
  }
  page_pool& operator=(page_pool&& other) noexcept {
    if (this != &other) {
      this->~page_pool();
      new (this) page_pool(std::move(other));
    }
    return *this;
  }
  ~page_pool() = default;

  const cache_shape& shape() const noexcept { return shape_; }
  const Format& format() const noexcept { return format_; }
  /// Tokens per page.
  Index page_size() const noexcept { return page_size_; }
  /// Stored units per page (page_size / unit_tokens).
  Index units_per_page() const noexcept { return upp_; }
  Index n_pages() const noexcept { return n_pages_; }
  /// Bytes of one page, every layer and kv head.
  Index page_bytes() const noexcept { return page_bytes_; }

  pool_stats stats() const noexcept {
    pool_stats s;
    s.total = n_pages_;
    s.free = free_n_;
    s.cached = cached_;
    s.used = n_pages_ - s.free - s.cached;
    s.page_bytes = page_bytes_;
    s.used_bytes = s.used * page_bytes_;
    s.total_bytes = n_pages_ * page_bytes_;
    s.evictions = evictions_;
    return s;
  }
  /// Pages an allocation may take now: the free ones and the cached ones it would evict.
  Index available() const noexcept { return free_n_ + cached_; }

  /// A page with reference count 1: page `hint` when it is free (a sequence asks for the page
  /// after its last one, so that its pages lie in order in memory, where reading them runs at
  /// full bandwidth), else the most recently freed page, else the least recently used cached
  /// page, which leaves the prefix index (the eviction handler sees it first). O(1) plus the
  /// handler. Throws std::length_error when no page is free or cached, and whatever the
  /// eviction handler throws; nothing changes then.
  Index allocate(Index hint = -1) {
    Index p;
    if (free_n_ > 0) {
      p = hint >= 0 && hint < n_pages_ && refs_[at(hint)] == 0 && !published_[at(hint)]
              ? hint
              : next_[at(free_list())];
      unlink(p);
      --free_n_;
    } else if (cached_ > 0) {
      p = next_[at(lru_list())];
      if (on_evict_) on_evict_(p);  // the page still holds its tokens, hashes and contents
      unlink(p);
      --cached_;
      unpublish(p);
      ++evictions_;
    } else {
      detail::fail<std::length_error>("page_pool: all ", n_pages_,
                                      " pages are in use; free or preempt a sequence");
    }
    refs_[at(p)] = 1;
    return p;
  }

  /// Adds a reference to page p (a fork, or a prefix hit on a cached page, which leaves the
  /// LRU list). O(1). Throws std::out_of_range for a page that does not exist or is not in use
  /// or cached.
  void retain(Index p) {
    check_page("retain", p);
    if (refs_[at(p)] == 0) {
      if (!published_[at(p)]) {
        detail::fail<std::out_of_range>("page_pool: retain of page ", p, ", which is free");
      }
      unlink(p);
      --cached_;
    }
    ++refs_[at(p)];
  }

  /// Drops a reference to page p; at 0 it becomes cached (published) or free. O(1). Throws
  /// std::out_of_range for a page that does not exist or has no reference.
  void release(Index p) {
    check_page("release", p);
    if (refs_[at(p)] <= 0) {
      detail::fail<std::out_of_range>("page_pool: release of page ", p, ", which has no reference");
    }
    if (--refs_[at(p)] > 0) return;
    if (published_[at(p)]) {
      push_back(lru_list(), p);
      ++cached_;
    } else {
      push_front(free_list(), p);
      ++free_n_;
    }
  }

  Index ref_count(Index p) const {
    check_page("ref_count", p);
    return refs_[at(p)];
  }
  /// Whether page p is in the prefix index. A published page is never written again.
  bool published(Index p) const {
    check_page("published", p);
    return published_[at(p)] != 0;
  }
  /// Whether a sequence holding page p may write into it: it alone holds it, unpublished.
  bool writable(Index p) const noexcept { return refs_[at(p)] == 1 && !published_[at(p)]; }

  /// The stored units of layer l: [kv_head][page * units_per_page + unit][...].
  /// (A moved-from pool has empty storage with no slots.)
  const storage_type& storage(Index l) const noexcept {
    return storage_.empty() ? none_ : storage_[static_cast<std::size_t>(l)];
  }
  storage_type& storage(Index l) noexcept {
    return storage_.empty() ? none_ : storage_[static_cast<std::size_t>(l)];
  }

  /// Copies every unit of page `src` to page `dst`, every layer (copy-on-write).
  void copy_page(Index dst, Index src) noexcept {
    for (auto& s : storage_) detail::copy_units<Format>(s, dst * upp_, s, src * upp_, upp_);
  }

  /// Publishes page p, holding tokens[0..page_size) after the prefix that hashed to `parent`,
  /// under `hash` (chain_hash(parent, tokens, page_size)). Returns false, and publishes
  /// nothing, when p is published already or another page holds `hash`. Throws
  /// std::out_of_range for a page not in use; std::bad_alloc leaves the pool unchanged.
  bool publish(Index p, const page_hash& hash, const page_hash& parent, const std::int32_t* tokens) {
    check_page("publish", p);
    if (refs_[at(p)] <= 0) {
      detail::fail<std::out_of_range>("page_pool: publish of page ", p, ", which is not in use");
    }
    if (published_[at(p)] || index_.count(hash) != 0) return false;
    index_.emplace(hash, p);
    published_[at(p)] = 1;
    hash_[at(p)] = hash;
    parent_[at(p)] = parent;
    std::copy(tokens, tokens + page_size_, tokens_.begin() + p * page_size_);
    return true;
  }

  /// The published page holding exactly tokens[0..page_size) after the prefix that hashed to
  /// `parent`, or -1. A hit is checked against the stored tokens and parent hash, not trusted
  /// on `hash` alone. O(page_size). Changes nothing (the LRU order moves on retain).
  Index find(const page_hash& hash, const page_hash& parent, const std::int32_t* tokens) const {
    const auto it = index_.find(hash);
    if (it == index_.end()) return -1;
    const Index p = it->second;
    if (parent_[at(p)] != parent ||
        !std::equal(tokens, tokens + page_size_, tokens_.begin() + p * page_size_)) {
      return -1;
    }
    return p;
  }

  /// Published pages, in use or cached.
  Index n_published() const noexcept { return Index(index_.size()); }

  /// The hash under which page p is published, its parent's hash and its page_size token ids.
  /// Throws std::out_of_range for a page that does not exist or is not published.
  const page_hash& hash_of(Index p) const {
    check_published("hash_of", p);
    return hash_[at(p)];
  }
  const page_hash& parent_of(Index p) const {
    check_published("parent_of", p);
    return parent_[at(p)];
  }
  const std::int32_t* tokens_of(Index p) const {
    check_published("tokens_of", p);
    return tokens_.data() + p * page_size_;
  }

  /// Calls `handler(page)` whenever allocate() is about to evict a cached page, while the page
  /// is still published with its contents, hash, parent and tokens: the place to offload it to
  /// a slower tier (vLLM's KV offloading). The handler must not call members of this pool that
  /// change it. An empty function removes the handler. A handler that throws makes allocate()
  /// throw with nothing changed, so a handler that must not stop allocation catches its own
  /// failures.
  void set_eviction_handler(std::function<void(Index)> handler) { on_evict_ = std::move(handler); }
  /// Whether an eviction handler is set.
  bool has_eviction_handler() const noexcept { return static_cast<bool>(on_evict_); }

 private:
  static std::size_t at(Index p) noexcept { return static_cast<std::size_t>(p); }
  Index lru_list() const noexcept { return n_pages_; }
  Index free_list() const noexcept { return n_pages_ + 1; }

  void check_page(const char* fn, Index p) const {
    if (p < 0 || p >= n_pages_) {
      detail::fail<std::out_of_range>("page_pool: ", fn, " of page ", p, ", expected 0..",
                                      n_pages_ - 1);
    }
  }
  void check_published(const char* fn, Index p) const {
    check_page(fn, p);
    if (!published_[at(p)]) {
      detail::fail<std::out_of_range>("page_pool: ", fn, " of page ", p, ", which is not published");
    }
  }
  // Leaves a moved-from pool without pages, every member consistent.
  void clear_moved() noexcept {
    storage_.clear();
    refs_.clear();
    published_.clear();
    hash_.clear();
    parent_.clear();
    tokens_.clear();
    prev_.clear();
    next_.clear();
    index_.clear();
    on_evict_ = nullptr;
  }
  void unlink(Index p) noexcept {
    next_[at(prev_[at(p)])] = next_[at(p)];
    prev_[at(next_[at(p)])] = prev_[at(p)];
  }
  // Links p after `before`.
  void link_after(Index before, Index p) noexcept {
    const Index after = next_[at(before)];
    prev_[at(p)] = before;
    next_[at(p)] = after;
    next_[at(before)] = p;
    prev_[at(after)] = p;
  }
  void push_back(Index list, Index p) noexcept { link_after(prev_[at(list)], p); }
  void push_front(Index list, Index p) noexcept { link_after(list, p); }
  void unpublish(Index p) noexcept {
    index_.erase(hash_[at(p)]);
    published_[at(p)] = 0;
  }

  cache_shape shape_;
  Format format_;
  Index page_size_ = 1;
  Index n_pages_ = 0;
  Index upp_ = 1;
  Index page_bytes_ = 0;
  std::vector<storage_type> storage_;         // [layer]
  storage_type none_{};                       // what a moved-from pool hands out
  std::vector<Index> refs_;                   // [page] reference count
  std::vector<unsigned char> published_;      // [page] in the prefix index
  std::vector<page_hash> hash_;               // [page] its hash, when published
  std::vector<page_hash> parent_;             // [page] its parent's hash, when published
  std::vector<std::int32_t> tokens_;          // [page][page_size] its token ids, when published
  std::vector<Index> prev_, next_;  // [page + 2 sentinels] the LRU and free lists
  Index free_n_ = 0;
  Index cached_ = 0;
  Index evictions_ = 0;
  std::unordered_map<page_hash, Index, page_hash_hasher> index_;
  std::function<void(Index)> on_evict_;  // called before a cached page is evicted
};

}  // namespace kvcache
