#!/usr/bin/env bash
# The main job: install what is missing, build loom, and train the character-level language
# model of examples/char_lm.cpp on Moby-Dick (about two minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dtests=false
ninja -C build
./build/examples/char_lm "$@"
