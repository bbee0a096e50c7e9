#!/usr/bin/env bash
# Does federated fine-tuning of a pre-trained model beat training from scratch? Fashion-MNIST:
# a CNN is pre-trained centrally on classes 0-4 (the "public" data), then fine-tuned on classes
# 5-9, held privately by 4 client processes (Dirichlet alpha 0.5), for 10 rounds of 1 local
# epoch: (a) pre-trained, head only (--freeze head-only); (b) pre-trained, all layers;
# (b') pre-trained, all layers, classifier head re-initialised (--reset-head: the new task has
# other classes); (c) from scratch. Then centralised fine-tuning of the same pre-trained model on the union of
# the clients' data with the same budget (10 epochs). Prints Markdown tables: test accuracy
# (classes 5-9) and bytes per round, rounds to reach TARGET, and the federated-centralised gap.
#
#   deploy/experiment-pretrained.sh [OUT_DIR]
#
# Environment: ROUNDS (10), CLIENTS (4), ALPHA (0.5), MODEL (cnn), PRETRAIN_EPOCHS (2),
# TARGET (0.90), DATA (the demo's default: the full data set when installed, else the bundled
# subset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-pretrained}"
rounds="${ROUNDS:-10}" clients="${CLIENTS:-4}" alpha="${ALPHA:-0.5}" model="${MODEL:-cnn}"
pretrain_epochs="${PRETRAIN_EPOCHS:-2}" target="${TARGET:-0.90}"
. deploy/experiment-common.sh
bin="$coordinator"
mkdir -p "$out"

echo "pre-training $model on classes 0-4 of $data ($pretrain_epochs epochs)" >&2
"$bin" pretrain --model "$model" --data "$data" --classes 0,1,2,3,4 --epochs "$pretrain_epochs" \
  --seed 1 --out "$out/pretrained.safetensors" > "$out/pretrain.log" 2>&1

run() { # name, extra demo args...
  local name="$1"; shift
  echo "federated run: $name" >&2
  local start=$(date +%s)
  "$bin" demo --clients "$clients" --alpha "$alpha" --rounds "$rounds" --model "$model" \
    --local-epochs 1 --classes 5,6,7,8,9 --fraction-evaluate 0 --seed 42 --data "$data" \
    --out "$out/$name" "$@" > "$out/$name.log" 2>&1 || { echo "$name failed; see $out/$name.log" >&2; exit 1; }
  echo "  $(( $(date +%s) - start )) s" >&2
}
run head-only --init "$out/pretrained.safetensors" --freeze head-only
run all-layers --init "$out/pretrained.safetensors"
run all-layers-reset-head --init "$out/pretrained.safetensors" --reset-head
run scratch

echo "centralised fine-tuning on the union of the clients' data ($rounds epochs)" >&2
"$bin" pretrain --model "$model" --data "$data" --classes 5,6,7,8,9 --epochs "$rounds" --val-fraction 0.1 \
  --init "$out/pretrained.safetensors" --seed 1 --out "$out/centralised.safetensors" > "$out/centralised.log" 2>&1

field() { grep -o "\"$2\":[0-9.]*" "$out/$1/metrics.jsonl" | cut -d: -f2; }
echo
echo "Test accuracy on classes 5-9 (%), $clients clients, Dirichlet alpha $alpha, $model, 1 local epoch per round:"
echo
echo "| round | (a) pre-trained, head only | (b) pre-trained, all layers | (b') all layers, head reset | (c) from scratch |"
echo "|---|---|---|---|---|"
paste -d' ' <(field head-only eval_accuracy) <(field all-layers eval_accuracy) \
  <(field all-layers-reset-head eval_accuracy) <(field scratch eval_accuracy) |
  awk '{printf "| %d | %.2f | %.2f | %.2f | %.2f |\n", NR, $1*100, $2*100, $3*100, $4*100}'
echo
echo "Bytes per round (down / up, all clients together):"
echo
echo "| run | round 1 down | later rounds down | up per round |"
echo "|---|---|---|---|"
for r in head-only all-layers all-layers-reset-head scratch; do
  d=($(field "$r" bytes_down)); u=($(field "$r" bytes_up))
  echo "| $r | ${d[0]} | ${d[1]} | ${u[0]} |"
done
echo
echo "Rounds to reach $target test accuracy:"
echo
for r in head-only all-layers all-layers-reset-head scratch; do
  n=$(field "$r" eval_accuracy | awk -v t="$target" '$1 >= t {print NR; exit}')
  echo "- $r: ${n:-not within $rounds rounds}"
done
central=$(grep -o 'test split ([0-9]* examples): loss [0-9.]* acc [0-9.]*%' "$out/centralised.log" | grep -o 'acc [0-9.]*' | cut -d' ' -f2)
pre=$(grep -o 'test split ([0-9]* examples): loss [0-9.]* acc [0-9.]*%' "$out/pretrain.log" | grep -o 'acc [0-9.]*' | cut -d' ' -f2)
echo
echo "Pre-trained model on classes 0-4: test accuracy ${pre}% (its own classes)."
echo "Centralised fine-tuning, $rounds epochs on the union: test accuracy ${central}% on classes 5-9;"
echo "federated (b) after $rounds rounds: $(field all-layers eval_accuracy | tail -1 | awk '{printf "%.2f", $1*100}')%."
