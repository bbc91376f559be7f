// SPDX-License-Identifier: Apache-2.0
// encoder_decoder: a small encoder-decoder transformer that generates with both caches (the
// decoder's self-attention cache and its cross-attention cache of the encoder's output), with
// the self-attention cache alone, and without any cache, and shows that all three pick the same
// tokens, how much faster the caches are, and what each cache holds.
#include "generate.hpp"

#include <kvcache/detail/checked.hpp>
#include <kvcache/memory.hpp>
#include <kvcache/thread_pool.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using encdec::Index;

constexpr const char* usage = R"(usage: encoder_decoder [options]

Encodes a random source sequence once (bidirectional self-attention), then decodes greedily
(causal self-attention, cross-attention over the encoder's output, MLP), three ways:
  cached           the self-attention kv cache, and the cross-attention cache: every decoder
                   layer's keys and values of the encoder's output projected once, before the
                   first step
  self-cache-only  the self-attention cache, the cross keys and values projected again from
                   the encoder's output at every step
  uncached         no cache: every step runs the whole target so far again and projects the
                   cross keys and values again
and compares their tokens and speed, and the memory of the two caches. The weights are random
(seeded): the decoder is asked to copy or reverse the source, but does not know how.

  --mode compare|cached|self-cache-only|uncached   what to run (default compare: all three)
  --src-len N         source tokens (default 128, at most 1048576)
  --gen N             tokens to generate (default: --src-len, at most 1048576)
  --task copy|reverse the decoder's task token (default copy)
  --seed N            seed of the weights and the source (default 42)
  --threads N         threads for attention (default 1, at most 1024)
  --kv-type T         storage of both caches: f32 (default), f16, bf16, int8, int4
  --group N           int8/int4: elements per scale and zero point (default 32)
  --dim N --hidden N --enc-layers N --dec-layers N --heads N --kv-heads N --vocab N
                      model shape (default 256, 768, 4, 4, 8, 2, 512; each at most 65536)
  --json              print one JSON object instead of text
  --help              this text

Exit status: 0 on success, 2 for a bad argument, 1 for other failures and when, with f32
caches, the modes pick different tokens.
)";

[[noreturn]] void die(const std::string& message) {
  std::cerr << "encoder_decoder: " << message << "\n(see encoder_decoder --help)\n";
  std::exit(2);
}

struct options {
  std::string mode = "compare";
  Index src_len = 128;
  std::optional<Index> gen;
  std::string task = "copy";
  std::uint64_t seed = 42;
  Index threads = 1;
  std::string kv_type = "f32";
  Index group = 32;
  encdec::config cfg;
  bool json = false;
};

Index parse_int(const std::string& flag, const std::string& value, Index min, Index max) {
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

options parse(int argc, char** argv) {
  constexpr Index max_size = 65536, max_tokens = Index(1) << 20;
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
    if (flag.rfind("--", 0) != 0) die("unknown argument '" + flag + "'");
    if (i + 1 >= argc) die(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--mode") {
      if (value != "compare" && value != "cached" && value != "self-cache-only" &&
          value != "uncached") {
        die("--mode must be compare, cached, self-cache-only or uncached, got '" + value + "'");
      }
      o.mode = value;
    } else if (flag == "--src-len") {
      o.src_len = parse_int(flag, value, 1, max_tokens);
    } else if (flag == "--gen") {
      o.gen = parse_int(flag, value, 1, max_tokens);
    } else if (flag == "--task") {
      if (value != "copy" && value != "reverse") {
        die("--task must be copy or reverse, got '" + value + "'");
      }
      o.task = value;
    } else if (flag == "--seed") {
      o.seed = std::uint64_t(parse_int(flag, value, 0, std::numeric_limits<Index>::max()));
    } else if (flag == "--threads") {
      o.threads = parse_int(flag, value, 1, kvcache::thread_pool::max_threads);
    } else if (flag == "--kv-type") {
      if (value != "f32" && value != "f16" && value != "bf16" && value != "int8" &&
          value != "int4") {
        die("--kv-type must be f32, f16, bf16, int8 or int4, got '" + value + "'");
      }
      o.kv_type = value;
    } else if (flag == "--group") {
      o.group = parse_int(flag, value, 1, max_size);
    } else if (flag == "--dim") {
      o.cfg.dim = parse_int(flag, value, 1, max_size);
    } else if (flag == "--hidden") {
      o.cfg.hidden_dim = parse_int(flag, value, 1, max_size);
    } else if (flag == "--enc-layers") {
      o.cfg.encoder_layers = parse_int(flag, value, 1, max_size);
    } else if (flag == "--dec-layers") {
      o.cfg.decoder_layers = parse_int(flag, value, 1, max_size);
    } else if (flag == "--heads") {
      o.cfg.n_heads = parse_int(flag, value, 1, max_size);
    } else if (flag == "--kv-heads") {
      o.cfg.n_kv_heads = parse_int(flag, value, 1, max_size);
    } else if (flag == "--vocab") {
      o.cfg.vocab_size = parse_int(flag, value, encdec::first_word + 1, max_size);
    } else {
      die("unknown option '" + flag + "'");
    }
  }
  const encdec::config& c = o.cfg;
  if (c.dim % c.n_heads != 0 || c.head_dim() % 2 != 0) {
    die("--dim " + std::to_string(c.dim) + " must be --heads " + std::to_string(c.n_heads) +
        " times an even head_dim");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    die("--heads " + std::to_string(c.n_heads) + " is not a multiple of --kv-heads " +
        std::to_string(c.n_kv_heads));
  }
  return o;
}

struct mode_report {
  encdec::run_result run;
  double decode_median_ms = 0, decode_p90_ms = 0, tokens_per_s = 0;
};

mode_report summarize(encdec::run_result run) {
  mode_report r;
  r.decode_median_ms = encdec::quantile(run.decode_ms, 0.5);
  r.decode_p90_ms = encdec::quantile(run.decode_ms, 0.9);
  double total = 0;
  for (double ms : run.decode_ms) total += ms;
  r.tokens_per_s = total > 0 ? 1000.0 * double(run.decode_ms.size()) / total : 0.0;
  r.run = std::move(run);
  return r;
}

// Calls go(format) with the storage format of --kv-type.
template <class Go>
auto with_format(const options& o, Go&& go) {
  if (o.kv_type == "f16") return go(kvcache::plain_format<Eigen::half>());
  if (o.kv_type == "bf16") return go(kvcache::plain_format<Eigen::bfloat16>());
  if (o.kv_type == "int8") return go(kvcache::quantized_format<8>(o.group, 0));
  if (o.kv_type == "int4") return go(kvcache::quantized_format<4>(o.group, 0));
  return go(kvcache::plain_format<float>());
}

// What kv_cache_bytes says `tokens` tokens of every decoder layer take in --kv-type (for
// int8/int4, every token quantized).
Index formula_bytes(const options& o, const encdec::config& c, Index tokens) {
  if (o.kv_type == "int8" || o.kv_type == "int4") {
    const auto dtype = o.kv_type == "int8" ? kvcache::kv_dtype::int8(int(o.group))
                                           : kvcache::kv_dtype::int4(int(o.group));
    return Index(kvcache::kv_cache_bytes(1, tokens, c.decoder_layers, c.n_kv_heads, c.head_dim(),
                                         dtype));
  }
  return Index(kvcache::kv_cache_bytes(1, tokens, c.decoder_layers, c.n_kv_heads, c.head_dim(),
                                       o.kv_type == "f32" ? 4 : 2));
}

void print_tokens(const char* label, const std::vector<int>& tokens) {
  std::printf("%s", label);
  for (std::size_t i = 0; i < std::min<std::size_t>(tokens.size(), 20); ++i) {
    std::printf(" %d", tokens[i]);
  }
  std::printf(tokens.size() > 20 ? " ...\n" : "\n");
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  try {
    const encdec::config& cfg = o.cfg;
    cfg.validate();
    const Index gen = o.gen.value_or(o.src_len);
    // The decoder runs its prompt (bos, task) and every generated token but the last.
    const std::vector<int> prompt = {encdec::bos,
                                     o.task == "copy" ? encdec::copy_task : encdec::reverse_task};
    const Index max_target = kvcache::detail::checked_add(Index(prompt.size()), gen - 1, "--gen");
    const encdec::weights w = encdec::random_weights(cfg, o.seed);
    std::vector<int> source;
    std::mt19937_64 pick(o.seed ^ 0x5eedULL);
    for (Index i = 0; i < o.src_len; ++i) {
      source.push_back(encdec::first_word +
                       int(pick() % std::uint64_t(cfg.vocab_size - encdec::first_word)));
    }

    std::unique_ptr<kvcache::thread_pool> pool;
    if (o.threads > 1) pool = std::make_unique<kvcache::thread_pool>(o.threads);
    kvcache::attention_options opt;
    opt.pool = pool.get();

    // The encoder runs once; every mode decodes from its output.
    encdec::encoder enc(cfg, w, o.src_len, opt);
    const auto e0 = std::chrono::steady_clock::now();
    const encdec::matrix encoded = enc.run(source);
    const double encoder_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - e0).count();

    struct ran {
      encdec::mode mode;
      mode_report report;
    };
    std::vector<ran> runs;
    Index cross_capacity_bytes = 0;
    with_format(o, [&](auto format) {
      encdec::decoder<decltype(format)> dec(cfg, w, format, o.src_len, max_target, opt);
      cross_capacity_bytes = dec.cross().capacity_bytes();
      for (const encdec::mode m : {encdec::mode::cached, encdec::mode::self_cache_only,
                                   encdec::mode::uncached}) {
        const std::string flag = m == encdec::mode::cached            ? "cached"
                                 : m == encdec::mode::self_cache_only ? "self-cache-only"
                                                                      : "uncached";
        if (o.mode != "compare" && o.mode != flag) continue;
        // A short warm-up pays first-touch page faults and the workspace's first sizing.
        encdec::generate(dec, encoded, prompt, std::min<Index>(gen, 2), m);
        runs.push_back({m, summarize(encdec::generate(dec, encoded, prompt, gen, m))});
      }
      return 0;
    });

    const ran* cached = nullptr;
    const ran* self_only = nullptr;
    const ran* uncached = nullptr;
    for (const ran& r : runs) {
      if (r.mode == encdec::mode::cached) cached = &r;
      if (r.mode == encdec::mode::self_cache_only) self_only = &r;
      if (r.mode == encdec::mode::uncached) uncached = &r;
    }
    // Every mode that ran against the first: the same tokens, logits within rounding.
    const ran& first = runs.front();
    bool identical = true;
    double max_diff = 0;
    for (const ran& r : runs) {
      identical = identical && r.report.run.tokens == first.report.run.tokens;
      const auto& a = r.report.run.logits;
      const auto& b = first.report.run.logits;
      for (std::size_t s = 0; s < std::min(a.size(), b.size()); ++s) {
        max_diff = std::max(max_diff, double((a[s] - b[s]).cwiseAbs().maxCoeff()));
      }
    }
    const auto ratio = [](const ran* slow, const ran* fast) {
      return slow != nullptr && fast != nullptr && fast->report.decode_median_ms > 0
                 ? slow->report.decode_median_ms / fast->report.decode_median_ms
                 : 0.0;
    };
    const double speedup = ratio(uncached, cached);
    const double speedup_over_self_only = ratio(self_only, cached);
    const Index self_bytes = cached != nullptr     ? cached->report.run.self_bytes
                             : self_only != nullptr ? self_only->report.run.self_bytes
                                                    : 0;
    const Index self_tokens = cached != nullptr     ? cached->report.run.self_tokens
                              : self_only != nullptr ? self_only->report.run.self_tokens
                                                     : 0;
    const Index cross_bytes = cached != nullptr ? cached->report.run.cross_bytes : 0;
    const Index self_formula = formula_bytes(o, cfg, self_tokens);
    const Index cross_formula = cached != nullptr ? formula_bytes(o, cfg, o.src_len) : 0;

    if (o.json) {
      std::ostringstream js;
      js << "{\"config\":{\"dim\":" << cfg.dim << ",\"hidden_dim\":" << cfg.hidden_dim
         << ",\"encoder_layers\":" << cfg.encoder_layers
         << ",\"decoder_layers\":" << cfg.decoder_layers << ",\"n_heads\":" << cfg.n_heads
         << ",\"n_kv_heads\":" << cfg.n_kv_heads << ",\"head_dim\":" << cfg.head_dim()
         << ",\"vocab_size\":" << cfg.vocab_size << ",\"weights\":\"random\"}"
         << ",\"src_len\":" << o.src_len << ",\"gen\":" << gen << ",\"task\":\"" << o.task
         << "\",\"kv_type\":\"" << o.kv_type << "\",\"group\":" << o.group
         << ",\"threads\":" << o.threads << ",\"seed\":" << o.seed
         << ",\"encoder_ms\":" << encoder_ms << ",\"modes\":{";
      for (std::size_t i = 0; i < runs.size(); ++i) {
        const mode_report& r = runs[i].report;
        js << (i ? "," : "") << "\"" << encdec::name(runs[i].mode) << "\":{"
           << "\"cross_fill_ms\":" << r.run.cross_fill_ms << ",\"prefill_ms\":" << r.run.prefill_ms
           << ",\"decode_ms_per_token_median\":" << r.decode_median_ms
           << ",\"decode_ms_per_token_p90\":" << r.decode_p90_ms
           << ",\"tokens_per_s\":" << r.tokens_per_s << ",\"self_kv_bytes\":" << r.run.self_bytes
           << ",\"cross_kv_bytes\":" << r.run.cross_bytes << ",\"tokens\":[";
        for (std::size_t t = 0; t < r.run.tokens.size(); ++t) {
          js << (t ? "," : "") << r.run.tokens[t];
        }
        js << "]}";
      }
      js << "},\"self_kv_bytes\":" << self_bytes << ",\"self_kv_tokens\":" << self_tokens
         << ",\"self_kv_bytes_formula\":" << self_formula << ",\"cross_kv_bytes\":" << cross_bytes
         << ",\"cross_kv_bytes_formula\":" << cross_formula
         << ",\"cross_kv_capacity_bytes\":" << cross_capacity_bytes
         << ",\"identical_tokens\":" << (identical ? "true" : "false")
         << ",\"max_abs_logit_diff\":" << max_diff << ",\"speedup\":" << speedup
         << ",\"speedup_over_self_cache_only\":" << speedup_over_self_only << "}\n";
      std::cout << js.str();
    } else {
      std::printf("model: dim %td, %td encoder + %td decoder layers, %td query heads on %td kv "
                  "heads (head_dim %td), vocab %td, random weights\n",
                  cfg.dim, cfg.encoder_layers, cfg.decoder_layers, cfg.n_heads, cfg.n_kv_heads,
                  cfg.head_dim(), cfg.vocab_size);
      std::printf("source: %td tokens, encoded once in %.2f ms; %s task, generating %td greedily; "
                  "%s caches, %td attention thread%s\n\n",
                  o.src_len, encoder_ms, o.task.c_str(), gen, o.kv_type.c_str(), o.threads,
                  o.threads == 1 ? "" : "s");
      for (const ran& r : runs) {
        const mode_report& m = r.report;
        std::printf("%-16s cross fill %7.2f ms | prefill %7.2f ms | decode/token median %8.3f ms, "
                    "p90 %8.3f ms | %9.1f tokens/s\n",
                    encdec::name(r.mode), m.run.cross_fill_ms, m.run.prefill_ms,
                    m.decode_median_ms, m.decode_p90_ms, m.tokens_per_s);
      }
      std::printf("\n");
      if (cached != nullptr || self_only != nullptr) {
        std::printf("self-attention cache:  %10td bytes (%td tokens x %td layers; the formula "
                    "says %td)\n",
                    self_bytes, self_tokens, cfg.decoder_layers, self_formula);
      }
      if (cached != nullptr) {
        std::printf("cross-attention cache: %10td bytes (%td encoder tokens x %td layers; the "
                    "formula says %td)\n",
                    cross_bytes, o.src_len, cfg.decoder_layers, cross_formula);
      }
      print_tokens("tokens:", first.report.run.tokens);
      if (runs.size() > 1) {
        std::printf("identical tokens in every mode: %s; largest |logit difference| %.3g\n",
                    identical ? "yes" : "NO", max_diff);
      }
      if (speedup > 0) {
        std::printf("speedup of both caches over none: %.1fx (decode time per token, medians)\n",
                    speedup);
      }
      if (speedup_over_self_only > 0) {
        std::printf("speedup of both caches over the self-attention cache alone: %.2fx\n",
                    speedup_over_self_only);
      }
    }
    // With f32 caches every mode computes the same model: different tokens are a failure.
    return o.kv_type == "f32" && !identical ? 1 : 0;
  } catch (const std::invalid_argument& e) {  // sizes from the flags that the library refuses
    die(e.what());
  } catch (const std::length_error& e) {
    die(e.what());
  } catch (const std::exception& e) {
    std::cerr << "encoder_decoder: error: " << e.what() << "\n";
    return 1;
  }
}
