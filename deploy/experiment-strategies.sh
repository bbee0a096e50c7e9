#!/usr/bin/env bash
# Server strategies compared on the same budget: FedAvg, FedAvgM, FedAdam and FedYogi on
# Fashion-MNIST, 10 client processes, Dirichlet alpha 0.1 (very skewed) and 1.0, the same
# rounds, local epochs, client optimiser and seed for every run. Prints server-side test
# accuracy per round as Markdown tables (the figures in docs/benchmarks.md come from here).
#
#   deploy/experiment-strategies.sh [OUT_DIR]
#
# Environment: ROUNDS (10), MODEL (mlp), EPOCHS (1), CLIENTS (10), ALPHAS ("0.1 1.0"),
# STRATEGIES ("fedavg fedavgm fedadam fedyogi"), DATA (demo default: the full data set when
# installed, else the bundled subset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/experiment-strategies}"
rounds="${ROUNDS:-10}" model="${MODEL:-mlp}" epochs="${EPOCHS:-1}" clients="${CLIENTS:-10}"
alphas="${ALPHAS:-0.1 1.0}" strategies="${STRATEGIES:-fedavg fedavgm fedadam fedyogi}"
cargo build --release --workspace --bin fedtune-coordinator --bin fedtune-client >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
bin="$target_dir/release/fedtune-coordinator"
mkdir -p "$out"
data_args=()
[[ -n "${DATA:-}" ]] && data_args=(--data "$DATA")

for alpha in $alphas; do
  for s in $strategies; do
    run="$out/alpha$alpha-$s"
    echo "running $s, alpha $alpha -> $run" >&2
    start=$(date +%s)
    "$bin" demo --clients "$clients" --alpha "$alpha" --strategy "$s" --rounds "$rounds" \
      --model "$model" --local-epochs "$epochs" --fraction-evaluate 0 --seed 42 \
      "${data_args[@]}" --out "$run" > "$run.log" 2>&1 \
      || { echo "$s alpha $alpha failed; see $run.log" >&2; exit 1; }
    echo "  $(( $(date +%s) - start )) s" >&2
  done
done

accuracy() { grep -o '"eval_accuracy":[0-9.]*' "$1/metrics.jsonl" | cut -d: -f2; }
for alpha in $alphas; do
  echo
  echo "Dirichlet alpha $alpha, $clients clients, $model, $epochs local epoch(s) per round; server-side test accuracy (%):"
  echo
  printf '| round |'; for s in $strategies; do printf ' %s |' "$s"; done; echo
  printf '|---|'; for _ in $strategies; do printf -- '---|'; done; echo
  cols=()
  for s in $strategies; do cols+=("$(accuracy "$out/alpha$alpha-$s" | awk '{printf "%.2f\n", $1 * 100}')"); done
  for ((r = 1; r <= rounds; r++)); do
    printf '| %d |' "$r"
    for c in "${cols[@]}"; do printf ' %s |' "$(sed -n "${r}p" <<< "$c")"; done
    echo
  done
done
