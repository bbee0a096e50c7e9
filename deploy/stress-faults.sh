#!/usr/bin/env bash
# The fault scenarios of tests/tests/kill_anywhere.rs, mid_round.rs and network_faults.rs,
# each run N times (outside the normal test run, which runs each once): a coordinator killed
# with SIGKILL at six points, clients killed mid-training and mid-upload, a client frozen
# with SIGSTOP, a coordinator killed after an update was accepted (and with that update
# damaged on disk), and connections reset and stalled mid-transfer. Prints, per scenario,
# passes, failures and the mean seconds per run; the log of each failure is kept.
#
#   deploy/stress-faults.sh [N=10]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedtune/target}"
logs="$(mktemp -d /tmp/fedtune-stress.XXXXXX)"

# The test binaries, built once.
binaries="$(cargo test --release -p fedtune-tests --test kill_anywhere --test mid_round \
  --test network_faults --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')"

printf '%-70s %6s %6s %8s\n' scenario passed failed "s/run"
total_failed=0
while read -r suite exe; do
  for scenario in $("$exe" --list 2>/dev/null | sed -n 's/: test$//p'); do
    passed=0; failed=0; started=$SECONDS
    for i in $(seq 1 "$n"); do
      if "$exe" --exact "$scenario" --test-threads 1 > "$logs/$scenario.$i.log" 2>&1; then
        passed=$((passed + 1)); rm -f "$logs/$scenario.$i.log"
      else
        failed=$((failed + 1))
      fi
    done
    total_failed=$((total_failed + failed))
    printf '%-70s %6d %6d %8.1f\n' "$suite::$scenario" "$passed" "$failed" \
      "$(python3 -c "print(($SECONDS - $started) / $n)")"
  done
done <<< "$binaries"
if [ "$total_failed" -gt 0 ]; then
  echo "$total_failed failed runs; their logs are in $logs"
  exit 1
fi
rmdir "$logs"
echo "all passed"
