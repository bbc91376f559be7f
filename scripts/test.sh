#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds and runs every test: the AddressSanitizer + UndefinedBehaviorSanitizer build (-Og,
# assertions on, warnings as errors) with every test, the release build (-DNDEBUG, -march=native)
# with the SIMD kernels' tests and the allocation counter, whose benchmarks then run once each
# (but the uncached baselines' longest contexts, which recompute every token), and the kernels'
# tests built by clang for AVX2 without AVX-512 (x86-64-v3; on a machine without AVX-512 the
# release build is that already, and the avx2 preset is skipped: both compilers build the SIMD
# paths, and clang builds these tests in under half GCC's time); then, as an extra stage, the
# fuzz build (clang, libFuzzer), whose fuzzers each run for 20 seconds (the CMake cache variable
# KVCACHE_FUZZ_SECONDS). The Redis tier's tests start redis-server (installed here with
# hiredis) on a loopback port. The dev preset (assertions without the sanitizers) runs the same
# tests as the sanitized build but the allocation counter, which the release build runs: it is
# for working on the code (`scripts/test.sh dev`), not needed for a full run.
# Installs missing Debian packages first. Usage: scripts/test.sh [preset...]
set -euo pipefail
cd "$(dirname "$0")/.."

presets=("$@")
if [ ${#presets[@]} -eq 0 ]; then
  presets=(asan release avx2 fuzz)
  # Without AVX-512 the release build's -march=native is the AVX2 the avx2 preset would test.
  if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    echo "==> kvcache: no AVX-512 here: the release build tests the AVX2 kernels (avx2 preset skipped)"
    presets=(asan release fuzz)
  fi
fi

packages=(g++ cmake ninja-build pkg-config libeigen3-dev libxxhash-dev libgtest-dev libgmock-dev
  libbenchmark-dev libhiredis-dev redis-server)
for preset in "${presets[@]}"; do
  if [ "$preset" = avx2 ]; then packages+=(clang); fi
  if [ "$preset" = fuzz ]; then packages+=(clang libclang-rt-14-dev); fi
done
scripts/deps.sh "${packages[@]}"

for preset in "${presets[@]}"; do
  if [ "$preset" = fuzz ]; then
    echo "==> kvcache: extra stage: fuzzers (clang, libFuzzer, ASan + UBSan)"
  fi
  echo "==> kvcache: ${preset} build"
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset"
  echo "==> kvcache: ${preset} tests"
  ctest --preset "$preset"
  if [ "$preset" = release ]; then
    echo "==> kvcache: every benchmark once, briefly, so they keep building and running"
    # One iteration of the uncached baselines at 512 tokens and more takes up to 25 s; their
    # shorter contexts run the same code.
    build/release/bench/kvcache_bench --benchmark_min_time=0.001 \
      --benchmark_filter='-/uncached/(512|2048|4096)$' >/dev/null
    build/release/bench/store_bench --benchmark_min_time=0.001 >/dev/null
  fi
done
echo "==> kvcache: all tests passed (${presets[*]})"
