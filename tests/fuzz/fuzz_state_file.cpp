// SPDX-License-Identifier: Apache-2.0
// libFuzzer harness of the state file container. Each input is read as a file, as it is and
// again with its section checksums made to match: every section walked, its fields read in an
// order its own bytes choose; the only exception allowed out is io::format_error. The same input
// also describes sections that are written, read back field by field (any difference traps) and
// then cut short at a point it chooses (which must be refused).
#include "checksums.hpp"

#include <kvcache/io/state_file.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace io = kvcache::io;
using kvcache::Index;

// Reads the fields of `s` in an order its own payload chooses, until one is refused or none
// remain.
void read_fields(io::section& s) {
  while (s.remaining() > 0) {
    unsigned char op = 0;
    s.get_bytes(&op, 1, "op");
    switch (op % 10) {
      case 0:
        (void)s.get_u32("u32");
        break;
      case 1:
        (void)s.get_u64("u64");
        break;
      case 2:
        (void)s.get_i64("i64");
        break;
      case 3:
        (void)s.get_f64("f64");
        break;
      case 4:
        (void)s.get_string("string");
        break;
      case 5: {
        // A count read from the file sizes an allocation: get_count has checked it fits.
        const Index n = s.get_count(2, "count");
        std::vector<Eigen::half> halves(static_cast<std::size_t>(n));
        s.get_array(halves.data(), n, "halves");
        break;
      }
      case 6: {
        float floats[25];
        s.get_array(floats, op / 10, "floats");
        break;
      }
      case 7:
        s.expect_u32("n_kv_heads", 8);
        break;
      case 8:
        s.expect_string("model", "llama");
        break;
      default:
        s.expect_end();
        break;
    }
  }
  s.expect_end();
}

// Reads `bytes` as a state file, every section and every field it can.
void read_file(const std::string& bytes) {
  std::istringstream in(bytes);
  try {
    io::state_reader reader(in, "fuzz.kv");
    while (std::optional<io::section> s = reader.next_section()) {
      try {
        read_fields(*s);
      } catch (const io::format_error&) {
        // A field refused; the sections after it are still read.
      }
    }
    reader.expect_end();
  } catch (const io::format_error&) {
    // The file refused: what the reader is for.
  }
}

// The input as a stream of bytes, zeros once it runs out.
struct input {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t pos = 0;
  bool empty() const { return pos >= size; }
  std::uint8_t byte() { return pos < size ? data[pos++] : 0; }
  std::uint64_t word(int n) {
    std::uint64_t value = 0;
    for (int i = 0; i < n; ++i) value |= std::uint64_t{byte()} << (8 * i);
    return value;
  }
};

struct field {
  int kind;
  std::uint64_t bits;                // u32, u64, i64, f64
  std::string text;                  // string
  std::vector<std::uint16_t> words;  // array
};

struct planned_section {
  std::uint32_t tag;
  std::vector<field> fields;
};

void check(bool ok) {
  if (!ok) __builtin_trap();
}

// Writes the sections `in` describes, reads them back, and checks every field; then checks that
// the file cut short at a point `in` chooses is refused.
void round_trip(input in) {
  const std::uint64_t cut_at = in.word(2);
  std::vector<planned_section> plan;
  while (!in.empty() && plan.size() < 16) {
    planned_section s;
    // Letters only: never the reserved "END " tag.
    s.tag = 0;
    for (int i = 0; i < 4; ++i) s.tag |= std::uint32_t('A' + in.byte() % 26) << (8 * i);
    const int n_fields = in.byte() % 8;
    for (int f = 0; f < n_fields; ++f) {
      field x{in.byte() % 6, 0, {}, {}};
      if (x.kind <= 3) x.bits = in.word(x.kind == 0 ? 4 : 8);
      if (x.kind == 4) {
        for (int n = in.byte() % 24; n > 0; --n) x.text += static_cast<char>(in.byte());
      }
      if (x.kind == 5) {
        for (int n = in.byte() % 12; n > 0; --n) {
          x.words.push_back(static_cast<std::uint16_t>(in.word(2)));
        }
      }
      s.fields.push_back(std::move(x));
    }
    plan.push_back(std::move(s));
  }

  std::ostringstream out;
  io::state_writer writer(out, "planned.kv");
  for (const planned_section& s : plan) {
    writer.begin_section(s.tag);
    for (const field& x : s.fields) {
      switch (x.kind) {
        case 0:
          writer.put_u32(static_cast<std::uint32_t>(x.bits));
          break;
        case 1:
          writer.put_u64(x.bits);
          break;
        case 2:
          writer.put_i64(static_cast<std::int64_t>(x.bits));
          break;
        case 3: {
          double d;
          std::memcpy(&d, &x.bits, 8);
          writer.put_f64(d);
          break;
        }
        case 4:
          writer.put_string(x.text);
          break;
        default:
          writer.put_u64(x.words.size());
          writer.put_array(x.words.data(), static_cast<Index>(x.words.size()));
          break;
      }
    }
    writer.end_section();
  }
  writer.finish();
  const std::string file = out.str();

  std::istringstream back(file);
  io::state_reader reader(back, "planned.kv");
  for (const planned_section& s : plan) {
    io::section got = reader.expect_section(s.tag);
    for (const field& x : s.fields) {
      switch (x.kind) {
        case 0:
          check(got.get_u32() == x.bits);
          break;
        case 1:
          check(got.get_u64() == x.bits);
          break;
        case 2:
          check(got.get_i64() == static_cast<std::int64_t>(x.bits));
          break;
        case 3: {
          const double d = got.get_f64();
          check(std::memcmp(&d, &x.bits, 8) == 0);
          break;
        }
        case 4:
          check(got.get_string() == x.text);
          break;
        default: {
          const Index n = got.get_count(2);
          std::vector<std::uint16_t> words(static_cast<std::size_t>(n));
          got.get_array(words.data(), n);
          check(words == x.words);
          break;
        }
      }
    }
    got.expect_end();
  }
  reader.expect_end();

  // Any proper prefix is refused, with format_error and nothing else.
  const std::size_t cut = static_cast<std::size_t>(cut_at) % file.size();
  std::istringstream cut_in(file.substr(0, cut));
  bool refused = false;
  try {
    io::state_reader cut_reader(cut_in, "cut.kv");
    while (cut_reader.next_section()) {
    }
  } catch (const io::format_error&) {
    refused = true;
  }
  check(refused);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  read_file(bytes);
  read_file(kvcache::fuzz::with_checksums_fixed(bytes));
  round_trip(input{data, size});
  return 0;
}
