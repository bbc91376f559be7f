// SPDX-License-Identifier: Apache-2.0
// libFuzzer harness of io::load for paged sequences: each input is loaded, as it is and with its
// section checksums made to match, into a paged cache of every kind. The only exceptions allowed
// out are io::format_error and, for a pool too small, std::length_error; a sequence that loads
// must hold what it says, attend, save and load again to the same bytes, shift and take a token
// (any difference traps).
#include "checksums.hpp"
#include "paged_kinds.hpp"

#include <kvcache/io/paged_file.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

using namespace kvcache;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

template <class Cache>
void load_and_use(Cache& cache, const std::string& bytes) {
  Index seq = -1;
  try {
    std::istringstream in(bytes);
    seq = io::load(cache, in, "fuzz.kvp");
  } catch (const io::format_error&) {
    return;  // refused: what the loader is for
  } catch (const std::length_error&) {
    check(cache.n_sequences() == 0 && cache.stats().used == 0);
    return;  // more pages than the pool has
  }
  using T = typename Cache::compute_type;
  const cache_shape& s = cache.shape();
  for (Index l = 0; l < cache.n_layers(); ++l) {
    const auto view = cache.view(seq, l);
    check(cache.keys(seq, l).rows() == view.size());
    check(view.end_position() == cache.position(seq, l));
    if (view.size() > 0) {
      attention_workspace<T> ws;
      row_vector<T> q = row_vector<T>::Ones(s.q_width()), out(s.q_width());
      decode_attention(s.heads(), q, view, out, ws);
    }
  }
  // Saved again, the same bytes; loaded again where the pool has the pages, the same sequence.
  std::stringstream again;
  io::save(cache, seq, again);
  check(again.str() == bytes);
  if (cache.pool().available() >= Index(cache.block_table(seq).size())) {
    const Index copy = io::load(cache, again);
    std::stringstream twice;
    io::save(cache, copy, twice);
    check(twice.str() == bytes);
    cache.free(copy);
  }
  // A shift of the middle, then a token to every layer, unless refused; the sequence stays one
  // that a file could hold (check_record throws otherwise, which traps).
  const Index n = cache.position(seq);
  try {
    cache.shift(seq, std::max(cache.layout().sinks, n / 3), n / 2 + n / 3, rope(s.head_dim()));
  } catch (const std::out_of_range&) {
  } catch (const std::length_error&) {
  }
  cache.check_record(cache.record(seq));
  try {
    const row_matrix<float> kv = row_matrix<float>::Ones(1, s.kv_width());
    for (Index l = 0; l < cache.n_layers(); ++l) cache.append(seq, l, kv, kv);
  } catch (const std::length_error&) {
  }
  cache.check_record(cache.record(seq));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const std::string fixed = fuzz::with_checksums_fixed(bytes);
  for (const std::string* input : {&bytes, &fixed}) {
    auto caches = fuzz::paged_kinds();
    std::apply([&](auto&... cache) { (load_and_use(cache, *input), ...); }, caches);
  }
  return 0;
}
