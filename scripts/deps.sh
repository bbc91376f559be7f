#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian packages kvcache's scripts need, when missing: `deps.sh PKG...`.
# Uses apt-get directly as root, through sudo otherwise; fails with a clear message when
# neither can install them.
set -euo pipefail

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
else
  echo "kvcache: not a Debian-based system; assuming these are installed: $*" >&2
  exit 0
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "kvcache: installing missing packages: ${missing[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo)
elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
  as_root=(sudo)  # sudo will ask for a password on the terminal
else
  echo "kvcache: error: missing packages ${missing[*]}, and no root or sudo to install them." >&2
  echo "kvcache: install them with: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  # A fresh machine has no package lists yet: fetch them once and try again.
  "${as_root[@]}" apt-get update -q
  "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" || {
    echo "kvcache: error: could not install ${missing[*]} with apt-get." >&2
    exit 1
  }
fi
