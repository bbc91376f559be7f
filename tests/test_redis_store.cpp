// SPDX-License-Identifier: Apache-2.0
// The Redis tier against a real redis-server that each test starts on a free loopback port and
// stops: batches, expiry, two caches sharing a prompt, and the faults (a server killed,
// restarted, stalled or never there, a corrupted value, another model's value), each answered
// by recomputation. With the serve example built, two serve processes share a prompt through it.
#include "common.hpp"

#include <kvcache/store/redis_store.hpp>
#include <kvcache/store/tiered.hpp>

#include <hiredis/hiredis.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// Global operator new, able to fail an allocation of one chosen size (a value of a reply) with
// std::bad_alloc; GCC pairs the replaced operators with malloc/free and warns at every inlined
// delete.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<std::size_t> fail_allocation_of{0};
}  // namespace
void* operator new(std::size_t n) {
  if (n != 0 && n == fail_allocation_of.load(std::memory_order_relaxed)) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  const auto align = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(align, (n + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using namespace kvcache;
using namespace kvcache::test;

// A free TCP port on 127.0.0.1, as the kernel hands one out.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    throw std::runtime_error("free_port: no socket");
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

// A redis-server of our own on loopback: no persistence, 64 MB with allkeys-lru.
class redis_server {
 public:
  explicit redis_server(int port = 0) : port_(port > 0 ? port : free_port()) { start(); }
  ~redis_server() { stop(); }
  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  int port() const { return port_; }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }

  void start() {
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("redis_server: fork failed");
    if (pid_ == 0) {
      const int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      const std::string port = std::to_string(port_);
      ::execl(KVCACHE_REDIS_SERVER, "redis-server", "--port", port.c_str(), "--bind", "127.0.0.1",
              "--save", "", "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy",
              "allkeys-lru", "--loglevel", "warning", static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    for (int i = 0; i < 200; ++i) {  // up to 10 s for it to answer PING
      if (ping()) return;
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("redis_server: redis-server exited on port " + std::to_string(port_));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    stop();
    throw std::runtime_error("redis_server: no answer on port " + std::to_string(port_));
  }
  // Ends the server with `sig` (SIGTERM: a clean stop; SIGKILL: killed) and reaps it.
  void stop(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  void pause() { ::kill(pid_, SIGSTOP); }
  void resume() { ::kill(pid_, SIGCONT); }

  // One command through a connection of the test's own, for what the store does not offer.
  std::string command(const std::vector<std::string>& args) const {
    redisContext* c = redisConnect("127.0.0.1", port_);
    if (c == nullptr || c->err) {
      if (c) redisFree(c);
      return "<no connection>";
    }
    std::vector<const char*> argv;
    std::vector<std::size_t> len;
    for (const auto& a : args) {
      argv.push_back(a.data());
      len.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(c, int(args.size()), argv.data(), len.data()));
    std::string out = "<error>";
    if (r != nullptr) {
      if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) out.assign(r->str, r->len);
      else if (r->type == REDIS_REPLY_INTEGER) out = std::to_string(r->integer);
      else if (r->type == REDIS_REPLY_NIL) out = "<nil>";
      freeReplyObject(r);
    }
    redisFree(c);
    return out;
  }

 private:
  bool ping() const { return command({"PING"}) == "PONG"; }
  int port_;
  pid_t pid_ = -1;
};

redis_options fast_options(int port) {
  redis_options o;
  o.port = port;
  o.connect_timeout = std::chrono::milliseconds(200);
  o.command_timeout = std::chrono::milliseconds(150);
  o.retry_after = std::chrono::milliseconds(0);
  return o;
}

const cache_shape model(2, 4, 2, 16);
using cache_type = paged_kv_cache<plain_format<float>>;
using tiers_type = tiered_prefix_cache<plain_format<float>>;

row_matrix<float> kv_rows(Index l, const std::vector<std::int32_t>& tokens, Index from, Index to,
                          int which) {
  row_matrix<float> m(to - from, model.kv_width());
  for (Index i = from; i < to; ++i) {
    for (Index c = 0; c < model.kv_width(); ++c) {
      m(i - from, c) = float(std::cos(0.29 * tokens[std::size_t(i)] + 0.17 * double(i) +
                                      0.5 * double(l) + 0.011 * double(c) + which));
    }
  }
  return m;
}
void prefill(cache_type& cache, Index seq, const std::vector<std::int32_t>& tokens, Index from, Index to) {
  if (to <= from) return;
  for (Index l = 0; l < cache.n_layers(); ++l) {
    cache.append(seq, l, kv_rows(l, tokens, from, to, 0), kv_rows(l, tokens, from, to, 1));
  }
}
std::vector<std::int32_t> prompt(Index n, int seed) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) t[std::size_t(i)] = std::int32_t((i * 5 + seed * 11) % 89);
  return t;
}
void expect_computed(const cache_type& c, Index seq, const std::vector<std::int32_t>& tokens) {
  cache_type ref(model, paged_layout{8, 64});
  const Index r = ref.create();
  prefill(ref, r, tokens, 0, Index(tokens.size()));
  for (Index l = 0; l < model.n_layers(); ++l) {
    EXPECT_EQ(c.keys(seq, l), ref.keys(r, l));
    EXPECT_EQ(c.values(seq, l), ref.values(r, l));
  }
}
// A "process": a cache of its own with a store of its own, publishing `tokens` as it prefills
// them; returns the prefix it restored.
Index run_process(redis_store& store, const std::vector<std::int32_t>& tokens,
                  tier_stats* stats = nullptr, const char* model_key = "m") {
  cache_type c(model, paged_layout{8, 32});
  tiers_type t(c, {&store});
  const Index n = Index(tokens.size());
  const Index s = t.create(tokens.data(), n, model_key);
  const Index hit = c.prefix_hit(s);
  prefill(c, s, tokens, hit, n);
  t.publish(s, tokens.data(), n, model_key);
  expect_computed(c, s, tokens);
  if (stats) *stats = t.stats();
  return hit;
}

TEST(RedisStore, BatchesRoundTripBinaryValuesAndNeverReplaceOne) {
  redis_server server;
  redis_store store(fast_options(server.port()));
  const std::string binary("a\0b\r\n\xff", 6);
  store.put_many({"k1", "k2", "k3"}, {binary, "two", std::string(100000, 'x')});
  std::vector<bool> held;
  store.contains_many({"k1", "nope", "k3"}, held);
  EXPECT_EQ(held, (std::vector<bool>{true, false, true}));
  std::vector<std::optional<std::string>> got;
  store.get_many({"k3", "k1", "nope", "k2"}, got);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0]->size(), 100000u);
  EXPECT_EQ(*got[1], binary);
  EXPECT_FALSE(got[2]);
  EXPECT_EQ(*got[3], "two");
  store.put("k2", "other");
  EXPECT_EQ(*store.get("k2"), "two");
  const store_counters c = store.counters();
  EXPECT_EQ(c.puts, 3);
  EXPECT_EQ(c.gets, 5);
  EXPECT_EQ(c.hits, 4);
  EXPECT_EQ(c.errors, 0);
  EXPECT_EQ(store.name(), server.url());
  EXPECT_EQ(server.command({"TTL", "k1"}), "-1");  // no expiry by default: the server's LRU
}

TEST(RedisStore, AnExpirySetsTheTtl) {
  redis_server server;
  redis_options o = fast_options(server.port());
  o.ttl_seconds = 100;
  redis_store store(o);
  store.put("k", "v");
  const int ttl = std::stoi(server.command({"TTL", "k"}));
  EXPECT_GT(ttl, 0);
  EXPECT_LE(ttl, 100);
}

// Options under which a stalled server would hold a lookup without end are refused.
TEST(RedisStore, OptionsWithoutATimeoutAreRefused) {
  redis_options o;
  o.command_timeout = std::chrono::milliseconds(0);
  EXPECT_THROW(redis_store{o}, std::invalid_argument);
  o = redis_options{};
  o.connect_timeout = std::chrono::milliseconds(-1);
  EXPECT_THROW(redis_store{o}, std::invalid_argument);
  o = redis_options{};
  o.retry_after = std::chrono::milliseconds(-1);
  EXPECT_THROW(redis_store{o}, std::invalid_argument);
  o = redis_options{};
  o.ttl_seconds = -5;
  EXPECT_THROW(redis_store{o}, std::invalid_argument);
  o = redis_options{};
  o.port = 0;
  EXPECT_THROW(redis_store{o}, std::invalid_argument);
  EXPECT_NO_THROW(redis_store{redis_options{}});
}

TEST(RedisStore, UrlsAreParsedOrRefused) {
  const redis_options o = redis_options::from_url("redis://10.1.2.3:7000");
  EXPECT_EQ(o.host, "10.1.2.3");
  EXPECT_EQ(o.port, 7000);
  EXPECT_EQ(redis_options::from_url("redis://cache").port, 6379);
  for (const char* bad : {"redis://", "http://x:1", "redis://h:0", "redis://h:70000", "redis://h:x",
                          "redis://:80", "redis://h:"}) {
    EXPECT_THROW(redis_options::from_url(bad), std::invalid_argument) << bad;
  }
}

// Two processes in a row: the second restores the shared prompt's pages and holds exactly what
// computing them gives.
TEST(RedisStore, TwoCachesShareAPrompt) {
  redis_server server;
  const auto tokens = prompt(70, 1);  // 8 full pages
  redis_store first(fast_options(server.port()));
  EXPECT_EQ(run_process(first, tokens), 0);
  EXPECT_EQ(first.counters().puts, 8);
  redis_store second(fast_options(server.port()));
  tier_stats st;
  EXPECT_EQ(run_process(second, tokens, &st), 64);
  EXPECT_EQ(st.restored_pages, 8);
  EXPECT_EQ(st.rejected, 0);
  EXPECT_EQ(second.counters().puts, 0);  // nothing new to write
  // Another model's lookup of the same tokens misses: its chain names other keys.
  redis_store third(fast_options(server.port()));
  EXPECT_EQ(run_process(third, tokens, nullptr, "another model"), 0);
}

TEST(RedisStore, AKilledServerIsAMissAndANewOneIsUsed) {
  redis_server server;
  const auto tokens = prompt(40, 2);
  redis_store store(fast_options(server.port()));
  run_process(store, tokens);
  server.stop(SIGKILL);
  tier_stats st;
  EXPECT_EQ(run_process(store, tokens, &st), 0);  // recomputed, every token right
  EXPECT_GT(store.counters().errors, 0);
  EXPECT_FALSE(store.connected());
  server.start();  // a new, empty server on the same port
  const Index errors = store.counters().errors;
  EXPECT_EQ(run_process(store, tokens), 0);  // empty: a miss, then the pages written again
  EXPECT_EQ(store.counters().errors, errors);
  EXPECT_EQ(run_process(store, tokens), 32);
}

// The server restarts between a store's calls: the stale connection fails once, the store
// reconnects, and the pages written before the restart are gone (no persistence).
TEST(RedisStore, ARestartInTheMiddleCostsRecomputation) {
  redis_server server;
  const auto tokens = prompt(33, 3);
  redis_store store(fast_options(server.port()));
  run_process(store, tokens);
  EXPECT_TRUE(store.connected());
  server.stop(SIGTERM);
  server.start();
  EXPECT_EQ(run_process(store, tokens), 0);
  EXPECT_EQ(run_process(store, tokens), 32);
}

TEST(RedisStore, AStalledServerTimesOut) {
  redis_server server;
  const auto tokens = prompt(40, 4);
  redis_store store(fast_options(server.port()));
  run_process(store, tokens);
  server.pause();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(run_process(store, tokens), 0);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  server.resume();
  EXPECT_GT(store.counters().errors, 0);
  std::printf("a stalled server cost %.3f s over the lookup and the publish\n", s);
  run_process(store, tokens);  // the server may or may not have run the writes it held
  EXPECT_EQ(run_process(store, tokens), 32);
}

// A server killed while a large batch is written to it: the write fails with EPIPE, which is an
// error and a dropped put, never a SIGPIPE that ends the process.
TEST(RedisStore, AServerKilledUnderALargeWriteIsAnErrorNotASignal) {
  redis_server server;
  EXPECT_EXIT(
      {
        redis_store store(fast_options(server.port()));
        store.put("k", "v");
        server.stop(SIGKILL);
        std::vector<std::string> keys;
        const std::string value(std::size_t(1) << 20, 'x');
        for (int i = 0; i < 32; ++i) keys.push_back("big" + std::to_string(i));
        store.put_many(keys, std::vector<std::string_view>(keys.size(), value));
        store.put_many(keys, std::vector<std::string_view>(keys.size(), value));
        std::exit(store.counters().errors > 0 && !store.connected() ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// A batch that throws while its replies are read (std::bad_alloc for a value) leaves no reply
// of it behind: the next batch reads its own replies, never the rest of the last one's.
TEST(RedisStore, AThrowInTheMiddleOfAPipelineLeavesNoReplyBehind) {
  redis_server server;
  redis_store store(fast_options(server.port()));
  const std::string big(100001, 'b');
  store.put_many({"k1", "k2", "k3"}, {big, "two", "three"});
  std::vector<std::optional<std::string>> got;
  fail_allocation_of = big.size() + 1;  // std::string's buffer for the value and its null
  EXPECT_THROW(store.get_many({"k1", "k2"}, got), std::bad_alloc);
  fail_allocation_of = 0;
  EXPECT_EQ(store.get("k3"), std::optional<std::string>("three"));
  EXPECT_EQ(store.get("k2"), std::optional<std::string>("two"));
}

// Keys of the pages holding what no page_store wrote: a list (GET answers WRONGTYPE), an empty
// string, a value of another key. Each is a miss or a refusal, the pages are recomputed, and the
// pipeline of the batch stays in step (the keys after them are still found).
TEST(RedisStore, RepliesOfOtherTypesAreMissesOrRefusals) {
  redis_server server;
  const auto tokens = prompt(40, 7);
  redis_store store(fast_options(server.port()));
  cache_type c(model, paged_layout{8, 32});
  tiers_type t(c, {&store});
  const Index s = t.create(tokens.data(), 40, "m");
  prefill(c, s, tokens, 0, 40);
  t.publish(s, tokens.data(), 40, "m");
  const auto& h = c.page_hashes(s);
  ASSERT_EQ(h.size(), 5u);
  std::vector<std::optional<std::string>> got;
  server.command({"DEL", t.key(h[1])});
  server.command({"RPUSH", t.key(h[1]), "a", "b"});
  store.get_many({t.key(h[0]), t.key(h[1]), t.key(h[2])}, got);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_TRUE(got[0]);
  EXPECT_FALSE(got[1]);
  EXPECT_TRUE(got[2]);
  tier_stats st;
  redis_store other(fast_options(server.port()));
  EXPECT_EQ(run_process(other, tokens, &st), 8);  // page 1 a list: a miss, recomputed
  EXPECT_EQ(st.rejected, 0);
  server.command({"DEL", t.key(h[1])});
  server.command({"SET", t.key(h[1]), ""});
  EXPECT_EQ(run_process(other, tokens, &st), 8);  // empty: refused and deleted
  EXPECT_EQ(st.rejected, 1);
  EXPECT_EQ(run_process(other, tokens, &st), 32);
}

TEST(RedisStore, NoServerIsAMiss) {
  const int port = free_port();  // nothing listens there
  redis_store store(fast_options(port));
  EXPECT_FALSE(store.get("k"));
  EXPECT_FALSE(store.contains("k"));
  store.put("k", "v");
  EXPECT_EQ(store.counters().errors, 3);
  const auto tokens = prompt(24, 5);
  EXPECT_EQ(run_process(store, tokens), 0);
}

TEST(RedisStore, CorruptedAndForeignValuesAreRefusedAndDeleted) {
  redis_server server;
  const auto tokens = prompt(40, 6);
  redis_store store(fast_options(server.port()));
  cache_type c(model, paged_layout{8, 32});
  tiers_type t(c, {&store});
  Index s = t.create(tokens.data(), 40, "m");
  prefill(c, s, tokens, 0, 40);
  t.publish(s, tokens.data(), 40, "m");
  const std::string k1 = t.key(c.page_hashes(s)[1]);
  const std::string k3 = t.key(c.page_hashes(s)[3]);
  // Flip one byte of page 1's value in the server.
  std::string v = server.command({"GET", k1});
  v[v.size() / 2] = char(v[v.size() / 2] ^ 1);
  server.command({"SET", k1, v});
  redis_store other(fast_options(server.port()));
  tier_stats st;
  EXPECT_EQ(run_process(other, tokens, &st), 8);
  EXPECT_EQ(st.rejected, 1);
  EXPECT_EQ(other.counters().rejected, 1);
  // Deleted, then written again by the process that recomputed it.
  EXPECT_EQ(run_process(other, tokens, &st), 32);
  // Page 0's value (other tokens, another parent) under page 3's key, then a value that is not
  // a page at all.
  server.command({"SET", k3, server.command({"GET", t.key(c.page_hashes(s)[0])})});
  EXPECT_EQ(run_process(other, tokens, &st), 24);
  EXPECT_EQ(st.rejected, 1);
  server.command({"SET", k3, "not a page"});
  EXPECT_EQ(run_process(other, tokens, &st), 24);
  EXPECT_EQ(st.rejected, 1);
  EXPECT_EQ(run_process(other, tokens, &st), 32);
}

#ifdef KVCACHE_SERVE
// Runs `command`, returning its standard output and exit status.
std::string run(const std::string& command, int* status) {
  std::string out;
  FILE* p = ::popen(command.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  *status = ::pclose(p);
  return out;
}
// The value of "key" in the JSON: a list of lists ([[...],...]) or a scalar (up to a ',' or a
// '}'). (No std::regex: GCC 12 warns inside <regex> under the sanitizers.)
std::string field(const std::string& json, const std::string& key) {
  const std::string name = "\"" + key + "\":";
  const auto at = json.find(name);
  if (at == std::string::npos) return "<missing>";
  const auto from = at + name.size();
  if (json.compare(from, 2, "[[") == 0) {
    const auto end = json.find("]]", from);
    return end == std::string::npos ? "<missing>" : json.substr(from, end + 2 - from);
  }
  const auto end = json.find_first_of(",}", from);
  return json.substr(from, end == std::string::npos ? std::string::npos : end - from);
}

// The end to end: two serve processes in a row, the second reusing the first's prompt
// through Redis, give the same tokens, and the second skips the shared prefill.
TEST(RedisStore, TwoServeProcessesShareAPrompt) {
  redis_server server;
  const std::string cmd = std::string(KVCACHE_SERVE) +
                          " --dim 64 --hidden 128 --heads 4 --kv-heads 2 --layers 2 --vocab 128"
                          " --requests 3 --max-batch 3 --shared-prompt-len 48 --suffix-len 5"
                          " --gen 8 --page-size 8 --chunk 64 --json --store " + server.url();
  int status = -1;
  const std::string one = run(cmd, &status);
  ASSERT_EQ(status, 0) << one;
  const std::string two = run(cmd, &status);
  ASSERT_EQ(status, 0) << two;
  EXPECT_EQ(field(one, "store_hits"), "0");
  EXPECT_EQ(field(two, "store_hits"), "6");
  // 48 shared tokens: the second and third requests adopt them from the pool in both runs,
  // the first from Redis in the second run.
  EXPECT_EQ(field(one, "prefill_tokens_skipped"), "96");
  EXPECT_EQ(field(two, "prefill_tokens_skipped"), "144");
  EXPECT_GT(std::stol(field(two, "store_bytes_read")), 0);
  EXPECT_EQ(field(one, "tokens"), field(two, "tokens"));
  EXPECT_NE(field(one, "tokens"), "<missing>");
  EXPECT_EQ(field(two, "identical_tokens"), "true");
  // The server gone: the same run recomputes, says so, and gives the same tokens.
  server.stop(SIGKILL);
  const std::string three = run(cmd, &status);
  ASSERT_EQ(status, 0) << three;
  EXPECT_EQ(field(three, "store_hits"), "0");
  EXPECT_GT(std::stol(field(three, "store_errors")), 0);
  EXPECT_EQ(field(one, "tokens"), field(three, "tokens"));
}
#endif

}  // namespace
