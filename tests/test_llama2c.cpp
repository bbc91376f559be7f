// SPDX-License-Identifier: Apache-2.0
// Tests of the llama2.c checkpoint reader and writer and of the tokenizer.bin reader.
#include <tiny_decoder/llama2c.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace tiny {
namespace {

namespace fs = std::filesystem;

/// Gives each test a fresh directory under ::testing::TempDir(), removed afterwards. A random
/// suffix keeps concurrent runs (say, a sanitizer build and a release build) apart.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::random_device entropy;
    do {
      dir_ =
          fs::path(::testing::TempDir()) / (std::string("test_llama2c_") + info->test_suite_name() +
                                            "_" + info->name() + "_" + std::to_string(entropy()));
    } while (!fs::create_directory(dir_));
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  fs::path dir_;
};

class Checkpoint : public TempDirTest {};
class Tokenizer : public TempDirTest {};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

void put_i32(std::string& out, std::int32_t v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  for (int i = 0; i < 4; ++i) out.push_back(char(u >> (8 * i) & 0xff));
}

void put_f32(std::string& out, float f) {
  std::int32_t bits;
  std::memcpy(&bits, &f, 4);
  put_i32(out, bits);
}

std::int32_t get_i32(const std::string& bytes, Index offset) {
  std::uint32_t u = 0;
  for (int i = 0; i < 4; ++i) {
    u |= std::uint32_t(static_cast<unsigned char>(bytes[std::size_t(offset + i)])) << (8 * i);
  }
  std::int32_t v;
  std::memcpy(&v, &u, 4);
  return v;
}

float get_f32(const std::string& bytes, Index offset) {
  const std::int32_t bits = get_i32(bytes, offset);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Runs `f`, expecting a std::runtime_error whose message contains every one of `parts`.
template <class F>
void expect_runtime_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << *parts.begin();
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

config small_config() {
  config c;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 40;
  c.seq_len = 32;
  return c;
}

// Random weights whose classifier is the token embedding, as in most llama2.c checkpoints.
weights shared_classifier_weights(const config& c) {
  weights w = random_weights(c, 7);
  w.classifier = w.token_embedding;
  w.shared_classifier = true;
  return w;
}

weights separate_classifier_weights(const config& c) {
  weights w = random_weights(c, 7);
  EXPECT_FALSE(w.shared_classifier) << "random weights have an untied classifier";
  return w;
}

/// Size of a checkpoint for `c`, spelled out tensor by tensor as llama2.c's export writes it.
Index expected_bytes(const config& c, bool shared) {
  const Index d = c.dim, hd = c.dim / c.n_heads, kv = c.n_kv_heads * hd, L = c.n_layers;
  const Index floats = c.vocab_size * d                    // token_embedding_table
                       + L * d                             // rms_att_weight
                       + L * d * d + 2 * L * kv * d        // wq, wk, wv
                       + L * d * d                         // wo
                       + L * d                             // rms_ffn_weight
                       + 3 * L * c.hidden_dim * d          // w1, w2, w3
                       + d                                 // rms_final_weight
                       + 2 * c.seq_len * (hd / 2)          // freq_cis_real, freq_cis_imag
                       + (shared ? 0 : c.vocab_size * d);  // wcls
  return 28 + 4 * floats;
}

template <class A, class B>
void expect_identical(const A& a, const B& b, const std::string& name) {
  ASSERT_EQ(a.rows(), b.rows()) << name;
  ASSERT_EQ(a.cols(), b.cols()) << name;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())), 0) << name;
}

void expect_identical(const weights& a, const weights& b) {
  EXPECT_EQ(a.shared_classifier, b.shared_classifier);
  expect_identical(a.token_embedding, b.token_embedding, "token_embedding");
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    const layer_weights &x = a.layers[l], &y = b.layers[l];
    const std::string at = "layer " + std::to_string(l) + " ";
    expect_identical(x.attn_norm, y.attn_norm, at + "attn_norm");
    expect_identical(x.wq, y.wq, at + "wq");
    expect_identical(x.wk, y.wk, at + "wk");
    expect_identical(x.wv, y.wv, at + "wv");
    expect_identical(x.wo, y.wo, at + "wo");
    expect_identical(x.ffn_norm, y.ffn_norm, at + "ffn_norm");
    expect_identical(x.w1, y.w1, at + "w1");
    expect_identical(x.w2, y.w2, at + "w2");
    expect_identical(x.w3, y.w3, at + "w3");
  }
  expect_identical(a.final_norm, b.final_norm, "final_norm");
  expect_identical(a.classifier, b.classifier, "classifier");
}

void expect_same_sizes(const config& a, const config& b) {
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.hidden_dim, b.hidden_dim);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.seq_len, b.seq_len);
}

TEST_F(Checkpoint, SharedClassifierRoundTripsBitIdentically) {
  const config c = small_config();
  const weights w = shared_classifier_weights(c);
  const std::string file = path("shared.bin");
  save_checkpoint(file, c, w);

  const std::string bytes = read_bytes(file);
  EXPECT_EQ(Index(bytes.size()), expected_bytes(c, true));
  EXPECT_EQ(get_i32(bytes, 5 * 4), 40) << "a positive vocab_size marks a shared classifier";

  const model m = load_checkpoint(file);
  expect_same_sizes(m.cfg, c);
  EXPECT_EQ(m.cfg.rope_theta, 10000.0f);
  EXPECT_EQ(m.cfg.norm_eps, 1e-5f);
  EXPECT_TRUE(m.w.shared_classifier);
  expect_identical(m.w, w);
}

TEST_F(Checkpoint, SeparateClassifierRoundTripsBitIdentically) {
  const config c = small_config();
  const weights w = separate_classifier_weights(c);
  const std::string file = path("separate.bin");
  save_checkpoint(file, c, w);

  const std::string bytes = read_bytes(file);
  EXPECT_EQ(Index(bytes.size()), expected_bytes(c, false));
  EXPECT_EQ(get_i32(bytes, 5 * 4), -40) << "a negative vocab_size marks a separate classifier";

  const model m = load_checkpoint(file);
  expect_same_sizes(m.cfg, c);
  EXPECT_FALSE(m.w.shared_classifier);
  expect_identical(m.w, w);
}

// Where llama2.c's memory_map_weights looks for a few values, computed independently.
TEST_F(Checkpoint, LayoutIsLlama2cs) {
  const config c = small_config();
  const weights w = separate_classifier_weights(c);
  const std::string file = path("layout.bin");
  save_checkpoint(file, c, w);
  const std::string bytes = read_bytes(file);

  const Index d = 64, kv = 32, L = 2, hidden = 96, vocab = 40, seq = 32, half = 8;
  const std::int32_t header[] = {64, 96, 2, 4, 2, -40, 32};
  for (int i = 0; i < 7; ++i) EXPECT_EQ(get_i32(bytes, 4 * i), header[i]) << "field " << i;

  Index at = 28;  // in bytes
  EXPECT_EQ(get_f32(bytes, at + 4 * (3 * d + 5)), w.token_embedding(3, 5));
  at += 4 * vocab * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (d + 7)), w.layers[1].attn_norm(7));
  at += 4 * L * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (d * d + 2 * d + 9)), w.layers[1].wq(2, 9));
  at += 4 * L * d * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (kv * d - 1)), w.layers[0].wk(kv - 1, d - 1));
  at += 4 * L * kv * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (kv * d)), w.layers[1].wv(0, 0));
  at += 4 * L * kv * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (1 * d + 3)), w.layers[0].wo(1, 3));
  at += 4 * L * d * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * d), w.layers[1].ffn_norm(0));
  at += 4 * L * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (hidden * d + 5 * d + 1)), w.layers[1].w1(5, 1));
  at += 4 * L * hidden * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * (4 * hidden + 95)), w.layers[0].w2(4, 95));
  at += 4 * L * d * hidden;
  EXPECT_EQ(get_f32(bytes, at + 4 * (hidden * d + 95 * d + 63)), w.layers[1].w3(95, 63));
  at += 4 * L * hidden * d;
  EXPECT_EQ(get_f32(bytes, at + 4 * 11), w.final_norm(11));
  at += 4 * d;
  // freq_cis_real[pos][i] = cos(pos / 10000^(2i/head_dim)), then freq_cis_imag with sin.
  // The writer computes in float: a few ulp of the angle, up to pos = 31 radians.
  for (const Index pos : {0, 1, 17, 31}) {
    for (const Index i : {0, 3, 7}) {
      const double angle = double(pos) * std::pow(10000.0, -2.0 * double(i) / 16.0);
      EXPECT_NEAR(get_f32(bytes, at + 4 * (pos * half + i)), std::cos(angle), 1e-5);
      EXPECT_NEAR(get_f32(bytes, at + 4 * (seq * half + pos * half + i)), std::sin(angle), 1e-5);
    }
  }
  at += 4 * 2 * seq * half;
  EXPECT_EQ(get_f32(bytes, at + 4 * (39 * d + 63)), w.classifier(39, 63));
  EXPECT_EQ(at + 4 * vocab * d, Index(bytes.size()));
}

TEST_F(Checkpoint, RefusesTruncatedFileOrTrailingBytes) {
  const config c = small_config();
  const std::string file = path("model.bin");
  save_checkpoint(file, c, random_weights(c, 7));
  const std::string bytes = read_bytes(file);
  const std::string expected = std::to_string(bytes.size());

  write_bytes(file, bytes.substr(0, bytes.size() - 1));
  expect_runtime_error([&] { load_checkpoint(file); },
                       {file, "truncated", std::to_string(bytes.size() - 1), expected});

  write_bytes(file, bytes + '\0');
  expect_runtime_error([&] { load_checkpoint(file); },
                       {file, "trailing bytes", std::to_string(bytes.size() + 1), expected});

  write_bytes(file, bytes.substr(0, 10));
  expect_runtime_error([&] { load_checkpoint(file); }, {file, "10 bytes", "header"});
  write_bytes(file, "");
  expect_runtime_error([&] { load_checkpoint(file); }, {file, "0 bytes", "header"});
}

TEST_F(Checkpoint, RefusesMissingFile) {
  const std::string file = path("no_such.bin");
  expect_runtime_error([&] { load_checkpoint(file); }, {file, "cannot open"});
}

// A directory opens as a stream that seeks to 2^63 - 1: it was read as a file of that size.
TEST_F(Checkpoint, RefusesADirectory) {
  const std::string dir = path("a_directory");
  fs::create_directory(dir);
  expect_runtime_error([&] { load_checkpoint(dir); }, {dir, "is a directory"});
}

TEST_F(Checkpoint, RefusesBadHeaderFields) {
  const config c = small_config();
  const std::string file = path("model.bin");
  save_checkpoint(file, c, random_weights(c, 7));
  const std::string good = read_bytes(file);

  struct bad_field {
    int index;
    std::int32_t value;
    std::string reason;
  };
  const bad_field cases[] = {
      {2, 0, "n_layers = 0"},
      {0, -64, "dim = -64"},
      {5, 0, "vocab_size = 0"},
      {6, -1, "seq_len = -1"},
      {1, 0, "hidden_dim = 0"},
      {4, 3, "n_heads = 4 is not divisible by n_kv_heads = 3"},
      {3, 5, "dim = 64 is not divisible by n_heads = 5"},
      {3, 64, "head_dim = dim / n_heads = 1 is odd"},
  };
  for (const bad_field& bad : cases) {
    std::string bytes = good;
    std::string field;
    put_i32(field, bad.value);
    bytes.replace(std::size_t(4 * bad.index), 4, field);
    write_bytes(file, bytes);
    SCOPED_TRACE(bad.reason);
    expect_runtime_error([&] { load_checkpoint(file); }, {file, bad.reason});
  }
}

// A header whose sizes multiply past 2^63 bytes is refused before anything is allocated.
TEST_F(Checkpoint, RefusesSizesThatOverflow) {
  const std::string file = path("huge.bin");
  std::string bytes;
  for (const std::int32_t v : {1 << 30, 0x7fffffff, 0x7fffffff, 1, 1, 0x7fffffff, 0x7fffffff}) {
    put_i32(bytes, v);
  }
  write_bytes(file, bytes);
  expect_runtime_error([&] { load_checkpoint(file); }, {file, "overflow"});
}

TEST_F(Checkpoint, SaveChecksWeightsBeforeWriting) {
  const config c = small_config();
  const std::string file = path("never.bin");

  weights w = random_weights(c, 7);
  w.layers[1].wk.resize(16, 64);
  try {
    save_checkpoint(file, c, w);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("layers[1].wk is 16x64, expected 32x64"),
              std::string::npos)
        << e.what();
  }

  w = random_weights(c, 7);
  w.layers.pop_back();
  EXPECT_THROW(save_checkpoint(file, c, w), std::invalid_argument);

  w = shared_classifier_weights(c);
  w.classifier(0, 0) += 1.0f;  // claims to be shared but is not
  EXPECT_THROW(save_checkpoint(file, c, w), std::invalid_argument);

  w = separate_classifier_weights(c);
  w.classifier.resize(39, 64);
  EXPECT_THROW(save_checkpoint(file, c, w), std::invalid_argument);

  config odd = c;
  odd.n_kv_heads = 3;
  EXPECT_THROW(save_checkpoint(file, odd, random_weights(c, 7)), std::invalid_argument);

  EXPECT_FALSE(fs::exists(file));
}

TEST_F(Checkpoint, SaveNamesAnUnwritableFile) {
  const config c = small_config();
  const std::string file = path("missing_dir/model.bin");
  expect_runtime_error([&] { save_checkpoint(file, c, random_weights(c, 7)); },
                       {file, "cannot open"});
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

struct entry {
  std::string piece;
  float score;
};

/// llama2.c's fixed ids: <unk>, <s>, </s> (as its export spells them), then <0x00>..<0xFF>.
std::vector<entry> reserved_pieces() {
  std::vector<entry> v = {{"<unk>", 0.0f}, {"\n<s>\n", 0.0f}, {"\n</s>\n", 0.0f}};
  const char* digits = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    v.push_back({std::string("<0x") + digits[b / 16] + digits[b % 16] + ">", 0.0f});
  }
  return v;
}

// Ids from 259 on, in this order.
std::vector<entry> hello_world_vocab() {
  std::vector<entry> v = reserved_pieces();
  const std::vector<entry> extra = {
      {" ", -1000.0f}, {"h", -1000.0f},   {"e", -1000.0f}, {"l", -1000.0f},        {"o", -1000.0f},
      {"w", -1000.0f}, {"r", -1000.0f},   {"d", -1000.0f}, {"\xC3\xB6", -1000.0f},  // ö
      {"he", -1.0f},   {" h", -2.0f},     {" he", -3.0f},  {"ll", -4.0f},          {"llo", -5.0f},
      {"lo", -6.0f},   {" hello", -7.0f}, {" w", -8.0f},   {"or", -9.0f},          {" wor", -10.0f},
      {"ld", -11.0f},  {" world", -12.0f}};
  v.insert(v.end(), extra.begin(), extra.end());
  return v;
}

enum : int {
  space = 259,
  l = 262,
  o_umlaut = 267,
  he = 268,
  space_h = 269,
  space_he = 270,
  llo = 272,
  space_hello = 274,
  space_world = 279
};

std::string tokenizer_bytes(const std::vector<entry>& vocab, std::int32_t max_token_length = 0) {
  if (max_token_length == 0) {
    for (const entry& e : vocab) {
      max_token_length = std::max(max_token_length, std::int32_t(e.piece.size()));
    }
  }
  std::string out;
  put_i32(out, max_token_length);
  for (const entry& e : vocab) {
    put_f32(out, e.score);
    put_i32(out, std::int32_t(e.piece.size()));
    out += e.piece;
  }
  return out;
}

tokenizer write_and_load(const std::string& file, const std::vector<entry>& vocab) {
  write_bytes(file, tokenizer_bytes(vocab));
  return tokenizer::load(file, Index(vocab.size()));
}

std::string decode_all(const tokenizer& t, const std::vector<int>& tokens) {
  std::string text;
  for (std::size_t i = 1; i < tokens.size(); ++i) text += t.decode(tokens[i - 1], tokens[i]);
  return text;
}

TEST_F(Tokenizer, LoadsPiecesAndScores) {
  const std::vector<entry> vocab = hello_world_vocab();
  const tokenizer t = write_and_load(path("tok.bin"), vocab);
  EXPECT_EQ(t.vocab_size(), Index(vocab.size()));
  EXPECT_EQ(t.max_token_length(), 6);
  EXPECT_EQ(t.piece(1), "\n<s>\n");
  EXPECT_EQ(t.piece(3 + 0x41), "<0x41>");
  EXPECT_EQ(t.piece(space_hello), " hello");
  EXPECT_EQ(t.score(llo), -5.0f);
  EXPECT_THROW((void)t.piece(-1), std::out_of_range);
  EXPECT_THROW((void)t.score(int(vocab.size())), std::out_of_range);
}

TEST_F(Tokenizer, EncodesAsciiWithMergesAndDecodesBack) {
  const tokenizer t = write_and_load(path("tok.bin"), hello_world_vocab());
  EXPECT_EQ(t.encode("hello", true, false), (std::vector<int>{1, space_hello}));
  EXPECT_EQ(t.encode("hello world", true, true),
            (std::vector<int>{1, space_hello, space_world, 2}));
  EXPECT_EQ(t.encode("hello", false, true), (std::vector<int>{space_hello, 2}));
  // In " hel", "he" (-1) beats " h" (-2); then " he" (-3) forms and "hel" is no piece.
  EXPECT_EQ(t.encode("hel", true, false), (std::vector<int>{1, space_he, l}));
  // "x" is no piece: it falls back to its byte, which merges with nothing.
  EXPECT_EQ(t.encode("hex", false, false), (std::vector<int>{space_he, 3 + 'x'}));
  EXPECT_EQ(t.encode("", true, true), (std::vector<int>{1, 2}));
  EXPECT_EQ(t.encode("", false, false), (std::vector<int>{}));

  for (const std::string text :
       {"hello", "hello world", "hello  world ", " hello", "held low", "Hello, World!\n", "h"}) {
    EXPECT_EQ(decode_all(t, t.encode(text, true, false)), text);
  }
  EXPECT_EQ(t.decode(1, space_hello), "hello") << "after BOS the dummy prefix is dropped";
  EXPECT_EQ(t.decode(space_hello, space_world), " world");
  EXPECT_EQ(t.decode(1, space), "");
  EXPECT_EQ(t.decode(he, space), " ");
  EXPECT_THROW((void)t.decode(1, 10000), std::out_of_range);
}

TEST_F(Tokenizer, FallsBackToBytesForUnknownCodepoints) {
  const tokenizer t = write_and_load(path("tok.bin"), hello_world_vocab());
  // ö is a piece; é (C3 A9) is not and becomes two byte tokens.
  const std::string text = "h\xC3\xB6 \xC3\xA9";
  const std::vector<int> tokens = t.encode(text, true, false);
  EXPECT_EQ(tokens, (std::vector<int>{1, space_h, o_umlaut, space, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(decode_all(t, tokens), text);
  EXPECT_EQ(t.decode(space, 3 + 0xC3), "\xC3");
  EXPECT_EQ(t.decode(space, 3 + '\n'), "\n");

  // A 4-byte codepoint, stray continuation bytes, one past four, and a NUL byte.
  for (const std::string& odd : {std::string("\xF0\x9F\x98\x80"), std::string("\x80\x80h"),
                                 std::string("\xF0\x9F\x98\x80\x80"), std::string("a\0b", 3)}) {
    const std::vector<int> odd_tokens = t.encode(odd, true, false);
    EXPECT_EQ(decode_all(t, odd_tokens), odd);
  }
  EXPECT_EQ(t.encode("\xF0\x9F\x98\x80\x80", false, false),
            (std::vector<int>{space, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80, 3 + 0x80}));
}

TEST_F(Tokenizer, MergesTheHigherScoringPairFirst) {
  auto vocab_with = [](float ab, float bc) {
    std::vector<entry> v = reserved_pieces();
    for (const entry& e : std::vector<entry>{{" ", -100.0f},
                                             {"a", -100.0f},
                                             {"b", -100.0f},
                                             {"c", -100.0f},
                                             {"ab", ab},
                                             {"bc", bc}}) {
      v.push_back(e);
    }
    return v;
  };
  enum : int { sp = 259, a = 260, b = 261, c = 262, ab = 263, bc = 264 };
  const tokenizer bc_wins = write_and_load(path("bc.bin"), vocab_with(1.0f, 2.0f));
  EXPECT_EQ(bc_wins.encode("abc", false, false), (std::vector<int>{sp, a, bc}));
  const tokenizer ab_wins = write_and_load(path("ab.bin"), vocab_with(2.0f, 1.0f));
  EXPECT_EQ(ab_wins.encode("abc", false, false), (std::vector<int>{sp, ab, c}));
  // On a tie the leftmost pair merges.
  const tokenizer tie = write_and_load(path("tie.bin"), vocab_with(1.0f, 1.0f));
  EXPECT_EQ(tie.encode("abc", false, false), (std::vector<int>{sp, ab, c}));
  // llama2.c starts its search at -1e10: pieces scored no higher never merge.
  const tokenizer never = write_and_load(path("never.bin"), vocab_with(-1e10f, -2e10f));
  EXPECT_EQ(never.encode("abc", false, false), (std::vector<int>{sp, a, b, c}));
}

// llama2.c's merge loop as it is written: rescan every adjacent pair, merge the best-scoring
// (the leftmost on ties), repeat. O(n^2); the reference for the heap-based encode.
std::vector<int> rescan_merges(const std::vector<entry>& vocab, std::vector<int> tokens) {
  std::map<std::string, int> ids;
  for (std::size_t i = 0; i < vocab.size(); ++i) ids.emplace(vocab[i].piece, int(i));
  for (;;) {
    float best = -1e10f;
    int best_id = -1;
    std::size_t best_at = 0;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const auto it = ids.find(vocab[std::size_t(tokens[i])].piece + vocab[std::size_t(tokens[i + 1])].piece);
      if (it != ids.end() && vocab[std::size_t(it->second)].score > best) {
        best = vocab[std::size_t(it->second)].score;
        best_id = it->second;
        best_at = i;
      }
    }
    if (best_id < 0) return tokens;
    tokens[best_at] = best_id;
    tokens.erase(tokens.begin() + std::ptrdiff_t(best_at) + 1);
  }
}

TEST_F(Tokenizer, HeapMergesEqualTheRescanOnRandomText) {
  // Pieces over a four-letter alphabet with few distinct scores, so ties are common and merges
  // overlap in every way; the texts are long enough for chains of merges to cross.
  std::mt19937 gen(7);
  std::vector<entry> vocab = reserved_pieces();
  const std::string alphabet = " abc";
  std::map<std::string, bool> seen;
  for (const char ch : alphabet) {
    vocab.push_back({std::string(1, ch), -100.0f});
    seen[std::string(1, ch)] = true;
  }
  while (vocab.size() < 259 + 60) {
    std::string piece;
    const int len = 2 + int(gen() % 5);
    for (int i = 0; i < len; ++i) piece += alphabet[gen() % alphabet.size()];
    if (seen[piece]) continue;
    seen[piece] = true;
    vocab.push_back({piece, -float(gen() % 4)});
  }
  vocab.push_back({"\n<s>\n a", -1.0f});  // the BOS merges with " a" after it
  const tokenizer t = write_and_load(path("random.bin"), vocab);
  int merged_bos = 0;
  for (int round = 0; round < 300; ++round) {
    std::string text;
    const int len = 1 + int(gen() % 80);
    for (int i = 0; i < len; ++i) text += alphabet[gen() % alphabet.size()];
    std::vector<int> initial = {259};  // the dummy prefix
    for (const char ch : text) initial.push_back(259 + int(alphabet.find(ch)));
    ASSERT_EQ(t.encode(text, false, false), rescan_merges(vocab, initial)) << "text '" << text << "'";
    initial.insert(initial.begin(), 1);  // with BOS, which llama2.c merges like any token
    ASSERT_EQ(t.encode(text, true, false), rescan_merges(vocab, initial)) << "text '" << text << "'";
    const std::vector<int> with_bos = t.encode(text, true, false);
    if (with_bos.front() == 1) {
      ASSERT_EQ(decode_all(t, with_bos), text);
    }
    merged_bos += with_bos.front() != 1;
  }
  EXPECT_GT(merged_bos, 0) << "no text merged its BOS: the case is untested";
}

TEST_F(Tokenizer, EncodeNeedsASpacePieceAndByteTokens) {
  std::vector<entry> vocab = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}, {"a", 0}};
  const std::string file = path("small.bin");
  const tokenizer no_space = write_and_load(file, vocab);
  EXPECT_EQ(no_space.encode("", true, false), (std::vector<int>{1}));
  expect_runtime_error([&] { no_space.encode("a", true, false); }, {file, "dummy prefix"});

  vocab.push_back({" ", 0});
  const tokenizer no_bytes = write_and_load(file, vocab);
  EXPECT_EQ(no_bytes.encode("a", false, false), (std::vector<int>{4, 3}));
  expect_runtime_error([&] { no_bytes.encode("b", false, false); },
                       {file, "byte 98 has no fallback token"});
}

TEST_F(Tokenizer, RefusesADirectoryAndOtherFilesThatAreNotRegular) {
  const std::string dir = path("a_directory");
  fs::create_directory(dir);
  try {
    tokenizer::load(dir, 300);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("is a directory"), std::string::npos) << what;
    EXPECT_EQ(what.find("9223372036854775807"), std::string::npos) << what;
  }
  if (fs::exists("/dev/null")) {
    expect_runtime_error([&] { tokenizer::load("/dev/null", 300); },
                         {"/dev/null", "not a regular file"});
  }
}

TEST_F(Tokenizer, RefusesBadFiles) {
  const std::vector<entry> vocab = hello_world_vocab();
  const Index n = Index(vocab.size());
  const std::string file = path("tok.bin");
  const std::string good = tokenizer_bytes(vocab);

  expect_runtime_error([&] { tokenizer::load(path("missing.bin"), n); },
                       {path("missing.bin"), "cannot open"});

  write_bytes(file, good.substr(0, good.size() - 1));
  expect_runtime_error([&] { tokenizer::load(file, n); }, {file, "truncated in token 279"});
  write_bytes(file, good.substr(0, good.size() - 9));  // in the length of the last token
  expect_runtime_error([&] { tokenizer::load(file, n); },
                       {file, "truncated in the length of token 279"});
  write_bytes(file, good.substr(0, 2));
  expect_runtime_error([&] { tokenizer::load(file, n); }, {file, "truncated", "max_token_length"});

  write_bytes(file, good);
  expect_runtime_error([&] { tokenizer::load(file, n + 1); },
                       {file, "holds 280 tokens, expected vocab_size = 281"});
  expect_runtime_error([&] { tokenizer::load(file, n - 1); },
                       {file, "14 bytes follow the 279 tokens"});
  EXPECT_THROW(tokenizer::load(file, 2), std::invalid_argument);

  write_bytes(file, tokenizer_bytes(vocab, 4));
  expect_runtime_error([&] { tokenizer::load(file, n); },
                       {file, "token 0 has length 5, expected 0..max_token_length = 4"});
  write_bytes(file, tokenizer_bytes(vocab, -1));
  expect_runtime_error([&] { tokenizer::load(file, n); }, {file, "max_token_length = -1"});

  std::string negative = good;
  // Token 0 starts after max_token_length (4 bytes) with its score (4 bytes), then its length.
  std::string length;
  put_i32(length, -3);
  negative.replace(8, 4, length);
  write_bytes(file, negative);
  expect_runtime_error([&] { tokenizer::load(file, n); }, {file, "token 0 has length -3"});
}

TEST(SafePiece, DropsLoneControlBytesAsLlama2cDoes) {
  EXPECT_EQ(safe_piece(""), "");
  EXPECT_EQ(safe_piece("a"), "a");
  EXPECT_EQ(safe_piece(" "), " ");
  EXPECT_EQ(safe_piece("\n"), "\n");
  EXPECT_EQ(safe_piece("\t"), "\t");
  EXPECT_EQ(safe_piece("\x01"), "");
  EXPECT_EQ(safe_piece("\x7f"), "");
  EXPECT_EQ(safe_piece("\xC3"), "") << "half of a codepoint";
  EXPECT_EQ(safe_piece(std::string(1, '\0')), "");
  EXPECT_EQ(safe_piece("\x01\x02"), "\x01\x02") << "only single bytes are filtered";
  EXPECT_EQ(safe_piece("\xC3\xB6"), "\xC3\xB6");
}

}  // namespace
}  // namespace tiny
