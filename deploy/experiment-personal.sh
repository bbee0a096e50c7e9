#!/usr/bin/env bash
# Personalisation, measured: FedAvg on strongly skewed Fashion-MNIST shares, with federated
# evaluation by every client on its own validation split after every round: the global model,
# the global model fine-tuned STEPS local steps (`--personalize-steps`), and Ditto's personal
# model kept on each client across rounds (`--ditto-lambda`, one run per LAMBDAS value).
# Prints one Markdown table: federated validation accuracy per round.
#
#   deploy/experiment-personal.sh [OUT_DIR]
#
# Environment: CLIENTS (10), EXAMPLES (1200 per client), ALPHA (0.1), ROUNDS (10), MODEL (mlp),
# STEPS (20), LAMBDAS ("0.01 0.1 1"), DATA (the full data set when installed, else the bundled
# subset), PORT (29500).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
out="${1:-runs/experiment-personal}"
clients="${CLIENTS:-10}" examples="${EXAMPLES:-1200}" alpha="${ALPHA:-0.1}" rounds="${ROUNDS:-10}"
model="${MODEL:-mlp}" steps="${STEPS:-20}" lambdas="${LAMBDAS:-0.01 0.1 1}" port="${PORT:-29500}"
. deploy/experiment-common.sh
mkdir -p "$out"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

if [[ ! -d "$out/split/clients" ]]; then
  "$coordinator" partition --data "$data" --clients "$clients" --examples-per-client "$examples" \
    --alpha "$alpha" --seed 42 --test-examples 2000 --out "$out/split" > "$out/partition.log"
fi

# One federation: $1 names it, the rest are extra serve flags.
federation() {
  local run="$out/$1"
  shift
  [[ -f "$run/out/metrics.jsonl" ]] && [[ $(wc -l < "$run/out/metrics.jsonl") -ge $rounds ]] && return
  rm -rf "$run" && mkdir -p "$run"
  pids=()
  for d in "$out"/split/clients/client-*; do
    "$client" run --insecure --coordinator "http://127.0.0.1:$port" --data "$d" \
      --name "$(basename "$d")" --no-progress --state-dir "$run/state-$(basename "$d")" \
      > "$run/$(basename "$d").log" 2>&1 &
    pids+=($!)
  done
  echo "$(basename "$run")" >&2
  "$coordinator" serve --insecure --listen "127.0.0.1:$port" --model "$model" --rounds "$rounds" \
    --min-clients "$clients" --fraction-evaluate 1 --personalize-steps "$steps" --seed 42 \
    --out "$run/out" "$@" > "$run/serve.log" 2>&1 || { echo "serve failed: $run/serve.log" >&2; exit 1; }
  wait "${pids[@]}" || true
}

field() { grep -o "\"$2\":[0-9.]*" "$out/$1/out/metrics.jsonl" | cut -d: -f2; }

federation finetune
for l in $lambdas; do federation "ditto-$l" --ditto-lambda "$l"; done

echo
echo "$clients clients x $examples images, Dirichlet alpha $alpha, $model, FedAvg, $steps local steps: federated validation accuracy (%)"
echo
header="| round | global model | fine-tuned from the global model |"
rule="|---|---|---|"
for l in $lambdas; do header+=" Ditto λ = $l |"; rule+="---|"; done
echo "$header"
echo "$rule"
mapfile -t global < <(field finetune fed_eval_accuracy)
mapfile -t tuned < <(field finetune fed_eval_personal_accuracy)
declare -A ditto
for l in $lambdas; do
  mapfile -t col < <(field "ditto-$l" fed_eval_personal_accuracy)
  for i in "${!col[@]}"; do ditto[$l,$i]=${col[$i]}; done
done
pct() { awk -v v="$1" 'BEGIN {printf "%.2f", v * 100}'; }
for i in "${!global[@]}"; do
  line="| $((i + 1)) | $(pct "${global[$i]}") | $(pct "${tuned[$i]}") |"
  for l in $lambdas; do line+=" $(pct "${ditto[$l,$i]:-0}") |"; done
  echo "$line"
done
