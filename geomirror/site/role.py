"""state_dir/role.json: what this site holds, across restarts. The only reader and writer.

A restarted daemon must neither forget that it took the guest over nor reuse a stale
lease generation, so the file is written durably (0600, atomic) on every change of
role or generation. A corrupt file is refused with a sentence naming it, as the witness
refuses a corrupt lease table: guessing could run a second copy of the guest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from geomirror.errors import GeomirrorError
from geomirror.ha import Role
from gmbase.files import atomic_write

# Words of role.json files written before the vocabulary was settled: "active" was the
# site that took over (it runs the guest), "failed" a site whose guest died.
_OLD_WORDS = {"active": Role.PRIMARY, "failed": Role.FENCED}


class RoleFileError(GeomirrorError):
    """role.json cannot be read or trusted."""


@dataclass(frozen=True)
class GuestRecord:
    """The QEMU this site runs for the guest (the guest itself at a primary, the hot standby at a
    standby), so a restarted daemon finds it again instead of starting another."""

    pid: int
    qmp: str
    ram: str
    started_at: float  # the process's start time (/proc/PID/stat), so a recycled pid is not taken for it
    tag: str = "primary"  # which of this site's QEMU definitions it runs: "primary" or "standby"

    @classmethod
    def of(cls, guest) -> "GuestRecord":
        spec = guest.spec
        return cls(pid=guest.pid, qmp=str(spec.qmp_path), ram=str(spec.ram_path), started_at=guest.started_at,
                   tag="standby" if spec.incoming else "primary")


@dataclass(frozen=True)
class RoleState:
    role: Role
    lease_generation: int = 0
    run_id: str = ""  # one booted guest and its continuation at the other site
    at: float = 0.0
    guest: GuestRecord | None = None
    reason: str = ""  # why the role last changed (for people reading the file)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["role"] = self.role.value
        extra = d.pop("extra")
        return {**extra, **d}


class RoleStore:
    def __init__(self, state_dir: Path, initial_role: str):
        self.path = Path(state_dir) / "role.json"
        self.initial_role = Role(initial_role)

    def load(self) -> RoleState:
        """The saved role; the config's initial role on a site's first start (no file)."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return RoleState(self.initial_role)
        except OSError as e:
            raise RoleFileError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            word = d.get("role")
            role = _OLD_WORDS.get(word) or Role(word)
            gen = d.get("lease_generation", 0)
            if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
                raise ValueError(f"lease_generation {gen!r} is not a whole number >= 0")
            run_id = d.get("run_id", "")
            if not isinstance(run_id, str):
                raise ValueError(f"run_id {run_id!r} is not a string")
            g = d.get("guest")
            guest = None
            if g is not None:
                guest = GuestRecord(pid=int(g["pid"]), qmp=str(g["qmp"]), ram=str(g["ram"]),
                                    started_at=float(g.get("started_at", 0.0)), tag=str(g.get("tag", "primary")))
                if guest.tag not in ("primary", "standby"):
                    raise ValueError(f"guest.tag {guest.tag!r} is not 'primary' or 'standby'")
        except (ValueError, KeyError, TypeError) as e:
            raise RoleFileError(
                f"{self.path} is corrupt ({e}): refusing to start, since guessing this site's role could run a "
                "second copy of the guest; restore it, or remove it to start as the config's initial role "
                f"({self.initial_role.value}) with lease generation 0") from None
        known = {"role", "lease_generation", "run_id", "at", "guest", "reason"}
        return RoleState(role, gen, run_id, float(d.get("at", 0.0)), guest, str(d.get("reason", "")),
                         {k: v for k, v in d.items() if k not in known})

    def save(self, state: RoleState) -> RoleState:
        state = replace(state, at=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(state.to_json()))
        return state
