"""role.json: the one reader and writer; a corrupt file refuses the start with a sentence."""

from __future__ import annotations

import json

import pytest

from geomirror.ha import Role
from geomirror.site.role import GuestRecord, RoleFileError, RoleState, RoleStore


def test_missing_file_means_the_configs_initial_role(tmp_path):
    st = RoleStore(tmp_path, "standby").load()
    assert st.role is Role.STANDBY and st.lease_generation == 0 and st.run_id == "" and st.guest is None


def test_round_trip_is_durable_and_private(tmp_path):
    store = RoleStore(tmp_path, "primary")
    g = GuestRecord(pid=123, qmp="/run/x/qmp.sock", ram="/run/x/guest.ram", started_at=1.5)
    saved = store.save(RoleState(Role.PRIMARY, 7, "abc", guest=g, reason="booted"))
    assert saved.at > 0
    assert (tmp_path / "role.json").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".role.json*"))
    back = store.load()
    assert back.role is Role.PRIMARY and back.lease_generation == 7 and back.run_id == "abc" and back.guest == g


def test_words_of_older_files_are_understood(tmp_path):
    (tmp_path / "role.json").write_text(json.dumps({"role": "active", "lease_generation": 3, "run_id": "r",
                                                    "rejoined_from": "fenced"}))
    st = RoleStore(tmp_path, "standby").load()
    assert st.role is Role.PRIMARY and st.lease_generation == 3 and st.extra == {"rejoined_from": "fenced"}
    (tmp_path / "role.json").write_text(json.dumps({"role": "failed"}))
    assert RoleStore(tmp_path, "standby").load().role is Role.FENCED


@pytest.mark.parametrize("content, problem", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    ('{"role": "master"}', "'master' is not a valid Role"),
    ('{"role": "primary", "lease_generation": -1}', "lease_generation -1"),
    ('{"role": "primary", "lease_generation": "7"}', "lease_generation '7'"),
    ('{"role": "primary", "guest": {"pid": 1}}', "'qmp'"),
])
def test_a_corrupt_file_is_refused_with_a_sentence(tmp_path, content, problem):
    p = tmp_path / "role.json"
    p.write_text(content)
    with pytest.raises(RoleFileError) as e:
        RoleStore(tmp_path, "primary").load()
    msg = str(e.value)
    assert msg.startswith(f"{p} is corrupt (") and problem in msg and "refusing to start" in msg
    assert "\n" not in msg
    assert p.read_text() == content, "the file is left for the operator to look at"
