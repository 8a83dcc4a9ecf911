"""The process ExaBGP runs: relays its API pipe to the daemon's UNIX socket.

    python -m bgp.relay /run/geomirror/bgp/api.sock

ExaBGP writes JSON events and `done`/`error` acks to our stdin; each line goes to the
daemon. Lines from the daemon (commands) go to our stdout, one per line, flushed. stdin is
read all the time, connected or not, so ExaBGP's pipe never fills. If the daemon's socket
drops we reconnect; events seen meanwhile are kept (bounded) and sent first, acks are
dropped (they answer commands of the old connection; the speaker re-sends its state).
We exit when ExaBGP closes our stdin.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time

BACKLOG_LINES = 1000
_ACKS = (b"done", b"error", b"shutdown")


def is_ack(line: bytes) -> bool:
    s = line.strip()
    return s in _ACKS or s.startswith(b'{ "answer"') or s.startswith(b'{"answer"')


class Relay:
    def __init__(self, path: str, stdin=None, stdout=None):
        self.path = path
        self.stdin = stdin or sys.stdin.buffer
        self.stdout = stdout or sys.stdout.buffer
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.backlog: collections.deque[bytes] = collections.deque(maxlen=BACKLOG_LINES)

    def _connect(self) -> socket.socket:
        delay = 0.05
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _from_daemon(self) -> None:
        """Socket → stdout; reconnects whenever the daemon's side goes away."""
        while True:
            s = self._connect()
            with self.lock:
                try:
                    for line in self.backlog:
                        s.sendall(line)
                    self.backlog.clear()
                    self.sock = s
                except OSError:
                    s.close()
                    continue
            try:
                for line in s.makefile("rb"):
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    self.stdout.write(line)
                    self.stdout.flush()
            except OSError:
                pass
            except ValueError:  # stdout closed under us: ExaBGP is going away
                return
            with self.lock:
                self.sock = None
            s.close()

    def _to_daemon(self, line: bytes) -> None:
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.sendall(line)
                    return
                except OSError:
                    try:  # wakes the reader thread, which reconnects
                        self.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self.sock = None
            if not is_ack(line):
                self.backlog.append(line)

    def run(self) -> int:
        threading.Thread(target=self._from_daemon, name="relay-from-daemon", daemon=True).start()
        for line in iter(self.stdin.readline, b""):  # ends when ExaBGP closes our stdin
            if not line.endswith(b"\n"):
                line += b"\n"
            self._to_daemon(line)
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bgp.relay SOCKET", file=sys.stderr)
        return 2
    return Relay(argv[1]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
