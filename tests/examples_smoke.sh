#!/usr/bin/env bash
# Runs every example with tiny settings and fixed seeds, and checks that it learned something:
# a loss well below its start, or a score better than chance or the baseline.
set -euo pipefail
examples=$(cd "$1/examples" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
failures=0
check() {  # check NAME CONDITION-DESCRIPTION AWK-EXPRESSION-ON-$out
    local name=$1 what=$2 ok=$3
    if [ "$ok" = 1 ]; then echo "ok   $name: $what"; else echo "FAIL $name: $what"; failures=$((failures + 1)); fi
}
value() { sed -n "s/^$1 \([-0-9.e+]*\).*/\1/p" "$2" | tail -n 1; }
ratio_ok() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { print (a != "" && b != "" && a + 0 < (b + 0) * f) ? 1 : 0 }'; }

"$examples/rnn_by_hand" > rnn_by_hand.out
first=$(sed -n 's/^step *0  loss \([0-9.]*\)/\1/p' rnn_by_hand.out); last=$(tail -n 1 rnn_by_hand.out | awk '{print $4}')
check rnn_by_hand "loss $first -> $last, below a tenth" "$(ratio_ok "$last" "$first" 0.1)"

"$examples/readme_rnn" > readme_rnn.out
check readme_rnn "prints the loss and dL/db" "$(grep -q '^dL/db tensor' readme_rnn.out && echo 1 || echo 0)"

"$examples/readme_training" > readme_training.out
last=$(tail -n 1 readme_training.out | awk '{print $4}')
check readme_training "loss $last, well below ln 8 = 2.08" "$(ratio_ok "$last" 2.08 0.5)"

"$examples/custom_cell" > custom_cell.out  # exits non-zero unless its gradcheck passes and it learns
check custom_cell "$(tail -n 1 custom_cell.out)" 1

"$examples/extending" > extending.out  # exits non-zero unless its op gradchecks and its optimizer learns
check extending "$(sed -n 2p extending.out)" 1

"$examples/custom_op" > custom_op.out  # exits non-zero unless both ops check out (first and second order) and both fits work
check custom_op "$(tail -n 1 custom_op.out)" 1

"$examples/inspect" --dot inspect.dot > inspect.out
dot -Tsvg inspect.dot -o inspect.svg  # graphviz renders the tape's DOT
check inspect "anomaly names 'log' at decoder/step 3; the report and the graph are there" \
    "$(grep -q "forward of 'log' (tape entry #[0-9]*, in scope 'decoder/step 3')" inspect.out &&
       grep -q 'update/weight' inspect.out && grep -q '<svg' inspect.svg && echo 1 || echo 0)"

"$examples/gradient_flow" --length 40 --steps 60 --out . > gradient_flow.out
# At initialisation the gradient reaching step 1 is far larger through an LSTM than a tanh RNN,
# and clipping keeps the exploding ReLU RNN's loss small while the unclipped one blows up.
ratios=$(grep '^|dL/dh_1| / |dL/dh_T|:' gradient_flow.out)
rnn=$(sed -n 's/.*RNN init \([-0-9.e+]*\).*/\1/p' <<<"$ratios"); lstm=$(sed -n 's/.*LSTM init \([-0-9.e+]*\).*/\1/p' <<<"$ratios")
unclipped=$(grep '^not clipped' gradient_flow.out | sed 's/.*60: [^|]*| \([-0-9.e+]*\).*/\1/')
clipped=$(grep '^clipped at 1' gradient_flow.out | sed 's/.*60: [^|]*| \([-0-9.e+]*\).*/\1/')
check gradient_flow "dh_1/dh_T at init: RNN $rnn, LSTM $lstm; loss at step 60: clipped $clipped, not $unclipped" \
    "$(awk -v r="$rnn" -v l="$lstm" -v c="$clipped" -v u="$unclipped" 'BEGIN { print (l > 1000 * r && c < 1 && u > 1000 * c) ? 1 : 0 }')"
test -s gradient_flow.svg && test -s exploding_loss.svg && test -s deep_stack.svg

"$examples/next_number" --epochs 300 > next_number.out
first=$(sed -n 's/.*(first epoch \([0-9.]*\)).*/\1/p' next_number.out); last=$(sed -n 's/^train loss: \([0-9.]*\).*/\1/p' next_number.out)
check next_number "train loss $first -> $last" "$(ratio_ok "$last" "$first" 0.05)"

"$examples/classify_sequences" --epochs 3 --sequences 800 > classify.out
acc=$(value test_accuracy classify.out)
check classify_sequences "test accuracy $acc, chance 0.33" "$(awk -v a="$acc" 'BEGIN { print (a > 0.6) ? 1 : 0 }')"

"$examples/adding_problem" --lengths 20 --models gru --steps 300 > adding.out
mse=$(awk '$1 == "gru" { print $3 }' adding.out)
check adding_problem "GRU test MSE $mse at T = 20, guessing 0.167" "$(ratio_ok "$mse" 0.167 0.5)"

"$examples/forecast" --epochs 3 > forecast.out
first=$(value train_loss_first forecast.out); last=$(value train_loss_last forecast.out)
check forecast "train loss $first -> $last, test_rmse $(value test_rmse forecast.out)" "$(ratio_ok "$last" "$first" 0.7)"
"$examples/forecast" --synthetic --epochs 2 > forecast_synthetic.out
check "forecast --synthetic" "test_rmse $(value test_rmse forecast_synthetic.out)" "$(grep -q '^test_rmse [0-9]' forecast_synthetic.out && echo 1 || echo 0)"

"$examples/char_lm" --steps 40 --epochs 1 --batch 8 --seq-len 32 --hidden 32 --embed 16 --out lm > char_lm.out
bpc=$(value val_bpc char_lm.out)
check char_lm "val_bpc $bpc, uniform guessing 6.36" "$(ratio_ok "$bpc" 6.36 0.85)"
"$examples/char_lm" --steps 60 --epochs 2 --batch 8 --seq-len 32 --hidden 32 --embed 16 --out lm --resume > char_lm_resume.out
check "char_lm --resume" "$(grep -m1 resumed char_lm_resume.out)" "$(grep -q 'resumed from .* at step 40' char_lm_resume.out && echo 1 || echo 0)"

echo "$failures example(s) failed"
[ "$failures" -eq 0 ]
