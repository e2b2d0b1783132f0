#!/usr/bin/env bash
# The main job: install what is missing, build loom, and train the example model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dtests=false
ninja -C build
./build/examples/rnn_by_hand
