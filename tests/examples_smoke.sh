#!/usr/bin/env bash
# Runs every example with tiny settings and fixed seeds, and checks that it learned something:
# a loss well below its start, or a score better than chance or the baseline.
set -euo pipefail
examples=$(cd "$1/examples" && pwd)
decode_events=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")  # FILE PROTO_DIR: an event file, decoded
proto_dir=$(cd "$3" && pwd)
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

"$examples/custom_cell" --trace trace.json > custom_cell.out  # exits non-zero unless its gradcheck passes and it learns
check custom_cell "$(grep '^mse fell' custom_cell.out); a profile and a timeline" \
    "$(grep -q '^(sweep bookkeeping)' custom_cell.out && grep -q '"traceEvents":\[{' trace.json && echo 1 || echo 0)"

"$examples/extending" > extending.out  # exits non-zero unless its op gradchecks and its optimizer learns
check extending "$(sed -n 2p extending.out)" 1

"$examples/custom_op" > custom_op.out  # exits non-zero unless both ops check out (first and second order) and both fits work
check custom_op "$(tail -n 1 custom_op.out)" 1

"$examples/inspect" --dot inspect.dot > inspect.out
dot -Tsvg inspect.dot -o inspect.svg  # graphviz renders the tape's DOT
check inspect "anomaly names 'log' at decoder/step 3; the report and the graph are there" \
    "$(grep -q "forward of 'log' (tape entry #[0-9]*, in scope 'decoder/step 3')" inspect.out &&
       grep -q 'update/weight' inspect.out && grep -q '<svg' inspect.svg && echo 1 || echo 0)"

"$examples/long_memory" --lengths 16,24 --time-lengths 32 --steps 150 --hidden 16 --layers 1 --ssm-state 2 --out . > long_memory.out
lines=$(grep -c '^test_accuracy_\|^test_mse_' long_memory.out || true)
best=$(sed -n 's/^test_accuracy_[a-z]* //p' long_memory.out | sort -g | tail -n 1)
check long_memory "$lines score lines, best copying accuracy $best (chance 0.125)" \
    "$([ "$lines" = 10 ] && test -s long_memory_time.svg && awk -v b="$best" 'BEGIN { print (b > 0.2) ? 1 : 0 }' || echo 0)"

"$examples/gradient_flow" --length 40 --steps 60 --out . > gradient_flow.out
# At initialisation the gradient reaching step 1 is far larger through an LSTM than a tanh RNN,
# and clipping keeps the exploding ReLU RNN's loss small while the unclipped one blows up.
ratios=$(grep '^|dL/dh_1| / |dL/dh_T|:' gradient_flow.out)
rnn=$(sed -n 's/.*RNN init \([-0-9.e+]*\).*/\1/p' <<<"$ratios"); lstm=$(sed -n 's/.*LSTM init \([-0-9.e+]*\).*/\1/p' <<<"$ratios")
unclipped=$(grep '^not clipped' gradient_flow.out | sed 's/.*60: [^|]*| \([-0-9.e+]*\).*/\1/')
clipped=$(grep '^clipped at 1' gradient_flow.out | sed 's/.*60: [^|]*| \([-0-9.e+]*\).*/\1/')
check gradient_flow "dh_1/dh_T at init: RNN $rnn, LSTM $lstm; loss at step 60: clipped $clipped, not $unclipped" \
    "$(awk -v r="$rnn" -v l="$lstm" -v c="$clipped" -v u="$unclipped" 'BEGIN { print (l > 1000 * r && c < 1 && u > 1000 * c) ? 1 : 0 }')"
test -s gradient_flow.svg && test -s exploding_loss.svg && test -s deep_stack.svg && grep -q "id=\"heatmap-1\"" gradient_flow.html

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

"$examples/char_lm" --steps 40 --epochs 1 --batch 8 --seq-len 32 --hidden 32 --embed 16 --out lm --tensorboard board > char_lm.out
bpc=$(value val_bpc char_lm.out)
check char_lm "val_bpc $bpc, uniform guessing 6.36" "$(ratio_ok "$bpc" 6.36 0.85)"
# --tensorboard: every frame's checksums hold and protoc decodes every record: 40 step losses, the
# model's summary, and the epoch's val_bpc as printed (histograms come every 100 steps: none here).
"$decode_events" board/events.out.tfevents.* "$proto_dir" > board.txt
losses=$(grep -c 'tag: "batch/loss"' board.txt || true)
logged_bpc=$(grep -A1 'tag: "epoch/val_bpc"' board.txt | sed -n 's/.*simple_value: \([-0-9.e+]*\).*/\1/p')
check "char_lm --tensorboard" "$losses step losses (40), val_bpc $logged_bpc (printed $bpc), summary $(grep -c 'plugin_name: "text"' board.txt)" \
    "$(awk -v n="$losses" -v a="$logged_bpc" -v b="$bpc" -v t="$(grep -c 'plugin_name: "text"' board.txt)" \
        'BEGIN { d = a - b; if (d < 0) d = -d; print (n == 40 && a != "" && d < 1e-3 && t == 1) ? 1 : 0 }')"
for cell in mingru minlstm ssm; do  # the linear-recurrent layers, two stacked
    "$examples/char_lm" --cell $cell --layers 2 --steps 40 --epochs 1 --batch 8 --seq-len 32 --hidden 32 --embed 16 \
        --lr 0.01 --out lm_$cell > char_lm_$cell.out
    bpc=$(value val_bpc char_lm_$cell.out)
    check "char_lm --cell $cell" "val_bpc $bpc, uniform guessing 6.36" "$(ratio_ok "$bpc" 6.36 0.85)"
done
"$examples/char_lm" --steps 60 --epochs 2 --batch 8 --seq-len 32 --hidden 32 --embed 16 --out lm --resume > char_lm_resume.out
check "char_lm --resume" "$(grep -m1 resumed char_lm_resume.out)" "$(grep -q 'resumed from .* at step 40' char_lm_resume.out && echo 1 || echo 0)"

"$examples/pronounce" --steps 300 --minutes 0 --hidden 64 --embed 32 --eval-words 300 --beam 2 --svg attention.svg > pronounce.out
per=$(value test_per pronounce.out)
check pronounce "PER $per and WER $(value test_wer pronounce.out) on 300 unseen words after 300 steps; predicting nothing scores 1" \
    "$(ratio_ok "$per" 1 0.5)"
check "pronounce attention picture" "$(grep -c '<rect' attention.svg) cells" "$(grep -q 'fill-opacity' attention.svg && echo 1 || echo 0)"
"$examples/pronounce" --steps 30 --minutes 0 --hidden 16 --embed 8 --eval-words 20 --attention additive > pronounce_additive.out
check "pronounce --attention additive" "PER $(value test_per pronounce_additive.out)" "$(grep -q '^test_per [0-9]' pronounce_additive.out && echo 1 || echo 0)"

"$examples/spam" --epochs 3 > spam.out 2> spam.err
acc=$(value test_accuracy spam.out); bag=$(value baseline_accuracy spam.out); most=$(value majority_accuracy spam.out)
check spam "GRU $acc, bag of words $bag, majority class $most" \
    "$(awk -v a="$acc" -v b="$bag" -v m="$most" 'BEGIN { print (a > m + 0.1 && b > m + 0.1) ? 1 : 0 }')"
check "spam: subjects left out" "$(cat spam.err)" "$(grep -q '19 messages have an empty subject' spam.err && echo 1 || echo 0)"

# Bad data files: an error naming the file, the line and what was expected; never a crash.
bad_input() {  # bad_input NAME EXAMPLE FILE-CONTENT EXPECTED-TEXT...
    local name=$1 example=$2 content=$3
    shift 3
    printf '%b' "$content" > "bad_$name"
    local rc=0
    "$examples/$example" --data "bad_$name" > /dev/null 2> "bad_$name.err" || rc=$?
    local ok=1
    [ "$rc" = 1 ] || ok=0
    for part in "$@"; do grep -qF -- "$part" "bad_$name.err" || ok=0; done
    check "$example, $name" "exit $rc: $(head -c 200 "bad_$name.err")" "$ok"
}
bad_input "no phonemes" pronounce 'ABANDON  AH0 B AE1 N D AH0 N\nABBEY\n' "bad_no phonemes line 2" "two spaces"
bad_input "phonemes missing" pronounce 'ABANDON  AH0 B AE1 N D AH0 N\nABBEY  \n' "line 2" "no phonemes"
bad_input "unknown phoneme" pronounce 'ABANDON  AH0 B AE1 N D XX0 N\n' "line 1" '"XX" is not an ARPAbet phoneme'
bad_input "not UTF-8" pronounce 'ABANDON  AH0 B AE1 N D AH0 N\nAB\xff  EY1\n' "line 2" "byte 3 (0xff) is not valid UTF-8"
bad_input "no words" pronounce '' "no words"
bad_input "no header" spam 'easy-ham-1,ham,Hello\n' "line 1" "header group,label,subject"
bad_input "wrong columns" spam 'group,label,subject\neasy-ham-1,ham\n' "line 2" "expected 3 fields"
bad_input "bad label" spam 'group,label,subject\neasy-ham-1,eggs,Hello\n' "line 2" "ham or spam" "eggs"
bad_input "open quote" spam 'group,label,subject\neasy-ham-1,ham,"Hello\n' "line 2" "not closed"
bad_input "not UTF-8 subject" spam 'group,label,subject\nspam-1,spam,Win \xc3\x28 now\n' "line 2" "not valid UTF-8"
bad_input "only empty subjects" spam 'group,label,subject\nspam-1,spam,\n' "no messages" "empty subject"
rc=0; "$examples/spam" --data does_not_exist.csv > /dev/null 2> missing.err || rc=$?
check "spam, missing file" "exit $rc: $(cat missing.err)" "$([ "$rc" = 1 ] && grep -q 'cannot open does_not_exist.csv' missing.err && echo 1 || echo 0)"

echo "$failures example(s) failed"
[ "$failures" -eq 0 ]
