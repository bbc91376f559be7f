// SPDX-License-Identifier: Apache-2.0
// Writes the seed corpus of fuzz_cache_file: a saved cache of every kind the fuzzer loads, at a
// few fills (empty, part full, wrapped), into the directory given.
#include "cache_kinds.hpp"

#include <kvcache/io/cache_file.hpp>

#include <cstdio>
#include <fstream>
#include <string>

int main(int argc, char** argv) {
  using namespace kvcache;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIRECTORY\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int kind = 0;
  std::apply(
      [&](auto... caches) {
        const auto save_fills = [&](auto cache) {
          const Index width = cache.shape().kv_width();
          for (const Index tokens : {0, 7, 40}) {
            cache.clear();
            for (Index l = 0; l < cache.n_layers(); ++l) {
              const row_matrix<float> k = row_matrix<float>::Random(tokens, width);
              const row_matrix<float> v = row_matrix<float>::Random(tokens, width);
              cache.append(l, k, v);
            }
            const std::string path =
                dir + "/kind" + std::to_string(kind) + "_" + std::to_string(tokens) + ".kv";
            std::ofstream out(path, std::ios::binary | std::ios::trunc);
            io::save(cache, out, path);
          }
          ++kind;
        };
        (save_fills(caches), ...);
      },
      fuzz::cache_kinds());
  return 0;
}
