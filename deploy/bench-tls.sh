#!/usr/bin/env bash
# What TLS costs: deploy/bench-transport.sh over mutual TLS and over plaintext (--insecure),
# alternating PAIRS times on the same machine, then the mean round time of each (rounds 2..,
# the first holds start-up) and the difference.
#
#   deploy/bench-tls.sh [PARAMS=100M] [CLIENTS=2] [ROUNDS=4] [PAIRS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
params="${1:-100M}"; clients="${2:-2}"; rounds="${3:-4}"; pairs="${4:-3}"
out="$(mktemp)"; trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$pairs"); do
  for mode in tls plaintext; do
    if [ "$mode" = plaintext ]; then insecure=1; else insecure=; fi
    INSECURE="$insecure" deploy/bench-transport.sh "$params" "$clients" "$rounds" 2>/dev/null \
      | sed -n "s/^  round \([0-9]*\): *\([0-9.]*\) s.*/$mode \1 \2/p" >> "$out"
  done
done
python3 - "$out" "$params" "$clients" "$pairs" <<'PY'
import sys, statistics
path, params, clients, pairs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
times = {"tls": [], "plaintext": []}
for line in open(path):
    mode, rnd, secs = line.split()
    if int(rnd) >= 2:
        times[mode].append(float(secs))
if not times["tls"] or not times["plaintext"]:
    sys.exit("no rounds measured: run deploy/bench-transport.sh by hand to see why")
print(f"TLS cost: synthetic:{params}, {clients} clients, {pairs} alternating pairs, rounds 2..")
for mode, t in times.items():
    print(f"  {mode:9}: mean {statistics.mean(t):.2f} s, median {statistics.median(t):.2f} s, range {min(t):.2f}-{max(t):.2f} s over {len(t)} rounds")
cost = statistics.mean(times["tls"]) / statistics.mean(times["plaintext"]) - 1
print(f"  mutual TLS costs {cost * 100:+.1f}% of the plaintext round time")
PY
