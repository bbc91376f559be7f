// SPDX-License-Identifier: Apache-2.0
// The Redis tier of prefix pages, shared by every process (and machine) that reaches the
// server: pipelined batches through hiredis, short timeouts, misses when the server is away.
// Needs hiredis (Debian: libhiredis-dev); link kvcache::redis, which CMake defines when it
// finds it.
#pragma once

#include "kvcache/detail/error.hpp"
#include "kvcache/store/page_store.hpp"
#include "kvcache/types.hpp"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>
#include <time.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvcache {

namespace detail {

/// Keeps a write to a server that closed the connection (killed, restarted) from raising
/// SIGPIPE, whose default action ends the process (hiredis writes with write(2)): while it
/// lives, SIGPIPE is blocked in the calling thread; one raised meanwhile is taken before the
/// thread's mask is restored, so the write fails with EPIPE and nothing else happens. A SIGPIPE
/// pending before is left pending. Never throws.
class sigpipe_guard {
 public:
  sigpipe_guard() noexcept {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    was_pending_ = sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
    blocked_ = pthread_sigmask(SIG_BLOCK, &pipe_, &old_) == 0;
  }
  ~sigpipe_guard() {
    if (!blocked_) return;
    sigset_t pending;
    sigemptyset(&pending);
    if (!was_pending_ && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
      const timespec now{0, 0};
      while (sigtimedwait(&pipe_, nullptr, &now) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

 private:
  sigset_t pipe_;
  sigset_t old_;
  bool was_pending_ = false;
  bool blocked_ = false;
};

}  // namespace detail

/// Where and how redis_store talks to its server.
struct redis_options {
  std::string host = "127.0.0.1";
  int port = 6379;
  /// Time to connect; a server that does not answer in it is taken as away.
  std::chrono::milliseconds connect_timeout{200};
  /// Time for each reply of a command (socket read and write timeouts).
  std::chrono::milliseconds command_timeout{200};
  /// After a failure the store answers misses at once for this long before reconnecting, so
  /// a server that is away costs one timeout, not one a lookup.
  std::chrono::milliseconds retry_after{1000};
  /// Seconds a stored page lives (SET ... EX); 0 for no expiry, leaving the server's
  /// maxmemory-policy (allkeys-lru) to drop the least recently used.
  Index ttl_seconds = 0;

  /// "redis://HOST:PORT" or "redis://HOST" (port 6379) with the defaults above. Throws
  /// std::invalid_argument for anything else, or a port outside 1..65535.
  static redis_options from_url(const std::string& url) {
    const std::string scheme = "redis://";
    if (url.compare(0, scheme.size(), scheme) != 0 || url.size() == scheme.size()) {
      detail::fail<std::invalid_argument>("redis_options: \"", url,
                                          "\" is not a redis://HOST[:PORT] URL");
    }
    redis_options o;
    const std::string rest = url.substr(scheme.size());
    const auto colon = rest.rfind(':');
    o.host = rest.substr(0, colon);
    if (colon != std::string::npos) {
      const std::string port = rest.substr(colon + 1);
      char* end = nullptr;
      const long p = port.empty() ? 0 : std::strtol(port.c_str(), &end, 10);
      if (port.empty() || *end != '\0' || p < 1 || p > 65535) {
        detail::fail<std::invalid_argument>("redis_options: the port of \"", url,
                                            "\" must be 1..65535");
      }
      o.port = int(p);
    }
    if (o.host.empty()) {
      detail::fail<std::invalid_argument>("redis_options: \"", url, "\" names no host");
    }
    return o;
  }
};

/// A page_store on a Redis server (LMCache shares KV chunks between instances the same way).
/// Values are binary strings (encode_page's self-checking container) under their keys: a
/// batch is one pipeline of GET, EXISTS or SET ... NX [EX ttl] commands and one round trip.
///
/// The server is never needed for correctness: it connects lazily; when it cannot connect,
/// a command fails or a reply takes longer than command_timeout, the store counts an error,
/// drops the connection, answers misses (a put is dropped) and tries again after retry_after.
/// A killed, restarted, flushed or stalled server so costs recomputation, never a wrong page
/// (nor a SIGPIPE: writes to a closed connection fail with EPIPE; detail::sigpipe_guard).
class redis_store final : public page_store {
 public:
  /// Connects on first use, not here; never throws for the server. Throws
  /// std::invalid_argument for a connect or command timeout that is not positive (hiredis
  /// would wait without end for a stalled server), a negative retry_after or ttl_seconds, or a
  /// port outside 1..65535.
  explicit redis_store(redis_options options) : o_(std::move(options)) {
    if (o_.connect_timeout.count() <= 0 || o_.command_timeout.count() <= 0) {
      detail::fail<std::invalid_argument>("redis_store: the connect and command timeouts must be "
                                          "positive, got ", o_.connect_timeout.count(), " ms and ",
                                          o_.command_timeout.count(), " ms");
    }
    if (o_.retry_after.count() < 0 || o_.ttl_seconds < 0) {
      detail::fail<std::invalid_argument>("redis_store: retry_after and ttl_seconds must be >= 0, "
                                          "got ", o_.retry_after.count(), " ms and ",
                                          o_.ttl_seconds, " s");
    }
    if (o_.port < 1 || o_.port > 65535) {
      detail::fail<std::invalid_argument>("redis_store: the port must be 1..65535, got ", o_.port);
    }
  }
  explicit redis_store(const std::string& url) : redis_store(redis_options::from_url(url)) {}
  ~redis_store() override { disconnect(); }
  redis_store(const redis_store&) = delete;
  redis_store& operator=(const redis_store&) = delete;

  std::string name() const override { return "redis://" + o_.host + ":" + std::to_string(o_.port); }
  const redis_options& options() const noexcept { return o_; }
  /// Whether a connection is open now.
  bool connected() const noexcept { return ctx_ != nullptr; }

  void put_many(const std::vector<std::string>& keys,
                const std::vector<std::string_view>& values) override {
    check_put("redis_store", keys, values);
    const detail::sigpipe_guard no_sigpipe;
    if (keys.empty() || !connect()) return;
    const std::string ttl = std::to_string(o_.ttl_seconds);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const char* argv[6] = {"SET", keys[i].data(), values[i].data(), "NX", "EX", ttl.c_str()};
      const std::size_t len[6] = {3, keys[i].size(), values[i].size(), 2, 2, ttl.size()};
      if (!append(o_.ttl_seconds > 0 ? 6 : 4, argv, len)) return;
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      redisReply* r = reply();
      if (r == nullptr) return;
      if (r->type == REDIS_REPLY_STATUS) {  // OK; NIL when the key was there already
        ++c_.puts;
        c_.bytes_written += Index(values[i].size());
      } else if (r->type == REDIS_REPLY_ERROR) {
        ++c_.errors;  // e.g. OOM with maxmemory and no eviction policy
      }
      freeReplyObject(r);
    }
  }

  void get_many(const std::vector<std::string>& keys,
                std::vector<std::optional<std::string>>& out) override {
    out.assign(keys.size(), std::nullopt);
    c_.gets += Index(keys.size());
    const detail::sigpipe_guard no_sigpipe;
    if (keys.empty() || !connect()) return;
    for (const auto& k : keys) {
      const char* argv[2] = {"GET", k.data()};
      const std::size_t len[2] = {3, k.size()};
      if (!append(2, argv, len)) return;
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      redisReply* r = reply();
      if (r == nullptr) return;
      if (r->type == REDIS_REPLY_STRING) {
        try {
          out[i].emplace(r->str, r->len);
        } catch (...) {  // the rest of the pipeline is unread: the connection goes with it
          freeReplyObject(r);
          fail();
          throw;
        }
        ++c_.hits;
        c_.bytes_read += Index(r->len);
      } else if (r->type == REDIS_REPLY_ERROR) {
        ++c_.errors;
      }
      freeReplyObject(r);
    }
  }

  void contains_many(const std::vector<std::string>& keys, std::vector<bool>& out) override {
    out.assign(keys.size(), false);
    const detail::sigpipe_guard no_sigpipe;
    if (keys.empty() || !connect()) return;
    for (const auto& k : keys) {
      const char* argv[2] = {"EXISTS", k.data()};
      const std::size_t len[2] = {6, k.size()};
      if (!append(2, argv, len)) return;
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      redisReply* r = reply();
      if (r == nullptr) return;
      out[i] = r->type == REDIS_REPLY_INTEGER && r->integer > 0;
      freeReplyObject(r);
    }
  }

  void reject(const std::string& key) override {
    ++c_.rejected;
    const detail::sigpipe_guard no_sigpipe;
    if (!connect()) return;
    const char* argv[2] = {"DEL", key.data()};
    const std::size_t len[2] = {3, key.size()};
    if (!append(2, argv, len)) return;
    if (redisReply* r = reply()) freeReplyObject(r);
  }

  store_counters counters() const override { return c_; }

 private:
  using clock = std::chrono::steady_clock;

  static timeval to_timeval(std::chrono::milliseconds ms) {
    timeval tv{};
    tv.tv_sec = static_cast<decltype(tv.tv_sec)>(ms.count() / 1000);
    tv.tv_usec = static_cast<decltype(tv.tv_usec)>((ms.count() % 1000) * 1000);
    return tv;
  }

  // An open connection, or false (counted) while the server is away.
  bool connect() {
    if (ctx_ != nullptr) return true;
    if (clock::now() < retry_at_) return false;
    ctx_ = redisConnectWithTimeout(o_.host.c_str(), o_.port, to_timeval(o_.connect_timeout));
    if (ctx_ == nullptr || ctx_->err != 0 ||
        redisSetTimeout(ctx_, to_timeval(o_.command_timeout)) != REDIS_OK) {
      fail();
      return false;
    }
    return true;
  }
  void disconnect() noexcept {
    if (ctx_ != nullptr) redisFree(ctx_);
    ctx_ = nullptr;
  }
  // A failed connection or command: counted, the connection dropped, misses until retry_at_.
  void fail() noexcept {
    ++c_.errors;
    disconnect();
    retry_at_ = clock::now() + o_.retry_after;
  }
  bool append(int argc, const char** argv, const std::size_t* len) {
    if (redisAppendCommandArgv(ctx_, argc, argv, len) != REDIS_OK) {
      fail();
      return false;
    }
    return true;
  }
  // The next reply of the pipeline, or null (counted, disconnected) on an error or timeout.
  redisReply* reply() {
    void* r = nullptr;
    if (redisGetReply(ctx_, &r) != REDIS_OK || r == nullptr) {
      if (r != nullptr) freeReplyObject(r);
      fail();
      return nullptr;
    }
    return static_cast<redisReply*>(r);
  }

  redis_options o_;
  redisContext* ctx_ = nullptr;
  clock::time_point retry_at_{};
  store_counters c_;
};

}  // namespace kvcache
