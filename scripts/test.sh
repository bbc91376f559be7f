#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds and runs every test: the dev build (assertions, warnings as errors), the
# AddressSanitizer + UndefinedBehaviorSanitizer build, and the release build (-DNDEBUG).
# Installs missing Debian packages first. Usage: scripts/test.sh [preset...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh g++ cmake ninja-build libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev

presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(dev asan release)
for preset in "${presets[@]}"; do
  echo "==> kvcache: ${preset} build"
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset"
  echo "==> kvcache: ${preset} tests"
  ctest --preset "$preset"
done
echo "==> kvcache: all tests passed (${presets[*]})"
