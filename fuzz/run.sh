#!/usr/bin/env bash
# Builds a libFuzzer target with clang (libFuzzer + ASan + UBSan) and runs it; installs clang
# and its runtime if they are missing.
# Usage: fuzz/run.sh [safetensors|tensor|second_order] [seconds]   (defaults: safetensors, 600)
#   safetensors:  the file reader, seeded with the reference files of tests/data.
#   tensor:       the tensor API as programs of calls, seeded with fuzz/corpus/tensor; new
#                 inputs that add coverage are kept there (the suite replays that folder).
#   second_order: programs of smooth ops whose Hessian-vector products (grad with create_graph,
#                 then grad again) must equal finite differences of their gradients; corpus in
#                 fuzz/corpus/second_order, replayed by the suite too.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-safetensors}
seconds=${2:-600}
missing=()
for p in clang libclang-rt-14-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
out=build-fuzz
flags="-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude"
mkdir -p "$out"
clang++ $flags $(pkg-config --cflags fmt openblas) core/*.cpp autograd/*.cpp nn/*.cpp "fuzz/fuzz_$target.cpp" \
    $(pkg-config --libs fmt openblas) -o "$out/fuzz_$target"
# An allocation over 512 MiB returns null, as it would on a small machine: loom must report it.
export ASAN_OPTIONS=allocator_may_return_null=1:max_allocation_size_mb=512:detect_leaks=1
export OPENBLAS_NUM_THREADS=1
if [ "$target" = safetensors ]; then
    mkdir -p "$out/corpus"
    cp tests/data/*.safetensors "$out/corpus/"  # real files as seeds
    corpus=("$out/corpus")
    max_len=4096
else
    mkdir -p "fuzz/corpus/$target"
    corpus=("fuzz/corpus/$target")
    max_len=256
fi
"$out/fuzz_$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=3072 -malloc_limit_mb=1024 \
    -max_len=$max_len -print_final_stats=1 -artifact_prefix="$out/" "${corpus[@]}"
