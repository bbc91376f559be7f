// SPDX-License-Identifier: Apache-2.0
// Writes the seed corpus of fuzz_paged_file: a saved sequence of every kind of paged cache the
// fuzzer loads into, at a few fills (empty, part of a page, past a window's gap, layers apart),
// into the directory given.
#include "paged_kinds.hpp"

#include <kvcache/io/paged_file.hpp>

#include <cstdio>
#include <fstream>
#include <string>
#include <tuple>

int main(int argc, char** argv) {
  using namespace kvcache;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIRECTORY\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int kind = 0;
  auto caches = fuzz::paged_kinds();
  std::apply(
      [&](auto&... caches) {
        const auto save_fills = [&](auto& cache) {
          const Index width = cache.shape().kv_width();
          for (const Index tokens : {0, 7, 40}) {
            const Index seq = cache.create();
            for (Index at = 0; at < tokens; at += 5) {  // in chunks, so windows give pages back
              for (Index l = 0; l < cache.n_layers(); ++l) {
                const Index n = std::min<Index>(5, tokens - at + (l == 0 ? 1 : 0));
                const row_matrix<float> k = row_matrix<float>::Random(n, width);
                const row_matrix<float> v = row_matrix<float>::Random(n, width);
                cache.append(seq, l, k, v);
              }
            }
            const std::string path =
                dir + "/paged" + std::to_string(kind) + "_" + std::to_string(tokens) + ".kvp";
            std::ofstream out(path, std::ios::binary | std::ios::trunc);
            io::save(cache, seq, out, path);
            cache.free(seq);
          }
          ++kind;
        };
        (save_fills(caches), ...);
      },
      caches);
  return 0;
}
