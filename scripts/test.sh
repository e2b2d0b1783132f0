#!/usr/bin/env bash
# Installs what is missing, builds loom three times and runs the suite in each: plain, with
# AddressSanitizer + UndefinedBehaviorSanitizer (the whole suite), and with ThreadSanitizer
# (the thread tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --tests

# allocator_may_return_null: an allocation too large to satisfy returns null, as it does
# without ASan, so loom reports it as a loom::Error instead of ASan aborting.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
passed=0 failed=0
for config in plain sanitized tsan; do
    dir=build-test-$config
    opts=(-Dtests=true)
    [ "$config" = sanitized ] && opts+=(-Dsanitize=true -Dbuildtype=debugoptimized)
    [ "$config" = tsan ] && opts+=(-Dtsan=true -Dbuildtype=debugoptimized)
    if [ -f "$dir/build.ninja" ]; then meson setup --reconfigure "$dir" "${opts[@]}" >/dev/null
    else meson setup "$dir" "${opts[@]}" >/dev/null; fi
    if [ "$config" = tsan ]; then ninja -C "$dir" tests/test_threads; else ninja -C "$dir"; fi
    echo "== $config build: tests"
    status=0
    # OpenBLAS's own threads are not instrumented: one thread keeps ThreadSanitizer's view whole.
    if [ "$config" = tsan ]; then OPENBLAS_NUM_THREADS=1 meson test -C "$dir" --no-rebuild --print-errorlogs threads || status=$?
    else meson test -C "$dir" --print-errorlogs --num-processes 2 || status=$?; fi
    results=$dir/meson-logs/testlog.json  # one line per test
    ok=$(grep -c '"result": "OK"' "$results" || true)
    bad=$(grep -vc '"result": "OK"' "$results" || true)
    [ "$status" -eq 0 ] || [ "$bad" -gt 0 ] || bad=1  # meson failed before running a test
    passed=$((passed + ok)) failed=$((failed + bad))
done
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
