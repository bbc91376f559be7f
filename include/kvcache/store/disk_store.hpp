// SPDX-License-Identifier: Apache-2.0
// The disk tier of prefix pages: a directory with one file a page, a byte budget kept by
// evicting the least recently used, found again by the next process.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/store/page_store.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <ios>
#include <iterator>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>

namespace kvcache {

/// A page_store in a directory: the value under key K is the file K.kvpage, written to a
/// temporary name and renamed into place, so that a reader sees a whole file or none. The
/// files take at most `budget_bytes`; a put that would exceed it first removes the least
/// recently used files (each handed to `spill`, the next tier, when one is given). A get counts
/// as a use and sets the file's modification time, so a new process opening the directory
/// orders its files by their last use (and trims them to its budget).
///
/// Values are not trusted: a file that is truncated, damaged or of another model fails the
/// caller's checks (decode_page) and comes back through reject(), which removes it. Failures
/// of the file system (a full disk, permissions, a file removed by another process) count as
/// errors and answer as misses; nothing throws for them after construction. What is not a
/// regular file (a directory, a dangling link, a pipe named like a value) is a miss, and a get
/// never reads a file larger than the budget (a miss counted as an error).
///
/// Several processes may share the directory: each sees the files the others wrote (a get or
/// contains looks for the file; one another removed is forgotten and written again by the
/// next put), and renames keep files whole.
/// Each keeps the budget over the files it knows, so together they may exceed it until the
/// next one opens the directory.
class disk_store final : public page_store {
 public:
  /// Opens (creating it when missing) the directory `dir`, learns its .kvpage files named by
  /// a key (others are left alone), oldest use first, and removes the oldest beyond
  /// `budget_bytes`, and the temporary files of writes that stopped an hour ago or more (a
  /// process that died). Throws std::invalid_argument for a negative budget,
  /// std::runtime_error naming the directory when it cannot be created or read.
  disk_store(std::filesystem::path dir, Index budget_bytes, page_store* spill = nullptr)
      : dir_(std::move(dir)), budget_(budget_bytes), spill_(spill) {
    namespace fs = std::filesystem;
    if (budget_bytes < 0) {
      detail::fail<std::invalid_argument>("disk_store: budget_bytes must be >= 0, got ",
                                          budget_bytes);
    }
    std::error_code ec;
    fs::create_directories(dir_, ec);
    if (ec || !fs::is_directory(dir_, ec)) {
      detail::fail<std::runtime_error>("disk_store: cannot use the directory ", dir_.string(), ": ",
                                       ec ? ec.message() : std::string("not a directory"));
    }
    struct found {
      fs::file_time_type used;
      std::string key;
      Index bytes;
    };
    std::vector<found> files;
    fs::directory_iterator it(dir_, ec);
    if (ec) {
      detail::fail<std::runtime_error>("disk_store: cannot read the directory ", dir_.string(),
                                       ": ", ec.message());
    }
    const auto stale = fs::file_time_type::clock::now() - std::chrono::hours(1);
    for (const fs::directory_entry& e : it) {
      const fs::path& p = e.path();
      if (p.filename().string().rfind(".tmp-", 0) == 0 && e.is_regular_file(ec) &&
          e.last_write_time(ec) < stale && !ec) {
        fs::remove(p, ec);  // left by a process that died while writing, an hour ago or more
        continue;
      }
      if (p.extension() != extension || !is_key(p.stem().string()) || !e.is_regular_file(ec)) {
        continue;  // not a value of this store: left alone
      }
      const auto size = e.file_size(ec);
      if (ec) continue;
      const auto used = e.last_write_time(ec);
      if (ec) continue;
      files.push_back({used, p.stem().string(), Index(size)});
    }
    std::sort(files.begin(), files.end(),
              [](const found& a, const found& b) { return a.used < b.used; });
    for (const found& f : files) remember(f.key, f.bytes);
    make_room(0);
  }

  disk_store(const disk_store&) = delete;
  disk_store& operator=(const disk_store&) = delete;

  std::string name() const override { return "dir:" + dir_.string(); }
  const std::filesystem::path& directory() const noexcept { return dir_; }
  /// Bytes of the files this store knows.
  Index bytes() const noexcept { return bytes_; }
  /// Files this store knows.
  Index size() const noexcept { return Index(index_.size()); }

  /// Throws std::invalid_argument for keys that are not file names ([A-Za-z0-9_-]+).
  void put_many(const std::vector<std::string>& keys,
                const std::vector<std::string_view>& values) override {
    check_put("disk_store", keys, values);
    for (const auto& k : keys) check_key(k);
    for (std::size_t i = 0; i < keys.size(); ++i) put_one(keys[i], values[i]);
  }

  void get_many(const std::vector<std::string>& keys,
                std::vector<std::optional<std::string>>& out) override {
    for (const auto& k : keys) check_key(k);
    out.assign(keys.size(), std::nullopt);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      ++c_.gets;
      out[i] = read(keys[i]);
      if (!out[i]) continue;
      ++c_.hits;
      c_.bytes_read += Index(out[i]->size());
      touch(keys[i], Index(out[i]->size()));
    }
  }

  void contains_many(const std::vector<std::string>& keys, std::vector<bool>& out) override {
    for (const auto& k : keys) check_key(k);
    out.assign(keys.size(), false);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      std::error_code ec;
      out[i] = std::filesystem::is_regular_file(path(keys[i]), ec);
      if (!out[i]) forget(keys[i]);  // removed by another process: to be written again
    }
  }

  void reject(const std::string& key) override {
    check_key(key);
    remove(key);
    ++c_.rejected;
  }

  store_counters counters() const override { return c_; }

  /// The file name suffix of a value.
  static constexpr const char* extension = ".kvpage";

 private:
  std::filesystem::path path(const std::string& key) const { return dir_ / (key + extension); }

  static bool is_key(const std::string& key) noexcept {
    return !key.empty() && std::all_of(key.begin(), key.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '-' || c == '_';
    });
  }
  static void check_key(const std::string& key) {
    if (!is_key(key)) {
      detail::fail<std::invalid_argument>("disk_store: the key \"", key,
                                          "\" is not a file name of [A-Za-z0-9_-]");
    }
  }

  void put_one(const std::string& key, std::string_view value) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_regular_file(path(key), ec)) {  // written before, here or by another process
      if (index_.count(key) != 0) return;
      const auto size = fs::file_size(path(key), ec);
      if (!ec) remember(key, Index(size));
      make_room(0);
      return;
    }
    forget(key);  // removed by another process, if it was here: written again
    const Index need = Index(value.size());
    if (need > budget_) return;
    make_room(need);
    static std::atomic<unsigned long> counter{0};
    const fs::path tmp = dir_ / (".tmp-" + std::to_string(::getpid()) + "-" +
                                 std::to_string(counter.fetch_add(1)));
    bool ok = false;
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (out) {
        out.write(value.data(), static_cast<std::streamsize>(value.size()));
        out.flush();
        ok = static_cast<bool>(out);
      }
    }
    if (ok) {
      fs::rename(tmp, path(key), ec);
      ok = !ec;
    }
    if (!ok) {
      fs::remove(tmp, ec);
      ++c_.errors;
      return;
    }
    remember(key, need);
    ++c_.puts;
    c_.bytes_written += need;
  }

  // The file of `key`, or nullopt when there is none, it is not a regular file (a directory,
  // a dangling link or a pipe in its place) or it is larger than the budget (no value of this
  // store; counted as an error): never more than budget_ bytes read.
  std::optional<std::string> read(const std::string& key) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path(key), ec)) {
      forget(key);
      return std::nullopt;
    }
    std::ifstream in(path(key), std::ios::binary);
    if (!in) {
      forget(key);  // gone (another process trimmed it), or unreadable
      return std::nullopt;
    }
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    in.seekg(0, std::ios::beg);
    if (size < 0 || !in || size > budget_) {
      ++c_.errors;
      return std::nullopt;
    }
    std::string value(static_cast<std::size_t>(size), '\0');
    in.read(value.data(), static_cast<std::streamsize>(size));
    if (in.gcount() != static_cast<std::streamsize>(size)) {  // shrunk while read: a miss
      ++c_.errors;
      return std::nullopt;
    }
    return value;
  }

  // A use of `key`: newest in the LRU order, and in the file's time for the next process.
  void touch(const std::string& key, Index bytes) {
    std::error_code ec;
    std::filesystem::last_write_time(path(key), std::filesystem::file_time_type::clock::now(), ec);
    const auto it = index_.find(key);
    if (it == index_.end()) {
      remember(key, bytes);
      make_room(0);
    } else {
      lru_.splice(lru_.end(), lru_, it->second.at);
    }
  }

  void remember(const std::string& key, Index bytes) {
    if (index_.count(key) != 0) return;
    lru_.push_back(key);
    try {
      index_.emplace(key, entry{bytes, std::prev(lru_.end())});
    } catch (...) {
      lru_.pop_back();
      throw;
    }
    bytes_ += bytes;
  }
  void forget(const std::string& key) noexcept {
    const auto it = index_.find(key);
    if (it == index_.end()) return;
    bytes_ -= it->second.bytes;
    lru_.erase(it->second.at);
    index_.erase(it);
  }
  void remove(const std::string& key) {
    std::error_code ec;
    std::filesystem::remove(path(key), ec);
    forget(key);
  }
  // Evicts the least recently used files until `need` more bytes fit the budget.
  void make_room(Index need) {
    while (!lru_.empty() && bytes_ + need > budget_) {
      const std::string key = lru_.front();
      if (spill_ != nullptr) {
        if (auto value = read(key)) spill_->put(key, *value);
      }
      remove(key);
      ++c_.evictions;
    }
  }

  struct entry {
    Index bytes;
    std::list<std::string>::iterator at;  // its place in lru_
  };
  std::filesystem::path dir_;
  Index budget_;
  page_store* spill_;
  Index bytes_ = 0;
  std::list<std::string> lru_;  // keys, least recently used first
  std::unordered_map<std::string, entry> index_;
  store_counters c_;
};

}  // namespace kvcache
