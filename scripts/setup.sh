#!/usr/bin/env bash
# Installs everything geomirror needs on a Debian bookworm machine, idempotently:
# system packages with apt (only those missing), then a virtualenv in .venv with
# the package and its test dependencies (only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup: geomirror's lab and tests need root (network namespaces, TAP devices); run as root" >&2
  exit 1
fi

# chromium: the dashboard tests drive it headless; prometheus: its promtool checks the shipped alert rules;
# sip-tester: sipp, the SIP client of the PBX tests (and the guest's echo UA, copied into its image);
# mmdebstrap + e2fsprogs: the disk guest's Debian root filesystem and its ext4 image (`guest build --disk`)
APT_PACKAGES=(qemu-system-x86 qemu-utils bird2 busybox-static memcached sip-tester gcc libc6-dev iproute2 procps kmod zstd ca-certificates etcd-server chromium prometheus mmdebstrap e2fsprogs)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: system packages present"
fi
# BIRD's Debian service would hold the default control socket; the lab runs its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet bird 2>/dev/null; then
  systemctl stop bird || true
fi
# Likewise Debian's etcd service: the tests and the lab start their own members.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
# Only promtool is wanted from the prometheus package, not a Prometheus server running here.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.geomirror-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing geomirror and its Python dependencies into .venv"
  piplog=$(mktemp)
  if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >"$piplog" 2>&1; then
    cat "$piplog" >&2; rm -f "$piplog"; echo "setup: pip install failed" >&2; exit 1
  fi
  rm -f "$piplog"
  echo "$want" > "$stamp"
else
  echo "setup: Python environment up to date"
fi

# The COLO-capable QEMU 10.0 beside the system's 7.2 (the O(dirty) checkpoint capture,
# replication/colo.py): Debian's bookworm-backports build unpacked under /opt/geomirror/qemu-10
# (never installed: no package moves to backports) and the same source built with
# scripts/qemu10-colo.patch into /opt/geomirror/qemu-10-colofix, ~10-25 minutes the first time.
echo "setup: COLO-capable QEMU (scripts/qemu10.sh --colo-fix)"
./scripts/qemu10.sh --colo-fix | sed 's/^/  /'
