// SPDX-License-Identifier: Apache-2.0
// The kv_memory calculator: model presets, command-line parsing, the cache arithmetic, reports.
#pragma once

#include <kvcache/detail/checked.hpp>
#include <kvcache/memory.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace kv_memory {

/// Bad command-line input. The message names the flag and the value that came.
class usage_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// What one token costs in a model's cache. Standard attention (MHA, GQA, MQA) caches a key and
/// a value of `head_dim` per kv head per layer; multi-head latent attention (MLA,
/// `latent_dim > 0`) caches one compressed latent of `latent_dim` plus `rope_dim` decoupled
/// RoPE key dims per layer, with no heads and no separate K and V.
struct model_shape {
  const char* name;
  std::int64_t layers;
  std::int64_t query_heads;  // informative only; 0 when not known (custom shapes)
  std::int64_t kv_heads;     // 0 for MLA
  std::int64_t head_dim;     // 0 for MLA
  std::int64_t window;       // sliding window: at most this many tokens cached; 0 for none
  std::int64_t latent_dim;   // MLA: the compressed KV latent (kv_lora_rank); 0 otherwise
  std::int64_t rope_dim;     // MLA: decoupled RoPE key dims (qk_rope_head_dim); 0 otherwise

  constexpr bool mla() const noexcept { return latent_dim > 0; }
  /// "MHA", "GQA", "MQA", "MLA", or "" when the query heads of a custom shape are unknown.
  constexpr const char* attention() const noexcept {
    if (mla()) return "MLA";
    if (kv_heads == 1) return "MQA";
    if (query_heads == 0) return "";
    return query_heads == kv_heads ? "MHA" : "GQA";
  }
};

// The published shapes, from each model's Hugging Face config.json:
//   layers      = num_hidden_layers (Falcon: n_layer)
//   query_heads = num_attention_heads (Falcon: n_head)
//   kv_heads    = num_key_value_heads (absent in Llama-2-7B: equal to num_attention_heads;
//                 Falcon-7B: multi_query = true, one kv head)
//   head_dim    = hidden_size / num_attention_heads (4096/32, 8192/64, Falcon 4544/71 = 64)
//   window      = sliding_window (Mistral-7B-v0.1)
//   latent_dim  = kv_lora_rank, rope_dim = qk_rope_head_dim (DeepSeek-V2)
// clang-format off
inline constexpr std::array<model_shape, 6> presets = {{
    //  name          layers  q_heads  kv_heads  head_dim  window  latent  rope
    {"llama-2-7b",       32,      32,       32,      128,      0,      0,    0},
    {"llama-3-8b",       32,      32,        8,      128,      0,      0,    0},
    {"llama-3-70b",      80,      64,        8,      128,      0,      0,    0},
    {"mistral-7b",       32,      32,        8,      128,   4096,      0,    0},
    {"falcon-7b",        32,      71,        1,       64,      0,      0,    0},
    {"deepseek-v2",      60,     128,        0,        0,      0,    512,   64},
}};
// clang-format on

/// A byte count read from the command line, with the text it came from and its unit.
struct byte_size {
  std::int64_t bytes = 0;
  std::string text;  // as given, e.g. "24GB"
  std::string unit;  // what the unit means, e.g. "GB = 10^9 bytes"; empty for plain bytes
};

/// The parsed command line. Unset optionals were not given.
struct options {
  std::optional<std::string> model;
  std::optional<std::int64_t> layers, kv_heads, head_dim, window, latent_dim, rope_dim;
  std::optional<std::int64_t> seq_len;
  std::int64_t batch = 1;
  std::string dtype = "f16";
  std::optional<std::int64_t> group;
  std::optional<std::int64_t> page_size;
  std::optional<byte_size> device_mem, weights;
  bool json = false;
  bool list = false;
  bool help = false;
  std::vector<std::string> flags;  // every flag given, in order
};

/// What fits in `device - weights` bytes.
struct fit_result {
  byte_size device;
  std::optional<byte_size> weights;
  std::int64_t budget_bytes;
  /// Longest context per sequence at the report's batch; empty when any length fits because a
  /// sliding window caps the cache.
  std::optional<std::int64_t> max_seq_len;
  /// Bytes the max_seq_len context takes (or the window's, when unbounded).
  std::int64_t max_seq_len_bytes;
  /// Most sequences of the report's seq_len at once.
  std::int64_t max_batch;
};

/// The cache in pages of `page_size` tokens (vLLM's PagedAttention), given --page-size. Each
/// sequence's cached tokens fill whole pages but the last.
struct paged_result {
  std::int64_t page_size;           // tokens a page
  std::int64_t page_bytes;          // one page: its tokens of every layer and kv head
  std::int64_t pages_per_sequence;  // ceil(cached_tokens / page_size)
  std::int64_t total_pages;         // batch x pages_per_sequence
  std::int64_t unused_slots;        // per sequence, in its last page
  std::int64_t paged_bytes;         // total_pages x page_bytes
  std::int64_t waste_bytes;         // paged_bytes - the contiguous total
  /// Given a budget: whole pages it holds, their token slots, and how many sequences of the
  /// report's seq_len (pages_per_sequence each) they make.
  std::optional<std::int64_t> max_pages, max_tokens, max_batch;
};

/// Everything the calculator prints.
struct report {
  model_shape model;
  kvcache::kv_dtype dtype;
  std::int64_t seq_len;
  std::int64_t batch;
  std::int64_t cached_tokens;  // per sequence: min(seq_len, window)
  std::int64_t elements_per_token;
  double bits_per_element;  // average, scales included, for this model's vectors
  std::int64_t bytes_per_token;
  std::int64_t total_bytes;
  std::optional<paged_result> paged;
  std::optional<fit_result> fit;
};

inline constexpr std::string_view usage_text =
    R"(kv_memory computes what a transformer's KV cache costs and what fits in a device.

usage: kv_memory --model NAME --seq-len N [options]
       kv_memory --layers N --kv-heads N --head-dim N --seq-len N [options]
       kv_memory --layers N --latent-dim N [--rope-dim N] --seq-len N [options]
       kv_memory --list

model:
  --model NAME      a preset (see --list)
  --layers N        custom shape: layers
  --kv-heads N      custom shape: key/value heads per layer (1 = MQA)
  --head-dim N      custom shape: dims per head
  --latent-dim N    custom MLA shape: compressed latent cached per layer (no heads, no K/V pair)
  --rope-dim N      custom MLA shape: decoupled RoPE key dims cached beside the latent (0)
  --window N        custom shape: sliding window, at most N tokens cached per sequence
cache:
  --seq-len N       tokens per sequence (required)
  --batch N         sequences (1)
  --dtype D         f32, f16, bf16, int8, int4 (f16); int8/int4 store an fp16 scale and
                    an fp16 zero point per group
  --group N         int8/int4 quantization group (32), any N >= 1: values get a scale and zero
                    point per N channels of a token (the last group shorter), keys per
                    channel per N tokens
  --page-size N     also count the cache in pages of N tokens (vLLM's PagedAttention blocks,
                    e.g. 16): page bytes, pages, bytes paged vs contiguous, the waste of each
                    sequence's partly filled last page, and the pages a budget holds. With
                    int8/int4, N must be a multiple of --group (a page holds whole groups of
                    keys; MLA latents are grouped within a token, so any N). A sliding window
                    counts its cached tokens
memory:
  --device-mem SIZE device memory, e.g. 24GB (10^9 bytes), 24GiB (2^30 bytes), 14e9, 512MiB;
                    at most 2^63 - 1 bytes
  --weights SIZE    memory the weights take (0); the cache gets device-mem minus weights
output:
  --json            one JSON object instead of text
  --list            the presets and their bytes per token (with --group N: at that group)
  --help, -h        this text

Exit status: 0 on success, 2 on bad input.
)";

namespace detail {

inline std::string quoted(std::string_view text) { return "'" + std::string(text) + "'"; }

inline char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

inline bool equal_ignoring_case(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

/// Value of "%.2f" unless the number is whole: "9.31", "20".
inline std::string two_decimals(double value) {
  char text[64];
  if (value == static_cast<double>(static_cast<std::int64_t>(value))) {
    std::snprintf(text, sizeof text, "%.0f", value);
  } else {
    std::snprintf(text, sizeof text, "%.2f", value);
  }
  return text;
}

/// Shortest exact decimal of a double, for JSON and for fractional bits ("9", "8.5").
inline std::string shortest(double value) {
  char text[64];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, value);
    if (std::stod(text) == value) break;
  }
  return text;
}

}  // namespace detail

/// Bytes in the largest binary unit not above them: "512 KiB", "9.31 GiB", "20 GiB".
inline std::string binary_size(std::int64_t bytes) {
  static constexpr std::array<const char*, 7> units = {"B",   "KiB", "MiB", "GiB",
                                                       "TiB", "PiB", "EiB"};
  std::size_t unit = 0;
  std::int64_t divisor = 1;
  while (unit + 1 < units.size() && bytes / divisor >= 1024) {
    divisor *= 1024;
    ++unit;
  }
  return detail::two_decimals(static_cast<double>(bytes) / static_cast<double>(divisor)) + " " +
         units[unit];
}

/// Bytes in the largest decimal unit not above them: "524.29 kB", "10 GB", "21.47 GB".
inline std::string decimal_size(std::int64_t bytes) {
  static constexpr std::array<const char*, 7> units = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  std::size_t unit = 0;
  std::int64_t divisor = 1;
  while (unit + 1 < units.size() && bytes / divisor >= 1000) {
    divisor *= 1000;
    ++unit;
  }
  return detail::two_decimals(static_cast<double>(bytes) / static_cast<double>(divisor)) + " " +
         units[unit];
}

/// Reads a positive integer (digits only) given to `flag`. Throws usage_error naming the flag
/// and the value when it is empty, not a number, negative, zero or too large.
inline std::int64_t parse_count(std::string_view flag, std::string_view text,
                                std::int64_t minimum = 1) {
  const auto bad = [&](const char* expected) {
    return usage_error(std::string(flag) + ": expected " + expected + ", got " +
                       detail::quoted(text));
  };
  const char* expected = minimum == 0 ? "a non-negative integer" : "a positive integer";
  if (text.empty()) throw bad(expected);
  std::int64_t value = 0;
  for (const char c : text) {
    if (!detail::is_digit(c)) throw bad(expected);
    const int digit = c - '0';
    if (value > (std::numeric_limits<std::int64_t>::max() - digit) / 10) {
      throw bad("an integer below 2^63");
    }
    value = value * 10 + digit;
  }
  if (value < minimum) throw bad(expected);
  return value;
}

/// Reads a memory size given to `flag`: a decimal number (fraction and exponent allowed) and a
/// unit, case-insensitive: none or B for bytes, kB MB GB TB PB EB (powers of 1000) or KiB MiB
/// GiB TiB PiB EiB (powers of 1024). "24GB" is 24 x 10^9 bytes, "24GiB" 24 x 2^30, "14e9"
/// 14 x 10^9. Fractions of a byte are dropped. Throws usage_error naming the flag and the
/// value: a format error when it is not such a size, "too large" when it is one of more than
/// 2^63 - 1 bytes.
inline byte_size parse_size(std::string_view flag, std::string_view text) {
  const auto bad = [&](const std::string& why) {
    return usage_error(std::string(flag) + ": " + why + ", got " + detail::quoted(text));
  };
  const auto too_large = [&] {
    return bad("the size is too large: more than 2^63 - 1 = " +
               std::to_string(std::numeric_limits<std::int64_t>::max()) +
               " bytes (8EiB - 1), the most a 64-bit byte count holds");
  };
  const char* format = "expected a size such as 24GB, 24GiB, 14e9 or 512MiB";
  if (!text.empty() && text.front() == '-') throw bad("a size must not be negative");

  // mantissa x 10^exponent, read exactly into integers.
  std::size_t at = 0;
  std::int64_t mantissa = 0;
  std::int64_t exponent = 0;
  int digits = 0;
  const auto read_digit = [&](char c, bool fraction) {
    const int digit = c - '0';
    if (mantissa > (std::numeric_limits<std::int64_t>::max() - digit) / 10) {
      // A whole part this long is more bytes than 64 bits count, whatever the unit.
      if (!fraction) throw too_large();
      throw bad("too many digits after the decimal point");
    }
    mantissa = mantissa * 10 + digit;
    ++digits;
  };
  if (at < text.size() && text[at] == '+') ++at;
  for (; at < text.size() && detail::is_digit(text[at]); ++at) read_digit(text[at], false);
  if (at < text.size() && text[at] == '.') {
    for (++at; at < text.size() && detail::is_digit(text[at]); ++at) {
      read_digit(text[at], true);
      --exponent;
    }
  }
  if (digits == 0) throw bad(format);
  // An e followed by a digit or a sign is an exponent; otherwise it starts a unit (EB, EiB).
  const auto exponent_follows = [&] {
    if (at >= text.size() || (text[at] != 'e' && text[at] != 'E')) return false;
    const std::size_t next = at + 1;
    return next < text.size() &&
           (detail::is_digit(text[next]) || text[next] == '-' || text[next] == '+');
  };
  if (exponent_follows()) {
    ++at;
    const bool negative = at < text.size() && text[at] == '-';
    if (at < text.size() && (text[at] == '-' || text[at] == '+')) ++at;
    const std::size_t start = at;
    std::int64_t value = 0;
    // Beyond 10^4 the answer no longer depends on the exponent: 0 bytes or too many.
    for (; at < text.size() && detail::is_digit(text[at]); ++at) {
      value = std::min<std::int64_t>(value * 10 + (text[at] - '0'), 10000);
    }
    if (at == start) throw bad(format);
    exponent += negative ? -value : value;
  }

  struct unit {
    const char* name;
    std::int64_t bytes;
    const char* meaning;
  };
  static constexpr std::array<unit, 14> units = {{
      {"", 1, ""},
      {"B", 1, ""},
      {"kB", 1'000, "kB = 10^3 bytes"},
      {"MB", 1'000'000, "MB = 10^6 bytes"},
      {"GB", 1'000'000'000, "GB = 10^9 bytes"},
      {"TB", 1'000'000'000'000, "TB = 10^12 bytes"},
      {"PB", 1'000'000'000'000'000, "PB = 10^15 bytes"},
      {"EB", 1'000'000'000'000'000'000, "EB = 10^18 bytes"},
      {"KiB", std::int64_t{1} << 10, "KiB = 2^10 bytes"},
      {"MiB", std::int64_t{1} << 20, "MiB = 2^20 bytes"},
      {"GiB", std::int64_t{1} << 30, "GiB = 2^30 bytes"},
      {"TiB", std::int64_t{1} << 40, "TiB = 2^40 bytes"},
      {"PiB", std::int64_t{1} << 50, "PiB = 2^50 bytes"},
      {"EiB", std::int64_t{1} << 60, "EiB = 2^60 bytes"},
  }};
  const std::string_view suffix = text.substr(at);
  const unit* found = nullptr;
  for (const unit& u : units) {
    if (detail::equal_ignoring_case(suffix, u.name)) found = &u;
  }
  if (found == nullptr) {
    throw bad("unknown unit " + detail::quoted(suffix) +
              " (expected B, kB, MB, GB, TB, PB, EB, KiB, MiB, GiB, TiB, PiB or EiB)");
  }

  // floor(mantissa x unit x 10^exponent), exactly: a fraction is divided out of the product
  // without forming it (mul_div), and floor(floor(x / a) / b) = floor(x / ab) for the rest.
  std::int64_t bytes = 0;
  try {
    if (exponent >= 0) {
      bytes = kvcache::detail::checked_mul(mantissa, found->bytes);
      for (; exponent > 0 && bytes != 0; --exponent) {
        bytes = kvcache::detail::checked_mul(bytes, 10);
      }
    } else {
      std::int64_t divisor = 1;
      for (; exponent < 0 && divisor <= std::numeric_limits<std::int64_t>::max() / 10; ++exponent) {
        divisor *= 10;
      }
      bytes = kvcache::detail::mul_div(mantissa, found->bytes, divisor).quotient;
      for (; exponent < 0 && bytes != 0; ++exponent) bytes /= 10;
    }
  } catch (const std::length_error&) {
    throw too_large();
  }
  return {bytes, std::string(text), found->meaning};
}

/// Reads the command line (without the program name). Checks each flag's value on its own;
/// how they combine is checked by make_report. Throws usage_error.
inline options parse_args(const std::vector<std::string>& args) {
  options opts;
  std::vector<std::string> seen;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::optional<std::string> inline_value;
    if (const std::size_t eq = flag.find('=');
        flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = flag.substr(eq + 1);
      flag.resize(eq);
    }
    if (flag.rfind("-", 0) != 0) {
      throw usage_error("unexpected argument " + detail::quoted(flag) +
                        " (flags start with --; see --help)");
    }
    for (const std::string& earlier : seen) {
      if (earlier == flag) throw usage_error(flag + " given twice");
    }
    seen.push_back(flag);
    opts.flags.push_back(flag);

    if (flag == "--json" || flag == "--list" || flag == "--help" || flag == "-h") {
      if (inline_value) {
        throw usage_error(flag + " takes no value, got " + detail::quoted(*inline_value));
      }
      if (flag == "--json") opts.json = true;
      if (flag == "--list") opts.list = true;
      if (flag == "--help" || flag == "-h") opts.help = true;
      continue;
    }

    static constexpr std::array<const char*, 14> valued = {
        "--model",      "--layers",     "--kv-heads", "--head-dim", "--window",
        "--latent-dim", "--rope-dim",   "--seq-len",  "--batch",    "--dtype",
        "--group",      "--page-size",  "--device-mem", "--weights"};
    bool known = false;
    for (const char* name : valued) known = known || flag == name;
    if (!known) throw usage_error("unknown flag " + detail::quoted(flag) + " (see --help)");

    std::string value;
    if (inline_value) {
      value = *inline_value;
    } else if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      value = args[++i];
    } else {
      throw usage_error(flag + " is missing its value");
    }

    if (flag == "--model") opts.model = value;
    if (flag == "--layers") opts.layers = parse_count(flag, value);
    if (flag == "--kv-heads") opts.kv_heads = parse_count(flag, value);
    if (flag == "--head-dim") opts.head_dim = parse_count(flag, value);
    if (flag == "--window") opts.window = parse_count(flag, value);
    if (flag == "--latent-dim") opts.latent_dim = parse_count(flag, value);
    if (flag == "--rope-dim") opts.rope_dim = parse_count(flag, value, 0);
    if (flag == "--seq-len") opts.seq_len = parse_count(flag, value);
    if (flag == "--batch") opts.batch = parse_count(flag, value);
    if (flag == "--dtype") opts.dtype = value;
    if (flag == "--group") opts.group = parse_count(flag, value);
    if (flag == "--page-size") opts.page_size = parse_count(flag, value);
    if (flag == "--device-mem") opts.device_mem = parse_size(flag, value);
    if (flag == "--weights") opts.weights = parse_size(flag, value);
  }
  return opts;
}

/// The preset called `name`. Throws usage_error listing the presets when there is none.
inline model_shape find_preset(std::string_view name) {
  std::string known;
  for (const model_shape& preset : presets) {
    if (name == preset.name) return preset;
    known += known.empty() ? preset.name : std::string(", ") + preset.name;
  }
  throw usage_error("--model: unknown model " + detail::quoted(name) + " (known: " + known + ")");
}

/// The model the options describe: a preset or a custom shape. Throws usage_error.
inline model_shape select_model(const options& opts) {
  const bool custom = opts.layers || opts.kv_heads || opts.head_dim || opts.window ||
                      opts.latent_dim || opts.rope_dim;
  if (opts.model) {
    if (custom) {
      throw usage_error("--model " + *opts.model +
                        " cannot be combined with --layers, --kv-heads, --head-dim, --window, "
                        "--latent-dim or --rope-dim (those describe a custom model)");
    }
    return find_preset(*opts.model);
  }
  if (!custom) {
    throw usage_error(
        "no model: give --model NAME (see --list) or a custom shape: --layers N with --kv-heads "
        "N --head-dim N, or with --latent-dim N for MLA");
  }
  if (!opts.layers) throw usage_error("a custom model needs --layers");
  model_shape model{"custom", *opts.layers, 0, 0, 0, opts.window.value_or(0), 0, 0};
  if (opts.latent_dim) {
    if (opts.kv_heads || opts.head_dim) {
      throw usage_error(
          "--latent-dim (MLA: one latent per layer) cannot be combined with --kv-heads or "
          "--head-dim");
    }
    model.latent_dim = *opts.latent_dim;
    model.rope_dim = opts.rope_dim.value_or(0);
    return model;
  }
  if (opts.rope_dim) throw usage_error("--rope-dim needs --latent-dim");
  if (!opts.kv_heads || !opts.head_dim) {
    throw usage_error("a custom model needs --kv-heads and --head-dim (or --latent-dim for MLA)");
  }
  model.kv_heads = *opts.kv_heads;
  model.head_dim = *opts.head_dim;
  return model;
}

/// The element format named by --dtype and --group. Throws usage_error.
inline kvcache::kv_dtype select_dtype(const std::string& name, std::optional<std::int64_t> group) {
  const bool quantized = name == "int8" || name == "int4";
  if (group && !quantized) {
    throw usage_error("--group " + std::to_string(*group) +
                      " applies to --dtype int8 and int4 only, not to " + detail::quoted(name));
  }
  if (group && *group > std::numeric_limits<int>::max() / 64) {
    throw usage_error("--group: " + std::to_string(*group) + " is too large (at most " +
                      std::to_string(std::numeric_limits<int>::max() / 64) + ")");
  }
  const int group_size = static_cast<int>(group.value_or(32));
  if (name == "f32") return kvcache::kv_dtype::f32();
  if (name == "f16") return kvcache::kv_dtype::f16();
  if (name == "bf16") return kvcache::kv_dtype::bf16();
  if (name == "int8") return kvcache::kv_dtype::int8(group_size);
  if (name == "int4") return kvcache::kv_dtype::int4(group_size);
  throw usage_error("--dtype: unknown dtype " + detail::quoted(name) +
                    " (expected f32, f16, bf16, int8 or int4)");
}

/// Elements one token adds to one sequence's cache: 2 x layers x kv_heads x head_dim, or
/// layers x (latent_dim + rope_dim) for MLA. Throws std::length_error when they do not fit 64
/// bits.
inline std::int64_t elements_per_token(const model_shape& model) {
  using kvcache::detail::checked_add;
  using kvcache::detail::checked_product;
  if (model.mla()) {
    return checked_product({model.layers, checked_add(model.latent_dim, model.rope_dim,
                                                      "latent_dim + rope_dim")},
                           "layers x (latent_dim + rope_dim)");
  }
  return checked_product({2, model.layers, model.kv_heads, model.head_dim},
                         "2 x layers x kv_heads x head_dim");
}

/// Average bits one cached element takes, scales included, for this model's vectors (for
/// display: the byte functions count exactly). Groups that do not divide a vector leave a
/// shorter last group, whose scale and zero point weigh on fewer elements.
inline double bits_per_element(const model_shape& model, const kvcache::kv_dtype& dtype) {
  if (!dtype.quantized()) return dtype.bits;
  const double group = dtype.group_size, scale = dtype.scale_bits;
  const auto code_bits = [&](std::int64_t dim) {
    return 8.0 * static_cast<double>((dim * dtype.bits + 7) / 8);
  };
  const auto value_bits = [&](std::int64_t dim) {
    const std::int64_t groups = (dim + dtype.group_size - 1) / dtype.group_size;
    return code_bits(dim) + static_cast<double>(groups) * scale;
  };
  if (model.mla()) {
    return (value_bits(model.latent_dim) + value_bits(model.rope_dim)) /
           static_cast<double>(model.latent_dim + model.rope_dim);
  }
  const auto d = static_cast<double>(model.head_dim);
  return (code_bits(model.head_dim) + value_bits(model.head_dim) + d * scale / group) / (2 * d);
}

/// Bytes of `batch` sequences of `tokens` cached tokens each (the window already applied).
inline std::int64_t cache_bytes(const model_shape& model, const kvcache::kv_dtype& dtype,
                                std::int64_t batch, std::int64_t tokens) {
  if (model.mla()) {
    return kvcache::kv_latent_cache_bytes(batch, tokens, model.layers, model.latent_dim,
                                          model.rope_dim, dtype);
  }
  return kvcache::kv_cache_bytes(batch, tokens, model.layers, model.kv_heads, model.head_dim,
                                 dtype);
}

/// Bytes one token adds to one sequence's cache.
inline std::int64_t bytes_per_token(const model_shape& model, const kvcache::kv_dtype& dtype) {
  if (model.mla()) {
    return kvcache::kv_latent_bytes_per_token(model.layers, model.latent_dim, model.rope_dim,
                                              dtype);
  }
  return kvcache::kv_bytes_per_token(model.layers, model.kv_heads, model.head_dim, dtype);
}

/// The most cached tokens per sequence that fit `budget` at `batch` sequences.
inline std::int64_t tokens_that_fit(const model_shape& model, const kvcache::kv_dtype& dtype,
                                    std::int64_t budget, std::int64_t batch) {
  if (model.mla()) {
    return kvcache::kv_latent_tokens_that_fit(budget, batch, model.layers, model.latent_dim,
                                              model.rope_dim, dtype);
  }
  return kvcache::kv_tokens_that_fit(budget, batch, model.layers, model.kv_heads, model.head_dim,
                                     dtype);
}

/// The most sequences of `tokens` cached tokens that fit `budget`.
inline std::int64_t batch_that_fits(const model_shape& model, const kvcache::kv_dtype& dtype,
                                    std::int64_t budget, std::int64_t tokens) {
  if (model.mla()) {
    return kvcache::kv_latent_batch_that_fits(budget, tokens, model.layers, model.latent_dim,
                                              model.rope_dim, dtype);
  }
  return kvcache::kv_batch_that_fits(budget, tokens, model.layers, model.kv_heads, model.head_dim,
                                     dtype);
}

/// Bytes of one page of `page_size` tokens.
inline std::int64_t page_bytes(const model_shape& model, const kvcache::kv_dtype& dtype,
                               std::int64_t page_size) {
  if (model.mla()) {
    return kvcache::kv_latent_page_bytes(page_size, model.layers, model.latent_dim,
                                         model.rope_dim, dtype);
  }
  return kvcache::kv_page_bytes(page_size, model.layers, model.kv_heads, model.head_dim, dtype);
}

/// Bytes of the pages of `batch` sequences of `tokens` cached tokens each.
inline std::int64_t paged_cache_bytes(const model_shape& model, const kvcache::kv_dtype& dtype,
                                      std::int64_t batch, std::int64_t tokens,
                                      std::int64_t page_size) {
  if (model.mla()) {
    return kvcache::kv_latent_paged_cache_bytes(batch, tokens, page_size, model.layers,
                                                model.latent_dim, model.rope_dim, dtype);
  }
  return kvcache::kv_paged_cache_bytes(batch, tokens, page_size, model.layers, model.kv_heads,
                                       model.head_dim, dtype);
}

/// What those pages take beyond a contiguous cache of the same tokens.
inline std::int64_t paged_waste_bytes(const model_shape& model, const kvcache::kv_dtype& dtype,
                                      std::int64_t batch, std::int64_t tokens,
                                      std::int64_t page_size) {
  if (model.mla()) {
    return kvcache::kv_latent_paged_waste_bytes(batch, tokens, page_size, model.layers,
                                                model.latent_dim, model.rope_dim, dtype);
  }
  return kvcache::kv_paged_waste_bytes(batch, tokens, page_size, model.layers, model.kv_heads,
                                       model.head_dim, dtype);
}

/// Whole pages of `page_size` tokens that fit `budget`.
inline std::int64_t pages_that_fit(const model_shape& model, const kvcache::kv_dtype& dtype,
                                   std::int64_t budget, std::int64_t page_size) {
  if (model.mla()) {
    return kvcache::kv_latent_pages_that_fit(budget, page_size, model.layers, model.latent_dim,
                                             model.rope_dim, dtype);
  }
  return kvcache::kv_pages_that_fit(budget, page_size, model.layers, model.kv_heads,
                                    model.head_dim, dtype);
}

/// Token slots in the pages that fit `budget`.
inline std::int64_t paged_tokens_that_fit(const model_shape& model, const kvcache::kv_dtype& dtype,
                                          std::int64_t budget, std::int64_t page_size) {
  if (model.mla()) {
    return kvcache::kv_latent_paged_tokens_that_fit(budget, page_size, model.layers,
                                                    model.latent_dim, model.rope_dim, dtype);
  }
  return kvcache::kv_paged_tokens_that_fit(budget, page_size, model.layers, model.kv_heads,
                                           model.head_dim, dtype);
}

/// Tokens one sequence keeps cached: all of them, or the last `window`.
inline std::int64_t cached_tokens(const model_shape& model, std::int64_t seq_len) {
  return model.window > 0 && seq_len > model.window ? model.window : seq_len;
}

/// Checks how the options combine and computes the report. Throws usage_error.
inline report make_report(const options& opts) {
  report r{};
  r.model = select_model(opts);
  r.dtype = select_dtype(opts.dtype, opts.group);
  if (!opts.seq_len) throw usage_error("--seq-len N is required (tokens per sequence)");
  if (opts.weights && !opts.device_mem) {
    throw usage_error("--weights " + opts.weights->text + " needs --device-mem");
  }
  r.seq_len = *opts.seq_len;
  r.batch = opts.batch;
  r.cached_tokens = cached_tokens(r.model, r.seq_len);
  r.elements_per_token = elements_per_token(r.model);
  r.bits_per_element = bits_per_element(r.model, r.dtype);
  r.bytes_per_token = bytes_per_token(r.model, r.dtype);
  r.total_bytes = cache_bytes(r.model, r.dtype, r.batch, r.cached_tokens);
  if (opts.page_size) {
    const std::int64_t page_size = *opts.page_size;
    // Keys are grouped along tokens: a page holds whole groups. MLA groups run along the
    // channels of one token.
    if (!r.model.mla() && r.dtype.quantized() && page_size % r.dtype.group_size != 0) {
      throw usage_error("--page-size " + std::to_string(page_size) + " is not a multiple of " +
                        (opts.group ? "--group " : "the group ") +
                        std::to_string(r.dtype.group_size) + ": " + r.dtype.name +
                        " keys are stored in groups of " + std::to_string(r.dtype.group_size) +
                        " tokens, and a page must hold whole groups");
    }
    paged_result paged{};
    paged.page_size = page_size;
    paged.page_bytes = page_bytes(r.model, r.dtype, page_size);
    paged.pages_per_sequence = kvcache::kv_pages_for_tokens(r.cached_tokens, page_size);
    paged.total_pages = kvcache::detail::checked_mul(r.batch, paged.pages_per_sequence,
                                                     "batch x pages per sequence");
    // pages x page_size - cached_tokens, without forming the product: below one page.
    paged.unused_slots = (page_size - r.cached_tokens % page_size) % page_size;
    paged.paged_bytes = paged_cache_bytes(r.model, r.dtype, r.batch, r.cached_tokens, page_size);
    paged.waste_bytes = paged_waste_bytes(r.model, r.dtype, r.batch, r.cached_tokens, page_size);
    r.paged = paged;
  }
  if (!opts.device_mem) return r;

  const std::int64_t weights = opts.weights ? opts.weights->bytes : 0;
  if (weights > opts.device_mem->bytes) {
    throw usage_error("--weights " + opts.weights->text + " (" + std::to_string(weights) +
                      " bytes) is more than --device-mem " + opts.device_mem->text + " (" +
                      std::to_string(opts.device_mem->bytes) + " bytes)");
  }
  fit_result fit{};
  fit.device = *opts.device_mem;
  fit.weights = opts.weights;
  fit.budget_bytes = opts.device_mem->bytes - weights;
  const std::int64_t tokens = tokens_that_fit(r.model, r.dtype, fit.budget_bytes, r.batch);
  if (r.model.window > 0 && tokens >= r.model.window) {
    fit.max_seq_len_bytes = cache_bytes(r.model, r.dtype, r.batch, r.model.window);
  } else {
    fit.max_seq_len = tokens;
    fit.max_seq_len_bytes = cache_bytes(r.model, r.dtype, r.batch, tokens);
  }
  fit.max_batch = batch_that_fits(r.model, r.dtype, fit.budget_bytes, r.cached_tokens);
  r.fit = fit;
  if (r.paged) {
    paged_result& paged = *r.paged;
    paged.max_pages = pages_that_fit(r.model, r.dtype, fit.budget_bytes, paged.page_size);
    paged.max_tokens = paged_tokens_that_fit(r.model, r.dtype, fit.budget_bytes, paged.page_size);
    paged.max_batch = *paged.max_pages / paged.pages_per_sequence;
  }
  return r;
}

/// `text` as a JSON string literal: quotes, backslashes and control characters escaped.
inline std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x",
                        static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

namespace detail {
/// Writes `"key": value` pairs of one JSON object, one a line.
class json_object {
 public:
  explicit json_object(std::ostream& out) : out_(out) { out_ << "{"; }
  void raw(std::string_view key, std::string_view value) {
    out_ << (first_ ? "\n  " : ",\n  ") << json_string(key) << ": " << value;
    first_ = false;
  }
  void number(std::string_view key, std::int64_t value) { raw(key, std::to_string(value)); }
  void number_or_null(std::string_view key, std::int64_t value) {
    raw(key, value != 0 ? std::to_string(value) : "null");
  }
  void string(std::string_view key, std::string_view value) { raw(key, json_string(value)); }
  void close() { out_ << "\n}\n"; }

 private:
  std::ostream& out_;
  bool first_ = true;
};
}  // namespace detail

/// The report as one JSON object. Sizes are exact integers of bytes; shape fields that do not
/// apply (kv_heads for MLA, window without one) are null.
inline void write_json(std::ostream& out, const report& r) {
  detail::json_object json(out);
  json.string("model", r.model.name);
  json.raw("attention", r.model.attention()[0] != '\0' ? json_string(r.model.attention()) : "null");
  json.number("layers", r.model.layers);
  json.number_or_null("query_heads", r.model.query_heads);
  json.number_or_null("kv_heads", r.model.kv_heads);
  json.number_or_null("head_dim", r.model.head_dim);
  json.number_or_null("latent_dim", r.model.latent_dim);
  json.raw("rope_dim", r.model.mla() ? std::to_string(r.model.rope_dim) : "null");
  json.number_or_null("window", r.model.window);
  json.string("dtype", r.dtype.name);
  json.number_or_null("group_size", r.dtype.group_size);
  json.raw("bits_per_element", detail::shortest(r.bits_per_element));
  json.number("seq_len", r.seq_len);
  json.number("batch", r.batch);
  json.number("cached_tokens", r.cached_tokens);
  json.number("elements_per_token", r.elements_per_token);
  json.number("bytes_per_token", r.bytes_per_token);
  json.number("total_bytes", r.total_bytes);
  if (r.paged) {
    json.number("page_size", r.paged->page_size);
    json.number("page_bytes", r.paged->page_bytes);
    json.number("pages_per_sequence", r.paged->pages_per_sequence);
    json.number("total_pages", r.paged->total_pages);
    json.number("unused_slots_per_sequence", r.paged->unused_slots);
    json.number("paged_bytes", r.paged->paged_bytes);
    json.number("paged_waste_bytes", r.paged->waste_bytes);
  }
  if (r.fit) {
    json.number("device_mem_bytes", r.fit->device.bytes);
    json.number("weights_bytes", r.fit->weights ? r.fit->weights->bytes : 0);
    json.number("budget_bytes", r.fit->budget_bytes);
    json.raw("max_seq_len", r.fit->max_seq_len ? std::to_string(*r.fit->max_seq_len) : "null");
    json.raw("max_seq_len_unbounded", r.fit->max_seq_len ? "false" : "true");
    json.number("max_batch", r.fit->max_batch);
    if (r.paged) {
      json.number("max_pages", *r.paged->max_pages);
      json.number("max_paged_tokens", *r.paged->max_tokens);
      json.number("max_paged_batch", *r.paged->max_batch);
    }
  }
  json.close();
}

namespace detail {
/// Whether every cached vector is whole groups of codes in whole bytes, so that elements x
/// bits per element is the exact count.
inline bool groups_tile(const model_shape& m, const kvcache::kv_dtype& d) {
  if (!d.quantized()) return true;
  const auto tiles = [&](std::int64_t dim) {
    return dim % d.group_size == 0 && dim * d.bits % 8 == 0;
  };
  return m.mla() ? tiles(m.latent_dim) && tiles(m.rope_dim) : tiles(m.head_dim);
}

/// "2 (K and V) x 32 layers x 8 kv heads x 128 dims x 9 bits / 8" or, when the groups do not
/// tile the vectors, what each part of a row takes: "32 layers x 8 kv heads x (2 x 128 B codes
/// + 3 x 4 B value scales + 128 x 4 B / 48 key scales), rounded up".
inline std::string per_token_formula(const model_shape& m, const kvcache::kv_dtype& d) {
  std::ostringstream s;
  if (groups_tile(m, d)) {
    if (m.mla()) {
      s << m.layers << " layers x (" << m.latent_dim << " latent + " << m.rope_dim << " rope) dims";
    } else {
      s << "2 (K and V) x " << m.layers << " layers x " << m.kv_heads << " kv heads x "
        << m.head_dim << " dims";
    }
    s << " x " << shortest(d.bits_per_element()) << " bits / 8";
    return s.str();
  }
  const std::int64_t g = d.group_size, scale_bytes = d.scale_bits / 8;
  const auto codes = [&](std::int64_t dim) { return (dim * d.bits + 7) / 8; };
  const auto groups = [&](std::int64_t dim) { return (dim + g - 1) / g; };
  if (m.mla()) {
    s << m.layers << " layers x (" << codes(m.latent_dim) << " B codes + " << groups(m.latent_dim)
      << " x " << scale_bytes << " B scales of the latent";
    if (m.rope_dim > 0) {
      s << " + " << codes(m.rope_dim) << " B codes + " << groups(m.rope_dim) << " x "
        << scale_bytes << " B scales of the rope dims";
    }
    s << ")";
  } else {
    s << m.layers << " layers x " << m.kv_heads << " kv heads x (2 x " << codes(m.head_dim)
      << " B codes + " << groups(m.head_dim) << " x " << scale_bytes << " B value scales + "
      << m.head_dim << " x " << scale_bytes << " B / " << g << " key scales)";
  }
  s << ", rounded up";
  return s.str();
}

inline std::string describe_model(const model_shape& m) {
  std::ostringstream s;
  s << m.name << ": " << m.layers << " layers, ";
  if (m.mla()) {
    s << "one latent of " << m.latent_dim << " + " << m.rope_dim << " rope dims per layer (MLA";
    if (m.query_heads > 0) s << ", " << m.query_heads << " query heads";
    s << ")";
  } else {
    s << m.kv_heads << (m.kv_heads == 1 ? " kv head" : " kv heads") << " x " << m.head_dim
      << " dims";
    if (m.attention()[0] != '\0') {
      s << " (" << m.attention();
      if (m.query_heads > 0) s << ", " << m.query_heads << " query heads";
      s << ")";
    }
  }
  if (m.window > 0) s << ", sliding window " << m.window;
  return s.str();
}

inline std::string describe_dtype(const report& r) {
  const kvcache::kv_dtype& d = r.dtype;
  const bool exact = groups_tile(r.model, d);
  std::string s = std::string(d.name) + ": " +
                  (exact ? shortest(r.bits_per_element) : two_decimals(r.bits_per_element)) +
                  " bits per element";
  if (d.quantized()) {
    s += " (" + std::to_string(d.bits) + "-bit codes + fp16 scale and zero point per group of " +
         std::to_string(d.group_size) + (exact ? ")" : "; the last group of a vector is shorter)");
  }
  return s;
}

inline std::string describe_size(const byte_size& size) {
  std::string s = size.text + " = " + std::to_string(size.bytes) + " bytes";
  if (!size.unit.empty()) s += " (" + size.unit + ")";
  return s;
}

inline std::string both_units(std::int64_t bytes) {
  return "(" + binary_size(bytes) + ", " + decimal_size(bytes) + ")";
}
}  // namespace detail

namespace detail {
/// "1 page", "257 pages".
inline std::string pages(std::int64_t count) {
  return std::to_string(count) + (count == 1 ? " page" : " pages");
}

/// The page lines of the text report: a page, the pages, their bytes against the contiguous
/// cache's, and the waste of the partly filled last pages.
template <class Line>
void write_paged_text(const Line& line, const report& r) {
  const paged_result& p = *r.paged;
  const std::string page_size = std::to_string(p.page_size);
  // A page of a quantized format whose groups do not tile a vector is whole bytes; its tokens
  // alone are not.
  const std::string per_slot =
      p.page_bytes % p.page_size == 0
          ? std::to_string(p.page_bytes / p.page_size)
          : two_decimals(static_cast<double>(p.page_bytes) / static_cast<double>(p.page_size));
  line("page", std::to_string(p.page_bytes) + " bytes " + both_units(p.page_bytes) + " = " +
                   page_size + " tokens x " + per_slot + " bytes");
  line("pages", std::to_string(p.pages_per_sequence) + " a sequence = ceil(" +
                    std::to_string(r.cached_tokens) + " tokens / " + page_size + "), " +
                    std::to_string(p.total_pages) + " for batch " + std::to_string(r.batch));
  const double extra = 100.0 * static_cast<double>(p.waste_bytes) /
                       static_cast<double>(r.total_bytes > 0 ? r.total_bytes : 1);
  line("paged", std::to_string(p.paged_bytes) + " bytes " + both_units(p.paged_bytes) + " = " +
                    pages(p.total_pages) + " x " + std::to_string(p.page_bytes) +
                    " bytes, vs " + std::to_string(r.total_bytes) + " contiguous (+" +
                    two_decimals(extra) + "%)");
  if (p.unused_slots == 0 && p.waste_bytes == 0) {
    line("waste", "0 bytes: " + page_size + " divides the " + std::to_string(r.cached_tokens) +
                      " cached tokens of a sequence");
  } else {
    line("waste", std::to_string(p.waste_bytes) + " bytes " + both_units(p.waste_bytes) +
                      " = batch " + std::to_string(r.batch) + " x " +
                      std::to_string(p.unused_slots) + " unused slots in the last page");
  }
}

/// The page lines of the fit: the pages the budget holds and the sequences they make.
template <class Line>
void write_paged_fit_text(const Line& line, const report& r) {
  const paged_result& p = *r.paged;
  line("in pages", pages(*p.max_pages) + " of " + std::to_string(p.page_size) +
                       " tokens (" + std::to_string(*p.max_pages * p.page_bytes) + " bytes) = " +
                       std::to_string(*p.max_tokens) + " tokens");
  line("", "batch " + std::to_string(*p.max_batch) + " at seq-len " + std::to_string(r.seq_len) +
               " (" + pages(*p.max_batch * p.pages_per_sequence) + ", " +
               std::to_string(p.pages_per_sequence) + " a sequence)");
}
}  // namespace detail

/// The report as text, one labelled line per figure.
inline void write_text(std::ostream& out, const report& r) {
  const auto line = [&](const char* label, const std::string& text) {
    char padded[16];
    std::snprintf(padded, sizeof padded, "%-11s", label);
    out << padded << text << "\n";
  };
  line("model", detail::describe_model(r.model));
  line("dtype", detail::describe_dtype(r));
  line("per token", std::to_string(r.bytes_per_token) + " bytes " +
                        detail::both_units(r.bytes_per_token) + " = " +
                        detail::per_token_formula(r.model, r.dtype));
  std::string tokens = std::to_string(r.cached_tokens) + " tokens";
  if (r.cached_tokens != r.seq_len) {
    tokens = std::to_string(r.cached_tokens) + " cached tokens (the window of seq-len " +
             std::to_string(r.seq_len) + ")";
  }
  // Key scales spread over their groups of tokens can leave a fraction of a byte a token; the
  // cache rounds up once, not once per token.
  const std::string per_token =
      detail::groups_tile(r.model, r.dtype)
          ? std::to_string(r.bytes_per_token) + " bytes"
          : detail::two_decimals(r.bits_per_element *
                                 static_cast<double>(r.elements_per_token) / 8) +
                " bytes, rounded up";
  line("cache", std::to_string(r.total_bytes) + " bytes " + detail::both_units(r.total_bytes) +
                    " = batch " + std::to_string(r.batch) + " x " + tokens + " x " + per_token);
  if (r.paged) detail::write_paged_text(line, r);
  if (!r.fit) return;
  const fit_result& fit = *r.fit;
  line("device", detail::describe_size(fit.device));
  if (fit.weights) line("weights", detail::describe_size(*fit.weights));
  line("budget", std::to_string(fit.budget_bytes) + " bytes " +
                     detail::both_units(fit.budget_bytes) + " for the cache" +
                     (fit.weights ? ": device - weights" : ""));
  if (fit.max_seq_len) {
    line("fits", std::to_string(*fit.max_seq_len) + " tokens per sequence at batch " +
                     std::to_string(r.batch) + " (" + std::to_string(fit.max_seq_len_bytes) +
                     " bytes)");
  } else {
    line("fits", "any seq-len at batch " + std::to_string(r.batch) +
                     ": the window caps the cache at " + std::to_string(r.model.window) +
                     " tokens per sequence (" + std::to_string(fit.max_seq_len_bytes) + " bytes)");
  }
  line("", "batch " + std::to_string(fit.max_batch) + " at seq-len " + std::to_string(r.seq_len) +
               " (" +
               std::to_string(cache_bytes(r.model, r.dtype, fit.max_batch, r.cached_tokens)) +
               " bytes)");
  if (r.paged) detail::write_paged_fit_text(line, r);
}

/// The presets as a Markdown table: shape and bytes per token in f16, int8 and int4 (at `group`).
/// Computes the whole table before writing any of it, so an error leaves `out` untouched.
inline void write_presets(std::ostream& out, int group) {
  std::ostringstream table;
  const kvcache::kv_dtype int8 = kvcache::kv_dtype::int8(group);
  const kvcache::kv_dtype int4 = kvcache::kv_dtype::int4(group);
  const std::string int8_head = "int8/g" + std::to_string(group);
  const std::string int4_head = "int4/g" + std::to_string(group);
  char row[256];
  std::snprintf(row, sizeof row, "| %-11s | %-4s | %6s | %-22s | %6s | %9s | %9s | %9s |\n",
                "model", "attn", "layers", "cached per layer/token", "window", "f16 B/tok",
                int8_head.c_str(), int4_head.c_str());
  table << row;
  table << "|-------------|------|-------:|------------------------|-------:|----------:|"
           "----------:|----------:|\n";
  for (const model_shape& m : presets) {
    const std::string cached =
        m.mla() ? std::to_string(m.latent_dim) + " + " + std::to_string(m.rope_dim) + " latent"
                : "2 x " + std::to_string(m.kv_heads) + " x " + std::to_string(m.head_dim);
    const std::string window = m.window > 0 ? std::to_string(m.window) : "-";
    std::snprintf(row, sizeof row,
                  "| %-11s | %-4s | %6lld | %-22s | %6s | %9lld | %9lld | %9lld |\n", m.name,
                  m.attention(), static_cast<long long>(m.layers), cached.c_str(), window.c_str(),
                  static_cast<long long>(bytes_per_token(m, kvcache::kv_dtype::f16())),
                  static_cast<long long>(bytes_per_token(m, int8)),
                  static_cast<long long>(bytes_per_token(m, int4)));
    table << row;
  }
  out << table.str();
}

/// Runs the calculator on `args` (without the program name): the report on `out`, a message
/// naming the bad flag and value on `err`. Returns the exit status: 0, or 2 on bad input.
inline int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  bool paged = false;
  try {
    if (args.empty()) {
      err << usage_text;
      return 2;
    }
    const options opts = parse_args(args);
    if (opts.help) {
      out << usage_text;
      return 0;
    }
    if (opts.list) {
      for (const std::string& flag : opts.flags) {
        if (flag != "--list" && flag != "--group") {
          throw usage_error("--list takes only --group, got " + flag);
        }
      }
      const kvcache::kv_dtype dtype = select_dtype("int8", opts.group);
      write_presets(out, dtype.group_size);
      return 0;
    }
    paged = opts.page_size.has_value();
    const report r = make_report(opts);
    if (opts.json) {
      write_json(out, r);
    } else {
      write_text(out, r);
    }
    return 0;
  } catch (const std::invalid_argument& e) {  // usage_error, and the library's own checks
    err << "kv_memory: " << e.what() << "\n";
    return 2;
  } catch (const std::length_error& e) {  // a shape or batch too large to count in 64 bits
    err << "kv_memory: the cache is too large to count (" << e.what()
        << "): reduce --batch, --seq-len" << (paged ? ", --page-size" : "") << " or the shape\n";
    return 2;
  }
}

}  // namespace kv_memory
