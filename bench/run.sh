#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds kvcache_bench (release, -march=native), runs every benchmark with repetitions, and
# turns the medians into bench/results/*.png and a Markdown table (bench/results/table.md).
# Extra arguments go to the benchmark, e.g. bench/run.sh --benchmark_filter=decode_attention;
# a run limited by --benchmark_filter updates its benchmarks in results.json and keeps the
# others. When the build has the serve example (examples/serve), it also serves 16 requests at
# each --max-batch of 1 2 4 8 16 and plots tokens/s and KV memory against the batch size.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh g++ cmake ninja-build libeigen3-dev libxxhash-dev libgtest-dev libgmock-dev \
  libbenchmark-dev python3-matplotlib

# The examples too, for serve's plots (the preset leaves them out of CI's release build).
cmake --preset release -DKVCACHE_BUILD_EXAMPLES=ON >/dev/null
targets=(kvcache_bench)
# grep reads to the end (no -q): under pipefail an early exit would fail the pipe.
if cmake --build --preset release --target help | grep '^serve: ' >/dev/null; then
  targets+=(serve)
fi
cmake --build --preset release --target "${targets[@]}"
mkdir -p bench/results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

build/release/bench/kvcache_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_out="$tmp/run.json" --benchmark_out_format=json "$@"
mode=replace
for arg in "$@"; do
  case "$arg" in --benchmark_filter=*) mode=merge ;; esac
done
# Debian's python3, which has matplotlib; another python3 may come first on PATH.
/usr/bin/python3 bench/merge.py bench/results/results.json benchmarks "$tmp/run.json" "$mode"

serve=build/release/examples/serve
if [ -x "$serve" ]; then
  reports=()
  for batch in 1 2 4 8 16; do
    echo "==> serve --requests 16 --max-batch $batch --json"
    "$serve" --requests 16 --max-batch "$batch" --json >"$tmp/serve_$batch.json"
    reports+=("$batch=$tmp/serve_$batch.json")
  done
  /usr/bin/python3 bench/merge.py bench/results/results.json serve "${reports[@]}"
else
  echo "==> no $serve in this build: serve_throughput.png and serve_memory.png skipped"
fi

/usr/bin/python3 bench/plot.py bench/results/results.json bench/results | tee bench/results/table.md
