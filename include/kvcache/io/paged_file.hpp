// SPDX-License-Identifier: Apache-2.0
// Saving and loading one sequence of a paged_kv_cache as a checksummed state file.
#pragma once

#include "kvcache/io/state_file.hpp"
#include "kvcache/paged/cache.hpp"

#include <cstdint>
#include <istream>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvcache::io {

/// The sections of a paged sequence file, in order, inside the state_file container
/// (state_file.hpp: magic, version, sections each with a u64 length and an XXH3-64 checksum;
/// every integer little-endian, i64 two's complement):
///
///   'KVPS' the cache's kind and shape, each field checked on load against the cache loaded into:
///          string layout name ("paged"), string format name ("f32", "int8", ...), i64 n_layers,
///          n_heads, n_kv_heads, head_dim, i64 unit tokens (a quantized format's group, else 1),
///          i64 residual, i64 page_size, i64 window, i64 sinks, i64 bytes of the compute type
///          (4 or 8). The pool's page count is not saved: a sequence loads into a pool of any
///          size that has the pages free or cached.
///   'PSEQ' the sequence's block table: i64 table end (one past the last position its pages
///          cover), i64 gap (1 when a window gave pages back, else 0), u64 page count n, then n
///          i64 page positions (the position of each page's first token, oldest page first).
///          Page ids are the pool's and are not saved; loading takes new ones.
///   'PLYR' one per layer, in order: i64 layer index, i64 next position, i64 tail tokens; then the
///          contents as raw bytes in paged_kv_cache::for_each_span's order: for each page of the
///          table, the units the layer stores in it (its stored tokens end at next - tail
///          tokens; the units as the format lays them out, every array with kv heads inner,
///          little-endian on every supported host), then the tail's keys and values in the
///          compute type. The byte count must be exactly what the counts imply.
///
/// The counts must make a sequence this cache can hold (paged_kv_cache::check_record): pages
/// on page boundaries, the sink pages then one run of consecutive pages, every layer's stored
/// tokens within the table, ending on a unit, past a window's gap. Bad values of every kind
/// (another shape, format, page size or window, counts out of range, a length that does not
/// match, a truncated or corrupted file, a newer version) are refused with format_error naming
/// the file and what differs. The prefix index is not saved: publish() a loaded sequence to
/// share its pages again.

/// Writes sequence `seq` of `cache` to `out` (name is for messages). Throws std::out_of_range
/// for a sequence that does not exist, std::runtime_error when the stream fails. Cost: one
/// pass over the sequence's bytes; memory for one layer's bytes at a time.
template <class Format>
void save(const paged_kv_cache<Format>& cache, Index seq, std::ostream& out,
          std::string name = "paged sequence file") {
  const auto rec = cache.record(seq);
  state_writer w(out, std::move(name));
  const auto& s = cache.shape();
  const auto& layout = cache.layout();
  w.begin_section(fourcc("KVPS"));
  w.put_string(paged_layout::name);
  w.put_string(cache.format().name());
  for (const Index v : {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(),
                        cache.format().unit_tokens(), cache.format().residual(), layout.page_size,
                        layout.window, layout.sinks,
                        Index(sizeof(typename paged_kv_cache<Format>::compute_type))}) {
    w.put_i64(v);
  }
  w.end_section();
  w.begin_section(fourcc("PSEQ"));
  w.put_i64(rec.table_end);
  w.put_i64(rec.gap ? 1 : 0);
  w.put_u64(static_cast<std::uint64_t>(rec.page_positions.size()));
  w.put_array(rec.page_positions.data(), Index(rec.page_positions.size()));
  w.end_section();
  for (Index l = 0; l < cache.n_layers(); ++l) {
    const auto& L = rec.layers[static_cast<std::size_t>(l)];
    w.begin_section(fourcc("PLYR"));
    for (const Index v : {l, L.next, L.tail_tokens}) w.put_i64(v);
    cache.for_each_span(seq, l, [&](const void* data, std::size_t bytes) {
      w.put_bytes(data, static_cast<Index>(bytes));
    });
    w.end_section();
  }
  w.finish();
}

/// Loads a file written by save() into `cache`, which must have the shape, format, page size
/// and window the sequence was saved from, as a new sequence; returns its id. The sequence
/// reads back bit-identical (its tokens and positions, each layer's tail, a window's gap) and
/// goes on as the saved one would. Throws format_error (naming `name` and what is wrong) for a
/// file that does not fit or is damaged, std::length_error when the pool has fewer free or
/// cached pages than the sequence holds; `cache` is unchanged then. The whole file is read and
/// checked before any page is taken; nothing is allocated from a length read from the file
/// before it is checked against the file's length.
template <class Format>
Index load(paged_kv_cache<Format>& cache, std::istream& in,
           std::string name = "paged sequence file") {
  using cache_type = paged_kv_cache<Format>;
  state_reader r(in, name);
  const auto& s = cache.shape();
  const auto& layout = cache.layout();
  {
    section head = r.expect_section(fourcc("KVPS"));
    head.expect_string("layout", paged_layout::name);
    head.expect_string("format", cache.format().name());
    const char* fields[] = {"n_layers", "n_heads", "n_kv_heads", "head_dim", "group size",
                            "residual", "page_size", "window", "sinks", "compute type bytes"};
    const Index values[] = {s.n_layers(), s.n_heads(), s.n_kv_heads(), s.head_dim(),
                            cache.format().unit_tokens(), cache.format().residual(),
                            layout.page_size, layout.window, layout.sinks,
                            Index(sizeof(typename cache_type::compute_type))};
    for (std::size_t i = 0; i < sizeof(values) / sizeof(values[0]); ++i) {
      head.expect_i64(fields[i], values[i]);
    }
    head.expect_end();
  }
  typename cache_type::sequence_record rec;
  section table = r.expect_section(fourcc("PSEQ"));
  rec.table_end = table.get_i64("table end");
  const std::int64_t gap = table.get_i64("gap");
  if (gap != 0 && gap != 1) table.fail("gap is ", gap, ", expected 0 or 1");
  rec.gap = gap == 1;
  const Index n_pages = table.get_count(8, "pages");
  rec.page_positions.resize(static_cast<std::size_t>(n_pages));
  table.get_array(rec.page_positions.data(), n_pages, "page positions");
  table.expect_end();
  std::vector<section> layers;
  layers.reserve(static_cast<std::size_t>(cache.n_layers()));
  rec.layers.resize(static_cast<std::size_t>(cache.n_layers()));
  for (Index l = 0; l < cache.n_layers(); ++l) {
    section sec = r.expect_section(fourcc("PLYR"));
    sec.expect_i64("layer", l);
    auto& L = rec.layers[static_cast<std::size_t>(l)];
    L.next = sec.get_i64("next position");
    L.tail_tokens = sec.get_i64("tail tokens");
    layers.push_back(std::move(sec));
  }
  r.expect_end();
  try {
    cache.check_record(rec);
  } catch (const std::invalid_argument& e) {
    table.fail(e.what());
  }
  for (Index l = 0; l < cache.n_layers(); ++l) {
    section& sec = layers[static_cast<std::size_t>(l)];
    Index bytes = 0;
    try {
      bytes = cache.span_bytes(rec, l);
    } catch (const std::length_error& e) {
      sec.fail("layer ", l, ": ", e.what());
    }
    if (bytes != sec.remaining()) {
      sec.fail("layer ", l, " holds ", sec.remaining(), " bytes of contents, its counts say ",
               bytes);
    }
  }
  return cache.restore(rec, [&](Index l, void* data, std::size_t bytes) {
    layers[static_cast<std::size_t>(l)].get_bytes(data, static_cast<Index>(bytes), "contents");
  });
}

}  // namespace kvcache::io
