#!/usr/bin/env bash
# Installs what is missing, builds loom twice (plain, and with AddressSanitizer +
# UndefinedBehaviorSanitizer) and runs the whole test suite in both builds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
passed=0 failed=0
for config in plain sanitized; do
    dir=build-test-$config
    opts=(-Dtests=true)
    [ "$config" = sanitized ] && opts+=(-Dsanitize=true -Dbuildtype=debugoptimized)
    if [ -f "$dir/build.ninja" ]; then meson setup --reconfigure "$dir" "${opts[@]}" >/dev/null
    else meson setup "$dir" "${opts[@]}" >/dev/null; fi
    ninja -C "$dir"
    echo "== $config build: tests"
    status=0
    meson test -C "$dir" --print-errorlogs --num-processes 2 || status=$?
    results=$dir/meson-logs/testlog.json  # one line per test
    ok=$(grep -c '"result": "OK"' "$results" || true)
    bad=$(grep -vc '"result": "OK"' "$results" || true)
    [ "$status" -eq 0 ] || [ "$bad" -gt 0 ] || bad=1  # meson failed before running a test
    passed=$((passed + ok)) failed=$((failed + bad))
done
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
