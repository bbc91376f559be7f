#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the examples (release, -march=native) and runs the tiny decoder: prefill, then
# generation with and without the KV cache. Installs missing Debian packages first.
# Arguments go to tiny_decoder, e.g. scripts/demo.sh --gen 512 --json
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh g++ cmake ninja-build libeigen3-dev libxxhash-dev

cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCACHE_NATIVE=ON \
  -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=ON \
  -DKVCACHE_INSTALL=OFF >/dev/null
cmake --build build/demo >/dev/null
exec build/demo/examples/tiny_decoder "$@"
