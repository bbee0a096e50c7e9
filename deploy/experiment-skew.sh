#!/usr/bin/env bash
# Learning on skewed data, measured: FedAvg, FedProx, FedAvgM, FedAdam, SCAFFOLD and FedNova on
# Fashion-MNIST, each with its defaults and with the configuration `tune` found for it (the
# final run has the same round budget), against centralised training with the same budget on
# the union of the clients' data. Splits (SPLITS, each CLIENTS:EXAMPLES_PER_CLIENT:ALPHA): 3
# clients x 4,000 images at Dirichlet alpha 1, and 10 clients x 1,200 at alpha 0.1 and 1. The
# figure is server-side accuracy on 2,000 test images (the tuning itself only sees the clients'
# own validation data). The search covers the clients' learning rate and each strategy's own
# parameters, not the local epochs, so every run trains ROUNDS x EPOCHS epochs, as the
# centralised baseline does. Prints one Markdown table per split, and the targets: best tuned run
# >= 98% of centralised at alpha 1; the gap at alpha 0.1 at least halved against untuned FedAvg.
#
#   deploy/experiment-skew.sh [OUT_DIR]
#
# Environment: SPLITS ("3:4000:1.0 10:1200:0.1 10:1200:1.0"), ROUNDS (5), EPOCHS (1), MODEL
# (cnn), LR (0.001, Adam), SGD_LR (0.05: SCAFFOLD and FedNova train with SGD), STRATEGIES ("fedavg fedprox fedavgm fedadam scaffold fednova"),
# TRIALS (8), MIN_ROUNDS (1), ETA (3), OBJECTIVE (loss: what ranks the trials, or accuracy or
# f1; `tune --objective`), VARIANTS ("default tuned"; "default" skips the
# searches), DATA (the full data set when installed, else the
# bundled subset), PORT (29400: below Linux's ephemeral range, so no outgoing connection can hold it between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
out="${1:-runs/experiment-skew}"
splits="${SPLITS:-3:4000:1.0 10:1200:0.1 10:1200:1.0}" rounds="${ROUNDS:-5}" epochs="${EPOCHS:-1}"
model="${MODEL:-cnn}" lr="${LR:-0.001}" SGD_LR="${SGD_LR:-0.05}" trials="${TRIALS:-8}" min_rounds="${MIN_ROUNDS:-1}" eta="${ETA:-3}"
strategies="${STRATEGIES:-fedavg fedprox fedavgm fedadam scaffold fednova}" port="${PORT:-29400}"
variants="${VARIANTS:-default tuned}" objective="${OBJECTIVE:-loss}"
. deploy/experiment-common.sh
mkdir -p "$out"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

# Starts one client process per folder of $1/clients against the coordinator on $port.
start_clients() {
  pids=()
  for d in "$1"/clients/client-*; do
    "$client" run --insecure --coordinator "http://127.0.0.1:$port" --data "$d" \
      --name "$(basename "$d")" --no-progress --state-dir "$2/state-$(basename "$d")" \
      > "$2/$(basename "$d").log" 2>&1 &
    pids+=($!)
  done
}

# The strategy's own keys searched on top of the clients' learning rate and epochs.
space() {
  # Local epochs stay at EPOCHS: the tuned runs train as many epochs as the centralised
  # baseline. SCAFFOLD and FedNova train with SGD (as their papers analyse them: both read
  # an update as a sum of gradient steps), the others with Adam.
  local s=()
  case "$1" in
    scaffold | fednova) s+=(--space 'lr=loguniform(1e-3,3e-1)') ;;
    *) s+=(--space 'lr=loguniform(1e-4,1e-2)') ;;
  esac
  case "$1" in
    fedprox) s+=(--space 'proximal_mu=loguniform(1e-3,1)') ;;
    fedavgm) s+=(--space 'server_lr=loguniform(0.3,1.5)' --space 'server_momentum=uniform(0.5,0.95)') ;;
    fedadam) s+=(--space 'server_lr=loguniform(1e-3,1e-1)') ;;
    scaffold | fednova) s+=(--space 'server_lr=loguniform(0.5,1.5)') ;;
  esac
  printf '%s\n' "${s[@]}"
}

# The settings of a run: the split's clients, the strategy, the budget, the test set.
base_toml() { # split_dir strategy
  local extra="" optimizer=adam rate="$lr"
  [[ "$2" == fedprox ]] && extra="proximal_mu = 0.01"
  [[ "$2" == scaffold || "$2" == fednova ]] && optimizer=sgd rate="$SGD_LR"
  cat <<TOML
listen = "127.0.0.1:$port"
insecure = true
model = "$model"
strategy = "$2"
rounds = $rounds
local_epochs = $epochs
batch_size = 32
optimizer = "$optimizer"
lr = $rate
min_clients = $(ls -d "$1"/clients/client-* | wc -l)
fraction_fit = 1.0
eval_data = "$1/test"
seed = 42
$extra
TOML
}

accuracy() { grep -o '"eval_accuracy":[0-9.]*' "$1/metrics.jsonl" | tail -1 | cut -d: -f2; }

for split in $splits; do
  IFS=: read -r n per alpha <<< "$split"
  dir="$out/${n}x$per-alpha$alpha"
  mkdir -p "$dir"
  if [[ ! -d "$dir/clients" ]]; then
    "$coordinator" partition --data "$data" --clients "$n" --examples-per-client "$per" \
      --alpha "$alpha" --seed 42 --test-examples 2000 --out "$dir" > "$dir/partition.log"
  fi
  if [[ ! -f "$dir/centralised.log" ]]; then
    echo "$split: centralised, $rounds epochs on the union" >&2
    "$coordinator" pretrain --model "$model" --data "$dir/union" --epochs "$((rounds * epochs))" \
      --lr "$lr" --batch-size 32 --val-fraction 0 --seed 42 --out "$dir/centralised.safetensors" \
      > "$dir/centralised.log.part" 2>&1
    mv "$dir/centralised.log.part" "$dir/centralised.log" # only a finished run counts as done
  fi
  for s in $strategies; do
    for variant in $variants; do
      run="$dir/$s-$variant"
      [[ -f "$run/metrics.jsonl" ]] && [[ $(wc -l < "$run/metrics.jsonl") -ge $rounds ]] && continue
      mkdir -p "$run"
      base_toml "$dir" "$s" > "$run/base.toml"
      config="$run/base.toml"
      if [[ "$variant" == tuned ]]; then
        echo "$split: tuning $s ($trials trials)" >&2
        start_clients "$dir" "$run"
        mapfile -t sp < <(space "$s")
        "$coordinator" tune --config "$config" --trials "$trials" "${sp[@]}" --seed 1 \
          --min-rounds "$min_rounds" --max-rounds "$rounds" --eta "$eta" --objective "$objective" --out "$run/tune" \
          > "$run/tune.log" 2>&1 || { echo "tune failed: $run/tune.log" >&2; exit 1; }
        wait "${pids[@]}" || true
        config="$run/tune/best.toml"
      fi
      echo "$split: $s, $variant" >&2
      start_clients "$dir" "$run"
      "$coordinator" serve --config "$config" --out "$run/out" --fresh > "$run/serve.log" 2>&1 \
        || { echo "serve failed: $run/serve.log" >&2; exit 1; }
      wait "${pids[@]}" || true
      cp "$run/out/metrics.jsonl" "$run/metrics.jsonl"
    done
  done
done

for split in $splits; do
  IFS=: read -r n per alpha <<< "$split"
  dir="$out/${n}x$per-alpha$alpha"
  central=$(grep 'test split' "$dir/centralised.log" | grep -o 'acc [0-9.]*' | grep -o '[0-9.]*')
  echo
  echo "$n clients x $per images, Dirichlet alpha $alpha, $model, $rounds rounds x $epochs epoch: test accuracy (%), centralised $central"
  echo
  echo "| strategy | defaults | tuned | tuned / centralised | tuned configuration |"
  echo "|---|---|---|---|---|"
  for s in $strategies; do
    d=$(awk '{printf "%.2f", $1 * 100}' <<< "$(accuracy "$dir/$s-default")")
    t=- ratio=- conf=-
    if [[ -f "$dir/$s-tuned/metrics.jsonl" ]]; then
      t=$(awk '{printf "%.2f", $1 * 100}' <<< "$(accuracy "$dir/$s-tuned")")
      ratio=$(awk -v t="$t" -v c="$central" 'BEGIN {printf "%.3f", t / c}')
      conf=$(grep -o 'the values of trial [0-9]* ([^)]*)' "$dir/$s-tuned/tune/best.toml" | sed 's/the values of //')
    fi
    echo "| $s | $d | $t | $ratio | $conf |"
  done
done
