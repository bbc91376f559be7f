// SPDX-License-Identifier: Apache-2.0
// Tests of the state file container: round trips, the byte layout, and refusal of every
// truncation, every flipped bit, newer versions and lengths the file cannot hold.
#include <kvcache/io/state_file.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <streambuf>
#include <string>
#include <utility>
#include <vector>

namespace kvcache::io {
namespace {

using ::testing::HasSubstr;
using bytes = std::string;

static_assert(fourcc("LAYR") == 0x5259414Cu, "first character in the lowest byte");
static_assert(end_tag == fourcc("END "));

constexpr std::uint32_t head_tag = fourcc("HEAD");
constexpr std::uint32_t layer_tag = fourcc("LAYR");

// The message of the `Error` that `f` throws; a test failure when it throws nothing or another
// type.
template <class Error, class F>
std::string error_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another type: " << e.what();
    return {};
  }
  ADD_FAILURE() << "threw nothing";
  return {};
}

// A small file of three sections: a header, a layer of floats, and an empty one.
bytes small_file() {
  std::ostringstream out;
  state_writer w(out, "small");
  w.begin_section(head_tag);
  w.put_u32(2);           // n_layers
  w.put_u32(4);           // n_kv_heads
  w.put_i64(-17);         // a position
  w.put_f64(10000.0);     // rope theta
  w.put_string("llama");  // model
  w.end_section();
  w.begin_section(layer_tag);
  const float keys[3] = {1.5f, -2.25f, 0.0f};
  w.put_array(keys, 3);
  w.end_section();
  w.begin_section(fourcc("NOTE"));
  w.end_section();
  w.finish();
  return out.str();
}

// Reads every section of `file`, reading the fields of the known ones.
void read_all(const bytes& file) {
  std::istringstream in(file);
  state_reader r(in, "test.kv");
  while (std::optional<section> s = r.next_section()) {
    if (s->tag() == head_tag) {
      s->expect_u32("n_layers", 2);
      s->expect_u32("n_kv_heads", 4);
      s->expect_i64("position", -17);
      s->check_equal("rope_theta", s->get_f64("rope_theta"), 10000.0);
      s->expect_string("model", "llama");
    } else if (s->tag() == layer_tag) {
      float keys[3];
      s->get_array(keys, 3, "keys");
    }
    s->expect_end();
  }
  r.expect_end();
}

// Reads every section of `file` without looking inside.
void walk(const bytes& file) {
  std::istringstream in(file);
  state_reader r(in, "test.kv");
  while (r.next_section()) {
  }
}

TEST(StateFile, RoundTripOfEveryPut) {
  const double nan_with_payload = [] {
    const std::uint64_t bits = 0x7FF8000000001234ull;
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
  }();
  const std::vector<float> f32 = {1.0f, -0.0f, std::numeric_limits<float>::infinity(), 3e-39f};
  const std::vector<double> f64 = {1.0 / 3.0, -1e300, std::numeric_limits<double>::denorm_min()};
  const std::vector<Eigen::half> f16 = {Eigen::half(1.5f), Eigen::half(-65504.0f)};
  const std::vector<Eigen::bfloat16> bf16 = {Eigen::bfloat16(3.0f), Eigen::bfloat16(-1e30f)};
  const std::vector<std::int8_t> i8 = {-128, 0, 127};
  const std::vector<std::uint16_t> u16 = {0, 0xBEEF};
  const std::vector<std::int32_t> i32 = {std::numeric_limits<std::int32_t>::min(), 7};
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(), -1};
  const unsigned char raw[5] = {0, 0xFF, 0x80, 0x7F, 0x01};

  std::ostringstream out;
  state_writer w(out, "round.kv");
  w.begin_section(head_tag);
  for (std::uint32_t v : {0u, 1u, 0xFFFFFFFFu}) w.put_u32(v);
  for (std::uint64_t v : {std::uint64_t{0}, std::uint64_t{1} << 63, ~std::uint64_t{0}}) {
    w.put_u64(v);
  }
  for (std::int64_t v : {std::numeric_limits<std::int64_t>::min(), std::int64_t{-1},
                         std::numeric_limits<std::int64_t>::max()}) {
    w.put_i64(v);
  }
  for (double v : {0.0, -0.0, 1e-310, -std::numeric_limits<double>::infinity(), 0.1}) {
    w.put_f64(v);
  }
  w.put_f64(nan_with_payload);
  w.put_bytes(raw, 5);
  w.put_bytes(nullptr, 0);
  w.put_string("");
  w.put_string(std::string("a\0b", 3));
  w.end_section();
  w.begin_section(layer_tag);
  w.put_array(f32.data(), Index(f32.size()));
  w.put_array(f64.data(), Index(f64.size()));
  w.put_array(f16.data(), Index(f16.size()));
  w.put_array(bf16.data(), Index(bf16.size()));
  w.put_array(i8.data(), Index(i8.size()));
  w.put_array(u16.data(), Index(u16.size()));
  w.put_array(i32.data(), Index(i32.size()));
  w.put_array(i64.data(), Index(i64.size()));
  w.end_section();
  w.begin_section(fourcc("EMPT"));
  w.end_section();
  w.finish();
  EXPECT_TRUE(w.finished());
  const bytes file = out.str();
  EXPECT_EQ(w.bytes_written(), Index(file.size()));

  std::istringstream in(file);
  state_reader r(in, "round.kv");
  EXPECT_EQ(r.version(), format_version);
  EXPECT_EQ(r.size(), Index(file.size()));
  EXPECT_EQ(r.position(), 12);

  section head = r.expect_section(head_tag);
  EXPECT_EQ(head.offset(), 12);
  EXPECT_EQ(head.get_u32(), 0u);
  EXPECT_EQ(head.get_u32(), 1u);
  EXPECT_EQ(head.get_u32(), 0xFFFFFFFFu);
  EXPECT_EQ(head.get_u64(), 0u);
  EXPECT_EQ(head.get_u64(), std::uint64_t{1} << 63);
  EXPECT_EQ(head.get_u64(), ~std::uint64_t{0});
  EXPECT_EQ(head.get_i64(), std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(head.get_i64(), -1);
  EXPECT_EQ(head.get_i64(), std::numeric_limits<std::int64_t>::max());
  const double zero = head.get_f64();
  const double negative_zero = head.get_f64();
  EXPECT_TRUE(zero == 0.0 && !std::signbit(zero));
  EXPECT_TRUE(negative_zero == 0.0 && std::signbit(negative_zero));
  EXPECT_EQ(head.get_f64(), 1e-310);
  EXPECT_EQ(head.get_f64(), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(head.get_f64(), 0.1);
  const double nan = head.get_f64();
  EXPECT_EQ(std::memcmp(&nan, &nan_with_payload, 8), 0) << "a NaN's payload is kept";
  unsigned char raw_back[5];
  head.get_bytes(raw_back, 5);
  EXPECT_EQ(std::memcmp(raw_back, raw, 5), 0);
  head.get_bytes(nullptr, 0);
  EXPECT_EQ(head.get_string(), "");
  EXPECT_EQ(head.get_string(), std::string("a\0b", 3));
  EXPECT_EQ(head.remaining(), 0);
  EXPECT_EQ(head.position(), head.size());
  head.expect_end();

  section layer = r.expect_section(layer_tag);
  EXPECT_EQ(layer.offset(), head.offset() + 12 + head.size() + 8);
  auto read_back = [&layer](const auto& expected) {
    using T = typename std::decay_t<decltype(expected)>::value_type;
    std::vector<T> got(expected.size());
    layer.get_array(got.data(), Index(got.size()));
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), expected.size() * sizeof(T)), 0);
  };
  read_back(f32);
  read_back(f64);
  read_back(f16);
  read_back(bf16);
  read_back(i8);
  read_back(u16);
  read_back(i32);
  read_back(i64);
  layer.expect_end();

  section empty = r.expect_section(fourcc("EMPT"));
  EXPECT_EQ(empty.size(), 0);
  empty.expect_end();
  r.expect_end();
  EXPECT_TRUE(r.at_end());
  r.expect_end();  // already at the end: nothing to do
  EXPECT_THROW((void)r.next_section(), std::logic_error);
}

// The bytes of a one-section file, field by field, as the format comment in state_file.hpp
// describes them.
TEST(StateFile, ByteLayout) {
  std::ostringstream out;
  state_writer w(out);
  w.begin_section(head_tag);
  w.put_u32(0x01020304u);
  w.put_f64(1.0);
  w.end_section();
  w.finish();
  const bytes file = out.str();
  ASSERT_EQ(file.size(), 8 + 4 + (12 + 12 + 8) + (12 + 8));

  const auto* b = reinterpret_cast<const unsigned char*>(file.data());
  EXPECT_EQ(bytes(file, 0, 8), bytes("\x89KVC\r\n\x1a\n", 8));
  EXPECT_EQ(bytes(file, 8, 4), bytes("\x01\x00\x00\x00", 4));                   // version 1
  EXPECT_EQ(bytes(file, 12, 4), "HEAD");                                        // tag
  EXPECT_EQ(bytes(file, 16, 8), bytes("\x0c\x00\x00\x00\x00\x00\x00\x00", 8));  // length 12
  EXPECT_EQ(bytes(file, 24, 4), bytes("\x04\x03\x02\x01", 4));                  // u32
  EXPECT_EQ(bytes(file, 28, 8), bytes("\x00\x00\x00\x00\x00\x00\xf0\x3f", 8));  // f64 1.0
  // The checksum: one-shot XXH3-64 of the header and the payload as stored, little-endian.
  EXPECT_EQ(detail::load_le(b + 36, 8), XXH3_64bits(b + 12, 24));
  EXPECT_EQ(bytes(file, 44, 4), "END ");
  EXPECT_EQ(bytes(file, 48, 8), bytes(8, '\0'));
  EXPECT_EQ(detail::load_le(b + 56, 8), XXH3_64bits(b + 44, 12));
}

TEST(StateFile, SmallFileReads) { EXPECT_NO_THROW(read_all(small_file())); }

// Every prefix of a file, from empty to one byte short, is refused as truncated.
TEST(StateFile, TruncationAtEveryByteIsRefused) {
  const bytes file = small_file();
  ASSERT_GT(file.size(), 80u);
  for (std::size_t n = 0; n < file.size(); ++n) {
    const std::string what = error_of<format_error>([&] { read_all(file.substr(0, n)); });
    EXPECT_THAT(what, HasSubstr("test.kv: "));
    EXPECT_THAT(what, HasSubstr(n == 0 ? "empty" : "truncated at byte " + std::to_string(n)));
  }
}

// A flipped bit anywhere, magic, version, tag, length, payload or checksum, is refused.
TEST(StateFile, EveryFlippedBitIsRefused) {
  const bytes file = small_file();
  for (std::size_t i = 0; i < file.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      bytes bad = file;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      const std::string what = error_of<format_error>([&] { read_all(bad); });
      EXPECT_THAT(what, HasSubstr("test.kv: ")) << " (byte " << i << " bit " << bit << ")";
    }
  }
}

TEST(StateFile, WhatIsWrongIsNamed) {
  const bytes file = small_file();
  bytes bad = file;
  bad[0] = 'P';
  EXPECT_THAT(
      error_of<format_error>([&] { read_all(bad); }),
      HasSubstr("test.kv: bad magic: not a kvcache state file (it starts with 50 4b 56 43"));
  bad = file;
  bad[30] ^= 1;  // inside the HEAD payload
  EXPECT_THAT(error_of<format_error>([&] { read_all(bad); }),
              HasSubstr("test.kv: checksum mismatch in section 'HEAD' at byte 12"));
  bad = file;
  bad[12] = 1;  // the first byte of the HEAD tag
  EXPECT_THAT(error_of<format_error>([&] { read_all(bad); }),
              HasSubstr("bad section tag '\\x01EAD' at byte 12"));
  EXPECT_THAT(error_of<format_error>([&] { read_all(file + "x"); }),
              HasSubstr("test.kv: 1 bytes follow the end section"));
}

TEST(StateFile, NewerVersionIsRefused) {
  bytes file = small_file();
  detail::store_le(reinterpret_cast<unsigned char*>(file.data()) + 8, format_version + 1, 4);
  EXPECT_THAT(error_of<format_error>([&] { read_all(file); }),
              HasSubstr("test.kv: version " + std::to_string(format_version + 1) +
                        " is newer than this library's " + std::to_string(format_version)));
  detail::store_le(reinterpret_cast<unsigned char*>(file.data()) + 8, 0, 4);
  EXPECT_THAT(error_of<format_error>([&] { read_all(file); }),
              HasSubstr("version 0 is not a valid format version"));
}

// A section header with `length`, its tag and checksum valid, followed by `tail`.
bytes file_with_section(std::uint32_t tag, std::uint64_t length, const bytes& payload,
                        const bytes& tail) {
  bytes file(reinterpret_cast<const char*>(file_magic), 8);
  unsigned char word[12];
  detail::store_le(word, format_version, 4);
  file.append(reinterpret_cast<const char*>(word), 4);
  detail::store_le(word, tag, 4);
  detail::store_le(word + 4, length, 8);
  file.append(reinterpret_cast<const char*>(word), 12);
  file += payload;
  const auto* p = reinterpret_cast<const unsigned char*>(payload.data());
  unsigned char sum[8];
  detail::store_le(sum, detail::section_checksum(word, p, Index(payload.size())), 8);
  file.append(reinterpret_cast<const char*>(sum), 8);
  return file + tail;
}

// Lengths the file cannot hold are refused before anything is allocated: an allocation of
// 2^63 or 2^40 bytes would be std::length_error or std::bad_alloc here (and an ASan report),
// not format_error.
TEST(StateFile, HugeLengthIsRefusedWithoutAllocating) {
  for (std::uint64_t length :
       {std::uint64_t{1} << 63, ~std::uint64_t{0}, std::uint64_t{1} << 40, std::uint64_t{9}}) {
    const bytes file = file_with_section(layer_tag, length, "12345678", "");
    const std::string what = error_of<format_error>([&] { read_all(file); });
    EXPECT_THAT(what,
                HasSubstr("test.kv: section 'LAYR' at byte 12 claims " + std::to_string(length) +
                          " bytes of payload, but only 16 bytes remain"));
  }
  // The end section has no payload.
  EXPECT_THAT(error_of<format_error>([&] { read_all(file_with_section(end_tag, 1, "x", "")); }),
              HasSubstr("the end section at byte 12 has 1 bytes of payload"));
}

// Counts and string lengths inside a verified section are checked against what remains of it.
TEST(StateFile, CountsInsideASectionAreChecked) {
  std::ostringstream out;
  state_writer w(out, "counts.kv");
  w.begin_section(layer_tag);
  w.put_u64(std::uint64_t{1} << 63);  // read as a string length, then as a count
  w.put_u32(7);
  w.end_section();
  w.finish();
  const bytes file = out.str();
  auto with_section = [&file](auto&& f) {
    std::istringstream in(file);
    state_reader r(in, "counts.kv");
    section s = r.expect_section(layer_tag);
    f(s);
  };
  EXPECT_THAT(error_of<format_error>(
                  [&] { with_section([](section& s) { (void)s.get_string("model"); }); }),
              HasSubstr("counts.kv: section 'LAYR' at byte 12: model (string) at payload byte 0 "
                        "claims 9223372036854775808 bytes, but only 4 remain"));
  EXPECT_THAT(error_of<format_error>(
                  [&] { with_section([](section& s) { (void)s.get_count(1, "n_tokens"); }); }),
              HasSubstr("n_tokens (count) at payload byte 0 is 9223372036854775808"));
  EXPECT_THAT(
      error_of<format_error>([&] {
        with_section([](section& s) {
          float x;
          s.get_array(&x, std::numeric_limits<Index>::max(), "keys");
        });
      }),
      HasSubstr("keys (array) at payload byte 0 needs 9223372036854775807 elements of 4 bytes"));
  with_section([](section& s) {
    EXPECT_EQ(s.get_u64(), std::uint64_t{1} << 63);
    EXPECT_THAT(error_of<format_error>([&] { (void)s.get_u64("n_tokens"); }),
                HasSubstr("counts.kv: section 'LAYR' at byte 12 is too short: n_tokens (u64) at "
                          "payload byte 8 needs 8 bytes, but only 4 remain of its 12"));
    EXPECT_THAT(error_of<format_error>([&] { s.expect_end(); }),
                HasSubstr("4 of its 12 payload bytes are left after its last field"));
    EXPECT_THAT(error_of<format_error>([&] { s.expect_u32("n_kv_heads", 4); }),
                HasSubstr("counts.kv: section 'LAYR' at byte 12: n_kv_heads is 7 in the file, 4 in "
                          "this cache"));
    EXPECT_THAT(error_of<format_error>([&] { s.fail("n_tokens is ", 9, ", too many"); }),
                HasSubstr("counts.kv: section 'LAYR' at byte 12: n_tokens is 9, too many"));
  });
}

TEST(StateFile, SectionOrderIsChecked) {
  const bytes file = small_file();
  std::istringstream in(file);
  state_reader r(in, "order.kv");
  EXPECT_THAT(error_of<format_error>([&] { (void)r.expect_section(layer_tag); }),
              HasSubstr("order.kv: expected section 'LAYR' at byte 12, found section 'HEAD'"));
  EXPECT_THAT(error_of<format_error>([&] { r.expect_end(); }),
              HasSubstr("order.kv: expected the end section at byte "));
  EXPECT_THAT(error_of<format_error>([&] { (void)r.expect_section(layer_tag); }),
              HasSubstr("found section 'NOTE'"));
  EXPECT_THAT(error_of<format_error>([&] { (void)r.expect_section(layer_tag); }),
              HasSubstr("found the end section"));
}

// The file starts where the stream stands; offsets in messages count from there.
TEST(StateFile, ReadsFromTheStreamsPosition) {
  const bytes file = small_file();
  std::istringstream in("prefix" + file);
  in.seekg(6);
  EXPECT_NO_THROW({
    state_reader r(in, "embedded");
    EXPECT_EQ(r.size(), Index(file.size()));
    while (r.next_section()) {
    }
  });
}

// A stream buffer that cannot seek, as a pipe.
struct pipe_buf : std::streambuf {
  explicit pipe_buf(bytes data) : data_(std::move(data)) {
    setg(data_.data(), data_.data(), data_.data() + data_.size());
  }
  bytes data_;
};

TEST(StateFile, StreamProblemsAreNamed) {
  pipe_buf pipe(small_file());
  std::istream piped(&pipe);
  EXPECT_THAT(
      error_of<format_error>([&] { state_reader r(piped, "pipe"); }),
      HasSubstr("pipe: cannot find the stream's length: the reader needs a seekable stream"));

  std::istringstream failed(small_file());
  failed.setstate(std::ios::failbit);
  EXPECT_THAT(error_of<format_error>([&] { state_reader r(failed, "failed"); }),
              HasSubstr("failed: cannot read: the stream reports a failed operation"));

  // Exceptions on in the stream change nothing: the reader never reads past the end.
  std::istringstream strict(small_file().substr(0, 40));
  strict.exceptions(std::ios::failbit | std::ios::badbit | std::ios::eofbit);
  EXPECT_THAT(error_of<format_error>([&] {
                state_reader r(strict, "strict");
                while (r.next_section()) {
                }
              }),
              HasSubstr("strict: section 'HEAD' at byte 12 claims"));
}

// A stream buffer that takes `room` bytes and then fails, as a full disk.
struct full_disk_buf : std::streambuf {
  explicit full_disk_buf(std::size_t room) : room_(room) {}
  std::streamsize xsputn(const char*, std::streamsize n) override {
    const auto taken = std::min<std::streamsize>(n, std::streamsize(room_));
    room_ -= std::size_t(taken);
    return taken;
  }
  int_type overflow(int_type c) override {
    return xsputn(nullptr, 1) == 1 ? c : traits_type::eof();
  }
  std::size_t room_;
};

TEST(StateFile, WriteFailuresAreNamed) {
  std::ostringstream closed;
  closed.setstate(std::ios::badbit);
  EXPECT_THAT(
      error_of<std::runtime_error>([&] { state_writer w(closed, "closed.kv"); }),
      HasSubstr("closed.kv: writing the file header failed at byte 0: the stream reports an "
                "unrecoverable error (badbit)"));

  full_disk_buf disk(20);  // the file header fits, the section header does not
  std::ostream out(&disk);
  state_writer w(out, "full.kv");
  w.begin_section(layer_tag);
  w.put_u64(1);
  EXPECT_THAT(error_of<std::runtime_error>([&] { w.end_section(); }),
              HasSubstr("full.kv: writing section 'LAYR' failed at byte 12"));
}

TEST(StateFile, WriterMisuseIsALogicError) {
  std::ostringstream out;
  state_writer w(out, "misuse.kv");
  EXPECT_THROW(w.put_u32(1), std::logic_error);
  EXPECT_THROW(w.end_section(), std::logic_error);
  EXPECT_THROW(w.begin_section(end_tag), std::invalid_argument);
  EXPECT_THROW(w.begin_section(0x01020304u), std::invalid_argument);
  w.begin_section(head_tag);
  EXPECT_THROW(w.begin_section(layer_tag), std::logic_error);
  EXPECT_THROW(w.put_bytes("x", -1), std::invalid_argument);
  EXPECT_THROW(w.finish(), std::logic_error);
  w.end_section();
  w.finish();
  EXPECT_THROW(w.begin_section(layer_tag), std::logic_error);
  EXPECT_THROW(w.finish(), std::logic_error);

  state_writer moved(std::move(w));
  EXPECT_TRUE(moved.finished());
  EXPECT_FALSE(w.finished());
  EXPECT_THROW(w.begin_section(head_tag), std::logic_error);
}

// A writer that never reached finish() leaves a file without its end section: refused.
TEST(StateFile, UnfinishedFileIsRefused) {
  std::ostringstream out;
  {
    state_writer w(out);
    w.begin_section(fourcc("NOTE"));
    w.put_u32(1);
    w.end_section();
  }
  EXPECT_THAT(error_of<format_error>([&] { walk(out.str()); }),
              HasSubstr("truncated at byte 36: the file ends before its end section"));
}

TEST(StateFile, MovedFromObjectsAreEmpty) {
  const bytes file = small_file();
  std::istringstream in(file);
  state_reader r(in, "moved.kv");
  std::optional<section> s = r.next_section();
  ASSERT_TRUE(s);
  section taken = std::move(*s);
  EXPECT_EQ(s->size(), 0);
  EXPECT_EQ(s->tag(), 0u);
  EXPECT_THROW((void)s->get_u32(), format_error);
  EXPECT_EQ(taken.tag(), head_tag);
  EXPECT_EQ(taken.get_u32(), 2u);

  state_reader r2(std::move(r));
  EXPECT_THROW((void)r.next_section(), std::logic_error);
  EXPECT_TRUE(r2.next_section());
}

TEST(StateFile, ReaderRefusesFurtherUseAfterAFormatError) {
  const bytes file = small_file().substr(0, 40);
  std::istringstream in(file);
  state_reader r(in, "cut.kv");
  EXPECT_THROW((void)r.next_section(), format_error);
  EXPECT_THROW((void)r.next_section(), std::logic_error);
}

TEST(StateFile, TagNames) {
  EXPECT_EQ(tag_name(fourcc("LAYR")), "LAYR");
  EXPECT_EQ(tag_name(0x0A594100u), "\\x00AY\\x0a");
}

}  // namespace
}  // namespace kvcache::io
