#!/usr/bin/env bash
# QEMU 10.0.x from bookworm-backports, SIDE BY SIDE with the system QEMU (7.2), idempotently.
#
# Nothing is installed: the .debs are fetched with `apt-get download` and unpacked with
# `dpkg -x` under $PREFIX (default /opt/geomirror/qemu-10). The backports suite is added to
# apt's sources at its default priority (100: NotAutomatic/ButAutomaticUpgrades), so no
# package ever moves to backports by itself. On bookworm every shared library the binary
# needs is already present (ldd is checked below); only seabios has to come from
# backports too (qemu-system-x86 10.0 wants seabios > 1.16.3, bookworm has 1.16.2).
#
# Run the result with:
#   QEMU_MODULE_DIR=$PREFIX/usr/lib/x86_64-linux-gnu/qemu \
#   $PREFIX/usr/bin/qemu-system-x86_64 -L $PREFIX/usr/share/qemu -L $PREFIX/usr/share/seabios ...
# (-L twice: QEMU's own data first, then the matching seabios; QEMU_MODULE_DIR keeps it from
# loading 7.2's modules from /usr/lib/x86_64-linux-gnu/qemu). Prints the binary's path last.
#
# COLO: QEMU 10.0.0-10.0.6 never enter COLO (after the first full sync the migration ends as
# `completed`: commit 4881411136 "migration: Always set DEVICE state" broke the ACTIVE -> COLO
# transition; fixed upstream by 0b5bf4ea76 "migration: Fix transition to COLO state from
# precopy", in stable 10.0.7). Debian's 10.0.2 has the bug. And under TCG every QEMU from 7.2
# to 10.0 deadlocks at the first checkpoints (see scripts/qemu10-colo.patch, docs/colo-spike.md).
# `--colo-fix` builds the same 10.0.2 source (apt-get source, orig tarball) with
# scripts/qemu10-colo.patch (both fixes), x86_64 with TCG only, into
# $PREFIX-colofix/bin (about 10 minutes on 2 cores; needs libglib2.0-dev libpixman-1-dev
# libfdt-dev ninja-build, and meson + pycotap from PyPI in a build venv). It uses the data and
# firmware of the Debian tree above (the same -L options).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
COLO_FIX=0
[ "${1:-}" = "--colo-fix" ] && COLO_FIX=1

PREFIX=${PREFIX:-/opt/geomirror/qemu-10}
SUITE=bookworm-backports
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources

if [ "$(id -u)" != 0 ]; then
  echo "qemu10: needs root (apt sources, $PREFIX)" >&2
  exit 1
fi

if [ ! -f "$SOURCES" ]; then
  echo "qemu10: adding $SUITE to apt's sources ($SOURCES)"
  cat > "$SOURCES" <<EOF
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq
fi

version=$(apt-cache madison qemu-system-x86 | awk -F'|' -v s="$SUITE/" 'index($3, s) {gsub(/ /, "", $2); print $2; exit}')
if [ -z "$version" ]; then
  echo "qemu10: apt knows no qemu-system-x86 in $SUITE (apt-get update?)" >&2
  exit 1
fi

stamp="$PREFIX/.geomirror-version"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && [ -x "$PREFIX/usr/bin/qemu-system-x86_64" ]; then
  echo "qemu10: QEMU $version present in $PREFIX"
else
  echo "qemu10: unpacking QEMU $version from $SUITE into $PREFIX"
  debs=$(mktemp -d)
  trap 'rm -rf "$debs"' EXIT
  chmod 755 "$debs"  # apt's _apt user downloads into it
  (cd "$debs" && apt-get download -qq "${PACKAGES[@]/%//$SUITE}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  for p in "${PACKAGES[@]}"; do
    ls "$debs"/"${p}"_*.deb >/dev/null 2>&1 || { echo "qemu10: apt-get download $p/$SUITE failed" >&2; exit 1; }
  done
  rm -rf "$PREFIX.new"
  mkdir -p "$PREFIX.new"
  for d in "$debs"/*.deb; do dpkg -x "$d" "$PREFIX.new"; done
  echo "$version" > "$PREFIX.new/.geomirror-version"
  rm -rf "$PREFIX"
  mv "$PREFIX.new" "$PREFIX"
fi

missing=$(ldd "$PREFIX/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
  echo "qemu10: libraries missing on this host: $missing" >&2
  exit 1
fi
QEMU_MODULE_DIR="$PREFIX/usr/lib/x86_64-linux-gnu/qemu" "$PREFIX/usr/bin/qemu-system-x86_64" --version | head -1
if [ "$COLO_FIX" = 0 ]; then
  echo "$PREFIX/usr/bin/qemu-system-x86_64"
  exit 0
fi

FIXED="$PREFIX-colofix"
fstamp="$FIXED/.geomirror-version"
fversion="$version+colofix-$(sha256sum "$HERE/qemu10-colo.patch" | cut -c1-12)"
if [ -f "$fstamp" ] && [ "$(cat "$fstamp")" = "$fversion" ] && [ -x "$FIXED/bin/qemu-system-x86_64" ]; then
  echo "qemu10: COLO-fixed QEMU $version present in $FIXED"
else
  dev=(libglib2.0-dev libpixman-1-dev libfdt-dev ninja-build gcc patch python3-venv)
  need=()
  for p in "${dev[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "qemu10: installing build dependencies: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  work=$(mktemp -d /var/tmp/qemu10-build.XXXXXX)
  chmod 755 "$work"
  echo "qemu10: building QEMU $version with the COLO fix in $work"
  upstream=${version#*:}; upstream=${upstream%%-*}   # 10.0.2+ds
  # the .dsc and the Debian tarball may be missing from a mirror: only the orig tarball is needed
  (cd "$work" && apt-get source --download-only -qq "qemu/$SUITE" >/dev/null 2>&1 || true)
  orig="$work/qemu_${upstream}.orig.tar.xz"
  [ -f "$orig" ] || { echo "qemu10: apt-get source qemu/$SUITE gave no $orig" >&2; exit 1; }
  tar -C "$work" -xf "$orig"
  src=$(find "$work" -maxdepth 1 -type d -name 'qemu-*' | head -1)
  patch -d "$src" -p1 -s < "$HERE/qemu10-colo.patch"
  sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$src/meson.build"  # +ds: no edk2 blobs
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q meson pycotap==1.3.1
  mkdir "$src/build"
  (cd "$src/build" && ../configure --python="$work/venv/bin/python" --target-list=x86_64-softmmu \
      --without-default-features --enable-tcg --enable-replication --enable-fdt=system \
      --disable-install-blobs --disable-docs --disable-werror --prefix="$FIXED" >"$work/configure.log" 2>&1) \
    || { tail -20 "$work/configure.log" >&2; exit 1; }
  (cd "$src/build" && nice ninja -j"$(nproc)" qemu-system-x86_64 >"$work/build.log" 2>&1) \
    || { tail -20 "$work/build.log" >&2; exit 1; }
  mkdir -p "$FIXED/bin"
  install -m 755 "$src/build/qemu-system-x86_64" "$FIXED/bin/qemu-system-x86_64"
  echo "$fversion" > "$fstamp"
  rm -rf "$work"  # (left in place when a step fails, with its logs)
fi
"$FIXED/bin/qemu-system-x86_64" --version | head -1
echo "$FIXED/bin/qemu-system-x86_64"
