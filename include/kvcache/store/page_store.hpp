// SPDX-License-Identifier: Apache-2.0
// Where prefix pages go when they leave the pool: a key-value interface for encoded pages, the
// counters every tier keeps, and the host-memory tier.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"

#include <cstdint>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kvcache {

/// What one tier did since it was made. Pages are values; bytes are value bytes.
struct store_counters {
  Index gets = 0;           ///< keys asked for by get
  Index hits = 0;           ///< of them, found
  Index bytes_read = 0;     ///< bytes of the values found
  Index puts = 0;           ///< values stored
  Index bytes_written = 0;  ///< bytes of the values stored
  Index evictions = 0;      ///< values the tier dropped for its budget (LRU)
  Index rejected = 0;       ///< values found damaged or of another model or format, dropped
  Index errors = 0;         ///< operations that failed or timed out (the tier was unreachable,
                            ///< a file could not be written, ...): answered as misses
};

/// A tier of encoded prefix pages (store/page_blob.hpp encodes them), keyed by strings that name
/// the model, layout, format and the page's chained hash (page_blob_key). vLLM offloads evicted
/// prefix blocks to host memory and further tiers; LMCache shares them between instances
/// through stores such as Redis. The tiers here: memory_store (host memory), disk_store
/// (a directory), redis_store (a Redis server).
///
/// The contract: a tier never throws for what happens outside the process (an unreachable
/// server, a full disk, a timeout): it counts an error and answers as if the key were missing,
/// because the caller can always recompute a page. It throws std::invalid_argument for calls
/// whose arguments do not fit (keys and values of different counts) and std::bad_alloc when
/// memory is short. A value may come back damaged (disks and servers are not trusted): the
/// caller checks it and reports it with reject(), which drops it and counts it.
///
/// Thread safety: none; one caller at a time (the tiers are driven by one cache).
class page_store {
 public:
  virtual ~page_store() = default;

  /// A name for messages and reports: "memory", "dir:/var/cache/kv", "redis://127.0.0.1:6379".
  virtual std::string name() const = 0;

  /// Stores values[i] under keys[i], each unless the key is there already (a page's contents
  /// follow from its key, so a stored value never needs replacing). One round trip for a
  /// server.
  virtual void put_many(const std::vector<std::string>& keys,
                        const std::vector<std::string_view>& values) = 0;
  /// out[i] is the value under keys[i], or nullopt when the tier has none or fails. One round
  /// trip for a server. A hit counts as a use for the tier's LRU order.
  virtual void get_many(const std::vector<std::string>& keys,
                        std::vector<std::optional<std::string>>& out) = 0;
  /// out[i] says whether the tier holds keys[i] (false when it fails). Not a use.
  virtual void contains_many(const std::vector<std::string>& keys, std::vector<bool>& out) = 0;
  /// Drops the value under `key`, which the caller found damaged or of another model, and
  /// counts it as rejected.
  virtual void reject(const std::string& key) = 0;
  /// What the tier did so far.
  virtual store_counters counters() const = 0;

  /// One key: put_many, get_many and contains_many of a single key.
  void put(const std::string& key, std::string_view value) {
    put_many(std::vector<std::string>{key}, std::vector<std::string_view>{value});
  }
  std::optional<std::string> get(const std::string& key) {
    std::vector<std::optional<std::string>> out;
    get_many(std::vector<std::string>{key}, out);
    return std::move(out.front());
  }
  bool contains(const std::string& key) {
    std::vector<bool> out;
    contains_many(std::vector<std::string>{key}, out);
    return out.front();
  }

 protected:
  static void check_put(const char* who, const std::vector<std::string>& keys,
                        const std::vector<std::string_view>& values) {
    if (keys.size() != values.size()) {
      detail::fail<std::invalid_argument>(who, ": put_many of ", keys.size(), " keys and ",
                                          values.size(), " values");
    }
  }
};

/// The host-memory tier: values in a hash map, at most `budget_bytes` of them (keys and values
/// counted), the least recently used dropped first when a put would exceed it (vLLM's CPU
/// offloading of KV blocks). A value larger than the budget is not stored. Gone with the
/// process.
class memory_store final : public page_store {
 public:
  /// Throws std::invalid_argument for a negative budget.
  explicit memory_store(Index budget_bytes) : budget_(budget_bytes) {
    if (budget_bytes < 0) {
      detail::fail<std::invalid_argument>("memory_store: budget_bytes must be >= 0, got ",
                                          budget_bytes);
    }
  }

  std::string name() const override { return "memory"; }
  /// Bytes held now (keys and values).
  Index bytes() const noexcept { return bytes_; }
  /// Values held now.
  Index size() const noexcept { return Index(map_.size()); }

  void put_many(const std::vector<std::string>& keys,
                const std::vector<std::string_view>& values) override {
    check_put("memory_store", keys, values);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (map_.count(keys[i]) != 0) continue;
      const Index need = Index(keys[i].size() + values[i].size());
      if (need > budget_) continue;
      while (bytes_ + need > budget_) drop_oldest();
      lru_.push_back(keys[i]);
      auto it = std::prev(lru_.end());
      try {
        map_.emplace(keys[i], entry{std::string(values[i]), it});
      } catch (...) {
        lru_.pop_back();
        throw;
      }
      bytes_ += need;
      ++c_.puts;
      c_.bytes_written += Index(values[i].size());
    }
  }

  void get_many(const std::vector<std::string>& keys,
                std::vector<std::optional<std::string>>& out) override {
    out.assign(keys.size(), std::nullopt);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      ++c_.gets;
      const auto it = map_.find(keys[i]);
      if (it == map_.end()) continue;
      lru_.splice(lru_.end(), lru_, it->second.at);
      out[i] = it->second.value;
      ++c_.hits;
      c_.bytes_read += Index(it->second.value.size());
    }
  }

  void contains_many(const std::vector<std::string>& keys, std::vector<bool>& out) override {
    out.assign(keys.size(), false);
    for (std::size_t i = 0; i < keys.size(); ++i) out[i] = map_.count(keys[i]) != 0;
  }

  void reject(const std::string& key) override {
    const auto it = map_.find(key);
    if (it == map_.end()) return;
    erase(it);
    ++c_.rejected;
  }

  store_counters counters() const override { return c_; }

 private:
  struct entry {
    std::string value;
    std::list<std::string>::iterator at;  // its place in lru_
  };
  using map_type = std::unordered_map<std::string, entry>;

  void erase(map_type::iterator it) noexcept {
    bytes_ -= Index(it->first.size() + it->second.value.size());
    lru_.erase(it->second.at);
    map_.erase(it);
  }
  void drop_oldest() noexcept {
    erase(map_.find(lru_.front()));
    ++c_.evictions;
  }

  Index budget_;
  Index bytes_ = 0;
  std::list<std::string> lru_;  // keys, least recently used first
  map_type map_;
  store_counters c_;
};

}  // namespace kvcache
