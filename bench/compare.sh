#!/usr/bin/env bash
# Races loom against PyTorch on the reference workloads, each in its own process, in one run,
# and prints the ratio of median step times (loom / PyTorch: below 1 means loom is faster).
# Usage: bench/compare.sh [build dir] [workloads...]   Needs Debian's python3-torch.
# THREADS=n (default 2) sets both sides' threads for W1-W6 and W8 (W7 runs on one); PYTHON names
# another interpreter with torch (default /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
threads=${THREADS:-2}
python=${PYTHON:-/usr/bin/python3}
shift || true
workloads=${*:-W1-rnn W1-gru W1-lstm W1-cell W2-lstm W2-gru W3 W4 W4-cell W5 W5-checkpoint W6 W7 W8-mingru W8-gru}
reference=../shared/bench/torch_reference.py
[ -f bench/torch_reference.py ] && reference=bench/torch_reference.py
ms() { sed -n 's/.* ms=\([0-9.]*\).*/\1/p'; }
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; }
printf '%-8s %-6s %12s %12s %8s %12s %12s %10s %10s\n' workload mode "loom ms" "torch ms" ratio \
    "loom GF/s" "torch GF/s" "loom MiB" "torch MiB"
# W7, ADBench's LSTM objective: loom's primal and gradient, the plain C++ primal and PyTorch's
# gradient, each ratio named on its line.
adbench() {
    local out primal gradient plain torch scan_primal scan_gradient
    out=$("$build/bench/adbench_lstm")
    primal=$(grep loom-primal <<<"$out" | ms)
    gradient=$(grep loom-gradient <<<"$out" | ms)
    plain=$(grep plain-primal <<<"$out" | ms)
    torch=$("$python" "$reference" W7 | ms)
    printf '%-8s %-6s %12s %12s %8.3f   loom gradient / torch gradient\n' W7 grad "$gradient" "$torch" \
        "$(echo "$gradient / $torch" | bc -l)"
    printf '%-8s %-6s %12s %12s %8.2f   loom gradient / loom primal (%s ms)\n' W7 grad "$gradient" "" \
        "$(echo "$gradient / $primal" | bc -l)" "$primal"
    printf '%-8s %-6s %12s %12s %8.2f   loom primal / plain C++ primal (%s ms)\n' W7 primal "$primal" "" \
        "$(echo "$primal / $plain" | bc -l)" "$plain"
    scan_primal=$(grep scan-primal <<<"$out" | ms)
    scan_gradient=$(grep scan-gradient <<<"$out" | ms)
    printf '%-8s %-6s %12s %12s %8.3f   loom gradient with scan / torch gradient\n' W7 scan "$scan_gradient" \
        "$torch" "$(echo "$scan_gradient / $torch" | bc -l)"
    printf '%-8s %-6s %12s %12s %8.2f   loom gradient with scan / its primal (%s ms)\n' W7 scan "$scan_gradient" "" \
        "$(echo "$scan_gradient / $scan_primal" | bc -l)" "$scan_primal"
}
# W3 and W2-lstm against their GEMMs alone (workloads W3-sgemm, W2-lstm-sgemm: the same shapes
# straight on OpenBLAS), phase by phase: the share of the sgemm rate loom reaches in inference,
# and in a training step's forward and backward.
sgemm_share() {
    local w=$1 limit f b
    limit=$("$build/bench/workloads" "$w-sgemm" --threads "$threads")
    f=$(field forward_ms <<<"$limit")
    b=$(field backward_ms <<<"$limit")
    printf '%-8s %-6s %12s %12s %7.0f%%   sgemm alone %s ms / loom %s ms\n' "$w" infer "$infer_ms" "" \
        "$(echo "100 * $f / $infer_ms" | bc -l)" "$f" "$infer_ms"
    printf '%-8s %-6s %12s %12s %7.0f%%   sgemm alone %s ms / loom %s ms (forward of a training step)\n' "$w" fwd \
        "$forward_ms" "" "$(echo "100 * $f / $forward_ms" | bc -l)" "$f" "$forward_ms"
    printf '%-8s %-6s %12s %12s %7.0f%%   sgemm alone %s ms / loom %s ms (backward)\n' "$w" bwd "$backward_ms" "" \
        "$(echo "100 * $b / $backward_ms" | bc -l)" "$b" "$backward_ms"
}
declare -A train_ms infer_ms_of
for w in $workloads; do
    if [ "$w" = W7 ]; then adbench; continue; fi
    for mode in train infer; do
        flag=$([ $mode = infer ] && echo --infer || true)
        # W5-checkpoint: loom's W5 with checkpoint(true) against PyTorch's plain W5.
        lw=${w%-checkpoint}
        extra=$([ "$lw" != "$w" ] && echo --checkpoint || true)
        lo=$("$build/bench/workloads" "$lw" --threads "$threads" $flag $extra)
        to=$("$python" "$reference" "$lw" --threads "$threads" $flag)
        l=$(ms <<<"$lo")
        t=$(ms <<<"$to")
        printf '%-8s %-6s %12s %12s %8.2f %12s %12s %10s %10s\n' "$w" "$mode" "$l" "$t" "$(echo "$l / $t" | bc -l)" \
            "$(field gflops <<<"$lo")" "$(field gflops <<<"$to")" "$(field peak_rss_mib <<<"$lo")" \
            "$(field peak_rss_mib <<<"$to")"
        if [ $mode = train ]; then
            train_ms[$w]=$l
            forward_ms=$(field forward_ms <<<"$lo")
            backward_ms=$(field backward_ms <<<"$lo")
        else
            infer_ms=$l
            infer_ms_of[$w]=$l
        fi
    done
    if [ "$w" = W3 ] || [ "$w" = W2-lstm ]; then sgemm_share "$w"; fi
done
# W8: how much faster loom trains a minGRU than its own fused GRU of the same width.
if [ -n "${train_ms[W8-mingru]:-}" ] && [ -n "${train_ms[W8-gru]:-}" ]; then
    printf '%-8s %-6s %12s %12s %8.2f   loom GRU / loom minGRU, training step\n' W8 train "${train_ms[W8-gru]}" \
        "${train_ms[W8-mingru]}" "$(echo "${train_ms[W8-gru]} / ${train_ms[W8-mingru]}" | bc -l)"
fi
# A user's LSTM cell through Recurrent<Cell> (replayed by scan) against loom's fused LSTM of the
# same sizes: W1-cell against W1-lstm, W4-cell against W2-lstm (the same model as W4's).
for pair in W1-cell:W1-lstm W4-cell:W2-lstm; do
    cell=${pair%%:*} fused=${pair##*:}
    if [ -n "${train_ms[$cell]:-}" ] && [ -n "${train_ms[$fused]:-}" ]; then
        printf '%-8s %-6s %12s %12s %8.2f   loom %s / loom %s (fused), training step\n' "$cell" train \
            "${train_ms[$cell]}" "${train_ms[$fused]}" "$(echo "${train_ms[$cell]} / ${train_ms[$fused]}" | bc -l)" \
            "$cell" "$fused"
        printf '%-8s %-6s %12s %12s %8.2f   loom %s / loom %s (fused), inference\n' "$cell" infer \
            "${infer_ms_of[$cell]}" "${infer_ms_of[$fused]}" \
            "$(echo "${infer_ms_of[$cell]} / ${infer_ms_of[$fused]}" | bc -l)" "$cell" "$fused"
    fi
done
