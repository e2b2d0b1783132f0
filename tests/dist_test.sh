#!/usr/bin/env bash
# loom::dist under mpirun -np 2: equivalence with one process, and faults that must end the job
# within a time limit instead of hanging. $1: the dist_check program.
set -uo pipefail
check_program=$1
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

echo "$failures dist check(s) failed"
[ "$failures" -eq 0 ]
