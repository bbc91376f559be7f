// SPDX-License-Identifier: Apache-2.0
// A paged cache's prefix pages over tiers beyond the pool: evicted pages written to the first
// tier, published pages written through, prefix lookups that miss the pool answered by the
// tiers in order, their hits brought back into the pool.
#pragma once

#include "kvcache/io/state_file.hpp"
#include "kvcache/paged/cache.hpp"
#include "kvcache/store/page_blob.hpp"
#include "kvcache/store/page_store.hpp"

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvcache {

/// What a tiered_prefix_cache did with its tiers since it was made.
struct tier_stats {
  Index restored_pages = 0;   ///< pages brought back from a tier into the pool
  Index restored_bytes = 0;   ///< value bytes read for them
  Index restored_tokens = 0;  ///< tokens in them: prefill a prompt's owner did not run
  Index offloaded_pages = 0;  ///< pages the first tier stored (evicted or published)
  Index offloaded_bytes = 0;  ///< value bytes it stored for them
  Index rejected = 0;         ///< values a tier returned that failed decode_page: damaged, of
                              ///< another model, format or shape; dropped, never used
  Index errors = 0;           ///< offloads (evicted or written through) that failed inside
                              ///< this process (out of memory)
  std::string last_rejection; ///< why the newest rejected value was refused
};

/// The prefix pages of a paged_kv_cache over a list of page_store tiers, fastest first (host
/// memory, a local directory, a shared Redis): vLLM's KV offloading and LMCache's shared
/// prefix stores over our pool.
///
/// - A cached page that the pool evicts for a new allocation is written to the first tier
///   unless it holds it already (the eviction handler this object installs on the cache).
/// - With write_through (the default), publish() writes the pages it publishes to the first
///   tier too, so that another process finds them without waiting for an eviction.
/// - create() adopts the pool's pages of a prompt's prefix; for the pages after them it asks
///   the tiers in order (one batched get a tier), checks each value (decode_page: checksum,
///   layout, format, shape, parent hash, tokens) and brings the run of good pages from the
///   start into the pool, where the sequence adopts them as it would its own cached pages.
///   A value that fails its checks is dropped from its tier and counted, never used; a tier
///   that fails answers as a miss. Either way the caller prefills what was not restored, so
///   the tokens never depend on the tiers.
///
/// Keys are page_blob_key(page_layout_fingerprint(cache), chained hash); the chain starts
/// from the extra key (prefix_root), which must name the model (its weights), so that two
/// models never share a key.
///
/// The cache and the tiers must outlive this object, which must not move (the eviction
/// handler points to it); it removes its handler when destroyed. One caller at a time.
template <class Format>
class tiered_prefix_cache {
 public:
  using cache_type = paged_kv_cache<Format>;

  /// Binds `cache` to `tiers` (non-null, fastest first; empty for none). Throws
  /// std::invalid_argument for a null tier, or for tiers over a cache that has an eviction
  /// handler already (another tiered_prefix_cache with tiers over it: it would lose its
  /// evicted pages, and the handler when this one goes).
  tiered_prefix_cache(cache_type& cache, std::vector<page_store*> tiers, bool write_through = true)
      : cache_(cache), tiers_(std::move(tiers)), write_through_(write_through),
        layout_(page_layout_fingerprint(cache)) {
    for (std::size_t i = 0; i < tiers_.size(); ++i) {
      if (tiers_[i] == nullptr) {
        detail::fail<std::invalid_argument>("tiered_prefix_cache: tier ", i, " is null");
      }
    }
    if (!tiers_.empty() && cache_.has_eviction_handler()) {
      detail::fail<std::invalid_argument>("tiered_prefix_cache: the cache has an eviction handler "
                                          "already (another tiered_prefix_cache over it?)");
    }
    if (!tiers_.empty()) cache_.set_eviction_handler([this](Index page) { offload_evicted(page); });
  }
  tiered_prefix_cache(const tiered_prefix_cache&) = delete;
  tiered_prefix_cache& operator=(const tiered_prefix_cache&) = delete;
  ~tiered_prefix_cache() {
    if (!tiers_.empty()) cache_.set_eviction_handler(nullptr);
  }

  cache_type& cache() noexcept { return cache_; }
  const std::vector<page_store*>& tiers() const noexcept { return tiers_; }
  const tier_stats& stats() const noexcept { return stats_; }
  /// The key of the page with chained hash `hash` in every tier.
  std::string key(const page_hash& hash) const { return page_blob_key(layout_, hash); }

  /// cache.create(tokens, n, extra_key) after restoring, from the tiers, the full pages of the
  /// prompt's first n - 1 tokens that follow the pool's own: the new sequence holds
  /// prefix_hit(id) tokens and the caller prefills the rest. Pages are restored while the pool
  /// has free or cached pages to put them in (restoring evicts the least recently used cached
  /// pages, never the prompt's own). `extra_key` must name the model (its weights, not a file
  /// path): the tiers are shared, and an empty key is refused. Cost: a hash per page of the
  /// prompt, one batched get per tier asked, a copy of each restored page. Throws
  /// std::invalid_argument for an empty extra_key, and as cache.create does; std::bad_alloc
  /// leaves the cache as it was, apart from pages restored into it.
  Index create(const std::int32_t* tokens, Index n, std::string_view extra_key) {
    check_key("create", extra_key);
    Index id = cache_.create(tokens, n, extra_key);
    if (tiers_.empty() || n < 1) return id;
    Index restored = 0;
    try {
      restored = restore_after(tokens, n - 1, extra_key, cache_.prefix_hit(id));
    } catch (...) {
      cache_.free(id);
      throw;
    }
    if (restored > 0) {  // adopt them: its pages go to the newest end of the LRU list and
      cache_.free(id);   // are taken straight back, so nothing is evicted in between
      id = cache_.create(tokens, n, extra_key);
    }
    return id;
  }

  /// cache.publish(seq, tokens, n, extra_key); with write_through, the pages it publishes are
  /// then written to the first tier unless it holds them (one batched contains, one batched
  /// put). Returns the pages newly published. Throws std::invalid_argument for an empty
  /// extra_key (see create), and as cache.publish does; a write-through
  /// that fails after the pages are published (a tier's std::bad_alloc) is counted in
  /// stats().errors, not thrown, since the publish is done.
  Index publish(Index seq, const std::int32_t* tokens, Index n, std::string_view extra_key) {
    check_key("publish", extra_key);
    const std::size_t before = cache_.page_hashes(seq).size();
    const page_hash root_before = root_of(seq);
    const Index published = cache_.publish(seq, tokens, n, extra_key);
    if (!write_through_ || tiers_.empty()) return published;
    try {
      const auto& hashes = cache_.page_hashes(seq);
      const std::size_t from = root_of(seq) == root_before ? std::min(before, hashes.size()) : 0;
      std::vector<Index> pages;
      const auto& table = cache_.block_table(seq);
      for (std::size_t i = from; i < hashes.size() && i < table.size(); ++i) {
        const Index p = table[i];
        if (cache_.pool().published(p) && cache_.pool().hash_of(p) == hashes[i]) pages.push_back(p);
      }
      offload(pages);
    } catch (...) {
      ++stats_.errors;
    }
    return published;
  }

  /// Writes the given published pages of the pool to the first tier, skipping those it holds.
  /// Returns the pages the tier stored (by its counters: none when it failed, fewer when its
  /// budget refused some). Never throws for the tier's failures (counted by the tier). Throws
  /// std::out_of_range, before asking the tier anything, for a page that does not exist or is
  /// not published; std::bad_alloc as the tier and the encoding do.
  Index offload(const std::vector<Index>& pages) {
    if (tiers_.empty() || pages.empty()) return 0;
    std::vector<std::string> keys;
    keys.reserve(pages.size());
    for (const Index p : pages) keys.push_back(key(cache_.pool().hash_of(p)));
    std::vector<bool> held;
    tiers_.front()->contains_many(keys, held);
    std::vector<std::string> put_keys;
    std::vector<std::string> values;
    for (std::size_t i = 0; i < pages.size(); ++i) {
      if (held[i]) continue;
      put_keys.push_back(keys[i]);
      values.push_back(encode_page(cache_, pages[i]));
    }
    if (put_keys.empty()) return 0;
    std::vector<std::string_view> views(values.begin(), values.end());
    const store_counters before = tiers_.front()->counters();
    tiers_.front()->put_many(put_keys, views);
    const store_counters after = tiers_.front()->counters();
    stats_.offloaded_pages += after.puts - before.puts;
    stats_.offloaded_bytes += after.bytes_written - before.bytes_written;
    return after.puts - before.puts;
  }

 private:
  static void check_key(const char* fn, std::string_view extra_key) {
    if (extra_key.empty()) {
      detail::fail<std::invalid_argument>(
          "tiered_prefix_cache::", fn, ": the extra key is empty; tiers are shared between ",
          "processes, so it must name the model (e.g. a hash of its weights)");
    }
  }

  page_hash root_of(Index seq) const {
    const auto& h = cache_.page_hashes(seq);
    return h.empty() ? page_hash{} : h.front();
  }

  // Restores, from the tiers, the full pages of tokens[0..n) after the first `have` tokens
  // (a multiple of the page size) that the pool holds; returns the pages restored.
  Index restore_after(const std::int32_t* tokens, Index n, std::string_view extra_key, Index have) {
    const Index P = cache_.page_size();
    const Index full = n / P;
    Index next = have / P;
    if (next >= full) return 0;
    std::vector<page_hash> hashes(static_cast<std::size_t>(full));
    page_hash parent = prefix_root(extra_key);
    for (Index i = 0; i < full; ++i) {
      hashes[static_cast<std::size_t>(i)] = chain_hash(parent, tokens + i * P, P);
      parent = hashes[static_cast<std::size_t>(i)];
    }
    const Index room = cache_.pool().available();
    Index restored = 0;
    std::vector<std::string> keys;
    std::vector<std::optional<std::string>> values;
    for (page_store* tier : tiers_) {
      if (next >= full || restored >= room) break;
      keys.clear();
      for (Index i = next; i < full && i - next < room - restored; ++i) {
        keys.push_back(key(hashes[static_cast<std::size_t>(i)]));
      }
      tier->get_many(keys, values);
      for (std::size_t j = 0; j < keys.size(); ++j) {
        if (!values[j]) break;  // a miss: the next tier goes on from this page
        const Index i = next;
        const page_hash expected_parent =
            i == 0 ? prefix_root(extra_key) : hashes[static_cast<std::size_t>(i - 1)];
        std::optional<decoded_page> d;
        try {
          d = decode_page(cache_, *values[j], expected_parent, tokens + i * P,
                          tier->name() + " value " + keys[j]);
        } catch (const io::format_error& e) {
          tier->reject(keys[j]);
          ++stats_.rejected;
          stats_.last_rejection = e.what();
          break;
        }
        if (import_decoded_page(cache_, *d) < 0) return restored;  // no room left
        ++next;
        ++restored;
        ++stats_.restored_pages;
        stats_.restored_tokens += P;
        stats_.restored_bytes += Index(values[j]->size());
      }
    }
    return restored;
  }

  // The eviction handler: writes the page to the first tier unless it holds it. Never throws:
  // a page that cannot be offloaded is simply recomputed when next needed.
  void offload_evicted(Index page) noexcept {
    try {
      offload(std::vector<Index>{page});
    } catch (...) {
      ++stats_.errors;
    }
  }

  cache_type& cache_;
  std::vector<page_store*> tiers_;
  bool write_through_;
  page_hash layout_;
  tier_stats stats_;
};

}  // namespace kvcache
