// SPDX-License-Identifier: Apache-2.0
// serve: many requests sharing a system prompt, served by continuous batching over a paged KV
// cache with prefix caching and chunked prefill, checked token for token against generating
// each request alone with the tiny decoder on a contiguous cache, and timed against that.
#include "scheduler.hpp"

#include "tiny_decoder/generate.hpp"
#include "tiny_decoder/llama2c.hpp"

#include <kvcache/detail/checked.hpp>
#include <kvcache/detail/xxhash.hpp>
#include <kvcache/store/disk_store.hpp>
#include <kvcache/store/tiered.hpp>
#include <kvcache/thread_pool.hpp>
#ifdef KVCACHE_HAVE_REDIS
#include <kvcache/store/redis_store.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using tiny::Index;

constexpr const char* usage = R"(usage: serve [options]

Serves --requests requests that share a system prompt, each with its own continuation, by
continuous batching over a paged f32 KV cache: requests are admitted while batch slots and
pages allow, adopt the cached pages of the shared prompt, prefill the rest in chunks beside
the decode tokens of the running ones, and free their pages when done; when the pages run out
the newest request is preempted and recomputed later. Then generates each request alone with
the tiny decoder on a contiguous cache, one after another, and compares tokens and speed.

  --requests N          requests to serve (default 16)
  --max-batch B         requests running at once (default 16)
  --shared-prompt-len P random system prompt of P tokens from --seed, shared by all requests
                        (default 256)
  --shared-prompt TEXT  the system prompt as text instead (needs --tokenizer)
  --suffix-len S        each request's own tokens after it, random from --seed + i (default 8)
  --gen G               tokens each request generates, greedily (default 64)
  --chunk N             prompt tokens prefilled per step, over all requests (default 256)
  --page-size N         tokens per page (default 16)
  --pages N             pages in the pool (default: enough for every request at once without
                        sharing, ceil((prompt + gen - 1) / page-size) each)
  --threads N           threads for attention (default 1, at most 1024); matrix products run
                        on one thread
  --seed N              seed of the random weights and prompts (default 42)
  --checkpoint FILE     llama2.c checkpoint (.bin, version 0) instead of random weights
  --tokenizer FILE      llama2.c tokenizer.bin, to encode --shared-prompt and print text
  --dim N --hidden N --layers N --heads N --kv-heads N --vocab N --seq-len N
                        random model shape (default 256, 768, 4, 8, 2, 512; seq-len: as needed),
                        as tiny_decoder's
  --store SPEC          a tier of prefix pages beyond the pool, shared with other processes:
                        redis://HOST:PORT (a Redis server; needs serve built with hiredis) or
                        dir:PATH (a directory). Prompt pages the pool misses are restored from
                        it, published pages written to it; when it fails, pages are recomputed
  --store-budget-mb N   the most a dir: store keeps, in MiB (default 1024)
  --json                print one JSON object instead of text
  --help                this text

Exit status: 0 when every request's tokens equal those generated alone, 1 when they differ or
on other failures, 2 for a bad argument (or a file it names).
)";

[[noreturn]] void die(const std::string& message) {
  std::cerr << "serve: " << message << "\n(see serve --help)\n";
  std::exit(2);
}

struct options {
  Index requests = 16;
  Index max_batch = 16;
  Index shared_len = 256;
  std::optional<std::string> shared_text;
  Index suffix_len = 8;
  Index gen = 64;
  Index chunk = 256;
  Index page_size = 16;
  Index pages = 0;  // 0: enough for all requests
  Index threads = 1;
  std::uint64_t seed = 42;
  std::optional<std::string> checkpoint, tokenizer_path;
  tiny::config cfg;
  bool seq_len_given = false;
  bool json = false;
  std::optional<std::string> store;
  Index store_budget_mb = 1024;
};

Index parse_int(const std::string& flag, const std::string& value, Index min,
                Index max = std::numeric_limits<Index>::max()) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::out_of_range&) {
    die(flag + " " + value + " is out of range: a whole number from " + std::to_string(min) +
        " to " + std::to_string(max) + " is expected");
  } catch (const std::exception&) {
    die(flag + " needs a whole number, got '" + value + "'");
  }
  if (used != value.size()) die(flag + " needs a whole number, got '" + value + "'");
  if (v < min) die(flag + " must be >= " + std::to_string(min) + ", got " + value);
  if (v > max) die(flag + " must be <= " + std::to_string(max) + ", got " + value);
  return Index(v);
}

// The random model's shape, named by its flags; exits with status 2 when it is bad.
void check_shape(const tiny::config& c) {
  if (c.dim % c.n_heads != 0 || c.head_dim() % 2 != 0) {
    die("--dim " + std::to_string(c.dim) + " must be --heads " + std::to_string(c.n_heads) +
        " times an even head_dim");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    die("--heads " + std::to_string(c.n_heads) + " is not a multiple of --kv-heads " +
        std::to_string(c.n_kv_heads));
  }
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    die(e.what());
  }
  if (!tiny::detail::checkpoint_bytes(c, /*shared_classifier=*/false)) {
    die("the model's weights (--dim " + std::to_string(c.dim) + ", --hidden " +
        std::to_string(c.hidden_dim) + ", --layers " + std::to_string(c.n_layers) + ", --vocab " +
        std::to_string(c.vocab_size) + ", --seq-len " + std::to_string(c.seq_len) +
        ") would take more bytes than a 64-bit size counts");
  }
}

options parse(int argc, char** argv) {
  options o;
  bool shared_len_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    if (flag == "--json") {
      o.json = true;
      continue;
    }
    if (i + 1 >= argc) {
      die(flag.rfind("--", 0) == 0 ? flag + " needs a value" : "unknown argument '" + flag + "'");
    }
    const std::string value = argv[++i];
    if (flag == "--requests") {
      o.requests = parse_int(flag, value, 1, 1 << 20);
    } else if (flag == "--max-batch") {
      o.max_batch = parse_int(flag, value, 1, 1 << 20);
    } else if (flag == "--shared-prompt-len") {
      o.shared_len = parse_int(flag, value, 0);
      shared_len_given = true;
    } else if (flag == "--shared-prompt") {
      o.shared_text = value;
    } else if (flag == "--suffix-len") {
      o.suffix_len = parse_int(flag, value, 0);
    } else if (flag == "--gen") {
      o.gen = parse_int(flag, value, 1);
    } else if (flag == "--chunk") {
      o.chunk = parse_int(flag, value, 1);
    } else if (flag == "--page-size") {
      o.page_size = parse_int(flag, value, 1);
    } else if (flag == "--pages") {
      o.pages = parse_int(flag, value, 1);
    } else if (flag == "--threads") {
      o.threads = parse_int(flag, value, 1, kvcache::thread_pool::max_threads);
    } else if (flag == "--seed") {
      o.seed = std::uint64_t(parse_int(flag, value, 0));
    } else if (flag == "--checkpoint") {
      o.checkpoint = value;
    } else if (flag == "--tokenizer") {
      o.tokenizer_path = value;
    } else if (flag == "--dim") {
      o.cfg.dim = parse_int(flag, value, 1);
    } else if (flag == "--hidden") {
      o.cfg.hidden_dim = parse_int(flag, value, 1);
    } else if (flag == "--layers") {
      o.cfg.n_layers = parse_int(flag, value, 1);
    } else if (flag == "--heads") {
      o.cfg.n_heads = parse_int(flag, value, 1);
    } else if (flag == "--kv-heads") {
      o.cfg.n_kv_heads = parse_int(flag, value, 1);
    } else if (flag == "--vocab") {
      o.cfg.vocab_size = parse_int(flag, value, 1);
    } else if (flag == "--seq-len") {
      o.cfg.seq_len = parse_int(flag, value, 1);
      o.seq_len_given = true;
    } else if (flag == "--store") {
      const bool redis = value.rfind("redis://", 0) == 0;
      if (!redis && (value.rfind("dir:", 0) != 0 || value.size() == 4)) {
        die("--store needs redis://HOST:PORT or dir:PATH, got '" + value + "'");
      }
#ifndef KVCACHE_HAVE_REDIS
      if (redis) die("--store " + value + ": this serve was built without hiredis");
#else
      if (redis) {
        try {
          kvcache::redis_options::from_url(value);
        } catch (const std::invalid_argument& e) {
          die(std::string("--store: ") + e.what());
        }
      }
#endif
      o.store = value;
    } else if (flag == "--store-budget-mb") {
      o.store_budget_mb = parse_int(flag, value, 0, Index(1) << 40);
    } else {
      die("unknown option '" + flag + "'");
    }
  }
  if (o.shared_text && !o.tokenizer_path) {
    die("--shared-prompt needs --tokenizer to turn text into tokens");
  }
  if (o.shared_text && shared_len_given) {
    die("--shared-prompt and --shared-prompt-len exclude each other");
  }
  if (!o.shared_text && o.shared_len == 0 && o.suffix_len == 0) {
    die("--shared-prompt-len 0 with --suffix-len 0 leaves the requests without a prompt");
  }
  if (!o.checkpoint) check_shape(o.cfg);
  return o;
}

// `n` random tokens of a vocabulary of `vocab`, drawn as tiny_decoder draws its prompt.
std::vector<int> random_tokens(std::uint64_t seed, Index n, Index vocab) {
  std::mt19937_64 gen(seed ^ 0x5eedULL);
  std::vector<int> t;
  for (Index i = 0; i < n; ++i) t.push_back(int(gen() % std::uint64_t(vocab)));
  return t;
}

// Reads what the options name and builds the prompts: the shared one, then each request's own
// tokens after it. Files that cannot be used and sizes that do not fit are bad arguments.
void load_inputs(const options& o, tiny::config& cfg, tiny::weights& w,
                 std::optional<tiny::tokenizer>& tok, std::vector<std::vector<int>>& prompts,
                 Index& shared_len) {
  std::vector<int> shared;
  try {
    if (o.checkpoint) {
      auto m = tiny::load_checkpoint(*o.checkpoint);
      cfg = m.cfg;
      w = std::move(m.w);
    }
    if (o.tokenizer_path) tok = tiny::tokenizer::load(*o.tokenizer_path, cfg.vocab_size);
    if (o.shared_text) shared = tok->encode(*o.shared_text, /*bos=*/true, /*eos=*/false);
  } catch (const std::bad_alloc&) {
    throw;  // not the argument's fault
  } catch (const std::exception& e) {
    die(e.what());
  }
  shared_len = o.shared_text ? Index(shared.size()) : o.shared_len;
  Index prompt_len = 0, needed = 0;
  try {
    prompt_len = kvcache::detail::checked_add(shared_len, o.suffix_len, "prompt");
    needed = kvcache::detail::checked_add(prompt_len, o.gen, "prompt + --gen") - 1;
  } catch (const std::length_error&) {
    die("a prompt of " + std::to_string(shared_len) + " + --suffix-len " +
        std::to_string(o.suffix_len) + " tokens and --gen " + std::to_string(o.gen) +
        " need more positions than a 64-bit index holds");
  }
  if (prompt_len == 0) die("the shared prompt is empty and --suffix-len is 0: no prompt");
  // Every request's tokens are held twice (the served and the sequential run): refuse counts
  // that could never be, before drawing them.
  constexpr Index most_tokens = Index(1) << 26;
  if (needed + 1 > most_tokens / o.requests) {
    die("--requests " + std::to_string(o.requests) + " of " + std::to_string(prompt_len) +
        " prompt tokens + --gen " + std::to_string(o.gen) + " each make more than 2^26 tokens");
  }
  if (!o.checkpoint && !o.seq_len_given) cfg.seq_len = std::max<Index>(needed, 1);
  if (needed > cfg.seq_len) {
    die("a prompt of " + std::to_string(prompt_len) + " tokens + --gen " + std::to_string(o.gen) +
        " needs " + std::to_string(needed) + " positions but seq_len is " +
        std::to_string(cfg.seq_len));
  }
  if (!o.checkpoint) check_shape(cfg);  // with the sequence length now known
  if (!o.shared_text) shared = random_tokens(o.seed, o.shared_len, cfg.vocab_size);
  for (Index i = 0; i < o.requests; ++i) {
    std::vector<int> p = shared;
    const auto own = random_tokens((o.seed + std::uint64_t(i)) ^ 0xc0ffeeULL, o.suffix_len,
                                   cfg.vocab_size);
    p.insert(p.end(), own.begin(), own.end());
    prompts.push_back(std::move(p));
  }
}

// XXH3-64 of a file's bytes, in hex: the weights' fingerprint, so that two processes share
// prefix pages only when their weights are the same bytes.
std::string file_fingerprint(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    XXH3_64bits_update(&state, buf.data(), std::size_t(in.gcount()));
  }
  std::ostringstream out;
  out << std::hex << XXH3_64bits_digest(&state);
  return out.str();
}

// The tier --store names.
std::unique_ptr<kvcache::page_store> open_store(const options& o) {
  const std::string& spec = *o.store;
#ifdef KVCACHE_HAVE_REDIS
  if (spec.rfind("redis://", 0) == 0) return std::make_unique<kvcache::redis_store>(spec);
#endif
  return std::make_unique<kvcache::disk_store>(spec.substr(4), o.store_budget_mb << 20);
}

std::string json_escape(const std::string& s) {
  std::ostringstream out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out << buf;
    } else {
      out << c;
    }
  }
  return out.str();
}

// What generating every request alone, one after another, gave.
struct sequential_result {
  std::vector<std::vector<int>> tokens;  // [request]
  std::vector<double> ttft_ms;           // [request] since the first request started
  double wall_ms = 0;
  Index kv_bytes = 0;                    // the sum of each request's cache at its end
};

sequential_result run_sequential(const tiny::config& cfg, const tiny::weights& w, const options& o,
                                 const std::vector<std::vector<int>>& prompts) {
  using clock = std::chrono::steady_clock;
  tiny::decoder<> dec(cfg, w, o.threads);
  tiny::generate(dec, prompts.front(), std::min<Index>(o.gen, 2), tiny::mode::cached,
                 tiny::sampler());  // warm-up
  sequential_result r;
  const auto t0 = clock::now();
  for (const auto& prompt : prompts) {
    const auto start = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    tiny::run_result run = tiny::generate(dec, prompt, o.gen, tiny::mode::cached, tiny::sampler());
    r.ttft_ms.push_back(start + run.prefill_ms);
    r.kv_bytes += run.kv_bytes;
    r.tokens.push_back(std::move(run.tokens));
  }
  r.wall_ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  return r;
}

std::vector<serve::request> make_requests(const std::vector<std::vector<int>>& prompts, Index gen) {
  std::vector<serve::request> reqs;
  for (const auto& p : prompts) {
    serve::request r;
    r.tokens.assign(p.begin(), p.end());
    r.prompt_len = Index(p.size());
    r.gen = gen;
    reqs.push_back(std::move(r));
  }
  return reqs;
}

// Pages one request takes alone: its prompt and the generated tokens fed back (not the last).
Index pages_per_request(Index tokens, Index page_size) { return (tokens + page_size - 1) / page_size; }

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  tiny::config cfg = o.cfg;
  tiny::weights w;
  std::optional<tiny::tokenizer> tok;
  std::vector<std::vector<int>> prompts;
  Index shared_len = 0;
  load_inputs(o, cfg, w, tok, prompts, shared_len);
  const Index prompt_len = Index(prompts.front().size());
  const Index per_request = pages_per_request(prompt_len + o.gen - 1, o.page_size);
  Index pages = o.pages;
  if (pages == 0) {
    if (per_request > std::numeric_limits<Index>::max() / o.requests) {
      die("--requests " + std::to_string(o.requests) + " of " + std::to_string(per_request) +
          " pages each overflow a 64-bit count; give --pages");
    }
    pages = o.requests * per_request;
  }
  if (pages < per_request) {
    die("--pages " + std::to_string(pages) + " cannot hold one request: " +
        std::to_string(prompt_len) + " prompt tokens + --gen " + std::to_string(o.gen) +
        " take " + std::to_string(per_request) + " pages of " + std::to_string(o.page_size) +
        " tokens");
  }
  try {
    cfg.validate();
    if (!o.checkpoint) w = tiny::random_weights(cfg, o.seed);
    Eigen::setNbThreads(1);

    // The pool and the model's buffers first, so that sizes the flags make too large are
    // refused before anything runs.
    const Index max_seqs = std::min(o.max_batch, o.requests);
    const Index longest = prompt_len + o.gen - 1;  // tokens a request's sequence holds at most
    const Index max_rows = max_seqs + std::min(o.chunk, kvcache::detail::checked_mul(
                                                            max_seqs, longest, "--chunk rows"));
    serve::paged_cache cache(cfg.cache(), kvcache::paged_layout{o.page_size, pages});
    std::unique_ptr<kvcache::thread_pool> pool;
    if (o.threads > 1) pool = std::make_unique<kvcache::thread_pool>(o.threads);
    serve::batched_decoder model(cfg, w, max_rows, max_seqs, pool.get());

    const sequential_result seq = run_sequential(cfg, w, o, prompts);

    std::ostringstream key;  // the prefix cache's key: pages of another model never match
    key << "tiny " << (o.checkpoint ? "weights " + file_fingerprint(*o.checkpoint)
                                    : "random seed " + std::to_string(o.seed))
        << " dim " << cfg.dim << " hidden " << cfg.hidden_dim << " layers " << cfg.n_layers
        << " heads " << cfg.n_heads << " kv " << cfg.n_kv_heads << " vocab " << cfg.vocab_size;
    std::unique_ptr<kvcache::page_store> store;
    std::unique_ptr<kvcache::tiered_prefix_cache<kvcache::plain_format<float>>> tiers;
    if (o.store) {
      try {
        store = open_store(o);
      } catch (const std::runtime_error& e) {  // a directory that cannot be used
        die(std::string("--store: ") + e.what());
      }
      tiers = std::make_unique<kvcache::tiered_prefix_cache<kvcache::plain_format<float>>>(
          cache, std::vector<kvcache::page_store*>{store.get()});
    }
    serve::scheduler_options so;
    so.max_batch = max_seqs;
    so.chunk = o.chunk;
    so.extra_key = key.str();
    so.tiers = tiers.get();
    {  // warm-up: the first request, two tokens, on a cache of its own, publishing nothing
      serve::paged_cache scratch(cfg.cache(), kvcache::paged_layout{o.page_size, per_request});
      serve::scheduler_options warm = so;
      warm.publish = false;
      warm.tiers = nullptr;
      serve::scheduler s(model, scratch, warm);
      auto reqs = make_requests({prompts.front()}, std::min<Index>(o.gen, 2));
      s.run(reqs);
    }
    model.reset_profile();
    serve::scheduler server(model, cache, so);
    std::vector<serve::request> reqs = make_requests(prompts, o.gen);
    const serve::serve_stats st = server.run(reqs);
    const serve::forward_profile& prof = model.profile();

    // The comparison.
    bool identical = true;
    std::vector<Index> differ;
    std::vector<double> ttft, seq_ttft = seq.ttft_ms;
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      const auto& r = reqs[i];
      const std::vector<int> got(r.tokens.begin() + r.prompt_len, r.tokens.end());
      if (got != seq.tokens[i]) {
        identical = false;
        differ.push_back(Index(i));
      }
      ttft.push_back(r.first_token_ms);
    }
    const double generated = double(o.requests * o.gen);
    const double tps = st.wall_ms > 0 ? 1000.0 * generated / st.wall_ms : 0.0;
    const double seq_tps = seq.wall_ms > 0 ? 1000.0 * generated / seq.wall_ms : 0.0;
    const double speedup = seq_tps > 0 ? tps / seq_tps : 0.0;
    const double hit_rate =
        st.prefill_tokens > 0 ? double(st.prefix_hit_tokens) / double(st.prefill_tokens) : 0.0;
    const double scheduler_ms = st.wall_ms - st.forward_ms;
    const auto text_of = [&](const serve::request& r) {
      std::string s;
      int prev = r.tokens[std::size_t(r.prompt_len - 1)];
      for (std::size_t i = std::size_t(r.prompt_len); i < r.tokens.size(); ++i) {
        s += tiny::safe_piece(tok->decode(prev, r.tokens[i]));
        prev = r.tokens[i];
      }
      return s;
    };

    const kvcache::tier_stats ts = tiers ? tiers->stats() : kvcache::tier_stats{};
    const kvcache::store_counters sc = store ? store->counters() : kvcache::store_counters{};
    if (store && (ts.rejected > 0 || sc.errors > 0)) {  // recomputed, but worth a look
      std::cerr << "serve: warning: the store " << store->name() << " failed " << sc.errors
                << " time" << (sc.errors == 1 ? "" : "s") << " and returned " << ts.rejected
                << " bad page" << (ts.rejected == 1 ? "" : "s")
                << (ts.last_rejection.empty() ? "" : " (" + ts.last_rejection + ")")
                << "; those pages were recomputed\n";
    }
    if (o.json) {
      std::ostringstream js;
      js << "{\"identical_tokens\":" << (identical ? "true" : "false")
         << ",\"tokens_per_s\":" << tps << ",\"sequential_tokens_per_s\":" << seq_tps
         << ",\"speedup\":" << speedup << ",\"prefix_hit_rate\":" << hit_rate
         << ",\"peak_kv_bytes\":" << st.peak_kv_bytes
         << ",\"contiguous_kv_bytes\":" << seq.kv_bytes
         << ",\"config\":{\"dim\":" << cfg.dim << ",\"hidden_dim\":" << cfg.hidden_dim
         << ",\"n_layers\":" << cfg.n_layers << ",\"n_heads\":" << cfg.n_heads
         << ",\"n_kv_heads\":" << cfg.n_kv_heads << ",\"head_dim\":" << cfg.head_dim()
         << ",\"vocab_size\":" << cfg.vocab_size << ",\"seq_len\":" << cfg.seq_len
         << ",\"weights\":\"" << (o.checkpoint ? json_escape(*o.checkpoint) : "random") << "\"}"
         << ",\"requests\":" << o.requests << ",\"max_batch\":" << o.max_batch
         << ",\"shared_prompt_len\":" << shared_len << ",\"suffix_len\":" << o.suffix_len
         << ",\"gen\":" << o.gen << ",\"chunk\":" << o.chunk << ",\"page_size\":" << o.page_size
         << ",\"pages\":" << pages << ",\"threads\":" << o.threads
         << ",\"wall_ms\":" << st.wall_ms << ",\"sequential_wall_ms\":" << seq.wall_ms
         << ",\"ttft_ms_median\":" << tiny::quantile(ttft, 0.5)
         << ",\"ttft_ms_p90\":" << tiny::quantile(ttft, 0.9)
         << ",\"sequential_ttft_ms_median\":" << tiny::quantile(seq_ttft, 0.5)
         << ",\"sequential_ttft_ms_p90\":" << tiny::quantile(seq_ttft, 0.9)
         << ",\"steps\":" << st.steps << ",\"max_rows\":" << st.max_rows
         << ",\"max_running\":" << st.max_running << ",\"preemptions\":" << st.preemptions
         << ",\"admissions\":" << st.admissions << ",\"prefill_tokens\":" << st.prefill_tokens
         << ",\"prefix_hit_tokens\":" << st.prefix_hit_tokens
         << ",\"prefix_waits\":" << st.prefix_waits
         << ",\"computed_tokens\":" << st.computed_tokens
         << ",\"peak_pages\":" << st.peak_pages << ",\"page_bytes\":" << cache.stats().page_bytes
         << ",\"evictions\":" << cache.stats().evictions
         << ",\"prefill_tokens_skipped\":" << st.prefix_hit_tokens
         << ",\"store\":\"" << (store ? json_escape(store->name()) : "") << "\""
         << ",\"store_hits\":" << ts.restored_pages
         << ",\"store_bytes_read\":" << ts.restored_bytes
         << ",\"store_tokens_restored\":" << ts.restored_tokens
         << ",\"store_pages_written\":" << ts.offloaded_pages
         << ",\"store_rejected\":" << ts.rejected
         << ",\"store_errors\":" << sc.errors + ts.errors
         << ",\"time_ms\":{\"embed_norm\":" << prof.embed_norm << ",\"qkv\":" << prof.qkv
         << ",\"rope_append\":" << prof.rope_append << ",\"attention\":" << prof.attention
         << ",\"out_proj\":" << prof.out_proj << ",\"mlp\":" << prof.mlp
         << ",\"head\":" << prof.head << ",\"scheduler\":" << scheduler_ms << "}"
         << ",\"differing_requests\":[";
      for (std::size_t i = 0; i < differ.size(); ++i) js << (i ? "," : "") << differ[i];
      js << "],\"tokens\":[";
      for (std::size_t i = 0; i < reqs.size(); ++i) {
        js << (i ? "," : "") << "[";
        for (Index t = reqs[i].prompt_len; t < Index(reqs[i].tokens.size()); ++t) {
          js << (t > reqs[i].prompt_len ? "," : "") << reqs[i].tokens[std::size_t(t)];
        }
        js << "]";
      }
      js << "]";
      if (tok) {
        js << ",\"text\":[";
        for (std::size_t i = 0; i < reqs.size(); ++i) {
          js << (i ? "," : "") << "\"" << json_escape(text_of(reqs[i])) << "\"";
        }
        js << "]";
      }
      js << "}\n";
      std::cout << js.str();
      return identical ? 0 : 1;
    }

    std::printf("model: dim %td, %td layers, %td query heads on %td kv heads (head_dim %td), "
                "vocab %td, %s weights\n",
                cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(), cfg.vocab_size,
                o.checkpoint ? o.checkpoint->c_str() : "random");
    std::printf("requests: %td, each %td shared + %td own prompt tokens, generating %td greedily\n",
                o.requests, shared_len, o.suffix_len, o.gen);
    std::printf("serving: max batch %td, chunk %td, %td pages of %td tokens (%td bytes each), "
                "%td attention thread%s\n\n",
                o.max_batch, o.chunk, pages, o.page_size, cache.stats().page_bytes, o.threads,
                o.threads == 1 ? "" : "s");
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      const auto& r = reqs[i];
      std::printf("request %zu: first token %.2f ms%s |", i, r.first_token_ms,
                  r.preempted > 0 ? ", preempted" : "");
      for (Index t = r.prompt_len; t < Index(r.tokens.size()); ++t) {
        std::printf(" %d", int(r.tokens[std::size_t(t)]));
      }
      std::printf("\n");
      if (tok) std::printf("  text: %s\n", text_of(r).c_str());
    }
    std::printf("\nbatched     %9.1f tokens/s: %td tokens in %.1f ms, %td steps, %td preemption%s\n",
                tps, o.requests * o.gen, st.wall_ms, st.steps, st.preemptions,
                st.preemptions == 1 ? "" : "s");
    std::printf("sequential  %9.1f tokens/s: %td tokens in %.1f ms (one request after another)\n",
                seq_tps, o.requests * o.gen, seq.wall_ms);
    std::printf("speedup     %.2fx\n", speedup);
    std::printf("first token median %.2f ms, p90 %.2f ms (sequential: median %.2f ms, p90 "
                "%.2f ms)\n",
                tiny::quantile(ttft, 0.5), tiny::quantile(ttft, 0.9),
                tiny::quantile(seq_ttft, 0.5), tiny::quantile(seq_ttft, 0.9));
    std::printf("prefix cache: %td of %td prompt tokens adopted (hit rate %.3f)\n",
                st.prefix_hit_tokens, st.prefill_tokens, hit_rate);
    if (store) {
      std::printf("store %s: %td pages restored (%td tokens not prefilled, %td bytes read), "
                  "%td pages written, %td rejected, %td errors\n",
                  store->name().c_str(), ts.restored_pages, ts.restored_tokens, ts.restored_bytes,
                  ts.offloaded_pages, ts.rejected, sc.errors + ts.errors);
    }
    std::printf("KV memory: peak %td bytes paged (%td pages) vs %td bytes in one contiguous "
                "cache per request\n",
                st.peak_kv_bytes, st.peak_pages, seq.kv_bytes);
    std::printf("time (ms): qkv %.1f, attention %.1f, output proj %.1f, mlp %.1f, head %.1f, "
                "norms %.1f, rope+append %.1f, scheduler %.1f\n",
                prof.qkv, prof.attention, prof.out_proj, prof.mlp, prof.head, prof.embed_norm,
                prof.rope_append, scheduler_ms);
    if (identical) {
      std::printf("identical tokens: yes, every request as generated alone on a contiguous cache\n");
    } else {
      std::printf("identical tokens: NO, %zu of %td requests differ (first: request %td)\n",
                  differ.size(), o.requests, differ.front());
    }
    return identical ? 0 : 1;
  } catch (const std::invalid_argument& e) {  // the library refusing what the flags asked for
    die(e.what());
  } catch (const std::length_error& e) {  // sizes from the flags that cannot be allocated
    die(e.what());
  } catch (const std::exception& e) {
    std::cerr << "serve: error: " << e.what() << "\n";
    return 1;
  }
}
