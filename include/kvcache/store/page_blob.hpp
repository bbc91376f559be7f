// SPDX-License-Identifier: Apache-2.0
// One published prefix page of a paged_kv_cache as a self-checking value for a page_store: its
// key, its encoding, and the checks that keep a damaged or foreign value from ever being used.
#pragma once

#include "kvcache/detail/xxhash.hpp"
#include "kvcache/io/state_file.hpp"
#include "kvcache/paged/cache.hpp"
#include "kvcache/paged/prefix_hash.hpp"

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace kvcache {

/// What makes the bytes of a page mean the same in two processes: the layout name, the format
/// (name, group, residual), the shape, the page size and the compute type, hashed (XXH3-128).
/// The model is not in it: the page's chained hash names the model through the extra key its
/// chain started from (prefix_root).
template <class Format>
page_hash page_layout_fingerprint(const paged_kv_cache<Format>& cache) {
  const auto& s = cache.shape();
  std::string text = "kvcache paged page v1|" + cache.format().name();
  for (const Index v : {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(), s.value_dim(),
                        Index(s.values_in_keys() ? 1 : 0), cache.format().unit_tokens(),
                        cache.format().residual(), cache.page_size(),
                        Index(sizeof(typename paged_kv_cache<Format>::compute_type))}) {
    text += '|' + std::to_string(v);
  }
  const XXH128_hash_t h = XXH3_128bits(text.data(), text.size());
  return {h.low64, h.high64};
}

/// The key of a page in every tier: "kvcache-<layout fingerprint>-<chained hash>", 32 hex
/// digits each, so pages of another layout, format or model never share a key.
inline std::string page_blob_key(const page_hash& layout, const page_hash& hash) {
  using detail::hex_digits;
  return "kvcache-" + hex_digits(layout.high, 16) + hex_digits(layout.low, 16) + "-" +
         hex_digits(hash.high, 16) + hex_digits(hash.low, 16);
}

/// Encodes published page `page` of `cache` as a state_file container (io/state_file.hpp:
/// magic, version, sections with XXH3-64 checksums, little-endian):
///
///   'KVPG' string "paged page", string format name, i64 n_layers, n_heads, n_kv_heads,
///          head_dim, value_dim, values in keys (0 or 1), unit tokens, residual, page_size,
///          compute type bytes: checked against the cache that decodes it;
///   'PKEY' u64 hash low, high, parent low, high, then page_size i32 token ids;
///   'PDAT' one per layer, in order: i64 layer, then the page's stored units as
///          paged_kv_cache::for_each_page_span visits them.
///
/// Size: cache.page_bytes() plus about 150 bytes, 4 * page_size and 20 a layer. Throws
/// std::out_of_range for a page that does not exist or is not published.
template <class Format>
std::string encode_page(const paged_kv_cache<Format>& cache, Index page) {
  const auto& pool = cache.pool();
  const page_hash hash = pool.hash_of(page);
  const page_hash parent = pool.parent_of(page);
  const std::int32_t* tokens = pool.tokens_of(page);
  std::ostringstream out;
  {
    io::state_writer w(out, "page value");
    const auto& s = cache.shape();
    w.begin_section(io::fourcc("KVPG"));
    w.put_string("paged page");
    w.put_string(cache.format().name());
    for (const Index v : {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(), s.value_dim(),
                          Index(s.values_in_keys() ? 1 : 0), cache.format().unit_tokens(),
                          cache.format().residual(), cache.page_size(),
                          Index(sizeof(typename paged_kv_cache<Format>::compute_type))}) {
      w.put_i64(v);
    }
    w.end_section();
    w.begin_section(io::fourcc("PKEY"));
    for (const std::uint64_t v : {hash.low, hash.high, parent.low, parent.high}) w.put_u64(v);
    w.put_array(tokens, cache.page_size());
    w.end_section();
    for (Index l = 0; l < cache.n_layers(); ++l) {
      w.begin_section(io::fourcc("PDAT"));
      w.put_i64(l);
      cache.for_each_page_span(page, l, [&](const void* data, std::size_t bytes) {
        w.put_bytes(data, static_cast<Index>(bytes));
      });
      w.end_section();
    }
    w.finish();
  }
  return std::move(out).str();
}

/// A value decoded and checked by decode_page: ready for import_page.
struct decoded_page {
  page_hash hash;
  page_hash parent;
  std::vector<std::int32_t> tokens;
  std::vector<io::section> layers;  // one 'PDAT' section a layer, its layer index read
};

/// Decodes `value` for `cache`, expecting the page of `tokens[0..page_size)` after the prefix
/// that hashed to `parent` (its hash chain_hash(parent, tokens, page_size)). Throws
/// io::format_error, naming `name` and what is wrong, for a value that is truncated, fails a
/// checksum, was written for another layout, format or shape, holds another page or prefix
/// (another model's chain), or whose layer sections are not exactly the page's bytes.
template <class Format>
decoded_page decode_page(const paged_kv_cache<Format>& cache, std::string_view value,
                         const page_hash& parent, const std::int32_t* tokens,
                         const std::string& name = "page value") {
  std::istringstream in{std::string(value)};
  io::state_reader r(in, name);
  const auto& s = cache.shape();
  {
    io::section head = r.expect_section(io::fourcc("KVPG"));
    head.expect_string("layout", "paged page");
    head.expect_string("format", cache.format().name());
    const char* fields[] = {"n_layers",  "n_heads",    "n_kv_heads",
                            "head_dim",  "value_dim",  "values in keys",
                            "group size", "residual",  "page_size",
                            "compute type bytes"};
    const Index values[] = {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(),
                            s.value_dim(), Index(s.values_in_keys() ? 1 : 0),
                            cache.format().unit_tokens(), cache.format().residual(),
                            cache.page_size(),
                            Index(sizeof(typename paged_kv_cache<Format>::compute_type))};
    for (std::size_t i = 0; i < sizeof(values) / sizeof(values[0]); ++i) {
      head.expect_i64(fields[i], values[i]);
    }
    head.expect_end();
  }
  decoded_page d;
  const Index P = cache.page_size();
  {
    io::section key = r.expect_section(io::fourcc("PKEY"));
    d.hash.low = key.get_u64("hash");
    d.hash.high = key.get_u64("hash");
    d.parent.low = key.get_u64("parent hash");
    d.parent.high = key.get_u64("parent hash");
    d.tokens.resize(static_cast<std::size_t>(P));
    key.get_array(d.tokens.data(), P, "tokens");
    key.expect_end();
    if (d.parent != parent) key.fail("the page follows another prefix (its parent hash differs)");
    if (std::memcmp(d.tokens.data(), tokens, static_cast<std::size_t>(P) * sizeof(std::int32_t)) != 0) {
      key.fail("the page holds other tokens");
    }
    if (chain_hash(d.parent, d.tokens.data(), P) != d.hash) {
      key.fail("the hash is not the chained hash of the parent and the tokens");
    }
  }
  const Index per_layer = cache.page_bytes() / cache.n_layers();
  d.layers.reserve(static_cast<std::size_t>(cache.n_layers()));
  for (Index l = 0; l < cache.n_layers(); ++l) {
    io::section sec = r.expect_section(io::fourcc("PDAT"));
    sec.expect_i64("layer", l);
    if (sec.remaining() != per_layer) {
      sec.fail("the layer holds ", sec.remaining(), " bytes, expected ", per_layer);
    }
    d.layers.push_back(std::move(sec));
  }
  r.expect_end();
  return d;
}

/// Brings a decoded page into `cache`'s prefix cache (paged_kv_cache::import_page). Returns
/// the page, or -1 when the cache holds it already or has no free or cached page.
template <class Format>
Index import_decoded_page(paged_kv_cache<Format>& cache, decoded_page& d) {
  return cache.import_page(d.hash, d.parent, d.tokens.data(),
                           [&](Index l, void* data, std::size_t bytes) {
                             d.layers[static_cast<std::size_t>(l)].get_bytes(
                                 data, static_cast<Index>(bytes), "page contents");
                           });
}

}  // namespace kvcache
