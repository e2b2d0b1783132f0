#!/usr/bin/env bash
# The tape's goals in instructions, which a shared machine's drifting clock cannot move: W7
# (ADBench's LSTM objective) per objective, and bench_tape's adds per op, each counted by
# cachegrind as the difference of two runs that differ only in how many objectives or ops they
# run, so that start-up, set-up and the first objective's warm-up cancel out.
# With --misses it also counts what W7 misses in a simulated cache (cachegrind's D1 of 32 KiB and
# last level of 1 MiB, about one core's L2 here): the primal stays in the caches and the gradient
# does not, which is why the gradient / primal ratio timed sits above the counted one. The
# simulation ignores software prefetches, so it tells where the gradient waits, not how long.
# Usage: bench/instructions.sh [build dir] [--misses]   Needs valgrind (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build misses=
for arg in "$@"; do
    case $arg in
        --misses) misses=yes ;;
        -*) echo "instructions.sh: unknown option '$arg' (the one there is: --misses)" >&2; exit 2 ;;
        *) build=$arg ;;
    esac
done
command -v valgrind >/dev/null || { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }

# Instructions of one run of the command given.
instructions() {
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$@" 2>&1 >/dev/null |
        sed -n 's/.*I *refs: *\([0-9,]*\).*/\1/p' | tr -d ,
}

# W7: one objective of each kind is (3 objectives - 1 objective) / 2.
declare -A w7
for kind in plain primal gradient; do
    one=$(instructions "$build/bench/adbench_lstm" --count "$kind" 1)
    three=$(instructions "$build/bench/adbench_lstm" --count "$kind" 3)
    w7[$kind]=$(((three - one) / 2))
done
printf 'W7 per objective: plain C++ %d, loom primal %d, loom gradient %d instructions\n' \
    "${w7[plain]}" "${w7[primal]}" "${w7[gradient]}"
printf 'W7 loom gradient / loom primal %.2f (goal <= 2.5), loom primal / plain C++ %.2f (goal <= 3)\n' \
    "$(echo "${w7[gradient]} / ${w7[primal]}" | bc -l)" "$(echo "${w7[primal]} / ${w7[plain]}" | bc -l)"

if [ -n "$misses" ]; then
    # Data misses of one run, D1 and last level: "d1 ll".
    data_misses() {
        valgrind --tool=cachegrind --cache-sim=yes --D1=32768,8,64 --LL=1048576,16,64 --cachegrind-out-file=/dev/null \
            "$@" 2>&1 >/dev/null | awk '/D1 +misses:/ {gsub(",", "", $4); d1 = $4} /LLd +misses:/ {gsub(",", "", $4); ll = $4}
                                         END {print d1, ll}'
    }
    for kind in primal gradient; do
        read -r d1_one ll_one < <(data_misses "$build/bench/adbench_lstm" --count "$kind" 1)
        read -r d1_three ll_three < <(data_misses "$build/bench/adbench_lstm" --count "$kind" 3)
        printf 'W7 loom %s per objective, simulated data misses: D1 %d, last level %d\n' "$kind" \
            $(((d1_three - d1_one) / 2)) $(((ll_three - ll_one) / 2))
    done
fi

# bench_tape's adds: one iteration is (3000 iterations - 1000) / 2000; the swept chain's holds 64 adds.
iterations_of() {  # name, iterations
    LOOM_BENCH_ITERATIONS=$2 instructions "$build/bench/bench_tape" --benchmark_filter="^count/$1/"
}
declare -A op
for name in add_plain_vector add_no_grad add_recorded add_recorded_and_swept; do
    one=$(iterations_of "$name" 1000)
    three=$(iterations_of "$name" 3000)
    op[$name]=$(echo "($three - $one) / 2000" | bc -l)
done
op[add_recorded_and_swept]=$(echo "${op[add_recorded_and_swept]} / 64" | bc -l)
printf 'bench_tape per add: plain C++ %.0f, no grad %.0f, recorded %.0f, recorded and swept %.0f instructions\n' \
    "${op[add_plain_vector]}" "${op[add_no_grad]}" "${op[add_recorded]}" "${op[add_recorded_and_swept]}"
printf 'bench_tape x the plain add: no grad %.2f (goal <= 1.5), recorded %.2f (goal <= 2), recorded and swept %.2f (goal <= 5)\n' \
    "$(echo "${op[add_no_grad]} / ${op[add_plain_vector]}" | bc -l)" \
    "$(echo "${op[add_recorded]} / ${op[add_plain_vector]}" | bc -l)" \
    "$(echo "${op[add_recorded_and_swept]} / ${op[add_plain_vector]}" | bc -l)"
