// SPDX-License-Identifier: Apache-2.0
// For the fuzzers: a state file with its section checksums made to match its bytes.
#pragma once

#include <kvcache/io/state_file.hpp>

#include <cstdint>
#include <string>

namespace kvcache::fuzz {

/// `bytes` with the checksum of every section whose length fits rewritten to match: so that
/// mutated payloads, which a real checksum would stop at once, reach the field reads.
inline std::string with_checksums_fixed(std::string bytes) {
  auto* b = reinterpret_cast<unsigned char*>(bytes.data());
  std::size_t pos = 12;
  while (pos + 20 <= bytes.size()) {
    const std::uint64_t length = detail::load_le(b + pos + 4, 8);
    if (length > bytes.size() - pos - 20) break;
    const auto n = static_cast<Index>(length);
    detail::store_le(b + pos + 12 + length, detail::section_checksum(b + pos, b + pos + 12, n), 8);
    pos += 20 + static_cast<std::size_t>(length);
  }
  return bytes;
}

}  // namespace kvcache::fuzz
