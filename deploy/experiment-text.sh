#!/usr/bin/env bash
# Federated fine-tuning of a published transformer (all-MiniLM-L6-v2) on real text, compared
# across ways of fine-tuning with the same budget. Prints Markdown tables.
#
#   deploy/experiment-text.sh [OUT_DIR]
#
# Rotten Tomatoes, IID over CLIENTS clients (EXAMPLES sentences each), ROUNDS rounds of 1 local
# epoch, server-side evaluation on EVAL test sentences:
#   LoRA r=8 (fedit), LoRA r=8 (ffa), head only (frozen encoder: logistic regression on frozen
#   MiniLM embeddings, trained by Adam), full fine-tuning, and centralised LoRA: one client holding
#   the union of the clients' sentences for the same number of epochs (ROUNDS).
# VADER, the four domains (movie reviews, tweets, product reviews, news) as four non-IID
#   clients (EXAMPLES each): LoRA fedit, evaluated on the union of the four test splits and by
#   each client on its own domain's test split (`--test-data`, federated evaluation).
#
# Environment: CLIENTS (4), EXAMPLES (500), ROUNDS (3), EVAL (1000), LR (0.002), FULL_LR (5e-5:
# full fine-tuning of all 22.7M weights needs a BERT-recipe rate, not the adapters'), BATCH (16),
# DEVICE (flex), PARTS ("rt vader"), RUNS (the Rotten Tomatoes runs: "lora-fedit lora-ffa
# head-only full central-lora"), BIN_DIR (use the binaries already built there instead of
# building).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-text}"
clients="${CLIENTS:-4}" examples="${EXAMPLES:-500}" rounds="${ROUNDS:-3}" eval="${EVAL:-1000}"
lr="${LR:-0.002}" full_lr="${FULL_LR:-5e-5}" batch="${BATCH:-16}" device="${DEVICE:-flex}" parts="${PARTS:-rt vader}"
runs="${RUNS:-lora-fedit lora-ffa head-only full central-lora}"
minilm="$(deploy/fetch-pretrained.sh minilm | tail -1)"
text="$(deploy/fetch-text-data.sh "$HOME/.cache/fedtune/text-data" | tail -1)"
if [[ -n "${BIN_DIR:-}" ]]; then
  bin_dir="$BIN_DIR"
else
  cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
  target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
  bin_dir="$target_dir/release"
fi
coordinator="$bin_dir/fedtune-coordinator"
client="$bin_dir/fedtune-client"
mkdir -p "$out"
field() { grep -o "\"$2\":[0-9.e-]*" "$1/metrics.jsonl" | cut -d: -f2; }
last() { field "$1" "$2" | tail -1; }
mean_round_s() { field "$1" round_ms | awk '{s+=$1} END {printf "%.1f", s/NR/1000}'; }

if [[ " $parts " == *" rt "* ]]; then
  demo() { # name, lr, extra demo args...
    local name="$1" run_lr="$2"; shift 2
    [[ " $runs " == *" $name "* ]] || return 0
    echo "rotten tomatoes: $name" >&2
    "$coordinator" demo --task text --clients "$clients" --examples-per-client "$examples" \
      --eval-examples "$eval" --rounds "$rounds" --lr "$run_lr" --batch-size "$batch" \
      --fraction-evaluate 0 --device "$device" --init "$minilm" --data "$text" \
      --out "$out/rt-$name" "$@" > "$out/rt-$name.log" 2>&1 || { echo "$name failed; see $out/rt-$name.log" >&2; exit 1; }
  }
  demo lora-fedit "$lr" --lora-rank 8 --lora-mode fedit
  demo lora-ffa "$lr" --lora-rank 8 --lora-mode ffa
  demo head-only "$lr" --lora-rank 0 --freeze head-only
  demo full "$full_lr" --lora-rank 0
  if [[ " $runs " == *" central-lora "* ]]; then
    echo "rotten tomatoes: centralised LoRA (one client, the union)" >&2
    "$coordinator" demo --task text --clients 1 --examples-per-client $((clients * examples)) \
      --eval-examples "$eval" --rounds "$rounds" --lr "$lr" --batch-size "$batch" --fraction-evaluate 0 \
      --device "$device" --init "$minilm" --data "$text" --lora-rank 8 \
      --out "$out/rt-central-lora" > "$out/rt-central-lora.log" 2>&1
  fi
  echo
  echo "Rotten Tomatoes, $clients clients × $examples sentences (IID), $rounds rounds × 1 epoch, batch $batch, lr $lr (full fine-tuning $full_lr), $device; test: $eval sentences"
  echo
  echo "| run | accuracy | macro-F1 | up per round (all clients) | full model would be | mean round time |"
  echo "|---|---|---|---|---|---|"
  for r in $runs; do
    d="$out/rt-$r"
    printf "| %s | %.2f%% | %.4f | %s B | %s B | %s s |\n" "$r" \
      "$(awk -v a="$(last "$d" eval_accuracy)" 'BEGIN {print a*100}')" "$(last "$d" eval_f1)" \
      "$(field "$d" bytes_up | tail -1)" "$(field "$d" bytes_up_full | tail -1)" "$(mean_round_s "$d")"
  done
  echo
  echo "Accuracy per round (%):"
  echo
  echo "| round | ${runs// / | } |"
  echo "|---|$(for r in $runs; do printf -- '---|'; done)"
  cols=()
  for r in $runs; do cols+=("$out/rt-$r"); done
  for ((i = 1; i <= rounds; i++)); do
    printf "| %d |" "$i"
    for d in "${cols[@]}"; do
      printf " %.2f |" "$(field "$d" eval_accuracy | sed -n "${i}p" | awk '{print $1*100}')"
    done
    echo
  done
fi

if [[ " $parts " == *" vader "* ]]; then
  echo "vader: four domains as four clients, LoRA fedit" >&2
  dir="$out/vader"
  mkdir -p "$dir"
  head -n $((eval + 1)) "$text/vader/all-test.csv" > "$dir/test.csv"
  port=$((20000 + RANDOM % 20000))
  rm -rf "$dir/kits"
  "$coordinator" provision --out "$dir/kits" --san 127.0.0.1 --clients movies,tweets,amazon,nyt >/dev/null
  "$coordinator" serve --config "$dir/kits/coordinator/coordinator.toml" --listen "127.0.0.1:$port" --model bert --init "$minilm" --labels neg,pos \
    --max-seq-len 64 --lora-rank 8 --rounds "$rounds" --lr "$lr" --batch-size "$batch" \
    --min-available-clients 4 --fraction-evaluate 1 --eval-data "$dir/test.csv" --out "$dir/out" \
    > "$dir/coordinator.log" 2>&1 &
  pid=$!
  for domain in movies tweets amazon nyt; do
    head -n $((examples + 1)) "$text/vader/$domain/train.csv" > "$dir/$domain.csv"
    "$client" run --config "$dir/kits/clients/$domain/client.toml" --coordinator "https://127.0.0.1:$port" \
      --data "$dir/$domain.csv" \
      --test-data "$text/vader/$domain/test.csv" \
      --tokenizer "$minilm/tokenizer.json" --device "$device" --no-progress > "$dir/$domain.log" 2>&1 &
  done
  wait "$pid"
  wait
  echo
  echo "VADER, 4 domains as 4 clients × $examples sentences (non-IID), LoRA r=8 fedit, $rounds rounds; union test: $eval sentences"
  echo
  echo "| round | union test accuracy | movies (own test split) | tweets | amazon | nyt |"
  echo "|---|---|---|---|---|---|"
  own() { grep "evaluation of model" "$dir/$1.log" | grep -o "acc [0-9.]*%" | cut -d' ' -f2 | tr -d '%'; }
  paste -d' ' <(field "$dir/out" eval_accuracy) <(own movies) <(own tweets) <(own amazon) <(own nyt) |
    awk '{printf "| %d | %.2f%% | %s%% | %s%% | %s%% | %s%% |\n", NR, $1*100, $2, $3, $4, $5}'
fi
