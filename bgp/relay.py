"""The process ExaBGP runs: relays its API pipe to the daemon's UNIX socket.

ExaBGP writes JSON events and `done`/`error` acks to our stdin; we pass every line to the
daemon. The daemon's commands arrive on the socket; we write them to stdout, one per
line, flushed. Both directions are read continuously so no pipe ever fills. If the
daemon's socket goes away we reconnect (the speaker re-applies its state on connect).

    python -m bgp.relay /run/geomirror/bgp/api.sock
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time


def _connect(path: str) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.2)


def main(path: str) -> int:
    lock = threading.Lock()
    state = {"sock": _connect(path)}

    def from_daemon():
        while True:
            s = state["sock"]
            f = s.makefile("rb")
            for line in f:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
            with lock:  # daemon went away: reconnect
                if state["sock"] is s:
                    s.close()
                    state["sock"] = _connect(path)

    threading.Thread(target=from_daemon, daemon=True).start()
    for line in sys.stdin:  # from ExaBGP; ends when ExaBGP closes our stdin
        data = line.encode()
        for _ in range(2):
            try:
                state["sock"].sendall(data)
                break
            except OSError:
                time.sleep(0.2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bgp.relay SOCKET", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
