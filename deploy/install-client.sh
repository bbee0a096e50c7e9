#!/usr/bin/env bash
# Installs a fedtune client on an edge device (Linux with systemd) from a binary and a kit, as
# the hardened service fedtune-client@NAME (deploy/systemd/fedtune-client@.service):
#
#   sudo deploy/install-client.sh --binary ./fedtune-client --kit kits/clients/site-a \
#        --data /srv/site-a-images
#
#   --binary PATH   the fedtune-client built for this device (docs/deploy.md, "Edge builds")
#   --kit DIR       the client's kit from `fedtune-coordinator provision` (client.toml, client.pem,
#                   client.key, ca.pem); its name is the kit's `name`
#   --data DIR      the private data; linked as /var/lib/fedtune-data/NAME, read-only to the
#                   service (it must not live under /home: the service cannot see /home)
#   --root DIR      install into DIR instead of / (a staging tree or an image): no user is
#                   created and nothing is started
#   --no-start      install and enable, but do not start now
#
# Re-running replaces the binary, the kit and the unit, and restarts the service.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="" kit="" data="" root="" start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --kit) kit="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --root) root="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install-client.sh: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "install-client.sh: $*" >&2; exit 1; }
[ -n "$binary" ] || fail "give --binary PATH (the fedtune-client for this device)"
[ -n "$kit" ] || fail "give --kit DIR (the client's folder from \`fedtune-coordinator provision\`)"
[ -n "$data" ] || fail "give --data DIR (the private data this client trains on)"
[ -x "$binary" ] || fail "--binary $binary is not an executable file"
for f in client.toml client.pem client.key ca.pem; do
  [ -f "$kit/$f" ] || fail "--kit $kit has no $f: give the folder \`provision\` wrote for this client"
done
[ -d "$data" ] || fail "--data $data is not a folder"
data="$(cd "$data" && pwd)"
case "$data" in
  /home/*|/root/*) fail "--data $data is under a home folder, which the hardened service cannot read; move it (e.g. to /srv)" ;;
esac
"$binary" --version >/dev/null 2>&1 || fail "--binary $binary does not run on this machine (built for another architecture?)"
name="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$kit/client.toml" | head -n1)"
[ -n "$name" ] || fail "$kit/client.toml names no client (name = \"...\")"
case "$name" in
  *[!A-Za-z0-9._-]*|.*) fail "the kit's name \`$name\` is not a valid instance name" ;;
esac

if [ -z "$root" ]; then
  [ "$(id -u)" -eq 0 ] || fail "run as root (it creates a user and a systemd service), or use --root DIR"
  command -v systemctl >/dev/null || fail "no systemctl: this installs a systemd service"
  if ! id -u fedtune-client >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedtune-client
  fi
  owner=(-o root -g fedtune-client)
else
  mkdir -p "$root"
  root="$(cd "$root" && pwd)"
  owner=()
fi

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system" "$root/var/lib/fedtune-data"
install -m 0755 "$binary" "$root/usr/local/bin/fedtune-client"
install -d -m 0750 "${owner[@]}" "$root/etc/fedtune" "$root/etc/fedtune/clients" "$root/etc/fedtune/clients/$name"
for f in client.toml client.pem ca.pem client.key; do
  install -m 0640 "${owner[@]}" "$kit/$f" "$root/etc/fedtune/clients/$name/$f"
done
ln -sfn "$data" "$root/var/lib/fedtune-data/$name"
install -m 0644 "$here/systemd/fedtune-client@.service" "$root/etc/systemd/system/fedtune-client@.service"
echo "installed fedtune-client@$name: binary $root/usr/local/bin/fedtune-client, kit $root/etc/fedtune/clients/$name, data $data"

if [ -z "$root" ]; then
  systemctl daemon-reload
  systemctl enable "fedtune-client@$name" >/dev/null
  if [ "$start" -eq 1 ]; then
    systemctl restart "fedtune-client@$name"
    echo "started: journalctl -u fedtune-client@$name -f"
  else
    echo "enabled; start it with: systemctl start fedtune-client@$name"
  fi
fi
