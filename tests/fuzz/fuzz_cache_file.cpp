// SPDX-License-Identifier: Apache-2.0
// libFuzzer harness of io::load: each input is loaded, as it is and with its section checksums
// made to match, into a cache of every kind. The only exception allowed out is io::format_error;
// a cache that loads must hold what it says, attend, take a token, and save and load again to
// the same contents (any difference traps).
#include "cache_kinds.hpp"
#include "checksums.hpp"

#include <kvcache/io/cache_file.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <sstream>
#include <string>

namespace {

using namespace kvcache;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

template <class Cache>
void load_and_use(Cache cache, const std::string& bytes) {
  std::istringstream in(bytes);
  try {
    io::load(cache, in, "fuzz.kv");
  } catch (const io::format_error&) {
    return;  // refused: what the loader is for
  }
  using T = typename Cache::compute_type;
  const cache_shape& s = cache.shape();
  for (Index l = 0; l < cache.n_layers(); ++l) {
    check(Index(cache.positions(l).size()) == cache.size(l));
    check(cache.keys(l).rows() == cache.size(l));
    if (cache.size(l) > 0) {
      attention_workspace<T> ws;
      row_vector<T> q = row_vector<T>::Ones(s.q_width()), out(s.q_width());
      decode_attention(s.heads(), q, cache.view(l), out, ws);
    }
  }
  std::stringstream again;
  io::save(cache, again);
  Cache copy = cache;
  copy.clear();
  io::load(copy, again);
  for (Index l = 0; l < cache.n_layers(); ++l) {
    check(copy.positions(l) == cache.positions(l));
    const auto a = copy.keys(l), b = cache.keys(l);
    // Bit for bit: NaN payloads compare by their bytes.
    check(a.size() == b.size() && (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0));
  }
  // A token more fits, unless the layout is full.
  try {
    const row_matrix<float> kv = row_matrix<float>::Ones(1, s.kv_width());
    cache.append(0, kv, kv);
  } catch (const std::length_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const std::string fixed = fuzz::with_checksums_fixed(bytes);
  std::apply([&](auto... cache) { (load_and_use(cache, bytes), ...); }, fuzz::cache_kinds());
  std::apply([&](auto... cache) { (load_and_use(cache, fixed), ...); }, fuzz::cache_kinds());
  return 0;
}
