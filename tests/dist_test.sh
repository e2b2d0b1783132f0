#!/usr/bin/env bash
# loom::dist under mpirun -np 2: equivalence with one process, and faults that must end the job
# within a time limit instead of hanging; char_lm and classify_sequences under mpirun.
# $1: the dist_check program, $2: the folder of the built examples.
set -uo pipefail
check_program=$(realpath "$1") examples=$(realpath "$2")  # meson passes paths relative to the build folder
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# As root in a container: allow it, oversubscribe the cores, and copy through shared memory
# without the cross-memory attach that containers usually forbid.
export OMPI_MCA_btl_vader_single_copy_mechanism=none
mpirun=(mpirun -np 2 --oversubscribe --allow-run-as-root)
failures=0
check() {  # check NAME DESCRIPTION OK
    if [ "$3" = 1 ]; then echo "ok   $1: $2"; else echo "FAIL $1: $2"; failures=$((failures + 1)); fi
}

rc=0; timeout 120 "${mpirun[@]}" "$check_program" equivalence > equivalence.out 2>&1 || rc=$?
cat equivalence.out
check equivalence "exit $rc" "$([ "$rc" = 0 ] && grep -q '^equivalent' equivalence.out && echo 1 || echo 0)"

start=$SECONDS; rc=0; timeout 60 "${mpirun[@]}" "$check_program" mismatch > mismatch.out 2>&1 || rc=$?
check "model mismatch" "exit $rc in $((SECONDS - start)) s: $(grep -m1 'differs' mismatch.out)" \
    "$([ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q 'is \"parameter head.weight float64 \[2, 5\]\" here but \"parameter head.weight float64 \[1, 5\]\" on rank 0' mismatch.out && echo 1 || echo 0)"

# Processes that pass different things: each ends with a loom::Error naming the difference, in seconds.
for mode in averager_count averager_dtype averager_shape negative_weight overlap_weight fit_sizes; do
    case $mode in
        averager_count) expected="the averager's parameter list differs across processes" ;;
        averager_dtype) expected='float32' ;;
        averager_shape) expected='\[2\]' ;;
        negative_weight) expected='got -1' ;;
        overlap_weight) expected='expects the weight given to start_during_backward() (1), got 2' ;;
        fit_sizes) expected='"41 examples' ;;
    esac
    start=$SECONDS; rc=0; timeout 60 "${mpirun[@]}" "$check_program" $mode > $mode.out 2>&1 || rc=$?
    check "$mode" "exit $rc in $((SECONDS - start)) s: $(grep -m1 'caught' $mode.out)" \
        "$([ "$rc" = 0 ] && grep -q '^rank 0 caught: dist\|^rank 0 caught: GradientAverager' $mode.out \
            && grep -q '^rank 1 caught: ' $mode.out && grep -q "$expected" $mode.out && echo 1 || { cat $mode.out; echo 0; })"
done

start=$SECONDS; rc=0; timeout 60 "${mpirun[@]}" "$check_program" throw > throw.out 2>&1 || rc=$?
check "exception on one rank" "exit $rc in $((SECONDS - start)) s: $(grep -m1 'rank 1:' throw.out)" \
    "$([ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q 'rank 1: a bad batch on purpose at step 3' throw.out && echo 1 || echo 0)"

start=$SECONDS; rc=0
timeout 60 "${mpirun[@]}" "$check_program" train > killed.out 2>&1 &
job=$!
for _ in $(seq 100); do [ -s pid.1 ] && break; sleep 0.1; done
sleep 1
kill -9 "$(cat pid.1)" 2> /dev/null
wait "$job" || rc=$?
check "SIGKILL of one rank" "exit $rc in $((SECONDS - start)) s: $(grep -m1 -i 'signal' killed.out)" \
    "$([ -s pid.1 ] && [ "$rc" != 0 ] && [ "$rc" != 124 ] && echo 1 || echo 0)"

# The examples under mpirun: char_lm with its own streams per process, resumed by one process
# from the checkpoint the two wrote; classify_sequences through train::fit.
rc=0; timeout 120 "${mpirun[@]}" "$examples/char_lm" --steps 40 --epochs 1 --batch 8 --seq-len 32 --hidden 32 --embed 16 \
    --out lm > char_lm.out 2>&1 || rc=$?
bpc=$(sed -n 's/^val_bpc \([0-9.]*\)/\1/p' char_lm.out)
check "char_lm, 2 processes" "exit $rc, val_bpc $bpc; $(grep -m1 'in all' char_lm.out)" \
    "$([ "$rc" = 0 ] && grep -q 'per process, .* in all (2 processes)' char_lm.out && awk -v b="$bpc" 'BEGIN { exit !(b != "" && b < 6.36 * 0.85) }' && echo 1 || echo 0)"
rc=0; timeout 120 "$examples/char_lm" --steps 60 --epochs 2 --batch 8 --seq-len 32 --hidden 32 --embed 16 --out lm --resume \
    > char_lm_resume.out 2>&1 || rc=$?
check "char_lm, resumed by 1 process" "exit $rc: $(grep -m1 resumed char_lm_resume.out)" \
    "$([ "$rc" = 0 ] && grep -q 'resumed from .* at step 40' char_lm_resume.out && grep -q '^val_bpc' char_lm_resume.out && echo 1 || echo 0)"
rc=0; timeout 120 "${mpirun[@]}" "$examples/classify_sequences" --epochs 4 > classify.out 2>&1 || rc=$?
acc=$(sed -n 's/^test_accuracy \([0-9.]*\)/\1/p' classify.out)
check "classify_sequences, 2 processes" "exit $rc, test accuracy $acc, chance 0.33" \
    "$([ "$rc" = 0 ] && grep -q '^2 processes' classify.out && awk -v a="$acc" 'BEGIN { exit !(a != "" && a > 0.6) }' && echo 1 || echo 0)"

echo "$failures dist check(s) failed"
[ "$failures" -eq 0 ]
