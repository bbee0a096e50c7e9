#!/usr/bin/env bash
# What differential privacy costs in accuracy: Fashion-MNIST, a CNN, 20 client processes,
# the same rounds, sampling rate, recipe and seed for every run; without DP and with central
# DP calibrated (by `fedtune-coordinator dp-plan`) to end the run at ε ≈ 8, 4 and 1. Prints
# server-side test accuracy per round and the ε curve as Markdown tables (the figures in
# docs/benchmarks.md come from here).
#
#   deploy/experiment-dp.sh [OUT_DIR]
#
# MODE=finetune instead pre-trains the CNN centrally on classes 0-4 (the "public" data) and
# fine-tunes only its classifier head (--freeze head-only: 1,290 values instead of 206,922)
# on classes 5-9 held by the clients: DP's noise grows with the number of values trained.
#
# Environment: MODE (scratch | finetune), ROUNDS (10), CLIENTS (20), FRACTION (0.5: q, each
# client's chance per round), EPSILONS ("8 4 1"), CLIP (1.0: the L2 bound on each update), DELTA
# (1e-5), MODEL (cnn), EPOCHS (1), LR (0.001: Adam on the clients), DATA (the full data set when installed, else the bundled
# subset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-dp}"
rounds="${ROUNDS:-10}" clients="${CLIENTS:-20}" q="${FRACTION:-0.5}" clip="${CLIP:-1.0}"
epsilons="${EPSILONS:-8 4 1}" delta="${DELTA:-1e-5}" model="${MODEL:-cnn}" epochs="${EPOCHS:-1}"
lr="${LR:-0.001}"
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
bin="$target_dir/release/fedtune-coordinator"
mkdir -p "$out"
data="${DATA:-}"
if [[ -z "$data" ]]; then
  if [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
    data=/usr/share/datasets/fashion-mnist
  else
    data=data/fashion-mnist-subset
  fi
fi
mode="${MODE:-scratch}"
task_args=()
if [[ "$mode" == finetune ]]; then
  echo "pre-training $model on classes 0-4 of $data" >&2
  "$bin" pretrain --model "$model" --data "$data" --classes 0,1,2,3,4 --epochs 2 --seed 1 \
    --out "$out/pretrained.safetensors" > "$out/pretrain.log" 2>&1
  task_args=(--classes 5,6,7,8,9 --init "$out/pretrained.safetensors" --freeze head-only)
fi

run() { # name, extra demo flags...
  local name="$1"; shift
  echo "running $name -> $out/$name" >&2
  local start; start=$(date +%s)
  "$bin" demo --clients "$clients" --rounds "$rounds" --model "$model" --local-epochs "$epochs" --lr "$lr" \
    --fraction-fit "$q" --fraction-evaluate 0 --alpha 1.0 --seed 42 --data "$data" "${task_args[@]}" \
    --out "$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || { echo "$name failed; see $out/$name.log" >&2; exit 1; }
  echo "  $(( $(date +%s) - start )) s" >&2
}

runs="no-dp"
run no-dp
for eps in $epsilons; do
  z="$("$bin" dp-plan --epsilon "$eps" --rounds "$rounds" --sample-rate "$q" --delta "$delta" \
    | grep -o -- '--dp-noise-multiplier [0-9.]*' | cut -d' ' -f2)"
  echo "ε $eps: noise multiplier $z" >&2
  run "eps$eps" --dp central --dp-clip "$clip" --dp-noise-multiplier "$z" --dp-delta "$delta"
  runs="$runs eps$eps"
done

field() { { grep -o "\"$2\":[0-9.e-]*" "$out/$1/metrics.jsonl" || true; } | cut -d: -f2; }
echo
echo "$mode: $clients clients, $model, $epochs local epoch(s) at lr $lr, q = $q, $rounds rounds, clip $clip, δ = $delta; server-side test accuracy (%), and ε after the round:"
echo
printf '| round |'; for r in $runs; do printf ' %s |' "$r"; done; echo
printf '|---|'; for _ in $runs; do printf -- '---|'; done; echo
acc=() eps=()
for r in $runs; do
  acc+=("$(field "$r" eval_accuracy | awk '{printf "%.2f\n", $1 * 100}')")
  eps+=("$(field "$r" epsilon | awk '{printf "%.2f\n", $1}')")
done
for ((i = 1; i <= rounds; i++)); do
  printf '| %d |' "$i"
  for ((j = 0; j < ${#acc[@]}; j++)); do
    e="$(sed -n "${i}p" <<< "${eps[$j]}")"
    printf ' %s%s |' "$(sed -n "${i}p" <<< "${acc[$j]}")" "${e:+ (ε $e)}"
  done
  echo
done
