"""sipp in the lab: its built-in UAC run from gm-client against the guest's PBX, and its results.

The UAC calls `sip:echo@198.51.100.10` (Kamailio relays to the echo UA in the guest), holds
each call, then sends BYE to the R-URI it started with (sipp ignores Record-Route: the PBX
matches the BYE by dialog). Results come from sipp's own files: the statistics CSV
(`-trace_stat`, last row = the totals), the message log (`-trace_msg`, one timestamped
block per message, for the longest wait for a response) and the exit code (0: every
call succeeded). While sipp runs, `ss` in gm-client records the local ports of the TCP
connections to the PBX, so a reopened connection shows.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from geomirror import netns
from lab import world

SIP_PORT = 5060
CLIENT_ADDR = "198.18.10.2"


@dataclass
class SippRun:
    """What one sipp UAC run did, from its exit code and its own files."""

    transport: str
    rc: int
    stats: dict[str, str]
    longest_response_gap_s: float
    longest_gap_request: str
    tcp_local_ports: list[int] = field(default_factory=list)
    stderr: str = ""
    # dead-call messages that are a second final answer to a request sent twice (UDP: sipp
    # retransmits after T1 = 500 ms without an answer; the UAS answers each copy, the second
    # answer comes after the call ended): SIP working as designed, not a lost or stray call
    duplicate_answers: int = 0

    def count(self, name: str) -> int:
        return int(self.stats.get(f"{name}(C)", self.stats.get(name, "0")) or 0)

    @property
    def created(self) -> int:
        return int(self.stats.get("TotalCallCreated", "0") or 0)

    @property
    def problems(self) -> list[str]:
        """Why this run is not a clean pass (empty when it is)."""
        out = []
        if self.rc != 0:
            out.append(f"sipp exited {self.rc}: {self.stderr.strip()[-300:]}")
        if self.created == 0 or self.count("SuccessfulCall") != self.created:
            out.append(f"{self.count('SuccessfulCall')} of {self.created} calls succeeded")
        for name in ("FailedCall", "OutOfCallMsgs"):
            if self.count(name):
                out.append(f"{name} {self.count(name)}")
        if self.count("DeadCallMsgs") > self.duplicate_answers:
            out.append(f"DeadCallMsgs {self.count('DeadCallMsgs')}" + (
                f" (answers to sipp's own retransmissions among them: {self.duplicate_answers})"
                if self.duplicate_answers else ""))
        if self.transport == "t1" and len(self.tcp_local_ports) > 1:
            out.append(f"the TCP connection was reopened (local ports {self.tcp_local_ports})")
        return out

    def summary(self) -> str:
        reopened = "n/a (UDP)" if self.transport != "t1" else (
            "no" if len(self.tcp_local_ports) <= 1 else f"yes {self.tcp_local_ports}")
        return (f"{'TCP' if self.transport == 't1' else 'UDP'}: calls {self.created}, successful "
                f"{self.count('SuccessfulCall')}, failed {self.count('FailedCall')}, retransmissions "
                f"{self.count('Retransmissions')}, out-of-call {self.count('OutOfCallMsgs')}, dead-call "
                f"{self.count('DeadCallMsgs')}"
                + (f" (answers to sipp's own retransmissions: {self.duplicate_answers})" if self.duplicate_answers
                   else "")
                + f", longest SIP response gap {self.longest_response_gap_s:.2f}s "
                f"({self.longest_gap_request}), TCP socket reopened: {reopened}")


# A phone in gm-client registers `[service]` with gm-client:CONTACT_PORT (its UAS) as Contact.
REGISTER_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="geomirror register">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[service]@[local_ip]:CONTACT_PORT;transport=[transport]>
      Expires: 3600
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""


# ---------------------------------------------------------------- pure parsers


def parse_stats(text: str) -> dict[str, str]:
    """The last row of sipp's -trace_stat CSV (';'-separated, a header row first), by column."""
    rows = [ln for ln in text.splitlines() if ln.strip()]
    if len(rows) < 2:
        return {}
    head = rows[0].rstrip(";").split(";")
    last = rows[-1].rstrip(";").split(";")
    return dict(zip(head, last))


_BLOCK = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n(.*?)(?=^-{20,} \d{4}-|\Z)", re.M | re.S)


def _header(msg: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.+?)\s*$", msg, re.M | re.I)
    return m.group(1) if m else ""


def _status(first_line: str) -> int | None:
    """The status code of an answer ("SIP/2.0 200 OK" -> 200); None for a request."""
    return int(first_line.split()[1]) if first_line.startswith("SIP/2.0") else None


def _logged(message_log: str) -> Iterator[tuple[str, str, tuple[str, str], int | None]]:
    """Each message in sipp's -trace_msg log as (timestamp, "sent" or "received", (Call-ID,
    CSeq), status code or None for a request); a message without Call-ID or CSeq is left out."""
    for m in _BLOCK.finditer(message_log):
        kind, _, msg = m.group(2).partition("\n")
        msg = msg.lstrip("\n")
        callid, cseq = _header(msg, "Call-ID"), _header(msg, "CSeq")
        if callid and cseq:
            yield m.group(1), "sent" if " sent" in kind else "received", (callid, cseq), _status(msg.split("\n", 1)[0])


def response_gaps(message_log: str) -> list[tuple[float, str]]:
    """(seconds, "METHOD Call-ID") from the first send of each request to its final response,
    read from sipp's -trace_msg log; a request with no final response is left out (sipp's
    counters report it as a failed call)."""
    sent: dict[tuple[str, str], tuple[datetime, str]] = {}
    gaps: list[tuple[float, str]] = []
    for ts, way, key, code in _logged(message_log):
        when = datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f")
        if way == "sent" and code is None:
            sent.setdefault(key, (when, f"{key[1].split()[-1]} {key[0]}"))
        elif way == "received" and code is not None and code >= 200 and key in sent:
            t0, what = sent.pop(key)
            gaps.append(((when - t0).total_seconds(), what))
    return gaps


_DEAD = re.compile(r"Dead call (\S+) \([^)]*\), received '(.*?)'\s*(?=\d{4}-\d\d-\d\d\t|\Z)", re.S)


def duplicate_answers(message_log: str, error_log: str) -> int:
    """How many of sipp's dead-call events (its -trace_err log) are a final answer to a request
    the message log shows sent more than once and answered more than once: the UAS's answer to
    sipp's own retransmission. Anything else there (a request, a provisional answer, an answer
    to a request sent once) is not counted, so it stays a problem."""
    logged = list(_logged(message_log))
    sends = Counter(key for _, way, key, code in logged if way == "sent" and code is None)
    finals = Counter(key for _, way, key, code in logged if way == "received" and code is not None and code >= 200)
    n = 0
    for m in _DEAD.finditer(error_log):
        msg = m.group(2)
        code, key = _status(msg.split("\n", 1)[0]), (m.group(1), _header(msg, "CSeq"))
        if (code is not None and code >= 200 and _header(msg, "Call-ID") == key[0]
                and sends[key] >= 2 and finals[key] >= 2):
            n += 1
    return n


# ---------------------------------------------------------------- running sipp in gm-client


def _tcp_local_ports(target: str) -> set[int]:
    res = netns.spawn(world.CLIENT, ["ss", "-Htn", "state", "established", "dst", f"{target}:{SIP_PORT}"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = res.communicate(timeout=10)
    ports = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            ports.add(int(parts[2].rsplit(":", 1)[1]))
    return ports


def start_uac(workdir: Path, *, transport: str, calls: int, rate: float, hold_ms: int,
              target: str = world.GUEST_ADDR, service: str = "echo", local_port: int = 5061) -> subprocess.Popen:
    """Start sipp's built-in UAC in gm-client: `calls` calls at `rate` per second, each held
    `hold_ms`, over one TCP connection (`t1`) or one UDP socket (`u1`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        "sipp", "-sn", "uac", "-t", transport, "-i", CLIENT_ADDR, "-p", str(local_port), "-s", service,
        f"{target}:{SIP_PORT}", "-m", str(calls), "-l", str(calls), "-r", str(rate), "-d", str(hold_ms),
        "-trace_stat", "-stf", str(workdir / "stat.csv"), "-fd", "1",
        "-trace_msg", "-message_file", str(workdir / "messages.log"),
        "-trace_err", "-error_file", str(workdir / "errors.log"),
        "-trace_screen", "-screen_file", str(workdir / "screen.log"),
        "-nostdin", "-max_reconnect", "0",
    ]
    return netns.spawn(world.CLIENT, argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)


def register(workdir: Path, user: str, contact_port: int, target: str = world.GUEST_ADDR) -> SippRun:
    """REGISTER sip:`user`@target with Contact gm-client:`contact_port` (UDP); waits for the 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = workdir / "register.xml"
    scenario.write_text(REGISTER_SCENARIO.replace("CONTACT_PORT", str(contact_port)))
    argv = ["sipp", "-sf", str(scenario), "-t", "u1", "-i", CLIENT_ADDR, "-p", str(contact_port + 1), "-s", user,
            f"{target}:{SIP_PORT}", "-m", "1", "-trace_stat", "-stf", str(workdir / "stat.csv"),
            "-trace_msg", "-message_file", str(workdir / "messages.log"), "-nostdin"]
    proc = netns.spawn(world.CLIENT, argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    return finish_uac(proc, workdir, "u1", 60)


def start_phone(workdir: Path, port: int) -> subprocess.Popen:
    """A phone in gm-client: sipp's built-in UAS on UDP `port`, answering every call."""
    workdir.mkdir(parents=True, exist_ok=True)
    return netns.spawn(world.CLIENT, ["sipp", "-sn", "uas", "-i", CLIENT_ADDR, "-p", str(port), "-nostdin",
                                      "-trace_err", "-error_file", str(workdir / "errors.log")],
                       cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_uac(proc: subprocess.Popen, workdir: Path, transport: str, timeout: float,
               ports: set[int] | None = None) -> SippRun:
    """Wait for a UAC started by `start_uac` and read its results."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err = f"sipp did not finish within {timeout:.0f}s (killed)\n{err}"
    stats = parse_stats(_read(workdir / "stat.csv"))
    messages = _read(workdir / "messages.log")
    gaps = response_gaps(messages)
    worst = max(gaps, default=(0.0, "no request"))
    return SippRun(transport=transport, rc=proc.returncode, stats=stats, longest_response_gap_s=worst[0],
                   longest_gap_request=worst[1], tcp_local_ports=sorted(ports or ()), stderr=err or "",
                   duplicate_answers=duplicate_answers(messages, _read(workdir / "errors.log")))


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


class TcpWatch(threading.Thread):
    """Records the local ports of gm-client's TCP connections to the PBX every `every` s."""

    def __init__(self, target: str = world.GUEST_ADDR, every: float = 0.5):
        super().__init__(daemon=True)
        self.target, self.every = target, every
        self.ports: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.ports |= _tcp_local_ports(self.target)
            self.stop.wait(self.every)

    def finish(self) -> set[int]:
        self.stop.set()
        self.join(15)
        return self.ports


def run_uac(workdir: Path, *, transport: str, calls: int, rate: float, hold_ms: int,
            during=None, timeout: float | None = None, service: str = "echo") -> SippRun:
    """Run the UAC to the end; `during(elapsed_fn)` runs meanwhile (e.g. a site loss)."""
    watch = TcpWatch() if transport == "t1" else None
    t0 = time.monotonic()
    proc = start_uac(workdir, transport=transport, calls=calls, rate=rate, hold_ms=hold_ms, service=service)
    if watch:
        watch.start()
    try:
        if during is not None:
            during(lambda: time.monotonic() - t0)
    finally:
        limit = timeout if timeout is not None else calls / rate + hold_ms / 1000 + 120
        run = finish_uac(proc, workdir, transport, limit)
        if watch:
            run.tcp_local_ports = sorted(watch.finish())
    return run
