#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds kvcache_bench (release, -march=native), runs every benchmark with repetitions, and
# turns the medians into bench/results/*.png and a Markdown table (bench/results/table.md).
# Extra arguments go to the benchmark, e.g. bench/run.sh --benchmark_filter=decode_attention
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh g++ cmake ninja-build libeigen3-dev libxxhash-dev libgtest-dev libgmock-dev \
  libbenchmark-dev python3-matplotlib

cmake --preset release >/dev/null
cmake --build --preset release --target kvcache_bench
mkdir -p bench/results
build/release/bench/kvcache_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_out=bench/results/results.json --benchmark_out_format=json "$@"
# Debian's python3, which has matplotlib; another python3 may come first on PATH.
/usr/bin/python3 bench/plot.py bench/results/results.json bench/results | tee bench/results/table.md
