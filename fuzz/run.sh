#!/usr/bin/env bash
# Builds the safetensors fuzz target with clang (libFuzzer + ASan + UBSan) and runs it.
# Usage: fuzz/run.sh [seconds]   (default 600). Needs clang and libclang-rt-14-dev.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
out=build-fuzz
mkdir -p "$out/corpus"
cp tests/data/*.safetensors "$out/corpus/"  # real files as seeds
flags="-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude"
clang++ $flags $(pkg-config --cflags fmt openblas) core/*.cpp autograd/*.cpp nn/*.cpp fuzz/fuzz_safetensors.cpp \
    $(pkg-config --libs fmt openblas) -o "$out/fuzz_safetensors"
"$out/fuzz_safetensors" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -print_final_stats=1 "$out/corpus"
