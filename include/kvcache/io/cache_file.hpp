// SPDX-License-Identifier: Apache-2.0
// Saving and loading a whole kv_cache (any layout, any format) as a checksummed state file.
#pragma once

#include "kvcache/cache.hpp"
#include "kvcache/io/state_file.hpp"

#include <cstring>
#include <istream>
#include <ostream>
#include <string>
#include <utility>

namespace kvcache::io {

/// The sections of a cache file, in order, inside the state_file container (state_file.hpp:
/// magic, version, sections each with a u64 length and an XXH3-64 checksum, little-endian):
///
///   'KVCS' the cache's kind and shape, each field checked on load against the cache loaded into:
///          string layout name ("contiguous", "fixed", "ring"), string format name ("f32",
///          "int8", ...), i64 n_layers, n_heads, n_kv_heads, head_dim, i64 unit tokens,
///          i64 residual, i64 sink units, i64 rolling units (0 when growing), i64 max_tokens,
///          i64 window, i64 sinks, i64 bytes of the compute type.
///   'LAYR' one per layer, in order: i64 layer index, i64 next position, i64 sink units held,
///          i64 rolling units held, i64 units in the first rolling run, i64 tail tokens; then the
///          contents as raw bytes in kv_cache::for_each_span's order (stored units as the format
///          lays them out, then the tail's keys and values in the compute type). The byte count
///          must be exactly what the counts imply; the counts must fit the cache
///          (kv_cache::check_record).
///
/// Bad values of every kind (another shape, layout or format, counts out of range, a length
/// that does not match, a truncated or corrupted file, a newer version) are refused with
/// format_error naming the file and what differs.

/// Writes `cache` to `out` (name is for messages). Throws std::runtime_error when the stream
/// fails. Cost: one pass over the cached bytes.
template <class Layout, class Format>
void save(const kv_cache<Layout, Format>& cache, std::ostream& out,
          std::string name = "cache file") {
  state_writer w(out, std::move(name));
  const auto& s = cache.shape();
  const auto& p = cache.plan();
  w.begin_section(fourcc("KVCS"));
  w.put_string(Layout::name);
  w.put_string(cache.format().name());
  for (const Index v : {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(),
                        cache.unit_tokens(), cache.format().residual(), p.sink_units,
                        p.grows ? Index(0) : p.ring_units, p.max_tokens, p.mask.window,
                        p.mask.sinks, Index(sizeof(typename kv_cache<Layout, Format>::compute_type))}) {
    w.put_i64(v);
  }
  w.end_section();
  for (Index l = 0; l < cache.n_layers(); ++l) {
    const auto r = cache.record(l);
    w.begin_section(fourcc("LAYR"));
    for (const Index v : {l, r.next, r.sink_units, r.ring_units, r.first_run, r.tail_tokens}) {
      w.put_i64(v);
    }
    cache.for_each_span(l, [&](const void* data, std::size_t bytes) {
      w.put_bytes(data, static_cast<Index>(bytes));
    });
    w.end_section();
  }
  w.finish();
}

/// Loads a file written by save() into `cache`, which must have the shape, layout and format
/// the file was saved from; the contents read back bit-identical. Throws format_error (naming
/// `name` and what is wrong) for a file that does not fit or is damaged; `cache` is unchanged
/// then. Never trusts a size read from the file before checking it against the file's length.
template <class Layout, class Format>
void load(kv_cache<Layout, Format>& cache, std::istream& in, std::string name = "cache file") {
  using cache_type = kv_cache<Layout, Format>;
  state_reader r(in, name);
  const auto& s = cache.shape();
  const auto& p = cache.plan();
  {
    section head = r.expect_section(fourcc("KVCS"));
    head.expect_string("layout", Layout::name);
    head.expect_string("format", cache.format().name());
    const char* fields[] = {"n_layers", "n_heads", "n_kv_heads", "head_dim", "group size",
                            "residual", "sink units", "rolling units", "max_tokens", "window",
                            "sinks", "compute type bytes"};
    const Index values[] = {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(),
                            cache.unit_tokens(), cache.format().residual(), p.sink_units,
                            p.grows ? Index(0) : p.ring_units, p.max_tokens, p.mask.window,
                            p.mask.sinks, Index(sizeof(typename cache_type::compute_type))};
    for (std::size_t i = 0; i < sizeof(values) / sizeof(values[0]); ++i) {
      head.expect_i64(fields[i], values[i]);
    }
    head.expect_end();
  }
  // Filled in, then moved in: the cache changes only on success.
  cache_type fresh(cache.shape(), cache.layout(), cache.format());
  for (Index l = 0; l < cache.n_layers(); ++l) {
    section sec = r.expect_section(fourcc("LAYR"));
    sec.expect_i64("layer", l);
    typename cache_type::layer_record rec;
    rec.next = sec.get_i64("next position");
    rec.sink_units = sec.get_i64("sink units");
    rec.ring_units = sec.get_i64("rolling units");
    rec.first_run = sec.get_i64("first run");
    rec.tail_tokens = sec.get_i64("tail tokens");
    Index bytes = 0;
    try {
      fresh.check_record(rec);
      bytes = fresh.span_bytes(rec);
    } catch (const std::invalid_argument& e) {
      sec.fail("layer ", l, ": ", e.what());
    } catch (const std::length_error& e) {
      sec.fail("layer ", l, ": ", e.what());
    }
    if (bytes != sec.remaining()) {
      sec.fail("layer ", l, " holds ", sec.remaining(), " bytes of contents, its counts say ",
               bytes);
    }
    fresh.restore_layer(l, rec, [&](void* data, std::size_t n) {
      sec.get_bytes(data, static_cast<Index>(n), "contents");
    });
    sec.expect_end();
  }
  r.expect_end();
  cache = std::move(fresh);
}

}  // namespace kvcache::io
