// SPDX-License-Identifier: Apache-2.0
// Reads and writes llama2.c's legacy (version 0) checkpoints, and reads its tokenizer.bin.
#pragma once

#include "model.hpp"

#include <kvcache/detail/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tiny {

/// A model read from a checkpoint: its sizes and its weights.
struct model {
  config cfg;
  weights w;
};

namespace detail {

static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559,
              "llama2.c files hold IEEE-754 binary32 floats");

// Seven int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
inline constexpr Index checkpoint_header_bytes = 7 * 4;
inline constexpr const char* checkpoint_fields[7] = {
    "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};

inline bool host_is_little_endian() {
  const std::uint32_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// Turns little-endian 4-byte words into host order, or back: the same swap both ways.
inline void words_to_host(char* bytes, Index n_words) {
  if (host_is_little_endian()) return;
  for (Index i = 0; i < n_words; ++i) {
    char* w = bytes + 4 * i;
    std::swap(w[0], w[3]);
    std::swap(w[1], w[2]);
  }
}

inline std::int32_t read_le_i32(const unsigned char* b) {
  const std::uint32_t u = std::uint32_t(b[0]) | std::uint32_t(b[1]) << 8 |
                          std::uint32_t(b[2]) << 16 | std::uint32_t(b[3]) << 24;
  std::int32_t v;
  std::memcpy(&v, &u, 4);
  return v;
}

inline void write_le_i32(std::ostream& out, std::int32_t v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  const char b[4] = {char(u & 0xff), char(u >> 8 & 0xff), char(u >> 16 & 0xff),
                     char(u >> 24 & 0xff)};
  out.write(b, 4);
}

inline bool read_floats(std::istream& in, float* dst, Index n) {
  char* bytes = reinterpret_cast<char*>(dst);
  if (!in.read(bytes, std::streamsize(4 * n))) return false;
  words_to_host(bytes, n);
  return true;
}

inline void write_floats(std::ostream& out, const float* src, Index n) {
  if (host_is_little_endian()) {
    out.write(reinterpret_cast<const char*>(src), std::streamsize(4 * n));
    return;
  }
  std::vector<float> chunk(std::size_t(std::min<Index>(n, 4096)));
  for (Index done = 0; done < n;) {
    const Index count = std::min<Index>(n - done, Index(chunk.size()));
    std::memcpy(chunk.data(), src + done, std::size_t(4 * count));
    words_to_host(reinterpret_cast<char*>(chunk.data()), count);
    out.write(reinterpret_cast<const char*>(chunk.data()), std::streamsize(4 * count));
    done += count;
  }
}

/// Size in bytes of a checkpoint for `c` (every size positive), or nullopt when it exceeds
/// the largest Index or stream offset.
inline std::optional<Index> checkpoint_bytes(const config& c, bool shared_classifier) {
  constexpr Index max = std::numeric_limits<Index>::max();
  bool overflow = false;
  auto mul = [&](Index a, Index b) {
    overflow = overflow || (b != 0 && a > max / b);
    return overflow ? Index(0) : a * b;
  };
  auto add = [&](Index a, Index b) {
    overflow = overflow || a > max - b;
    return overflow ? Index(0) : a + b;
  };
  const Index d = c.dim, h = c.hidden_dim, L = c.n_layers, hd = c.head_dim();
  const Index q_dim = mul(c.n_heads, hd), kv_dim = mul(c.n_kv_heads, hd);
  Index per_layer = add(d, d);                         // attn_norm, ffn_norm
  per_layer = add(per_layer, mul(2, mul(q_dim, d)));   // wq, wo
  per_layer = add(per_layer, mul(2, mul(kv_dim, d)));  // wk, wv
  per_layer = add(per_layer, mul(3, mul(h, d)));       // w1, w2, w3
  const Index embedding = mul(c.vocab_size, d);
  Index floats = add(embedding, mul(L, per_layer));
  floats = add(floats, d);                   // final norm
  floats = add(floats, mul(c.seq_len, hd));  // freq_cis_real and freq_cis_imag
  if (!shared_classifier) floats = add(floats, embedding);
  const Index bytes = add(checkpoint_header_bytes, mul(4, floats));
  if (overflow || bytes > Index(std::numeric_limits<std::streamoff>::max())) return std::nullopt;
  return bytes;
}

/// Calls visit(name, tensor, rows, cols) for each tensor a checkpoint holds before the RoPE
/// tables, in file order: embedding, each kind of layer tensor for all layers, final norm.
template <class Weights, class Visit>
void visit_tensors(const config& c, Weights& w, Visit&& visit) {
  const Index d = c.dim, q_dim = c.n_heads * c.head_dim(), kv_dim = c.kv_dim();
  visit("token_embedding", w.token_embedding, c.vocab_size, d);
  auto each_layer = [&](auto member, const char* name, Index rows, Index cols) {
    for (std::size_t l = 0; l < w.layers.size(); ++l) {
      visit(kvcache::detail::message("layers[", l, "].", name), w.layers[l].*member, rows, cols);
    }
  };
  each_layer(&layer_weights::attn_norm, "attn_norm", d, 1);
  each_layer(&layer_weights::wq, "wq", q_dim, d);
  each_layer(&layer_weights::wk, "wk", kv_dim, d);
  each_layer(&layer_weights::wv, "wv", kv_dim, d);
  each_layer(&layer_weights::wo, "wo", d, q_dim);
  each_layer(&layer_weights::ffn_norm, "ffn_norm", d, 1);
  each_layer(&layer_weights::w1, "w1", c.hidden_dim, d);
  each_layer(&layer_weights::w2, "w2", d, c.hidden_dim);
  each_layer(&layer_weights::w3, "w3", c.hidden_dim, d);
  visit("final_norm", w.final_norm, d, 1);
}

/// What is wrong with `path` as a file to read, or an empty string when it is a regular file
/// (or when its status cannot be read; opening it then says why). A directory opens as a
/// stream whose end is at offset 2^63 - 1, so its size would be read as that.
inline std::string not_a_regular_file(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(path, ec);
  if (ec || status.type() == std::filesystem::file_type::not_found ||
      status.type() == std::filesystem::file_type::regular) {
    return "";
  }
  if (status.type() == std::filesystem::file_type::directory) return "is a directory, not a file";
  return "is not a regular file";
}

inline std::string describe(const config& c, bool shared_classifier) {
  return kvcache::detail::message(
      "dim = ", c.dim, ", hidden_dim = ", c.hidden_dim, ", n_layers = ", c.n_layers,
      ", n_heads = ", c.n_heads, ", n_kv_heads = ", c.n_kv_heads, ", vocab_size = ", c.vocab_size,
      ", seq_len = ", c.seq_len, shared_classifier ? ", shared" : ", separate", " classifier");
}

}  // namespace detail

/// Reads a llama2.c legacy (version 0) checkpoint: a header of seven little-endian int32
/// (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size
/// marks a classifier stored apart from the embedding), then float32 tensors in the order of
/// llama2.c's `memory_map_weights`. The stored RoPE tables are skipped; rope_theta is set to
/// 10000 and norm_eps to 1e-5, as llama2.c assumes. With a shared classifier,
/// `w.classifier` is a copy of the embedding.
/// Throws std::runtime_error, naming the file and the problem, if it is a directory or
/// another file that is not a regular one, if it cannot be opened or read, if a header field
/// is not positive, if dim is not n_heads times an even head_dim or n_heads not a multiple of
/// n_kv_heads, if the sizes overflow, or if the file is not exactly as long as its header
/// implies. Reads the file once, allocating the weights once.
inline model load_checkpoint(const std::string& path) {
  using kvcache::detail::message;
  auto error = [&path](const auto&... parts) {
    return std::runtime_error(message("load_checkpoint: '", path, "': ", parts...));
  };
  if (const std::string wrong = detail::not_a_regular_file(path); !wrong.empty()) {
    throw error(wrong);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error("cannot open the file");
  in.seekg(0, std::ios::end);
  const Index file_bytes = Index(std::streamoff(in.tellg()));
  in.seekg(0, std::ios::beg);
  if (file_bytes < 0 || !in) throw error("cannot determine the file's size");
  if (file_bytes < detail::checkpoint_header_bytes) {
    throw error("the file is ", file_bytes, " bytes, shorter than the ",
                detail::checkpoint_header_bytes, "-byte header");
  }

  unsigned char header[detail::checkpoint_header_bytes];
  if (!in.read(reinterpret_cast<char*>(header), sizeof header)) {
    throw error("cannot read the header");
  }
  Index field[7];
  for (int i = 0; i < 7; ++i) field[i] = detail::read_le_i32(header + 4 * i);
  const bool shared = field[5] > 0;
  for (int i = 0; i < 7; ++i) {
    if (field[i] == 0 || (field[i] < 0 && i != 5)) {
      throw error("header field ", detail::checkpoint_fields[i], " = ", field[i],
                  ", expected a positive value");
    }
  }
  model m;
  config& c = m.cfg;
  c.dim = field[0];
  c.hidden_dim = field[1];
  c.n_layers = field[2];
  c.n_heads = field[3];
  c.n_kv_heads = field[4];
  c.vocab_size = std::abs(field[5]);  // Index is wider than int32: no overflow at INT32_MIN
  c.seq_len = field[6];
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  if (c.dim % c.n_heads != 0) {
    throw error("dim = ", c.dim, " is not divisible by n_heads = ", c.n_heads);
  }
  if (c.head_dim() % 2 != 0) {
    throw error("head_dim = dim / n_heads = ", c.head_dim(), " is odd; RoPE rotates pairs");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    throw error("n_heads = ", c.n_heads, " is not divisible by n_kv_heads = ", c.n_kv_heads);
  }
  const std::optional<Index> expected = detail::checkpoint_bytes(c, shared);
  if (!expected) {
    throw error("the header's sizes overflow a 64-bit byte count (", detail::describe(c, shared),
                "); not a llama2.c checkpoint?");
  }
  if (file_bytes < *expected) {
    throw error("truncated: the file is ", file_bytes, " bytes, expected ", *expected, " for ",
                detail::describe(c, shared));
  }
  if (file_bytes > *expected) {
    throw error("trailing bytes: the file is ", file_bytes, " bytes, expected ", *expected, " for ",
                detail::describe(c, shared));
  }

  auto read = [&](const std::string& name, auto& tensor, Index rows, Index cols) {
    tensor.resize(rows, cols);
    if (!detail::read_floats(in, tensor.data(), tensor.size())) {
      throw error("read failed in ", name);
    }
  };
  m.w.layers.resize(std::size_t(c.n_layers));
  detail::visit_tensors(c, m.w, read);
  in.seekg(std::streamoff(4 * c.seq_len * c.head_dim()), std::ios::cur);  // freq_cis tables
  m.w.shared_classifier = shared;
  if (shared) {
    m.w.classifier = m.w.token_embedding;
  } else {
    read("classifier", m.w.classifier, c.vocab_size, c.dim);
  }
  return m;
}

/// Writes `w` as a llama2.c legacy (version 0) checkpoint that `load_checkpoint` and llama2.c's
/// run.c read: the header (vocab_size negated when `!w.shared_classifier`), the tensors, the
/// RoPE tables llama2.c's export writes (cos and sin of pos / 10000^(2i/head_dim), as float),
/// and the classifier when it is not shared. The format has no field for rope_theta or
/// norm_eps; readers assume 10000 and 1e-5.
/// Throws std::invalid_argument if `c` is invalid or does not fit the int32 header, if a tensor
/// of `w` has the wrong shape (naming it), or if `w.shared_classifier` is set while
/// `w.classifier` is neither empty nor equal to the embedding; std::runtime_error, naming the
/// file, if it cannot be written. Checks everything before creating the file.
inline void save_checkpoint(const std::string& path, const config& c, const weights& w) {
  using kvcache::detail::fail;
  c.validate();
  const Index fields[7] = {c.dim,        c.hidden_dim, c.n_layers, c.n_heads,
                           c.n_kv_heads, c.vocab_size, c.seq_len};
  for (int i = 0; i < 7; ++i) {
    if (fields[i] > std::numeric_limits<std::int32_t>::max()) {
      fail<std::invalid_argument>("save_checkpoint: ", detail::checkpoint_fields[i], " = ",
                                  fields[i], " does not fit the int32 header");
    }
  }
  if (!detail::checkpoint_bytes(c, w.shared_classifier)) {
    fail<std::invalid_argument>("save_checkpoint: the sizes overflow a 64-bit byte count");
  }
  if (Index(w.layers.size()) != c.n_layers) {
    fail<std::invalid_argument>("save_checkpoint: weights have ", w.layers.size(),
                                " layers, expected n_layers = ", c.n_layers);
  }
  auto check = [](const std::string& name, const auto& tensor, Index rows, Index cols) {
    if (tensor.rows() != rows || tensor.cols() != cols) {
      fail<std::invalid_argument>("save_checkpoint: ", name, " is ", tensor.rows(), "x",
                                  tensor.cols(), ", expected ", rows, "x", cols);
    }
  };
  detail::visit_tensors(c, w, check);
  if (w.shared_classifier) {
    const bool same_shape = w.classifier.rows() == w.token_embedding.rows() &&
                            w.classifier.cols() == w.token_embedding.cols();
    if (w.classifier.size() != 0 && (!same_shape || w.classifier != w.token_embedding)) {
      fail<std::invalid_argument>(
          "save_checkpoint: shared_classifier is set but classifier differs from "
          "token_embedding; the file would keep only the embedding");
    }
  } else {
    check("classifier", w.classifier, c.vocab_size, c.dim);
  }

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail<std::runtime_error>("save_checkpoint: '", path, "': cannot open for writing");
  for (int i = 0; i < 7; ++i) {
    const Index value = (i == 5 && !w.shared_classifier) ? -fields[i] : fields[i];
    detail::write_le_i32(out, std::int32_t(value));
  }
  detail::visit_tensors(c, w, [&out](const std::string&, const auto& tensor, Index, Index) {
    detail::write_floats(out, tensor.data(), tensor.size());
  });
  // [pos][head_dim/2], the cos table then the sin table, computed in float as PyTorch does.
  const Index half = c.head_dim() / 2;
  std::vector<float> row(std::size_t(half), 0.0f);
  for (const bool imag : {false, true}) {
    for (Index pos = 0; pos < c.seq_len; ++pos) {
      for (Index i = 0; i < half; ++i) {
        const float freq = 1.0f / std::pow(10000.0f, float(2 * i) / float(c.head_dim()));
        const float angle = float(pos) * freq;
        row[std::size_t(i)] = imag ? std::sin(angle) : std::cos(angle);
      }
      detail::write_floats(out, row.data(), half);
    }
  }
  if (!w.shared_classifier) detail::write_floats(out, w.classifier.data(), w.classifier.size());
  out.close();
  if (!out) fail<std::runtime_error>("save_checkpoint: '", path, "': write failed");
}

/// Returns `piece` unless it is a single byte that is neither printable nor white space in
/// the C locale (a control code from a `<0xXX>` token), or empty; as llama2.c's safe_printf.
inline std::string safe_piece(const std::string& piece) {
  if (piece.size() == 1) {
    const unsigned char b = static_cast<unsigned char>(piece[0]);
    const bool printable = b >= 0x20 && b < 0x7f;
    const bool space = b == '\t' || b == '\n' || b == '\v' || b == '\f' || b == '\r';
    if (!printable && !space) return {};
  }
  return piece;
}

/// llama2.c's byte-pair tokenizer (its tokenizer.bin): SentencePiece pieces with a plain space
/// in place of U+2581, ids 0..2 for <unk>, <s>, </s>, and byte-fallback pieces <0x00>..<0xFF>
/// at ids 3..258.
class tokenizer {
 public:
  static constexpr int bos_id = 1;
  static constexpr int eos_id = 2;
  static constexpr int byte_fallback_offset = 3;

  tokenizer() = default;

  /// Reads a tokenizer.bin: int32 max_token_length, then `vocab_size` entries of
  /// (float32 score, int32 length, length bytes), little-endian. The file does not store
  /// vocab_size; pass the checkpoint's.
  /// Throws std::invalid_argument if vocab_size < 3 or above INT32_MAX; std::runtime_error,
  /// naming the file, if it is a directory or not a regular file, if it cannot be opened, if
  /// max_token_length is not positive, if a token's
  /// length is negative or above max_token_length, if the file holds fewer or more tokens
  /// than vocab_size, or if it is truncated.
  static tokenizer load(const std::string& path, Index vocab_size) {
    using kvcache::detail::message;
    if (vocab_size < 3 || vocab_size > std::numeric_limits<std::int32_t>::max()) {
      kvcache::detail::fail<std::invalid_argument>(
          "tokenizer::load: vocab_size = ", vocab_size,
          ", expected at least 3 (<unk>, <s>, </s>) and at most INT32_MAX");
    }
    auto error = [&path](const auto&... parts) {
      return std::runtime_error(message("tokenizer: '", path, "': ", parts...));
    };
    if (const std::string wrong = detail::not_a_regular_file(path); !wrong.empty()) {
      throw error(wrong);
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) throw error("cannot open the file");
    in.seekg(0, std::ios::end);
    const Index file_bytes = Index(std::streamoff(in.tellg()));
    in.seekg(0, std::ios::beg);
    if (file_bytes < 0 || !in) throw error("cannot determine the file's size");

    Index offset = 0;
    auto read_word = [&](const char* what, Index token) {
      unsigned char b[4];
      if (file_bytes - offset < 4 || !in.read(reinterpret_cast<char*>(b), 4)) {
        if (token < 0) throw error("truncated: the file is ", file_bytes, " bytes, no ", what);
        throw error("truncated in the ", what, " of token ", token, " of ", vocab_size);
      }
      offset += 4;
      return detail::read_le_i32(b);
    };

    tokenizer t;
    t.path_ = path;
    t.max_token_length_ = read_word("max_token_length", -1);
    if (t.max_token_length_ <= 0) {
      throw error("max_token_length = ", t.max_token_length_, ", expected a positive value");
    }
    // A token takes at least 8 bytes: reserve no more than the file can hold.
    const std::size_t capacity = std::size_t(std::min(vocab_size, file_bytes / 8));
    t.pieces_.reserve(capacity);
    t.scores_.reserve(capacity);
    for (Index i = 0; i < vocab_size; ++i) {
      if (offset == file_bytes) {
        throw error("holds ", i, " tokens, expected vocab_size = ", vocab_size,
                    " (a tokenizer for another model?)");
      }
      const std::int32_t score_bits = read_word("score", i);
      float score;
      std::memcpy(&score, &score_bits, 4);
      t.scores_.push_back(score);
      const std::int32_t length = read_word("length", i);
      if (length < 0 || length > t.max_token_length_) {
        throw error("token ", i, " has length ", length,
                    ", expected 0..max_token_length = ", t.max_token_length_);
      }
      if (file_bytes - offset < length) {
        throw error("truncated in token ", i, " of ", vocab_size, ": it has ", length, " bytes, ",
                    file_bytes - offset, " remain");
      }
      std::string piece(std::size_t(length), '\0');
      if (length > 0 && !in.read(piece.data(), length)) throw error("read failed in token ", i);
      t.pieces_.push_back(std::move(piece));
      offset += length;
    }
    if (offset != file_bytes) {
      throw error(file_bytes - offset, " bytes follow the ", vocab_size,
                  " tokens of vocab_size (a tokenizer for a larger vocabulary?)");
    }
    // emplace keeps the first of duplicate pieces: lookups return the lowest id.
    t.ids_.reserve(std::size_t(vocab_size));
    for (Index i = 0; i < vocab_size; ++i) t.ids_.emplace(t.pieces_[std::size_t(i)], int(i));
    return t;
  }

  Index vocab_size() const { return Index(pieces_.size()); }
  Index max_token_length() const { return max_token_length_; }

  /// The piece of `token` as stored (a space for U+2581, `<0xXX>` for byte tokens).
  /// Throws std::out_of_range unless 0 <= token < vocab_size().
  const std::string& piece(int token) const {
    check_token("piece", token);
    return pieces_[std::size_t(token)];
  }
  float score(int token) const {
    check_token("score", token);
    return scores_[std::size_t(token)];
  }

  /// Encodes UTF-8 `text` as llama2.c's encode does: optional BOS (1, itself among the pairs
  /// that may merge, as in llama2.c); a dummy-prefix " "
  /// token when the text is non-empty; each codepoint's piece, or its bytes as byte-fallback
  /// tokens (byte + 3) when the vocabulary lacks it; then, repeatedly, the adjacent pair whose
  /// concatenation is the highest-scoring piece is merged (the leftmost on ties; scores at or
  /// below -1e10 never merge); optional EOS (2). The merges run on a linked list with a heap
  /// of candidate pairs, O(n log n) piece lookups for n initial tokens, so a whole book
  /// encodes in one call; the result is the pair-by-pair rescan's. Throws std::runtime_error
  /// if the vocabulary lacks " " or a fallback byte token.
  std::vector<int> encode(const std::string& text, bool bos, bool eos) const {
    std::vector<int> symbols;  // the initial tokens, merged in place below
    symbols.reserve(text.size() + 2);
    if (bos) symbols.push_back(bos_id);  // among the pairs, as in llama2.c
    if (!text.empty()) {
      const std::optional<int> space = find(" ");
      if (!space) throw file_error("the vocabulary has no \" \" piece for the dummy prefix");
      symbols.push_back(*space);
    }
    auto is_continuation = [](char b) { return (static_cast<unsigned char>(b) & 0xC0) == 0x80; };
    std::string codepoint;
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (!is_continuation(text[i])) codepoint.clear();
      codepoint.push_back(text[i]);
      // A codepoint is at most 4 bytes; longer runs of continuation bytes are split.
      if (i + 1 < text.size() && is_continuation(text[i + 1]) && codepoint.size() < 4) continue;
      if (const std::optional<int> id = find(codepoint)) {
        symbols.push_back(*id);
      } else {
        for (const char b : codepoint) {
          const int byte_id = static_cast<unsigned char>(b) + byte_fallback_offset;
          if (byte_id >= vocab_size()) {
            throw file_error("byte ", static_cast<unsigned>(static_cast<unsigned char>(b)),
                             " has no fallback token: id ", byte_id,
                             " is past vocab_size = ", vocab_size());
          }
          symbols.push_back(byte_id);
        }
      }
      codepoint.clear();
    }
    merge_pairs(symbols);
    std::vector<int> tokens;
    tokens.reserve(symbols.size() + 1);
    for (const int t : symbols) {
      if (t >= 0) tokens.push_back(t);
    }
    if (eos) tokens.push_back(eos_id);
    return tokens;
  }

  /// The text of `token` following `prev_token`, as llama2.c's decode: after BOS the piece's
  /// leading space (the dummy prefix) is dropped; a `<0xXX>` piece is the raw byte XX.
  /// Throws std::out_of_range unless 0 <= token < vocab_size().
  std::string decode(int prev_token, int token) const {
    check_token("decode", token);
    std::string_view piece = pieces_[std::size_t(token)];
    if (prev_token == bos_id && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    if (const std::optional<unsigned char> byte = byte_piece(piece)) {
      return std::string(1, static_cast<char>(*byte));
    }
    return std::string(piece);
  }

 private:
  // Merges adjacent symbols as encode() describes, marking merged-away entries -1. Symbols
  // form a linked list by index; the heap holds candidate pairs, best score first and the
  // leftmost among equal scores. An entry is stale once either side has merged since it was
  // pushed: its left symbol then holds another token, or its right is no longer next.
  void merge_pairs(std::vector<int>& symbols) const {
    const std::size_t n = symbols.size();
    std::vector<std::size_t> next(n), prev(n);
    for (std::size_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i - 1;  // wraps for i = 0: never read, the head has no left neighbour
    }
    struct candidate {
      float score;
      std::size_t left, right;
      int left_token, right_token, merged;
    };
    auto worse = [](const candidate& a, const candidate& b) {
      return a.score != b.score ? a.score < b.score : a.left > b.left;
    };
    std::vector<candidate> heap;
    std::string pair;
    auto consider = [&](std::size_t left, std::size_t right) {
      const int a = symbols[left], b = symbols[right];
      pair.assign(pieces_[std::size_t(a)]).append(pieces_[std::size_t(b)]);
      const std::optional<int> id = find(pair);
      if (!id || !(scores_[std::size_t(*id)] > -1e10f)) return;
      heap.push_back({scores_[std::size_t(*id)], left, right, a, b, *id});
      std::push_heap(heap.begin(), heap.end(), worse);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      const candidate c = heap.back();
      heap.pop_back();
      if (symbols[c.left] != c.left_token || next[c.left] != c.right ||
          symbols[c.right] != c.right_token) {
        continue;  // stale
      }
      symbols[c.left] = c.merged;
      symbols[c.right] = -1;
      next[c.left] = next[c.right];
      if (next[c.left] < n) prev[next[c.left]] = c.left;
      if (c.left > 0) consider(prev[c.left], c.left);  // symbol 0 is always the head
      if (next[c.left] < n) consider(c.left, next[c.left]);
    }
  }

  std::optional<int> find(const std::string& piece) const {
    const auto it = ids_.find(piece);
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }

  // The byte of a piece spelled exactly `<0xXX>` with two hex digits of either case.
  static std::optional<unsigned char> byte_piece(std::string_view piece) {
    if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return std::nullopt;
    auto hex = [](char ch) -> int {
      if (ch >= '0' && ch <= '9') return ch - '0';
      if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
      if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
      return -1;
    };
    const int hi = hex(piece[3]), lo = hex(piece[4]);
    if (hi < 0 || lo < 0) return std::nullopt;
    return static_cast<unsigned char>(hi * 16 + lo);
  }

  void check_token(const char* where, int token) const {
    if (token < 0 || token >= vocab_size()) {
      kvcache::detail::fail<std::out_of_range>("tokenizer::", where, ": token ", token,
                                               " is outside [0, ", vocab_size(), ")");
    }
  }

  template <class... Parts>
  std::runtime_error file_error(const Parts&... parts) const {
    return std::runtime_error(kvcache::detail::message("tokenizer: '", path_, "': ", parts...));
  }

  std::string path_;
  std::vector<std::string> pieces_;  // [token]
  std::vector<float> scores_;        // [token]; higher merges first
  std::unordered_map<std::string, int> ids_;
  std::int32_t max_token_length_ = 0;
};

}  // namespace tiny
