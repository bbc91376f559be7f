// SPDX-License-Identifier: Apache-2.0
// State files: a versioned, checksummed, sectioned binary container, its writer and its reader.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/detail/xxhash.hpp"
#include "kvcache/types.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ios>
#include <istream>
#include <limits>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache::io {

/// What the reader throws for every file it refuses: truncated, corrupt, of a newer version, or
/// holding values the caller checked and rejected. The message starts with the name given to the
/// reader, then names the section and field and says what is wrong.
class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The format version this library writes, and the newest one it reads. Raised whenever the
/// container or the sections kvcache writes change; loaders branch on state_reader::version().
inline constexpr std::uint32_t format_version = 1;

/// The 8 bytes every state file starts with: "\x89KVC\r\n\x1a\n". As in PNG's signature, the
/// first byte is not ASCII and CR LF, ^Z, LF follow, so a file that went through a 7-bit or a
/// text-mode (newline-converting) channel fails here, not somewhere later.
inline constexpr unsigned char file_magic[8] = {0x89, 'K', 'V', 'C', '\r', '\n', 0x1A, '\n'};

/// A section tag from four printable ASCII characters (0x20 to 0x7E), the first in the lowest
/// byte, so the file holds them in reading order: `fourcc("LAYR")`. A non-printable character
/// is std::invalid_argument (a compile error where the tag is a constant).
constexpr std::uint32_t fourcc(const char (&chars)[5]) {
  std::uint32_t tag = 0;
  for (int i = 0; i < 4; ++i) {
    const auto c = static_cast<unsigned char>(chars[i]);
    if (c < 0x20 || c > 0x7E) {
      throw std::invalid_argument("fourcc: a tag is 4 printable characters");
    }
    tag |= std::uint32_t{c} << (8 * i);
  }
  if (chars[4] != '\0') throw std::invalid_argument("fourcc: a tag is 4 printable characters");
  return tag;
}

/// The tag of the section that ends every file; reserved (state_writer::finish writes it).
inline constexpr std::uint32_t end_tag = fourcc("END ");

}  // namespace kvcache::io

namespace kvcache::detail {

/// True when every byte of `tag` is printable ASCII.
constexpr bool tag_is_printable(std::uint32_t tag) {
  for (int i = 0; i < 4; ++i) {
    const std::uint32_t c = (tag >> (8 * i)) & 0xFFu;
    if (c < 0x20 || c > 0x7E) return false;
  }
  return true;
}

/// Writes the low `n` bytes of `value` to `out`, least significant first.
inline void store_le(unsigned char* out, std::uint64_t value, int n) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<unsigned char>((value >> (8 * i)) & 0xFFu);
}

/// Reads `n` bytes from `in`, least significant first.
inline std::uint64_t load_le(const unsigned char* in, int n) {
  std::uint64_t value = 0;
  for (int i = 0; i < n; ++i) value |= std::uint64_t{in[i]} << (8 * i);
  return value;
}

constexpr bool host_is_little_endian() {
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return false;
#else
  return true;
#endif
}

/// Types put_array/get_array store as one little-endian word per element.
template <class T>
inline constexpr bool is_le_word =
    (std::is_arithmetic_v<T> || std::is_same_v<T, Eigen::half> ||
     std::is_same_v<T, Eigen::bfloat16>) &&
    (sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);

/// Copies `n` elements of `size` bytes from `from` to `to`, reversing each element's bytes on a
/// big-endian host so that the file always holds little-endian words.
inline void copy_le_words(void* to, const void* from, Index n, std::size_t size) {
  const std::size_t bytes = static_cast<std::size_t>(n) * size;  // checked by the callers
  if constexpr (host_is_little_endian()) {
    if (bytes != 0) std::memcpy(to, from, bytes);
  } else {
    auto* out = static_cast<unsigned char*>(to);
    const auto* in = static_cast<const unsigned char*>(from);
    for (std::size_t e = 0; e < bytes; e += size) {
      for (std::size_t b = 0; b < size; ++b) out[e + b] = in[e + size - 1 - b];
    }
  }
}

/// A section's checksum: XXH3-64, seed 0, of its 12 header bytes followed by its payload.
inline std::uint64_t section_checksum(const unsigned char* header, const unsigned char* payload,
                                      Index payload_size) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, header, 12);
  if (payload_size > 0) {
    XXH3_64bits_update(&state, payload, static_cast<std::size_t>(payload_size));
  }
  return XXH3_64bits_digest(&state);
}

/// The low `digits` hex digits of `value`, most significant first.
inline std::string hex_digits(std::uint64_t value, int digits) {
  std::string out;
  for (int i = digits - 1; i >= 0; --i) out += "0123456789abcdef"[(value >> (4 * i)) & 0xFu];
  return out;
}

/// Which error bits a stream has set, for messages.
inline std::string stream_state(const std::ios& stream) {
  if (stream.bad()) return "an unrecoverable error (badbit)";
  if (stream.fail()) return "a failed operation (failbit)";
  if (stream.eof()) return "the end of the stream (eofbit)";
  return "no error";
}

}  // namespace kvcache::detail

namespace kvcache::io {

/// A tag as text for messages: its four characters, with \xNN for a byte that is not printable.
inline std::string tag_name(std::uint32_t tag) {
  std::string out;
  for (int i = 0; i < 4; ++i) {
    const auto c = static_cast<unsigned char>((tag >> (8 * i)) & 0xFFu);
    if (c >= 0x20 && c <= 0x7E) {
      out += static_cast<char>(c);
    } else {
      out += "\\x" + detail::hex_digits(c, 2);
    }
  }
  return out;
}

/// Writes a state file (format below, next to state_reader): the header at construction, then
/// sections, each held in memory from begin_section() until end_section() writes it with its
/// length and checksum, then the end section at finish(). A file whose writer never reached
/// finish() has no end section, and the reader refuses it as truncated.
///
/// Errors: a stream that fails is std::runtime_error naming the file, what was being written
/// and the byte offset (std::ios_base::failure, also a runtime_error, when the stream's own
/// exceptions are on); calls out of order (a put outside a section, begin_section inside one,
/// anything after finish or on a moved-from writer) are std::logic_error; a reserved or
/// non-printable tag, or a negative count, is std::invalid_argument.
///
/// Cost: each put appends to the section's buffer (amortized O(bytes put)); end_section hashes
/// the section once and writes it. The buffer keeps its capacity from one section to the next.
/// Memory: one section at a time, so split large data into several sections (one per layer).
///
/// Threads: one owner; two threads may not use one writer (or its stream) at once.
class state_writer {
 public:
  /// Writes the file header to `out`; `name` names the file in messages.
  explicit state_writer(std::ostream& out, std::string name = "state file")
      : out_(&out), name_(std::move(name)) {
    unsigned char header[12];
    std::memcpy(header, file_magic, 8);
    detail::store_le(header + 8, format_version, 4);
    write(header, 12, "the file header");
  }

  state_writer(const state_writer&) = delete;
  state_writer& operator=(const state_writer&) = delete;
  /// The moved-from writer is empty: finished() is false and every write is std::logic_error.
  state_writer(state_writer&& other) noexcept
      : out_(std::exchange(other.out_, nullptr)),
        name_(std::move(other.name_)),
        payload_(std::move(other.payload_)),
        tag_(std::exchange(other.tag_, 0)),
        written_(std::exchange(other.written_, 0)),
        open_(std::exchange(other.open_, false)),
        finished_(std::exchange(other.finished_, false)) {
    other.payload_.clear();
  }
  state_writer& operator=(state_writer&& other) noexcept {
    if (this != &other) {
      out_ = std::exchange(other.out_, nullptr);
      name_ = std::move(other.name_);
      payload_ = std::move(other.payload_);
      other.payload_.clear();
      tag_ = std::exchange(other.tag_, 0);
      written_ = std::exchange(other.written_, 0);
      open_ = std::exchange(other.open_, false);
      finished_ = std::exchange(other.finished_, false);
    }
    return *this;
  }
  ~state_writer() = default;

  /// Opens a section with `tag` (fourcc("LAYR")): the puts that follow are its payload.
  void begin_section(std::uint32_t tag) {
    usable("begin_section");
    if (open_) {
      detail::fail<std::logic_error>(name_, ": begin_section('", tag_name(tag), "'): section '",
                                     tag_name(tag_), "' is still open; call end_section() first");
    }
    if (!detail::tag_is_printable(tag)) {
      detail::fail<std::invalid_argument>(name_, ": begin_section: tag '", tag_name(tag),
                                          "' is not four printable characters");
    }
    if (tag == end_tag) {
      detail::fail<std::invalid_argument>(name_, ": begin_section: tag 'END ' is reserved for "
                                                 "the end of the file, which finish() writes");
    }
    payload_.clear();
    tag_ = tag;
    open_ = true;
  }

  /// Appends a 4-byte little-endian unsigned integer.
  void put_u32(std::uint32_t value) { detail::store_le(extend(4, "put_u32"), value, 4); }
  /// Appends an 8-byte little-endian unsigned integer.
  void put_u64(std::uint64_t value) { detail::store_le(extend(8, "put_u64"), value, 8); }
  /// Appends an 8-byte little-endian two's-complement integer.
  void put_i64(std::int64_t value) {
    detail::store_le(extend(8, "put_i64"), static_cast<std::uint64_t>(value), 8);
  }
  /// Appends a double as the 8-byte little-endian IEEE-754 binary64 pattern (NaN payloads and
  /// the sign of zero kept).
  void put_f64(double value) {
    static_assert(sizeof(double) == 8 && std::numeric_limits<double>::is_iec559);
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, 8);
    detail::store_le(extend(8, "put_f64"), bits, 8);
  }
  /// Appends `n` bytes as they are (`data` may be null when n is 0).
  void put_bytes(const void* data, Index n) {
    if (n < 0) detail::fail<std::invalid_argument>(name_, ": put_bytes: n is ", n, ", negative");
    unsigned char* out = extend(n, "put_bytes");
    if (n > 0) std::memcpy(out, data, static_cast<std::size_t>(n));
  }
  /// Appends a u64 byte count, then the bytes of `text` (no terminator).
  void put_string(std::string_view text) {
    const auto n = static_cast<Index>(text.size());
    put_u64(static_cast<std::uint64_t>(n));
    put_bytes(text.data(), n);
  }
  /// Appends `n` elements, each as one little-endian word of sizeof(T) bytes. T: an integer,
  /// float, double, Eigen::half or Eigen::bfloat16. No count is written: put one first when the
  /// reader cannot know it.
  template <class T>
  void put_array(const T* data, Index n) {
    static_assert(detail::is_le_word<T>,
                  "put_array: T must be an integer, float, double, Eigen::half or "
                  "Eigen::bfloat16");
    if (n < 0) detail::fail<std::invalid_argument>(name_, ": put_array: n is ", n, ", negative");
    const Index bytes = detail::checked_mul(n, Index{sizeof(T)}, "put_array: bytes");
    detail::copy_le_words(extend(bytes, "put_array"), data, n, sizeof(T));
  }

  /// Writes the open section: tag, payload length, payload, checksum.
  void end_section() {
    usable("end_section");
    if (!open_) detail::fail<std::logic_error>(name_, ": end_section: no section is open");
    write_section(tag_, payload_.data(), static_cast<Index>(payload_.size()));
    open_ = false;
  }

  /// Writes the end section and flushes the stream. Nothing may be written after it.
  void finish() {
    usable("finish");
    if (open_) {
      detail::fail<std::logic_error>(name_, ": finish: section '", tag_name(tag_),
                                     "' is still open; call end_section() first");
    }
    write_section(end_tag, nullptr, 0);
    out_->flush();
    if (!*out_) {
      detail::fail<std::runtime_error>(name_, ": flushing failed after byte ", written_,
                                       ": the stream reports ", detail::stream_state(*out_));
    }
    finished_ = true;
  }

  /// Whether finish() has completed.
  bool finished() const noexcept { return finished_; }
  /// Bytes written to the stream so far (sections still open not counted).
  Index bytes_written() const noexcept { return written_; }

 private:
  void usable(const char* call) const {
    if (out_ == nullptr) {
      detail::fail<std::logic_error>("state_writer::", call, ": the writer was moved from");
    }
    if (finished_) {
      detail::fail<std::logic_error>(name_, ": ", call, ": the file is already finished");
    }
  }

  // Grows the open section by n bytes and returns where they go.
  unsigned char* extend(Index n, const char* call) {
    usable(call);
    if (!open_) {
      detail::fail<std::logic_error>(name_, ": ", call, ": no section is open; call "
                                                        "begin_section(tag) first");
    }
    const Index old_size = static_cast<Index>(payload_.size());
    payload_.resize(static_cast<std::size_t>(detail::checked_add(old_size, n, "section size")));
    return payload_.data() + old_size;
  }

  void write_section(std::uint32_t tag, const unsigned char* payload, Index n) {
    unsigned char header[12];
    detail::store_le(header, tag, 4);
    detail::store_le(header + 4, static_cast<std::uint64_t>(n), 8);
    unsigned char checksum[8];
    detail::store_le(checksum, detail::section_checksum(header, payload, n), 8);
    const std::string what = "section '" + tag_name(tag) + "'";
    write(header, 12, what);
    write(payload, n, what);
    write(checksum, 8, what);
  }

  void write(const void* data, Index n, const std::string& what) {
    if (n == 0) return;
    out_->write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    if (!*out_) {
      detail::fail<std::runtime_error>(name_, ": writing ", what, " failed at byte ", written_,
                                       ": the stream reports ", detail::stream_state(*out_));
    }
    written_ = detail::checked_add(written_, n, "bytes written");
  }

  std::ostream* out_ = nullptr;
  std::string name_;
  std::vector<unsigned char> payload_;  // the open section's payload
  std::uint32_t tag_ = 0;
  Index written_ = 0;
  bool open_ = false;
  bool finished_ = false;
};

// ---------------------------------------------------------------------------------------------
// The state file format, version 1.
//
// Every integer is little-endian and of fixed width; an f64 is the IEEE-754 binary64 bit pattern
// stored as a u64. Offsets count from the file's first byte: where the stream stood when the
// reader was made. The reader first seeks to the end to learn how many bytes remain, and checks
// every length against them before it allocates or reads.
//
//   offset      size    type   field     the reader refuses (format_error) when
//   0           8       bytes  magic     it is not 89 4B 56 43 0D 0A 1A 0A ("bad magic"), or the
//                                        file ends inside it ("truncated")
//   8           4       u32    version   it is 0, or newer than format_version ("version 2 is
//                                        newer than this library's 1"); 1..format_version are
//                                        read, and version() tells the caller which
//   12          ...            sections, one after another, each:
//     +0        4       u32    tag       a byte is not printable ASCII 0x20..0x7E; the first
//                                        character is the lowest byte, so the file reads "LAYR"
//     +4        8       u64    length    payload bytes: more than remain after the header, less
//                                        the 8 checksum bytes, is refused before any allocation
//     +12       length  bytes  payload   the section's fields, read only once the checksum holds
//     +12+len   8       u64    checksum  it differs from XXH3-64 (seed 0) of the 12 header bytes
//                                        followed by the payload ("checksum mismatch in section
//                                        'LAYR'"): a flipped bit in tag, length or payload
//   the last section has tag "END " and length 0. The reader refuses an end section with a
//   payload, any byte after the end section, and a file that ends before it ("truncated": what
//   a writer that never reached finish() leaves).
//
// A section's payload is the sequence of fields its writer put, read back in the same order:
//   u32, u64, i64 (two's complement), f64    4, 8, 8, 8 bytes
//   string                                   u64 byte count, then the bytes, no terminator
//   array of T                               each element one little-endian word of sizeof(T)
//                                            bytes (integers, f32, f64, f16, bf16); its length
//                                            is the caller's (a count field, a shape)
//   bytes                                    as given
// Reading a field past the end of its section is refused ("section 'HEAD' at byte 12 is too
// short"); a count or string length larger than what remains of the section is refused before
// anything is allocated; section::expect_end() refuses bytes left unread. What tags a file
// holds and what their fields mean is the caller's; the container gives meaning only to END.
// ---------------------------------------------------------------------------------------------

/// One verified section and a cursor over its payload: the typed gets read its fields in the
/// order they were put. Every refusal is format_error, its message naming the file, the section
/// and the field. A default-constructed or moved-from section is empty (tag 0, size 0).
///
/// Threads: one owner; const members may be called from several threads at once.
class section {
 public:
  section() = default;
  section(const section&) = delete;
  section& operator=(const section&) = delete;
  section(section&& other) noexcept
      : name_(std::move(other.name_)),
        payload_(std::move(other.payload_)),
        tag_(std::exchange(other.tag_, 0)),
        offset_(std::exchange(other.offset_, 0)),
        pos_(std::exchange(other.pos_, 0)) {
    other.payload_.clear();
  }
  section& operator=(section&& other) noexcept {
    if (this != &other) {
      name_ = std::move(other.name_);
      payload_ = std::move(other.payload_);
      other.payload_.clear();
      tag_ = std::exchange(other.tag_, 0);
      offset_ = std::exchange(other.offset_, 0);
      pos_ = std::exchange(other.pos_, 0);
    }
    return *this;
  }
  ~section() = default;

  /// The section's tag; tag_name(tag()) for text.
  std::uint32_t tag() const noexcept { return tag_; }
  /// The file offset of the section's header.
  Index offset() const noexcept { return offset_; }
  /// Payload bytes.
  Index size() const noexcept { return static_cast<Index>(payload_.size()); }
  /// Payload bytes read so far.
  Index position() const noexcept { return pos_; }
  /// Payload bytes not yet read.
  Index remaining() const noexcept { return size() - pos_; }

  /// Reads a u32. `field` names it in messages (may be null). Throws format_error when fewer
  /// than 4 bytes remain; so do the other gets for their sizes.
  std::uint32_t get_u32(const char* field = nullptr) {
    return static_cast<std::uint32_t>(detail::load_le(take(4, field, "u32"), 4));
  }
  /// Reads a u64.
  std::uint64_t get_u64(const char* field = nullptr) {
    return detail::load_le(take(8, field, "u64"), 8);
  }
  /// Reads an i64 (two's complement).
  std::int64_t get_i64(const char* field = nullptr) {
    const std::uint64_t bits = detail::load_le(take(8, field, "i64"), 8);
    std::int64_t value = 0;
    std::memcpy(&value, &bits, 8);
    return value;
  }
  /// Reads an f64, bit for bit.
  double get_f64(const char* field = nullptr) {
    const std::uint64_t bits = detail::load_le(take(8, field, "f64"), 8);
    double value = 0;
    std::memcpy(&value, &bits, 8);
    return value;
  }
  /// Copies the next `n` bytes to `out`. A negative n is std::invalid_argument.
  void get_bytes(void* out, Index n, const char* field = nullptr) {
    if (n < 0) detail::fail<std::invalid_argument>(where(), "get_bytes: n is ", n, ", negative");
    const unsigned char* in = take(n, field, "bytes");
    if (n > 0) std::memcpy(out, in, static_cast<std::size_t>(n));
  }
  /// Reads a string: a u64 byte count, checked against what remains before allocating, then
  /// the bytes.
  std::string get_string(const char* field = nullptr) {
    const Index start = pos_;
    const std::uint64_t n = get_u64(field);
    if (n > static_cast<std::uint64_t>(remaining())) {
      fail(describe(field, "string"), " at payload byte ", start, " claims ", n,
           " bytes, but only ", remaining(), " remain in the section");
    }
    const auto* in = reinterpret_cast<const char*>(take(static_cast<Index>(n), field, "string"));
    return std::string(in, static_cast<std::size_t>(n));
  }
  /// Reads `n` elements written by put_array<T> into `out`. A negative n is
  /// std::invalid_argument; more than remain is format_error.
  template <class T>
  void get_array(T* out, Index n, const char* field = nullptr) {
    static_assert(detail::is_le_word<T>,
                  "get_array: T must be an integer, float, double, Eigen::half or "
                  "Eigen::bfloat16");
    if (n < 0) detail::fail<std::invalid_argument>(where(), "get_array: n is ", n, ", negative");
    // Compared by division: n comes from the caller, perhaps from the file, and n*sizeof(T)
    // could overflow.
    if (n > remaining() / Index{sizeof(T)}) {
      fail(describe(field, "array"), " at payload byte ", pos_, " needs ", n, " elements of ",
           sizeof(T), " bytes, but only ", remaining(), " bytes remain in the section");
    }
    const Index bytes = n * Index{sizeof(T)};
    detail::copy_le_words(out, take(bytes, field, "array"), n, sizeof(T));
  }
  /// Reads a u64 count of items of `bytes_each` bytes (>= 1) that are to follow in this
  /// section, and refuses a count whose items would not fit in what remains: a count that is
  /// returned can be allocated.
  Index get_count(Index bytes_each, const char* field = nullptr) {
    if (bytes_each < 1) {
      detail::fail<std::invalid_argument>(where(), "get_count: bytes_each is ", bytes_each,
                                          ", expected at least 1");
    }
    const Index start = pos_;
    const std::uint64_t n = get_u64(field);
    if (n > static_cast<std::uint64_t>(remaining() / bytes_each)) {
      fail(describe(field, "count"), " at payload byte ", start, " is ", n, ", but ", n,
           " items of ", bytes_each, " bytes do not fit in the ", remaining(),
           " bytes that remain in the section");
    }
    return static_cast<Index>(n);
  }

  /// Reads a u32 and refuses it unless it equals `expected`: "n_kv_heads is 8 in the file, 4
  /// in this cache", `here` naming where `expected` came from.
  void expect_u32(const char* field, std::uint32_t expected, const char* here = "this cache") {
    check_equal(field, get_u32(field), expected, here);
  }
  /// Reads a u64 and refuses it unless it equals `expected`.
  void expect_u64(const char* field, std::uint64_t expected, const char* here = "this cache") {
    check_equal(field, get_u64(field), expected, here);
  }
  /// Reads an i64 and refuses it unless it equals `expected`.
  void expect_i64(const char* field, std::int64_t expected, const char* here = "this cache") {
    check_equal(field, get_i64(field), expected, here);
  }
  /// Reads a string and refuses it unless it equals `expected`.
  void expect_string(const char* field, std::string_view expected,
                     const char* here = "this cache") {
    const std::string value = get_string(field);
    if (value != expected) {
      fail(field, " is \"", value, "\" in the file, \"", expected, "\" in ", here);
    }
  }
  /// Refuses a value already read unless it equals `expected`, with the message of
  /// expect_u32. For any T with == and <<.
  template <class T, class U>
  void check_equal(const char* field, const T& in_file, const U& expected,
                   const char* here = "this cache") const {
    if (!(in_file == expected)) {
      fail(field, " is ", in_file, " in the file, ", expected, " in ", here);
    }
  }

  /// Refuses bytes left unread: the fields read were not all the section holds.
  void expect_end() const {
    if (remaining() != 0) {
      fail(remaining(), " of its ", size(), " payload bytes are left after its last field ",
           "(at payload byte ", pos_, ")");
    }
  }

  /// Throws format_error with the file and section named, then `parts`: for the caller's own
  /// checks, e.g. `s.fail("n_tokens is ", n, ", more than the capacity ", cap)`.
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    detail::fail<format_error>(where(), parts...);
  }

 private:
  friend class state_reader;
  section(std::string name, std::uint32_t tag, Index offset, std::vector<unsigned char> payload)
      : name_(std::move(name)), payload_(std::move(payload)), tag_(tag), offset_(offset) {}

  std::string where() const {
    return detail::message(name_, ": section '", tag_name(tag_), "' at byte ", offset_, ": ");
  }

  static std::string describe(const char* field, const char* type) {
    return field != nullptr ? detail::message(field, " (", type, ")")
                            : detail::message("a field (", type, ")");
  }

  // The next n bytes of the payload (n >= 0), or format_error when fewer remain.
  const unsigned char* take(Index n, const char* field, const char* type) {
    if (n > remaining()) {
      detail::fail<format_error>(name_, ": section '", tag_name(tag_), "' at byte ", offset_,
                                 " is too short: ", describe(field, type), " at payload byte ",
                                 pos_, " needs ", n, " bytes, but only ", remaining(),
                                 " remain of its ", size());
    }
    const unsigned char* out = payload_.data() + pos_;
    pos_ += n;
    return out;
  }

  std::string name_;
  std::vector<unsigned char> payload_;
  std::uint32_t tag_ = 0;
  Index offset_ = 0;
  Index pos_ = 0;
};

/// Reads a state file (format above): the header at construction, then one verified section
/// at a time. Every refusal of the file is format_error, its message starting with `name`.
/// Calls out of order (next_section after the end section or after a format_error, anything on
/// a moved-from reader) are std::logic_error.
///
/// The stream must be seekable (a file or string stream): the reader learns the file's length
/// first, and never reads, allocates or trusts a length read from the file before checking it
/// against the bytes that remain. Cost: each section is read into memory once (its payload,
/// never more than what remains of the file) and hashed once.
///
/// Threads: one owner; two threads may not use one reader (or its stream) at once.
class state_reader {
 public:
  /// Learns the stream's length from its current position, then reads and checks the magic and
  /// the version.
  state_reader(std::istream& in, std::string name) : in_(&in), name_(std::move(name)) {
    find_length();
    read_header();
  }

  state_reader(const state_reader&) = delete;
  state_reader& operator=(const state_reader&) = delete;
  /// The moved-from reader is empty: size() and position() are 0, and next_section,
  /// expect_section and expect_end are std::logic_error.
  state_reader(state_reader&& other) noexcept
      : in_(std::exchange(other.in_, nullptr)),
        name_(std::move(other.name_)),
        size_(std::exchange(other.size_, 0)),
        pos_(std::exchange(other.pos_, 0)),
        version_(std::exchange(other.version_, 0)),
        at_end_(std::exchange(other.at_end_, false)),
        refused_(std::exchange(other.refused_, false)) {}
  state_reader& operator=(state_reader&& other) noexcept {
    if (this != &other) {
      in_ = std::exchange(other.in_, nullptr);
      name_ = std::move(other.name_);
      size_ = std::exchange(other.size_, 0);
      pos_ = std::exchange(other.pos_, 0);
      version_ = std::exchange(other.version_, 0);
      at_end_ = std::exchange(other.at_end_, false);
      refused_ = std::exchange(other.refused_, false);
    }
    return *this;
  }
  ~state_reader() = default;

  /// The name given for messages.
  const std::string& name() const noexcept { return name_; }
  /// The file's format version, 1..format_version.
  std::uint32_t version() const noexcept { return version_; }
  /// The file's length in bytes, from where the stream stood at construction to its end.
  Index size() const noexcept { return size_; }
  /// Bytes read so far: the offset of the next section.
  Index position() const noexcept { return pos_; }
  /// Whether the end section has been read.
  bool at_end() const noexcept { return at_end_; }

  /// Reads the next section and verifies its checksum; returns it, or nullopt at the end
  /// section (after checking that no byte follows it). Walk a file with
  /// `while (auto s = reader.next_section()) { ... }`.
  std::optional<section> next_section() {
    usable("next_section");
    if (at_end_) {
      detail::fail<std::logic_error>(name_, ": next_section: the end section was already read");
    }
    try {
      return read_section();
    } catch (const format_error&) {
      refused_ = true;  // the stream may stand anywhere inside the section now
      throw;
    }
  }

  /// Reads the next section and refuses it unless its tag is `tag`.
  section expect_section(std::uint32_t tag) {
    const Index start = pos_;
    std::optional<section> next = next_section();
    if (!next) {
      detail::fail<format_error>(name_, ": expected section '", tag_name(tag), "' at byte ",
                                 start, ", found the end section");
    }
    if (next->tag() != tag) {
      detail::fail<format_error>(name_, ": expected section '", tag_name(tag), "' at byte ",
                                 start, ", found section '", tag_name(next->tag()), "'");
    }
    return std::move(*next);
  }

  /// Refuses a file that has more sections: the next one must be the end section (nothing to
  /// do when it was already read).
  void expect_end() {
    usable("expect_end");
    if (at_end_) return;
    const Index start = pos_;
    if (std::optional<section> next = next_section()) {
      detail::fail<format_error>(name_, ": expected the end section at byte ", start,
                                 ", found section '", tag_name(next->tag()), "'");
    }
  }

 private:
  Index remaining() const noexcept { return size_ - pos_; }

  std::optional<section> read_section() {
    const Index start = pos_;
    if (remaining() == 0) {
      detail::fail<format_error>(name_, ": truncated at byte ", size_,
                                 ": the file ends before its end section");
    }
    unsigned char header[12];
    read_exact(header, 12, "a section header");
    const auto tag = static_cast<std::uint32_t>(detail::load_le(header, 4));
    const std::uint64_t length = detail::load_le(header + 4, 8);
    if (!detail::tag_is_printable(tag)) {
      detail::fail<format_error>(name_, ": bad section tag '", tag_name(tag), "' at byte ", start,
                                 ": not four printable characters (a corrupt file?)");
    }
    const Index left = remaining();
    if (length > static_cast<std::uint64_t>(left) ||
        static_cast<std::uint64_t>(left) - length < 8) {
      detail::fail<format_error>(name_, ": section '", tag_name(tag), "' at byte ", start,
                                 " claims ", length, " bytes of payload, but only ", left,
                                 " bytes remain for its payload and 8-byte checksum "
                                 "(the file is truncated at byte ", size_,
                                 ", or the length is corrupt)");
    }
    if (tag == end_tag && length != 0) {
      detail::fail<format_error>(name_, ": the end section at byte ", start, " has ", length,
                                 " bytes of payload; it has none");
    }
    const auto n = static_cast<Index>(length);  // <= left, so it fits
    std::vector<unsigned char> payload(static_cast<std::size_t>(n));
    read_exact(payload.data(), n, "a section payload");
    unsigned char stored[8];
    read_exact(stored, 8, "a section checksum");
    const std::uint64_t expected = detail::load_le(stored, 8);
    const std::uint64_t actual = detail::section_checksum(header, payload.data(), n);
    if (expected != actual) {
      detail::fail<format_error>(name_, ": checksum mismatch in section '", tag_name(tag),
                                 "' at byte ", start, " (", n, " bytes of payload): stored 0x",
                                 detail::hex_digits(expected, 16), ", computed 0x",
                                 detail::hex_digits(actual, 16), "; the file is corrupt");
    }
    if (tag == end_tag) {
      at_end_ = true;
      if (remaining() != 0) {
        detail::fail<format_error>(name_, ": ", remaining(), " bytes follow the end section at ",
                                   "byte ", start, "; the file ends with it");
      }
      return std::nullopt;
    }
    return section(name_, tag, start, std::move(payload));
  }

  void usable(const char* call) const {
    if (in_ == nullptr) {
      detail::fail<std::logic_error>("state_reader::", call, ": the reader was moved from");
    }
    if (refused_) {
      detail::fail<std::logic_error>(name_, ": ", call, ": the file was already refused");
    }
  }

  void find_length() {
    try {
      if (!in_->good()) {
        detail::fail<format_error>(name_, ": cannot read: the stream reports ",
                                   detail::stream_state(*in_));
      }
      const std::istream::pos_type start = in_->tellg();
      if (start != std::istream::pos_type(-1)) in_->seekg(0, std::ios::end);
      const std::istream::pos_type end = in_->good() ? in_->tellg() : std::istream::pos_type(-1);
      if (start == std::istream::pos_type(-1) || end == std::istream::pos_type(-1) ||
          end < start) {
        detail::fail<format_error>(name_, ": cannot find the stream's length: the reader needs "
                                          "a seekable stream (a file or a string stream), to "
                                          "check every length in the file against it");
      }
      in_->seekg(start);
      if (!in_->good()) {
        detail::fail<format_error>(name_, ": cannot seek back to the start of the file: the "
                                          "stream reports ", detail::stream_state(*in_));
      }
      size_ = static_cast<Index>(end - start);
    } catch (const std::ios_base::failure& e) {
      detail::fail<format_error>(name_, ": cannot find the stream's length: ", e.what());
    }
  }

  void read_header() {
    if (size_ == 0) detail::fail<format_error>(name_, ": empty, not a kvcache state file");
    unsigned char header[12];
    const Index magic_bytes = size_ < 8 ? size_ : 8;
    read_exact(header, magic_bytes, "the magic");
    if (std::memcmp(header, file_magic, static_cast<std::size_t>(magic_bytes)) != 0) {
      std::string seen;
      for (Index i = 0; i < magic_bytes; ++i) {
        seen += detail::hex_digits(header[i], 2);
        if (i + 1 < magic_bytes) seen += ' ';
      }
      detail::fail<format_error>(name_, ": bad magic: not a kvcache state file (it starts with ",
                                 seen, ")");
    }
    if (magic_bytes < 8) {
      detail::fail<format_error>(name_, ": truncated at byte ", size_,
                                 ": the 8-byte magic needs ", 8 - magic_bytes, " more bytes");
    }
    read_exact(header + 8, 4, "the format version");
    version_ = static_cast<std::uint32_t>(detail::load_le(header + 8, 4));
    if (version_ == 0) {
      detail::fail<format_error>(name_, ": version 0 is not a valid format version");
    }
    if (version_ > format_version) {
      detail::fail<format_error>(name_, ": version ", version_,
                                 " is newer than this library's ", format_version);
    }
  }

  // Reads exactly n bytes, or format_error: truncated when fewer than n remain, a read error
  // otherwise.
  void read_exact(unsigned char* out, Index n, const char* what) {
    if (n > remaining()) {
      detail::fail<format_error>(name_, ": truncated at byte ", size_, ": ", what, " at byte ",
                                 pos_, " needs ", n, " bytes, but only ", remaining(), " remain");
    }
    if (n == 0) return;
    try {
      in_->read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
    } catch (const std::ios_base::failure& e) {
      detail::fail<format_error>(name_, ": reading ", what, " at byte ", pos_,
                                 " failed: ", e.what());
    }
    if (in_->gcount() != static_cast<std::streamsize>(n)) {
      detail::fail<format_error>(name_, ": reading ", what, " at byte ", pos_, " failed after ",
                                 in_->gcount(), " of ", n, " bytes: the stream reports ",
                                 detail::stream_state(*in_), " (did the file change?)");
    }
    pos_ += n;
  }

  std::istream* in_ = nullptr;
  std::string name_;
  Index size_ = 0;  // bytes from the file's first byte to the end of the stream
  Index pos_ = 0;   // bytes read so far
  std::uint32_t version_ = 0;
  bool at_end_ = false;
  bool refused_ = false;  // next_section threw format_error
};

}  // namespace kvcache::io
