"""Checks the Helm chart offline (no cluster, no helm binary): `helm lint --strict`, values
against values.schema.json (good ones pass, bad ones are refused naming the key), rendering for
a matrix of values with the expected objects, and every rendered manifest against the
Kubernetes schema (kubernetes-validate --strict). Writes the rendered coordinator.toml files to
OUT for the binary to read. Run by deploy/check-deploy.sh with helm-python-sdk and
kubernetes-validate from PyPI.

    python deploy/helm/check_chart.py OUT_DIR
"""

import pathlib
import subprocess
import sys

import helm_python as helm
import yaml

CHART = pathlib.Path(__file__).resolve().parent / "fedtune"
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


report = helm.lint(str(CHART), strict=True)
errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
check(not errors, f"helm lint --strict: {errors or 'no warnings or errors'}")

chart = helm.Chart.load(str(CHART))
tiered = yaml.safe_load((CHART / "values-tiered.yaml").read_text())
matrix = [
    ("flat-cpu", {"aggregators": {"replicas": 0}, "clients": {"perAggregator": 3, "gpu": False}}),
    ("flat-gpu", {"aggregators": {"replicas": 0}, "clients": {"perAggregator": 3, "gpu": True}}),
    ("tiered-cpu", {"aggregators": {"replicas": 2}, "clients": {"perAggregator": 3, "gpu": False}}),
    ("tiered-gpu", {"aggregators": {"replicas": 2}, "clients": {"perAggregator": 3, "gpu": True}}),
    ("values-tiered.yaml", tiered),
]
for name, values in matrix:
    chart.validate_schema(values)
    rendered = chart.render(values, name="fed", namespace="fl", is_install=True)
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    merged = chart.merge_values(values)
    aggs = merged["aggregators"]["replicas"]
    per = merged["clients"]["perAggregator"]
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    sets = kinds.get("StatefulSet", [])
    client_sets = [s for s in sets if "-clients" in s["metadata"]["name"]]
    client_pods = sum(s["spec"]["replicas"] for s in client_sets)
    agg_sets = [s for s in sets if s["metadata"]["name"].endswith("-agg")]
    check(
        client_pods == max(aggs, 1) * per and len(client_sets) == max(aggs, 1),
        f"{name}: {client_pods} client pods in {len(client_sets)} StatefulSets (want {max(aggs, 1) * per} in {max(aggs, 1)})",
    )
    check(
        len(agg_sets) == (1 if aggs else 0)
        and (not aggs or agg_sets[0]["spec"]["replicas"] == aggs),
        f"{name}: aggregators {aggs}",
    )
    coordinator = next(s for s in sets if s["metadata"]["name"].endswith("-coordinator"))
    pod = coordinator["spec"]["template"]
    container = pod["spec"]["containers"][0]
    check(
        container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and pod["metadata"]["annotations"].get("prometheus.io/scrape") == "true"
        and coordinator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "run",
        f"{name}: coordinator probes /readyz, is scraped, keeps its run folder on a volume",
    )
    gpu = merged["clients"]["gpu"]
    for s in client_sets:
        c = s["spec"]["template"]["spec"]["containers"][0]
        has_gpu = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1
        check(
            has_gpu == gpu and ("cuda:0" in c["args"]) == gpu and ("client-cuda" in c["image"]) == gpu,
            f"{name}: {s['metadata']['name']} gpu={gpu}",
        )
    manifest = out / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        ["kubernetes-validate", "--strict", "--quiet", "-k", "1.30.0", str(manifest)],
        capture_output=True,
        text=True,
    )
    check(result.returncode == 0, f"{name}: kubernetes-validate {result.stdout.strip()}{result.stderr.strip()}")
    config = next(d for d in kinds["ConfigMap"] if d["metadata"]["name"].endswith("-coordinator"))
    (out / f"{name}.coordinator.toml").write_text(config["data"]["coordinator.toml"])

for what, bad in [
    ("a negative aggregator count", {"aggregators": {"replicas": -1}}),
    ("an unknown key", {"clients": {"perAggregatr": 3}}),
    ("a listen address in the settings (a flag here)", {"coordinator": {"settings": {"listen": "0.0.0.0:1"}}}),
    ("a duration without a unit", {"aggregators": {"roundTimeout": "30"}}),
]:
    try:
        chart.validate_schema(bad)
        check(False, f"schema refuses {what}")
    except helm.HelmValuesError as e:
        check(True, f"schema refuses {what}: {' '.join(str(e).split())[:140]}")

if failures:
    sys.exit(f"{len(failures)} chart check(s) failed")
