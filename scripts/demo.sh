#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the examples (release, -march=native) and runs the tiny decoder: prefill, then
# generation with and without the KV cache. Installs missing Debian packages first.
# By default it runs the model trained on the Brown corpus (examples/tiny_decoder/brown) on an
# English prompt and prints the continuation; --random runs random weights instead.
# Other arguments go to tiny_decoder, e.g. scripts/demo.sh --prompt "The river" --gen 300;
# file names in them are relative to the current directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

"$root/scripts/deps.sh" g++ cmake ninja-build libeigen3-dev libxxhash-dev

cmake -S "$root" -B "$root/build/demo" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCACHE_NATIVE=ON \
  -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=ON \
  -DKVCACHE_INSTALL=OFF >/dev/null
cmake --build "$root/build/demo" >/dev/null

model="$root/examples/tiny_decoder/brown"
args=()
random=0 own_model=0 own_prompt=0 own_sampling=0 value=0
for arg in "$@"; do
  if [ "$value" = 1 ]; then  # the value of the option before: passed on as it is
    value=0
    args+=("$arg")
    continue
  fi
  case "$arg" in
    --random) random=1; continue ;;
    --checkpoint|--tokenizer|--dim|--hidden|--layers|--heads|--kv-heads|--vocab) own_model=1 ;;
    --prompt|--prompt-tokens|--prompt-len|--eval|--eval-json) own_prompt=1 ;;
    --temperature) own_sampling=1 ;;
  esac
  case "$arg" in
    --json|--help|-h) ;;
    --*) value=1 ;;
  esac
  args+=("$arg")
done
defaults=()
if [ "$random" = 0 ] && [ "$own_model" = 0 ]; then
  defaults+=(--checkpoint "$model/model.bin" --tokenizer "$model/tokenizer.bin" --gen 200)
  [ "$own_prompt" = 0 ] && defaults+=(--prompt "The committee said that the city")
  [ "$own_sampling" = 0 ] && defaults+=(--temperature 0.8 --top-p 0.9)
fi
exec "$root/build/demo/examples/tiny_decoder" ${defaults[@]+"${defaults[@]}"} ${args[@]+"${args[@]}"}
