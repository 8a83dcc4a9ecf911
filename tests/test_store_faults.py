"""A full disk, an I/O error or a short write at every step of `Replica.commit`: the replica
is exactly epoch N-1 or N afterwards (or says it is invalid, and a reopen or the next
attempt brings it to N), never a mix. Faults come in through the FileOps seam; the real
full disk is in test_store_tmpfs.py."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import numpy as np
import pytest
import structlog

from replication.standby import resume
from replication.store import FileOps, Replica, ReplicaError, ReplicaStorageError
from tests import replica_worker as W

SIZE = W.PAGES * W.PS


class Faults(FileOps):
    """Fails chosen steps with an errno (after `after` good calls, `times` times; None = for
    ever), and optionally writes at most `short` bytes per writev."""

    def __init__(self, short: int = 0):
        self.rules: dict[str, list] = {}
        self.short = short
        self.failed: list[str] = []

    def fail(self, step: str, err: int = errno.ENOSPC, after: int = 0, times: int | None = None) -> "Faults":
        self.rules[step] = [err, after, times]
        return self

    def heal(self) -> None:
        self.rules.clear()

    def _check(self, step: str) -> None:
        rule = self.rules.get(step)
        if rule is None:
            return
        err, after, times = rule
        if after:
            rule[1] -= 1
            return
        if times is not None:
            if times == 0:
                return
            rule[2] -= 1
        self.failed.append(step)
        raise OSError(err, os.strerror(err))

    def writev(self, step, fd, parts):
        self._check(step)
        if self.short:
            return os.write(fd, b"".join(bytes(p) for p in parts)[: self.short])
        return super().writev(step, fd, parts)

    def fsync(self, step, fd):
        self._check(step)
        super().fsync(step, fd)

    def ftruncate(self, step, fd, length):
        self._check(step)
        super().ftruncate(step, fd, length)

    def msync(self, step, m):
        self._check(step)
        super().msync(step, m)

    def replace(self, step, path, data, fsync):
        self._check(step)
        super().replace(step, path, data, fsync)


def build(d, upto: int, ops: FileOps | None = None, resync_at: int = 0) -> Replica:
    r = Replica(d, SIZE, ops=ops)
    r.open()
    if r.committed_epoch == 0:
        r.begin_initial_sync()
    for e in range(r.committed_epoch + 1, upto + 1):
        epoch(r, e, resync_at)
    return r


def epoch(r: Replica, e: int, resync_at: int = 0) -> None:
    if e == resync_at:
        r.begin_resync()
        first, block = W.resync_blocks(e)
        r.write_block(first, block)
    pages, data, dev = W.epoch_content(e)
    r.commit(e, pages, data, dev)


def assert_whole(r: Replica, epochs: tuple, resync_at: int = 0) -> int:
    assert r.valid, f"replica invalid: {r.problem}"
    assert r.committed_epoch in epochs
    ram, dev = W.expected(r.committed_epoch, resync_at=resync_at or None)
    assert np.array_equal(r.ram, ram), f"RAM is not exactly epoch {r.committed_epoch}'s"
    assert r.device_state() == dev
    assert r.device_state_path.read_bytes() == dev
    return r.committed_epoch


BEFORE_DURABLE = ["resync-append", "journal-append", "journal-fsync"]
AFTER_DURABLE = ["ram-flush", "device-state", "meta"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("step", BEFORE_DURABLE + AFTER_DURABLE + ["journal-truncate"])
@pytest.mark.parametrize("persistent", [True, False])
def test_failure_at_each_step_leaves_n_minus_1_or_n(tmp_path, step, err, persistent):
    resync_at = 4
    ops = Faults()
    r = build(tmp_path, 3, ops, resync_at)
    ops.fail(step, err, times=None if persistent else 1)
    with structlog.testing.capture_logs() as logs:
        try:
            epoch(r, 4, resync_at)
            raised = None
        except ReplicaStorageError as e:
            raised = e
    assert ops.failed and ops.failed[0] == step
    if step in BEFORE_DURABLE:
        assert raised is not None and raised.step == step and raised.errno == err
        assert str(r.dir) in str(raised) and "bytes free" in str(raised)
        assert assert_whole(r, (3,), resync_at) == 3  # ram.img untouched
    elif step in AFTER_DURABLE and persistent:
        assert raised is not None and raised.errno == err
        assert not r.valid and "not usable" in r.problem and r.resync_base
    else:  # a transient failure after the journal is durable is replayed at once; truncation is harmless
        assert raised is None
        assert assert_whole(r, (4,), resync_at) == 4
    warnings = [x for x in logs if x["event"] == "replica.storage_failed"]
    assert len(warnings) == (1 if step != "journal-truncate" else 0)
    if warnings:
        assert warnings[0]["path"] and warnings[0]["error"] == os.strerror(err) and "free_bytes" in warnings[0]
    r.close()

    # Reopened with a working disk: whole, at 3 or 4; a durable epoch is never lost.
    ops.heal()
    r = Replica(tmp_path, SIZE, ops=ops)
    rep = r.open()
    want = (3,) if step in BEFORE_DURABLE else (4,)
    assert assert_whole(r, want, resync_at) in want, rep
    assert r.problem is None
    # and it carries on
    r.ready()
    for e in range(r.committed_epoch + 1, 6):
        epoch(r, e, resync_at)
    assert assert_whole(r, (5,), resync_at) == 5
    r.close()


@pytest.mark.parametrize("step", AFTER_DURABLE)
def test_next_attempt_replays_without_reopen(tmp_path, step):
    """The disk comes back while the process lives: the journalled epoch is replayed by `ready`
    (the standby's next session), then epochs go on."""
    ops = Faults()
    r = build(tmp_path, 3, ops)
    ops.fail(step)
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    assert not r.valid
    with pytest.raises(ReplicaStorageError):  # still failing: refused again, still not trusted
        r.ready()
    assert not r.valid
    ops.heal()
    with structlog.testing.capture_logs() as logs:
        r.ready()
        assert assert_whole(r, (4,)) == 4
        epoch(r, 5)
    assert assert_whole(r, (5,)) == 5
    assert [x["event"] for x in logs if x["log_level"] == "warning"] == []
    assert any(x["event"] == "replica.storage_recovered" for x in logs)
    r.close()


def test_short_writes_are_continued(tmp_path):
    """A journal written 1000 bytes at a time is whole: a replay from it gives exactly epoch 4."""
    ops = Faults(short=1000)
    r = build(tmp_path, 3, ops, resync_at=4)
    ops.fail("ram-flush")  # forces the epoch to come back from the journal alone
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4, resync_at=4)
    r.close()
    ops.heal()
    r = Replica(tmp_path, SIZE)
    assert r.open().recovered == "replayed epoch 4"
    assert assert_whole(r, (4,), resync_at=4) == 4
    r.close()


def test_torn_append_that_cannot_be_emptied_is_emptied_before_the_next_transaction(tmp_path):
    """ENOSPC after a few short writes leaves a torn record; if the journal cannot be emptied
    then, the next transaction must empty it first, or its records would sit behind the torn
    one where a replay never reaches them."""
    ops = Faults(short=1000)
    r = build(tmp_path, 3, ops)
    ops.fail("journal-append", after=3).fail("journal-reset")
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    assert r.journal_path.stat().st_size == 3000  # the torn record is still there
    assert assert_whole(r, (3,)) == 3
    ops.heal()
    ops.fail("ram-flush")  # epoch 4 must come back from the journal
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    r.close()
    r = Replica(tmp_path, SIZE)
    assert r.open().recovered == "replayed epoch 4"
    assert assert_whole(r, (4,)) == 4
    r.close()


def test_initial_sync_after_a_failed_replay_never_replays_the_old_epoch(tmp_path):
    """An invalid replica (replay failing) that gets an initial sync: the journal is emptied
    before any block lands in ram.img, so a reopen never replays epoch 4 onto the new RAM."""
    ops = Faults()
    r = build(tmp_path, 3, ops)
    ops.fail("device-state", times=2)  # the apply and the immediate replay
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    assert not r.valid and r.journal_path.stat().st_size > 0
    r.begin_initial_sync()
    assert r.journal_path.stat().st_size == 0
    r.write_block(0, np.full((W.PAGES, W.PS), 9, np.uint8))
    r.close()
    r = Replica(tmp_path, SIZE)
    rep = r.open()
    assert not rep.valid and rep.committed_epoch == 0 and rep.recovered == "clean"
    r.close()


def test_crash_between_invalidating_and_emptying_the_journal_replays_onto_untouched_ram(tmp_path):
    """begin_initial_sync records `valid: false` first, then empties the journal: if the second
    step fails, a reopen replays the journalled epoch onto RAM no block has touched yet."""
    ops = Faults()
    r = build(tmp_path, 3, ops)
    ops.fail("device-state", times=2)
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    ops.fail("journal-reset")
    with pytest.raises(ReplicaStorageError):
        r.begin_initial_sync()
    r.close()
    r = Replica(tmp_path, SIZE)
    assert r.open().recovered == "replayed epoch 4"
    assert assert_whole(r, (4,)) == 4
    r.close()


def test_resume_refuses_a_replica_left_mixed(tmp_path):
    ops = Faults().fail("meta")
    r = build(tmp_path, 2, FileOps())
    r._ops = ops
    with pytest.raises(ReplicaStorageError):
        epoch(r, 3)
    with pytest.raises(ReplicaError, match="not usable: replaying the journal failed"):
        asyncio.run(resume(r, None))
    r.close()


@pytest.mark.parametrize("content, what", [
    (b"{not json", "it is not JSON"),
    (b"[1, 2]", "a JSON list where an object was expected"),
    (b'{"committed_epoch": "7", "valid": true}', "committed_epoch is '7'"),
    (b'{"committed_epoch": 3, "valid": "yes"}', "valid is 'yes'"),
    (b'{"committed_epoch": -1}', "committed_epoch is -1"),
    (b"\xff\xfe", "it is not JSON"),
])
def test_corrupt_replica_json_is_refused_with_a_sentence(tmp_path, content, what):
    build(tmp_path, 1).close()
    (tmp_path / "replica.json").write_bytes(content)
    r = Replica(tmp_path, SIZE)
    with pytest.raises(ReplicaError) as ei:
        r.open()
    msg = str(ei.value)
    assert f"the replica record {tmp_path / 'replica.json'} is corrupt: {what}" in msg
    assert "remove it" in msg
    r.close()
    # removing it, as the sentence says, gives a fresh (invalid) replica that does a full sync
    (tmp_path / "replica.json").unlink()
    r = Replica(tmp_path, SIZE)
    rep = r.open()
    assert not rep.valid and rep.committed_epoch == 0
    r.close()


def test_replica_json_is_still_read_when_written_by_the_previous_version(tmp_path):
    build(tmp_path, 2).close()
    meta = json.loads((tmp_path / "replica.json").read_text())
    del meta["problem"]
    (tmp_path / "replica.json").write_text(json.dumps(meta))
    r = Replica(tmp_path, SIZE)
    assert r.open().committed_epoch == 2
    r.close()


def test_ram_image_is_preallocated(tmp_path):
    r = Replica(tmp_path, SIZE)
    r.open()
    assert os.stat(r.ram_path).st_blocks * 512 >= SIZE, "ram.img is sparse: a full disk would SIGBUS later"
    r.close()


def test_another_run_never_inherits_a_mixed_ram_as_valid(tmp_path):
    """A full disk kept the replica from recording that it is invalid; then the primary comes
    with another guest run and the new replica.json cannot be written either: whatever is on
    disk afterwards must not say valid over RAM that is part epoch 3, part epoch 4."""
    ops = Faults()
    r = build(tmp_path, 3, ops)
    ops.fail("device-state", times=2).fail("meta", times=1)  # the apply, the replay, the give-up
    with pytest.raises(ReplicaStorageError):
        epoch(r, 4)
    assert json.loads(r.meta_path.read_text())["valid"], "the test needs the disk to still say valid"
    ops.fail("meta", after=1, times=1)  # bind: `valid: false` goes through, the new run's record not
    with pytest.raises(ReplicaStorageError):
        r.bind({"other": True}, "run-2")
    r.close()
    r = Replica(tmp_path, SIZE)
    rep = r.open()
    assert not rep.valid, f"RAM of epoch 4 with the device state of epoch 3 claimed valid ({rep})"
    r.close()


@pytest.mark.parametrize("step", AFTER_DURABLE + ["journal-truncate"])
def test_a_failed_group_commit_write_back_replays_from_both_journal_files(tmp_path, step):
    """A write-back (in its thread) fails: the epochs it was writing and those journalled since
    are replayed from both journal files before the next epoch, which then goes on; the files end
    up saying the last epoch, whole."""
    ops = Faults()
    r = Replica(tmp_path, SIZE, ops=ops, writeback_ms=0.001)
    r.open()
    r.begin_initial_sync()
    epoch(r, 1)  # written back at once (after the initial sync)
    ops.fail(step, times=1)
    epoch(r, 2)  # applied in memory; its write-back fails in the thread
    r._join_writeback()
    assert ops.failed == [step]
    assert r.committed_epoch == 2 and r.durable_epoch == 2  # still what a takeover would resume
    if step != "journal-truncate":  # a failed truncation is harmless: the files do say epoch 2
        # not taken for written: the files still say 1, and the journal is replayed before epoch 3
        assert r.written_epoch == 1 and r.pending, (r.written_epoch, r.pending)
    epoch(r, 3)
    epoch(r, 4)
    r.flush()
    assert_whole(r, (4,))
    assert json.loads(r.meta_path.read_text())["committed_epoch"] == 4
    r.close()
    r2 = Replica(tmp_path, SIZE)
    assert r2.open().committed_epoch == 4
    assert_whole(r2, (4,))
    r2.close()
