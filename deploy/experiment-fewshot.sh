#!/usr/bin/env bash
# Few-shot federated fine-tuning: does a pre-trained start help when each client holds only k
# examples per class? Fashion-MNIST: a CNN is pre-trained centrally on classes 0-4 (the
# "public" data); 4 client processes each hold k examples of each of classes 5-9 (demo
# --shots k), for k in KS; 10 rounds of about STEPS local steps each (as many epochs as that
# takes: 10 for k = 1, 2 for k = 50). Runs per k: pre-trained, head only
# (--freeze head-only); pre-trained, all layers (head re-initialised: the new classes); from
# scratch. Prints a Markdown table of the final test accuracy on classes 5-9 (the demo's 2,000
# held-out images of them, or 500 with the bundled subset).
#
#   deploy/experiment-fewshot.sh [OUT_DIR]
#
# Environment: KS ("1 5 10 50"), ROUNDS (10), STEPS (10), CLIENTS (4), MODEL (cnn), PRETRAIN_EPOCHS (2),
# DATA (the demo's default: the full data set when installed, else the bundled subset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-fewshot}"
ks="${KS:-1 5 10 50}" rounds="${ROUNDS:-10}" steps="${STEPS:-10}" clients="${CLIENTS:-4}" model="${MODEL:-cnn}"
pretrain_epochs="${PRETRAIN_EPOCHS:-2}"
. deploy/experiment-common.sh
bin="$coordinator"
mkdir -p "$out"

if [[ ! -f "$out/pretrained.safetensors" ]]; then
  echo "pre-training $model on classes 0-4 of $data ($pretrain_epochs epochs)" >&2
  "$bin" pretrain --model "$model" --data "$data" --classes 0,1,2,3,4 --epochs "$pretrain_epochs" \
    --seed 1 --out "$out/pretrained.safetensors" > "$out/pretrain.log" 2>&1
fi

run() { # name, k, extra demo args...
  local name="$1" k="$2"; shift 2
  echo "k = $k: $name" >&2
  local start=$(date +%s)
  # About STEPS optimiser steps a round whatever k (a client's data is ceil(5k/32) batches),
  # so that k = 1 trains as many steps as k = 50.
  local epochs=$(( (steps + (5 * k + 31) / 32 - 1) / ((5 * k + 31) / 32) ))
  "$bin" demo --clients "$clients" --shots "$k" --rounds "$rounds" --model "$model" \
    --local-epochs "$epochs" --classes 5,6,7,8,9 --fraction-evaluate 0 --seed 42 --data "$data" \
    --out "$out/k$k-$name" "$@" > "$out/k$k-$name.log" 2>&1 \
    || { echo "k = $k, $name failed; see $out/k$k-$name.log" >&2; exit 1; }
  echo "  $(( $(date +%s) - start )) s" >&2
}
final() { grep -o '"eval_accuracy":[0-9.]*' "$out/$1/metrics.jsonl" | tail -1 | cut -d: -f2; }
for k in $ks; do
  run head-only "$k" --init "$out/pretrained.safetensors" --freeze head-only --reset-head
  run all-layers "$k" --init "$out/pretrained.safetensors" --reset-head
  run scratch "$k"
done

echo
echo "Test accuracy (%) on classes 5-9 after $rounds rounds of about $steps local steps; $clients clients, each with k examples per class, $model:"
echo
echo "| k per class | examples per client | pre-trained, head only | pre-trained, all layers | from scratch |"
echo "|---|---|---|---|---|"
for k in $ks; do
  printf '| %s | %s |' "$k" "$((k * 5))"
  for r in head-only all-layers scratch; do printf ' %.2f |' "$(awk '{print $1 * 100}' <<< "$(final "k$k-$r")")"; done
  echo
done
