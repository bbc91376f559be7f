// SPDX-License-Identifier: Apache-2.0
// tiny_decoder: a small Llama-style decoder that generates with and without the KV cache and
// shows that both pick the same tokens while the cache is far faster.
#include "evaluate.hpp"
#include "generate.hpp"
#include "llama2c.hpp"

#include <kvcache/cache/quantized.hpp>
#include <kvcache/io/cache_file.hpp>
#include <kvcache/layout/ring.hpp>
#include <kvcache/detail/checked.hpp>
#include <kvcache/thread_pool.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <unistd.h>

namespace {

using tiny::Index;

constexpr const char* usage = R"(usage: tiny_decoder [options]

Runs a prompt through a small Llama-style decoder (prefill), then generates tokens, once with
the KV cache (one token per step) and once without (the whole sequence every step), and
compares them.

  --mode cached|uncached|compare  what to run (default compare)
  --prompt-len N      random prompt of N tokens from --seed (default 16)
  --prompt TEXT       prompt text (needs --tokenizer)
  --prompt-tokens IDS prompt as token ids, comma-separated (e.g. 1,403,9), each below the
                      vocabulary size; a BOS is not added
  --gen N             tokens to generate (default 128)
  --seed N            seed of the random weights, prompt and sampling (default 42)
  --temperature T     0 for greedy argmax (default), else sample from softmax(logits / T);
                      any finite T >= 0 a float holds, denormals included
  --top-p P           nucleus sampling: keep the most likely tokens up to mass P (default 0.9)
  --threads N         threads for every part of a step: projections, MLP and classifier split
                      by rows, attention by kv heads and runs of tokens (default 1, at most 1024)
  --kv-type T         cache storage: f32 (default), f16, bf16, int8, int4; other than f32,
                      also reports the logit difference and KL divergence against an f32 cache
  --group N           int8/int4: elements per scale and zero point (default 32)
  --residual N        int8/int4: newest tokens kept unquantized, at most the sequence length
                      (default 0)
  --window W          sliding-window cache of the last W tokens (any --kv-type)
  --sinks S           with --window: the first S tokens are kept too (attention sinks)
  --save-cache FILE   cached run: save the prompt's KV cache (all but its last token) to FILE
  --load-cache FILE   cached run: load the prompt's KV cache from FILE instead of prefilling it
                      (saved with the same model, prompt, --kv-type and --window flags)
  --checkpoint FILE   llama2.c checkpoint (.bin, version 0) instead of random weights
  --tokenizer FILE    llama2.c tokenizer.bin, to encode --prompt and print text
  --dim N --hidden N --layers N --heads N --kv-heads N --vocab N --seq-len N
                      random model shape (default 256, 768, 4, 8, 2, 512; seq-len: as needed,
                      512 with --eval)
  --attention gqa|mla gqa (default): --heads query heads on --kv-heads key/value heads; mla:
                      multi-head latent attention (DeepSeek-V2) with random weights, the cache
                      holding per layer and token a latent of --kv-lora-rank and a RoPE key of
                      --rope-dim (each head's no-RoPE query, key and value are head_dim wide);
                      cached runs decode by weight absorption, uncached ones decompress every
                      head's keys and values; --json's gqa_kv_bytes is what the GQA model of
                      the same size (--heads, --kv-heads, head_dim) would cache
  --kv-lora-rank R    mla: latent width (default 64)
  --rope-dim D        mla: decoupled RoPE width, even (default 16)
  --logits-out FILE   write the logits of every generation step of the cached run (the
                      uncached one with --mode uncached): a 16-byte header, the ASCII magic
                      "KVLOGITS" then uint32 rows and uint32 vocab_size, then rows x vocab_size
                      float32; all little-endian; row i is the distribution token i was drawn
                      from
  --eval FILE         instead of generating: the teacher-forced loss over the text in FILE
                      (needs --tokenizer), in chunks of BOS + seq_len - 1 tokens, one decode step
                      a token, with the cache the other flags choose: perplexity, bits per byte,
                      and the mean KL divergence of its next-token distributions against an f32
                      cache that holds every token, run beside it
  --eval-json FILE    --eval FILE with --json: {"tokens","perplexity","bits_per_byte",
                      "mean_kl_vs_f32","kv_bytes",...}
  --eval-tokens-out FILE
                      with --eval: one CSV line per predicted token: index,position,token,nll,kl
                      (nats; position within its chunk: the BOS is 0, the first token 1)
  --json              print one JSON object instead of text
  --help              this text

Exit status: 0 on success, 2 for a bad argument (or a file it names), 1 for other failures
and when, with an f32 cache, cached and uncached generation pick different tokens.
)";

[[noreturn]] void die(const std::string& message) {
  std::cerr << "tiny_decoder: " << message << "\n(see tiny_decoder --help)\n";
  std::exit(2);
}

struct options {
  std::string mode = "compare";
  Index prompt_len = 16;
  std::optional<std::string> prompt_text;
  Index gen = 128;
  std::uint64_t seed = 42;
  float temperature = 0.0f;
  float top_p = 0.9f;
  Index threads = 1;
  std::optional<std::string> checkpoint, tokenizer_path;
  tiny::config cfg;
  bool seq_len_given = false;
  bool json = false;
  std::string kv_type = "f32";
  Index window = 0, sinks = 0;
  Index group = 32, residual = 0;
  std::optional<std::string> save_cache, load_cache;
  std::optional<std::vector<int>> prompt_tokens;
  std::optional<std::string> logits_out, eval_path, eval_tokens_out;
  bool mla = false;
  Index kv_lora_rank = 64, rope_dim = 16;
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

// "1,2,3" as token ids; each a whole number from 0 to INT32_MAX.
std::vector<int> parse_token_list(const std::string& flag, const std::string& value) {
  std::vector<int> ids;
  std::size_t at = 0;
  for (;;) {
    const std::size_t comma = value.find(',', at);
    const std::string item = value.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    if (item.empty()) die(flag + " needs comma-separated token ids, got '" + value + "'");
    ids.push_back(int(parse_int(flag, item, 0, std::numeric_limits<std::int32_t>::max())));
    if (comma == std::string::npos) return ids;
    at = comma + 1;
  }
}

// A float read through double, so that denormals (1e-45) are numbers as they are; what a
// float cannot hold is refused for that reason.
float parse_float(const std::string& flag, const std::string& value) {
  const char* begin = value.c_str();
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(begin, &end);
  if (value.empty() || end == begin || *end != '\0') {
    die(flag + " needs a number, got '" + value + "'");
  }
  if (!std::isfinite(v) || std::fabs(v) > double(std::numeric_limits<float>::max())) {
    die(flag + " must be a finite number a float holds (magnitude at most 3.4e38), got " + value);
  }
  const float f = float(v);
  if (v != 0.0 && f == 0.0f) {
    die(flag + " " + value + " is closer to 0 than the smallest positive float (1.4e-45)");
  }
  return f;
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
    if (i + 1 >= argc) die(flag.rfind("--", 0) == 0 ? flag + " needs a value" : "unknown argument '" + flag + "'");
    const std::string value = argv[++i];
    if (flag == "--mode") {
      if (value != "cached" && value != "uncached" && value != "compare") {
        die("--mode must be cached, uncached or compare, got '" + value + "'");
      }
      o.mode = value;
    } else if (flag == "--prompt-len") {
      o.prompt_len = parse_int(flag, value, 1);
    } else if (flag == "--prompt") {
      o.prompt_text = value;
    } else if (flag == "--prompt-tokens") {
      o.prompt_tokens = parse_token_list(flag, value);
    } else if (flag == "--logits-out") {
      o.logits_out = value;
    } else if (flag == "--eval" || flag == "--eval-json") {
      o.eval_path = value;
      if (flag == "--eval-json") o.json = true;
    } else if (flag == "--eval-tokens-out") {
      o.eval_tokens_out = value;
    } else if (flag == "--gen") {
      o.gen = parse_int(flag, value, 1);
    } else if (flag == "--seed") {
      o.seed = std::uint64_t(parse_int(flag, value, 0));
    } else if (flag == "--temperature") {
      o.temperature = parse_float(flag, value);
      if (!(o.temperature >= 0.0f)) die("--temperature must be >= 0, got " + value);
    } else if (flag == "--top-p") {
      o.top_p = parse_float(flag, value);
      if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) die("--top-p must be in (0, 1], got " + value);
    } else if (flag == "--threads") {
      o.threads = parse_int(flag, value, 1, kvcache::thread_pool::max_threads);
    } else if (flag == "--kv-type") {
      if (value != "f32" && value != "f16" && value != "bf16" && value != "int8" && value != "int4") {
        die("--kv-type must be f32, f16, bf16, int8 or int4, got '" + value + "'");
      }
      o.kv_type = value;
    } else if (flag == "--group") {
      // kv_dtype holds the group in an int; kv_memory caps it at the same value.
      o.group = parse_int(flag, value, 1, std::numeric_limits<int>::max() / 64);
    } else if (flag == "--residual") {
      o.residual = parse_int(flag, value, 0);
    } else if (flag == "--window") {
      o.window = parse_int(flag, value, 1);
    } else if (flag == "--sinks") {
      o.sinks = parse_int(flag, value, 0);
    } else if (flag == "--save-cache") {
      o.save_cache = value;
    } else if (flag == "--load-cache") {
      o.load_cache = value;
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
    } else if (flag == "--attention") {
      if (value != "gqa" && value != "mla") die("--attention must be gqa or mla, got '" + value + "'");
      o.mla = value == "mla";
    } else if (flag == "--kv-lora-rank") {
      o.kv_lora_rank = parse_int(flag, value, 1, std::numeric_limits<std::int32_t>::max());
    } else if (flag == "--rope-dim") {
      o.rope_dim = parse_int(flag, value, 2, std::numeric_limits<std::int32_t>::max());
      if (o.rope_dim % 2 != 0) die("--rope-dim must be even, got " + value);
    } else if (flag == "--seq-len") {
      o.cfg.seq_len = parse_int(flag, value, 1);
      o.seq_len_given = true;
    } else {
      die("unknown option '" + flag + "'");
    }
  }
  if (o.prompt_text && !o.tokenizer_path) die("--prompt needs --tokenizer to turn text into tokens");
  if (o.prompt_text && o.prompt_tokens) die("--prompt and --prompt-tokens exclude each other");
  if (o.eval_path && !o.tokenizer_path) die("--eval needs --tokenizer to turn the text into tokens");
  if (o.eval_tokens_out && !o.eval_path) die("--eval-tokens-out needs --eval");
  if (o.eval_path && (o.save_cache || o.load_cache || o.logits_out)) {
    die("--eval excludes --save-cache, --load-cache and --logits-out");
  }
  if (o.eval_path && (o.prompt_text || o.prompt_tokens)) {
    die("--eval excludes --prompt and --prompt-tokens: the text is the file's");
  }
  if (o.sinks > 0 && o.window == 0) die("--sinks needs --window");
  if (o.mla) {
    if (o.checkpoint) die("--attention mla runs random weights; it excludes --checkpoint");
    if (o.save_cache || o.load_cache) die("--attention mla excludes --save-cache and --load-cache");
    if (o.eval_path) die("--attention mla excludes --eval (its decoder has random weights)");
    o.cfg.kv_lora_rank = o.kv_lora_rank;
    o.cfg.rope_dim = o.rope_dim;
  }
  if (o.save_cache && o.load_cache) die("--save-cache and --load-cache exclude each other");
  if ((o.save_cache || o.load_cache) && o.mode == "uncached") {
    die("--save-cache and --load-cache need a cached run (--mode cached or compare)");
  }
  if (o.window > 0 && o.sinks >= o.window) {
    die("--sinks " + std::to_string(o.sinks) + " must be smaller than --window " + std::to_string(o.window));
  }
  if (!o.checkpoint) check_shape(o.cfg);
  return o;
}

// Reads what the options name: the checkpoint, the tokenizer and the prompt, and sizes the
// sequence. A file that cannot be used and sizes that do not fit are bad arguments: status 2.
void load_inputs(const options& o, tiny::config& cfg, tiny::weights& w,
                 std::optional<tiny::tokenizer>& tok, std::vector<int>& prompt) {
  try {
    if (o.checkpoint) {
      auto m = tiny::load_checkpoint(*o.checkpoint);
      cfg = m.cfg;
      w = std::move(m.w);
    }
    if (o.tokenizer_path) {
      tok = tiny::tokenizer::load(*o.tokenizer_path, cfg.vocab_size);
    }
    if (o.eval_path) {
      // No prompt: the text is the file's, in chunks of seq_len.
    } else if (o.prompt_text) {
      prompt = tok->encode(*o.prompt_text, /*bos=*/true, /*eos=*/false);
    } else if (o.prompt_tokens) {
      prompt = *o.prompt_tokens;
      for (const int t : prompt) {
        if (t >= cfg.vocab_size) {
          die("--prompt-tokens: token " + std::to_string(t) + " is not below the vocabulary size " +
              std::to_string(cfg.vocab_size));
        }
      }
    } else {
      std::mt19937_64 gen(o.seed ^ 0x5eedULL);
      for (Index i = 0; i < o.prompt_len; ++i) prompt.push_back(int(gen() % std::uint64_t(cfg.vocab_size)));
    }
  } catch (const std::bad_alloc&) {
    throw;  // not the argument's fault
  } catch (const std::exception& e) {
    die(e.what());
  }
  Index needed = 0;
  if (!o.eval_path) {
    try {
      needed = kvcache::detail::checked_add(Index(prompt.size()), o.gen, "prompt + --gen") - 1;
    } catch (const std::length_error&) {
      die("--gen " + std::to_string(o.gen) + " with a prompt of " + std::to_string(prompt.size()) +
          " tokens needs more positions than a 64-bit index holds");
    }
  }
  if (!o.checkpoint && !o.seq_len_given) {
    cfg.seq_len = o.eval_path ? 512 : std::max<Index>(needed, 1);
  }
  if (needed > cfg.seq_len) {
    die("prompt (" + std::to_string(prompt.size()) + " tokens) + --gen " + std::to_string(o.gen) +
        " needs " + std::to_string(needed) + " positions but seq_len is " + std::to_string(cfg.seq_len));
  }
  if (o.eval_path && cfg.seq_len < 2) {
    die("--eval needs a seq_len of at least 2 (a BOS and a token), got " + std::to_string(cfg.seq_len));
  }
  if (!o.checkpoint) check_shape(cfg);  // with the sequence length now known
  if (o.residual > cfg.seq_len) {
    die("--residual " + std::to_string(o.residual) + " is more than the sequence length " +
        std::to_string(cfg.seq_len) + " (tokens kept unquantized cannot outnumber the tokens)");
  }
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

struct mode_report {
  tiny::run_result run;
  double decode_median_ms = 0, decode_p90_ms = 0, tokens_per_s = 0;
};

mode_report summarize(tiny::run_result run) {
  mode_report r;
  r.decode_median_ms = tiny::quantile(run.decode_ms, 0.5);
  r.decode_p90_ms = tiny::quantile(run.decode_ms, 0.9);
  double total = 0;
  for (double ms : run.decode_ms) total += ms;
  r.tokens_per_s = total > 0 ? 1000.0 * double(run.decode_ms.size()) / total : 0.0;
  r.run = std::move(run);
  return r;
}

// Generates through a decoder over `cache`, after a short warm-up run that pays first-touch
// page faults and the workspace's first sizing.
template <class Cache>
tiny::run_result run_cached(const tiny::config& cfg, const tiny::weights& w, Cache cache,
                            const options& o, const kvcache::attention_mask& mask,
                            const std::vector<int>& prompt, const std::function<void(Index)>& progress,
                            const std::vector<int>* forced, bool prompt_cache) {
  tiny::decoder<Cache> dec(cfg, w, std::move(cache), o.threads, mask);
  tiny::generate(dec, prompt, std::min<Index>(o.gen, 2), tiny::mode::cached, tiny::sampler());
  tiny::prompt_cache_io<Cache> io;
  if (prompt_cache && o.save_cache) {
    io.save = [&](const Cache& c) {
      std::ofstream out(*o.save_cache, std::ios::binary | std::ios::trunc);
      if (!out) die("--save-cache " + *o.save_cache + ": cannot open it for writing");
      kvcache::io::save(c, out, *o.save_cache);
    };
  }
  if (prompt_cache && o.load_cache) {
    io.load = [&](Cache& c) {
      std::ifstream in(*o.load_cache, std::ios::binary);
      if (!in) die("--load-cache " + *o.load_cache + ": cannot open it");
      try {
        kvcache::io::load(c, in, *o.load_cache);
      } catch (const kvcache::io::format_error& e) {
        die(std::string("--load-cache: ") + e.what());
      }
    };
  }
  return tiny::generate(dec, prompt, o.gen, tiny::mode::cached,
                        tiny::sampler(o.temperature, o.top_p, o.seed), progress, forced,
                        io.save || io.load ? &io : nullptr);
}

// Calls go(cache) with the cache the flags choose for storage `kv_type`: a ring (sliding
// window) with --window, a contiguous cache with room for seq_len tokens otherwise.
template <class Go>
auto with_cache(const std::string& kv_type, const tiny::config& cfg, const options& o, Go&& go) {
  auto in_layout = [&](auto format) {
    using Format = decltype(format);
    if (o.window > 0) {
      return go(kvcache::kv_cache<kvcache::ring_layout, Format>(
          cfg.cache(), kvcache::ring_layout{o.window, o.sinks}, format));
    }
    kvcache::kv_cache<kvcache::contiguous_layout, Format> cache(
        cfg.cache(), kvcache::contiguous_layout{cfg.seq_len}, format);
    cache.reserve(cfg.seq_len);
    return go(std::move(cache));
  };
  if (kv_type == "f16") return in_layout(kvcache::plain_format<Eigen::half>());
  if (kv_type == "bf16") return in_layout(kvcache::plain_format<Eigen::bfloat16>());
  if (kv_type == "int8") return in_layout(kvcache::quantized_format<8>(o.group, o.residual));
  if (kv_type == "int4") return in_layout(kvcache::quantized_format<4>(o.group, o.residual));
  return in_layout(kvcache::plain_format<float>());
}

// The cached run with storage `kv_type`.
tiny::run_result run_kv_type(const std::string& kv_type, const tiny::config& cfg,
                             const tiny::weights& w, const options& o,
                             const kvcache::attention_mask& mask, const std::vector<int>& prompt,
                             const std::function<void(Index)>& progress,
                             const std::vector<int>* forced = nullptr, bool prompt_cache = false) {
  return with_cache(kv_type, cfg, o, [&](auto cache) {
    return run_cached(cfg, w, std::move(cache), o, mask, prompt, progress, forced, prompt_cache);
  });
}

// --eval: the file's tokens through a decoder over the chosen cache, an f32 contiguous one
// beside it. Prints the report; returns the exit status.
int run_eval(const tiny::config& cfg, const tiny::weights& w, const tiny::tokenizer& tok,
             const options& o) {
  std::string text;
  {
    if (const std::string wrong = tiny::detail::not_a_regular_file(*o.eval_path); !wrong.empty()) {
      die("--eval " + *o.eval_path + ": " + wrong);
    }
    std::ifstream in(*o.eval_path, std::ios::binary);
    if (!in) die("--eval " + *o.eval_path + ": cannot open it");
    std::ostringstream all;
    all << in.rdbuf();
    text = all.str();
  }
  if (text.empty()) die("--eval " + *o.eval_path + ": the file is empty");
  const auto start = std::chrono::steady_clock::now();
  std::vector<int> tokens;
  try {
    tokens = tok.encode(text, /*bos=*/false, /*eos=*/false);
  } catch (const std::runtime_error& e) {
    die("--eval " + *o.eval_path + ": " + e.what());
  }
  std::ofstream per_token;
  if (o.eval_tokens_out) {
    per_token.open(*o.eval_tokens_out, std::ios::trunc);
    if (!per_token) die("--eval-tokens-out " + *o.eval_tokens_out + ": cannot open it for writing");
    per_token << "index,position,token,nll,kl\n";
    per_token.precision(9);
  }
  tiny::decoder<> reference(cfg, w, o.threads);
  const tiny::eval_result r = with_cache(o.kv_type, cfg, o, [&](auto cache) {
    tiny::decoder<decltype(cache)> dec(cfg, w, std::move(cache), o.threads);
    return tiny::evaluate(dec, reference, tokens, cfg.seq_len, tiny::tokenizer::bos_id,
                          [&](const tiny::token_score& t) {
                            if (per_token.is_open()) {
                              per_token << t.index << ',' << t.position << ',' << t.token << ','
                                        << t.nll << ',' << t.kl << '\n';
                            }
                          });
  });
  if (per_token.is_open() && !per_token.flush()) {
    die("--eval-tokens-out " + *o.eval_tokens_out + ": write failed");
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double bits_per_byte = r.nll / std::log(2.0) / double(text.size());
  const double bytes_per_token = r.kv_positions > 0 ? double(r.kv_bytes) / double(r.kv_positions) : 0.0;
  if (o.json) {
    std::ostringstream js;
    js.precision(9);
    js << "{\"tokens\":" << r.tokens << ",\"perplexity\":" << r.perplexity()
       << ",\"bits_per_byte\":" << bits_per_byte << ",\"mean_kl_vs_f32\":" << r.mean_kl()
       << ",\"kv_bytes\":" << r.kv_bytes << ",\"kv_positions\":" << r.kv_positions
       << ",\"kv_bytes_per_token\":" << bytes_per_token << ",\"mean_nll\":" << r.mean_nll()
       << ",\"text_bytes\":" << text.size() << ",\"chunks\":" << r.chunks
       << ",\"chunk\":" << cfg.seq_len << ",\"kv_type\":\"" << o.kv_type << "\""
       << ",\"group\":" << o.group << ",\"residual\":" << o.residual << ",\"window\":" << o.window
       << ",\"sinks\":" << o.sinks << ",\"file\":\"" << json_escape(*o.eval_path) << "\""
       << ",\"seconds\":" << seconds << "}\n";
    std::cout << js.str();
    return 0;
  }
  std::printf("eval: %s, %zu bytes, %td tokens in %td chunks of a BOS + up to %td tokens\n",
              o.eval_path->c_str(), text.size(), r.tokens, r.chunks, cfg.seq_len - 1);
  std::string cache = o.kv_type;
  if (o.kv_type == "int8" || o.kv_type == "int4") {
    cache += ", group " + std::to_string(o.group) + ", residual " + std::to_string(o.residual);
  }
  if (o.window > 0) cache += ", window " + std::to_string(o.window) + " + " + std::to_string(o.sinks) + " sinks";
  std::printf("cache: %s; %td bytes after %td positions (%.1f bytes a position)\n", cache.c_str(),
              r.kv_bytes, r.kv_positions, bytes_per_token);
  std::printf("perplexity %.4f, %.4f bits per byte, mean KL divergence against an f32 cache %.3g "
              "nats (%.1f s)\n",
              r.perplexity(), bits_per_byte, r.mean_kl(), seconds);
  return 0;
}

// KL(p || q) of the softmax distributions of two logit vectors, in nats.
double kl_divergence(const tiny::vector& p_logits, const tiny::vector& q_logits) {
  return tiny::nll_and_kl(q_logits, p_logits, 0).second;
}

// --logits-out: "KVLOGITS", uint32 rows, uint32 vocab_size, then the rows as float32, all
// little-endian.
void write_logits(const std::string& path, const std::vector<tiny::vector>& rows, Index vocab) {
  if (rows.size() > std::numeric_limits<std::uint32_t>::max() ||
      vocab > Index(std::numeric_limits<std::uint32_t>::max())) {
    die("--logits-out " + path + ": more rows or a larger vocabulary than its header holds");
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) die("--logits-out " + path + ": cannot open it for writing");
  out.write("KVLOGITS", 8);
  tiny::detail::write_le_i32(out, std::int32_t(std::uint32_t(rows.size())));
  tiny::detail::write_le_i32(out, std::int32_t(std::uint32_t(vocab)));
  for (const tiny::vector& row : rows) tiny::detail::write_floats(out, row.data(), vocab);
  if (!out.flush()) die("--logits-out " + path + ": write failed");
}

// Bytes per element of a full-precision kv type.
Index element_bytes(const std::string& kv_type) { return kv_type == "f32" ? 4 : 2; }

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  tiny::config cfg = o.cfg;
  tiny::weights w;
  std::optional<tiny::tokenizer> tok;
  std::vector<int> prompt;
  load_inputs(o, cfg, w, tok, prompt);
  try {
    cfg.validate();
    if (!o.checkpoint) w = tiny::random_weights(cfg, o.seed);
    if (o.eval_path) return run_eval(cfg, w, *tok, o);

    kvcache::attention_mask mask;  // what the uncached run attends with: the same model
    mask.window = o.window;
    mask.sinks = o.sinks;
    const bool tty = isatty(2) != 0 && !o.json;
    auto progress_for = [&](const char* name) {
      const auto start = std::chrono::steady_clock::now();
      return [=, &o](Index done) {
        if (!tty || (done % 16 != 0 && done != o.gen)) return;
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::fprintf(stderr, "\r[%s] %td/%td tokens, %.1f tokens/s   ", name, done, o.gen,
                     double(done) / std::max(s, 1e-9));
        if (done == o.gen) std::fprintf(stderr, "\r%60s\r", "");
      };
    };
    std::optional<mode_report> cached, uncached;
    if (o.mode != "uncached") {
      cached = summarize(run_kv_type(o.kv_type, cfg, w, o, mask, prompt, progress_for("cached"),
                                     nullptr, /*prompt_cache=*/true));
    }
    if (o.mode != "cached") {
      // The uncached run keeps no cache; the decoder's own is never written.
      tiny::decoder<> dec(cfg, w, kvcache::contiguous_cache<float>(cfg.cache()), o.threads, mask);
      tiny::generate(dec, prompt, std::min<Index>(o.gen, 2), tiny::mode::uncached, tiny::sampler());
      uncached = summarize(tiny::generate(dec, prompt, o.gen, tiny::mode::uncached,
                                          tiny::sampler(o.temperature, o.top_p, o.seed),
                                          progress_for("uncached"), nullptr));
    }
    // Against an f32 cache of the same kind: the f32 run's own tokens are fed to both, so the
    // distributions are compared step by step on one sequence.
    struct versus_f32 {
      double max_abs_logit_diff = 0, mean_kl = 0;
      bool greedy_tokens_same = true;
    } vs;
    if (cached && o.kv_type != "f32") {
      const auto reference = run_kv_type("f32", cfg, w, o, mask, prompt, {});
      const auto forced = run_kv_type(o.kv_type, cfg, w, o, mask, prompt, {}, &reference.tokens);
      for (std::size_t s = 0; s < reference.logits.size(); ++s) {
        vs.max_abs_logit_diff = std::max(
            vs.max_abs_logit_diff, double((forced.logits[s] - reference.logits[s]).cwiseAbs().maxCoeff()));
        vs.mean_kl += kl_divergence(reference.logits[s], forced.logits[s]);
      }
      vs.mean_kl /= double(reference.logits.size());
      vs.greedy_tokens_same = cached->run.tokens == reference.tokens;
    }

    // What the formula says the cache holds: every token that went through it (at most
    // window + sinks with a window), at the storage's bytes per element, scales included.
    // With MLA, the latent formula, and beside it what the GQA model of the same size would
    // cache.
    Index formula_bytes = 0, gqa_bytes = 0;
    if (cached) {
      const Index held = o.window > 0 ? std::min(cached->run.tokens_cached, o.window + o.sinks)
                                      : cached->run.tokens_cached;
      if (o.kv_type == "int8" || o.kv_type == "int4") {
        const auto dtype = o.kv_type == "int8" ? kvcache::kv_dtype::int8(int(o.group))
                                               : kvcache::kv_dtype::int4(int(o.group));
        gqa_bytes = Index(kvcache::kv_cache_bytes(1, held, cfg.n_layers, cfg.n_kv_heads,
                                                  cfg.head_dim(), dtype));
        if (cfg.mla()) {
          formula_bytes = Index(kvcache::kv_latent_cache_bytes(1, held, cfg.n_layers,
                                                               cfg.kv_lora_rank, cfg.rope_dim, dtype));
        }
      } else {
        gqa_bytes = Index(kvcache::kv_cache_bytes(1, held, cfg.n_layers, cfg.n_kv_heads,
                                                  cfg.head_dim(), element_bytes(o.kv_type)));
        if (cfg.mla()) {
          const auto dtype = o.kv_type == "f32" ? kvcache::kv_dtype::f32() : kvcache::kv_dtype::f16();
          formula_bytes = Index(kvcache::kv_latent_cache_bytes(1, held, cfg.n_layers,
                                                               cfg.kv_lora_rank, cfg.rope_dim, dtype));
        }
      }
      if (!cfg.mla()) formula_bytes = gqa_bytes;
    }
    if (o.logits_out) {
      write_logits(*o.logits_out, (cached ? cached->run : uncached->run).logits, cfg.vocab_size);
    }
    bool identical = false;
    double max_diff = 0;
    double speedup = 0;
    if (cached && uncached) {
      identical = cached->run.tokens == uncached->run.tokens;
      for (std::size_t s = 0; s < std::min(cached->run.logits.size(), uncached->run.logits.size()); ++s) {
        max_diff = std::max(max_diff, double((cached->run.logits[s] - uncached->run.logits[s]).cwiseAbs().maxCoeff()));
      }
      speedup = cached->decode_median_ms > 0 ? uncached->decode_median_ms / cached->decode_median_ms : 0;
    }
    auto text_of = [&](const std::vector<int>& tokens) {
      std::string s;
      int prev = prompt.back();
      for (int t : tokens) {
        s += tiny::safe_piece(tok->decode(prev, t));
        prev = t;
      }
      return s;
    };

    if (o.json) {
      std::ostringstream js;
      js << "{\"config\":{\"dim\":" << cfg.dim << ",\"hidden_dim\":" << cfg.hidden_dim
         << ",\"n_layers\":" << cfg.n_layers << ",\"n_heads\":" << cfg.n_heads
         << ",\"n_kv_heads\":" << cfg.n_kv_heads << ",\"head_dim\":" << cfg.head_dim()
         << ",\"vocab_size\":" << cfg.vocab_size << ",\"seq_len\":" << cfg.seq_len
         << ",\"attention\":\"" << (cfg.mla() ? "mla" : "gqa") << "\""
         << ",\"kv_lora_rank\":" << cfg.kv_lora_rank << ",\"rope_dim\":" << cfg.rope_dim
         << ",\"weights\":\"" << (o.checkpoint ? json_escape(*o.checkpoint) : "random") << "\"}"
         << ",\"prompt_len\":" << prompt.size() << ",\"gen\":" << o.gen << ",\"threads\":" << o.threads
         << ",\"kv_type\":\"" << o.kv_type << "\",\"window\":" << o.window
         << ",\"sinks\":" << o.sinks << ",\"kv_bytes\":" << (cached ? cached->run.kv_bytes : 0)
         << ",\"prompt_cache\":\"" << (o.save_cache ? "saved" : o.load_cache ? "loaded" : "none")
         << "\"" << ",\"time_to_first_token_ms\":" << (cached ? cached->run.prefill_ms : 0.0)
         << ",\"modes\":{";
      bool first = true;
      for (const auto* r : {cached ? &*cached : nullptr, uncached ? &*uncached : nullptr}) {
        if (r == nullptr) continue;
        js << (first ? "" : ",") << "\"" << (r == &*cached ? "cached" : "uncached") << "\":{"
           << "\"prefill_ms\":" << r->run.prefill_ms
           << ",\"decode_ms_per_token_median\":" << r->decode_median_ms
           << ",\"decode_ms_per_token_p90\":" << r->decode_p90_ms
           << ",\"tokens_per_s\":" << r->tokens_per_s << ",\"kv_bytes\":" << r->run.kv_bytes
           << ",\"tokens_cached\":" << r->run.tokens_cached << ",\"tokens\":[";
        for (std::size_t i = 0; i < r->run.tokens.size(); ++i) js << (i ? "," : "") << r->run.tokens[i];
        js << "]";
        if (tok) js << ",\"text\":\"" << json_escape(text_of(r->run.tokens)) << "\"";
        js << "}";
        first = false;
      }
      js << "},\"kv_bytes_formula\":" << formula_bytes << ",\"gqa_kv_bytes\":" << gqa_bytes;
      if (cached) {
        js << ",\"vs_f32_cache\":{\"max_abs_logit_diff\":" << vs.max_abs_logit_diff
           << ",\"mean_kl\":" << vs.mean_kl
           << ",\"greedy_tokens_same\":" << (vs.greedy_tokens_same ? "true" : "false") << "}";
      }
      if (cached && uncached) {
        js << ",\"identical_tokens\":" << (identical ? "true" : "false")
           << ",\"max_abs_logit_diff\":" << max_diff << ",\"speedup\":" << speedup;
      }
      js << "}\n";
      std::cout << js.str();
      return 0;
    }

    if (cfg.mla()) {
      std::printf("model: dim %td, %td layers, %td query heads with multi-head latent attention "
                  "(latent %td + RoPE %td, head_dim %td), vocab %td, random weights\n",
                  cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_lora_rank, cfg.rope_dim,
                  cfg.head_dim(), cfg.vocab_size);
    } else {
      std::printf("model: dim %td, %td layers, %td query heads on %td kv heads (head_dim %td), "
                  "vocab %td, %s weights\n",
                  cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(),
                  cfg.vocab_size, o.checkpoint ? o.checkpoint->c_str() : "random");
    }
    std::printf("prompt: %zu tokens, generating %td, %s, %td thread%s\n\n", prompt.size(),
                o.gen, o.temperature == 0.0f ? "greedy" : "sampled", o.threads, o.threads == 1 ? "" : "s");
    for (const auto* r : {cached ? &*cached : nullptr, uncached ? &*uncached : nullptr}) {
      if (r == nullptr) continue;
      const bool is_cached = r == &*cached;
      std::printf("%-9s prefill %8.2f ms | decode/token median %8.3f ms, p90 %8.3f ms | %9.1f tokens/s\n",
                  is_cached ? "cached" : "uncached", r->run.prefill_ms, r->decode_median_ms,
                  r->decode_p90_ms, r->tokens_per_s);
      if (is_cached) {
        std::printf("          KV cache (%s%s): %td bytes after %td tokens; the formula says %td\n",
                    o.kv_type.c_str(),
                    o.window > 0 ? (", window " + std::to_string(o.window) + " + " +
                                    std::to_string(o.sinks) + " sinks").c_str()
                                 : "",
                    r->run.kv_bytes, r->run.tokens_cached, formula_bytes);
        if (cfg.mla()) {
          std::printf("          the GQA model of the same size (%td kv heads of %td) would "
                      "cache %td bytes: %.2fx\n",
                      cfg.n_kv_heads, cfg.head_dim(), gqa_bytes,
                      r->run.kv_bytes > 0 ? double(gqa_bytes) / double(r->run.kv_bytes) : 0.0);
        }
        if (o.save_cache || o.load_cache) {
          std::printf("          prompt cache %s %s; time to first token %.2f ms\n",
                      o.save_cache ? "saved to" : "loaded from",
                      (o.save_cache ? o.save_cache : o.load_cache)->c_str(), r->run.prefill_ms);
        }
      } else {
        std::printf("          no cache: every step recomputes K and V of all earlier tokens\n");
      }
    }
    const auto& shown = cached ? cached->run.tokens : uncached->run.tokens;
    std::printf("\ntokens:");
    for (std::size_t i = 0; i < std::min<std::size_t>(shown.size(), 24); ++i) std::printf(" %d", shown[i]);
    std::printf(shown.size() > 24 ? " ...\n" : "\n");
    if (tok && o.prompt_text) {  // the prompt, then the continuation (in bold on a terminal)
      const bool bold = isatty(1) != 0;
      std::printf("\n%s%s%s%s\n\n", o.prompt_text->c_str(), bold ? "\033[1m" : "",
                  text_of(shown).c_str(), bold ? "\033[0m" : "");
    } else if (tok) {
      std::printf("text: %s\n", text_of(shown).c_str());
    }
    if (cached && uncached) {
      std::printf("identical tokens: %s; largest |logit difference| over %zu steps: %.3g\n",
                  identical ? "yes" : "NO", cached->run.logits.size(), max_diff);
      std::printf("speedup (uncached / cached decode time per token, medians): %.1fx\n", speedup);
    }
    if (cached && o.kv_type != "f32") {
      std::printf("against an f32 cache: largest |logit difference| %.3g, mean KL divergence %.3g "
                  "nats, greedy tokens %s\n",
                  vs.max_abs_logit_diff, vs.mean_kl, vs.greedy_tokens_same ? "the same" : "differ");
    }
    // With a full-precision f32 cache both modes compute the same thing: different tokens
    // are a failure. Lower precision may legitimately change them.
    return cached && uncached && o.kv_type == "f32" && !identical ? 1 : 0;
  } catch (const std::invalid_argument& e) {  // the library refusing what the flags asked for
    die(e.what());
  } catch (const std::length_error& e) {  // sizes from the flags that cannot be allocated
    die(e.what());
  } catch (const std::exception& e) {
    std::cerr << "tiny_decoder: error: " << e.what() << "\n";
    return 1;
  }
}
