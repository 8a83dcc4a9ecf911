"""The guest's SIP PBX: Kamailio 5.6 from Debian's package plus an echo user agent (sipp UAS).

Kamailio is the registrar (usrloc in memory) and the dialog-stateful proxy on UDP and TCP
5060; `sip:echo@<guest>` is relayed to a sipp UAS on the guest's address, UDP 5070, which
answers INVITE with 200 and SDP, echoes RTP from the guest's address (port 6000) and
answers BYE. Kamailio cannot echo media, so a second program is needed; sipp is already
the lab's SIP client, its UAS scenario is built in, and it needs no configuration file.

The package is fetched with `apt-get download` and unpacked with `dpkg -x` (never
installed on the host); only the binary, the modules the config loads and the libraries
they need go into the initramfs. This module is the pure part: which files, where they go
in the guest, the start script. The I/O (download, unpack, ldd) is in `geomirror.image`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from geomirror.errors import ImageError

KAMAILIO_PACKAGE = "kamailio"
KAMAILIO_BINARY = "usr/sbin/kamailio"
KAMAILIO_LIB_DIR = "usr/lib/x86_64-linux-gnu/kamailio"  # the modules' RUNPATH (libsrdb1)
KAMAILIO_MODULE_DIR = f"{KAMAILIO_LIB_DIR}/modules"
KAMAILIO_CFG = Path(__file__).resolve().parent.parent / "guest" / "kamailio.cfg"
GUEST_CFG_PATH = "etc/kamailio/kamailio.cfg"
START_SCRIPT_PATH = "usr/bin/gm-sip-start"
SIPP = Path("/usr/bin/sipp")
SIP_PORT = 5060
ECHO_PORT = 5070
MEDIA_PORT = 6000
# Kamailio's shared memory (transactions, dialogs, location table) and private memory per
# process (about nine processes with 2 UDP and 2 TCP workers), in MB: small next to the lab
# guest's 128 MB, touched only as used, and far above what 20 concurrent calls need.
SHM_MB = 16
PKG_MB = 4
# What a registrar with usrloc in memory and a dialog-stateful proxy loads (kamailio.cfg).
# Kamailio looks its transports up with getprotobyname().
ETC_PROTOCOLS = b"ip 0 IP\nicmp 1 ICMP\ntcp 6 TCP\nudp 17 UDP\n"
KAMAILIO_MODULES = (
    "tm", "sl", "rr", "pv", "maxfwd", "textops", "siputils", "xlog", "sanity", "usrloc",
    "registrar", "dialog",
)  # fmt: skip

START_SCRIPT = rf"""#!/bin/sh
# geomirror guest SIP (geomirror/guest_sip.py): Kamailio on UDP+TCP {SIP_PORT} of the guest's
# address ($1) and the echo UA (sipp UAS, UDP {ECHO_PORT}, RTP echo on {MEDIA_PORT}). Exits 0 once
# all three sockets listen, else prints a GEOMIRROR-GUEST-ERROR line and exits 1.
ip="$1"
[ -n "$ip" ] || {{ echo "GEOMIRROR-GUEST-ERROR gm-sip-start needs the guest address"; exit 1; }}
mkdir -p /run/kamailio /tmp/sipp
/{KAMAILIO_BINARY} -f /{GUEST_CFG_PATH} -l "udp:$ip:{SIP_PORT}" -l "tcp:$ip:{SIP_PORT}" \
    -m {SHM_MB} -M {PKG_MB} -w /tmp -Y /run/kamailio -P /run/kamailio/kamailio.pid -E \
    || {{ echo "GEOMIRROR-GUEST-ERROR kamailio did not start"; exit 1; }}
# sipp's parent exits 99 once the background UAS runs ("Background mode - PID=[n]").
cd /tmp/sipp && TERM=dumb sipp -sn uas -i "$ip" -p {ECHO_PORT} -mi "$ip" -mp {MEDIA_PORT} -rtp_echo \
    -bg -nostdin >/tmp/sipp/start.log 2>&1
rc=$?
if [ "$rc" != 99 ] && [ "$rc" != 0 ]; then
    cat /tmp/sipp/start.log; echo "GEOMIRROR-GUEST-ERROR the echo UA (sipp) did not start"; exit 1
fi
n=0
until grep -q ':{SIP_PORT:04X} 00000000:0000 0A' /proc/net/tcp \
    && grep -q ':{SIP_PORT:04X} 00000000:0000 07' /proc/net/udp \
    && grep -q ':{ECHO_PORT:04X} 00000000:0000 07' /proc/net/udp; do
    n=$((n + 1))
    if [ "$n" -gt 600 ]; then echo "GEOMIRROR-GUEST-ERROR SIP does not listen on {SIP_PORT}/{ECHO_PORT}"; exit 1; fi
    sleep 0.1
done
avail=$(grep MemAvailable /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
echo "gm-sip: kamailio on udp+tcp $ip:{SIP_PORT}, echo UA on udp $ip:{ECHO_PORT}, MemAvailable ${{avail}} kB"
"""


@dataclass(frozen=True)
class SipInputs:
    """What the guest's SIP part is made from; hashed into the image key."""

    kamailio_package_version: str
    config: str
    sipp: Path
    sipp_libs: tuple[Path, ...]
    start_script: str = START_SCRIPT
    modules: tuple[str, ...] = KAMAILIO_MODULES
    kamailio_package: str = KAMAILIO_PACKAGE


def digests(sip: SipInputs, sha256_file) -> dict:
    """The key's view of `sip`: names and versions as text, files by content."""
    return {
        "kamailio_package": sip.kamailio_package,
        "kamailio_package_version": sip.kamailio_package_version,
        "kamailio_modules": list(sip.modules),
        "kamailio_cfg_sha256": hashlib.sha256(sip.config.encode()).hexdigest(),
        "start_sha256": hashlib.sha256(sip.start_script.encode()).hexdigest(),
        "sipp_sha256": sha256_file(sip.sipp),
        "sipp_libs": {str(p): sha256_file(p) for p in sip.sipp_libs},
    }


def config_modules(config: str) -> tuple[str, ...]:
    """The module names a Kamailio config loads (`loadmodule "x.so"` lines), in order."""
    return tuple(re.findall(r'^\s*loadmodule\s+"([\w-]+)(?:\.so)?"', config, re.M))


def check_config_modules(config: str, modules: tuple[str, ...]) -> None:
    """ImageError if the config loads a module the image would not carry."""
    missing = [m for m in config_modules(config) if m not in modules]
    if missing:
        raise ImageError(f"{KAMAILIO_CFG} loads the module(s) {', '.join(missing)}, which the guest image "
                         f"does not carry (geomirror.guest_sip.KAMAILIO_MODULES)")


def kamailio_files(tree: Path, modules: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(file in the unpacked package, path in the guest) for the binary and each module."""
    picks = [(tree / KAMAILIO_BINARY, KAMAILIO_BINARY)]
    picks += [(tree / KAMAILIO_MODULE_DIR / f"{m}.so", f"{KAMAILIO_MODULE_DIR}/{m}.so") for m in modules]
    for src, _ in picks:
        if not src.is_file():
            raise ImageError(f"the kamailio package unpacked at {tree} has no {src.relative_to(tree)}")
    return picks


def place_libraries(libs: list[Path], tree: Path) -> list[tuple[Path, str]]:
    """(source, guest path) for libraries ldd found: one from the unpacked package goes to its
    path inside the package (the modules' RUNPATH), one from the host to its host path."""
    out: dict[str, Path] = {}
    for lib in libs:
        try:
            guest = str(lib.relative_to(tree))
        except ValueError:
            guest = str(lib).lstrip("/")
        out.setdefault(guest, lib)
    return [(src, guest) for guest, src in sorted(out.items())]


def guest_files(config: str, start_script: str) -> list[tuple[str, bytes, int]]:
    """(guest path, bytes, permissions) of the files the SIP part writes itself."""
    return [
        (GUEST_CFG_PATH, config.encode(), 0o644),
        (START_SCRIPT_PATH, start_script.encode(), 0o755),
        ("etc/protocols", ETC_PROTOCOLS, 0o644),
    ]
