#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The quality table and the window probe of README's "What a cache costs a trained model":
# builds tiny_decoder (release) and evaluates every cache on the Brown model's held-out text.
# Arguments go to examples/tiny_decoder/quality.py (e.g. --jobs 1, --distance 300).
set -euo pipefail
cd "$(dirname "$0")/.."  # the outputs below are the repository's

scripts/deps.sh g++ cmake ninja-build libeigen3-dev libxxhash-dev python3-matplotlib

cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCACHE_NATIVE=ON \
  -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=ON \
  -DKVCACHE_INSTALL=OFF >/dev/null
cmake --build build/demo --target tiny_decoder >/dev/null
exec /usr/bin/python3 examples/tiny_decoder/quality.py --decoder build/demo/examples/tiny_decoder \
  --plot examples/tiny_decoder/brown/window_probe.png --json build/quality/results.json "$@"
