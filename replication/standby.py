"""Standby side: verify, journal, apply, acknowledge; and resume the guest from the replica.

A checkpoint is acknowledged once it is verified (AEAD), its replica check compared and its
transaction durable in the replica's journal (`Replica.journal`); it is applied right after the
ACK (`Replica.apply_journalled`), under the lock every other reader of the replica takes, so
the next checkpoint, a new session and a takeover all see it applied, and a crash in between
replays it (docs/replication.md, "What the ACK means"). Its disk blocks and zeroed disk ranges (a
replica with a disk) are in the same transaction as its RAM. The primary's guest disk must be the replica disk's size (HELLO
`disk_bytes`), else the session is refused with a sentence naming both and the file. Anything that fails verification, arrives out of
order (a replayed or stale epoch) or breaks the protocol drops the connection with a
clear log line and is never applied; the primary reconnects and resyncs.

A replica disk that is full or failing stops protection, visibly: the session is
refused with the sentence (an ERROR message, so the primary logs why and reconnects
with backoff), `StandbyStatus.state` is ``disk_full`` / ``disk_failed`` with
`StandbyStatus.problem`, and every later session is refused at its HELLO, cheaply,
until the replica is settled and the space the failed write needed is back; then the
session's resync brings protection back by itself. O(RAM) work (block hashes, the
apply, binding) runs in a thread, never on the event loop that carries heartbeats.

In a planned switchover the primary sends, with the SWITCHOVER, the guest's inbound frames
that reached it after its final epoch (GUEST_FRAMES). They are kept here, bounded
(`max_forwarded_bytes`, the rest dropped and counted), until the site resumes the guest and
takes them (`take_forwarded`); a later committed epoch (the primary went on) discards them.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import structlog

from replication import codec as codec_mod
from replication import verify
from replication.progress import Progress
from replication.qemu import Guest, GuestSpec
from replication.session import (BLOCK_PAGES, HELLO_UPSTREAM_KEY, LinkStats, compat_mismatch, heartbeat_payload,
                                 new_nonce, on_heartbeat_message, own_lateness, run_to_end, send_heartbeats,
                                 session_key)
from replication.store import Replica, ReplicaError, ReplicaStorageError, _crash_point
from replication.transport import (HELLO_DISK_KEY, HELLO_FRAMES_KEY, PROTOCOL_VERSION, Channel, ChannelError,
                                   MsgType, unpack_frames)

log = structlog.get_logger(__name__)
_U64 = struct.Struct(">Q")


@dataclass
class StandbyStatus:
    state: str = "waiting"  # waiting | syncing | replicating | taken_over | disk_full | disk_failed
    committed_epoch: int = 0
    valid: bool = False
    peer: str | None = None
    peer_cert_serial: str | None = None
    last_apply_ms: float = 0.0  # the last checkpoint, from its read to applied
    last_journal_ms: float = 0.0  # ... from its read to durable in the journal (then the ACK goes)
    max_journal_ms: float = 0.0  # the longest journal step (read to durable) since this standby began
    max_apply_ms: float = 0.0  # the longest apply step (the ACK to applied: the next epoch waits on it)
    slow_steps: int = 0  # journal or apply steps that took SLOW_STEP_MS or more (standby.slow_step)
    rejected_frames: int = 0
    sessions: int = 0
    problem: str | None = None  # why this site is not protecting the guest (one sentence), or None
    verified: int = 0  # epochs whose replica check matched the primary's live RAM
    verified_bytes: int = 0
    diverged: int = 0  # epochs whose replica check did not match (replica.diverged)
    last_divergence: dict | None = None
    frames_received: int = 0  # guest frames the primary forwarded in handovers (GUEST_FRAMES)
    frames_dropped: int = 0  # ... over max_forwarded_bytes, or stale (the primary went on)


_NOT_PROTECTING = ("disk_full", "disk_failed")
SLOW_STEP_MS = 100.0  # a checkpoint's journal or apply step this long is logged (standby.slow_step)


class Standby:
    def __init__(self, replica: Replica, compat: dict, site: str, heartbeat_ms: float = 100.0,
                 allowed_peer=None, min_timeout_ms: float = 600.0, max_timeout_ms: float = 5000.0,
                 refuse_delay_s: float = 1.0, max_forwarded_bytes: int = 4 << 20):
        # A refused primary reconnects at once; answering a disk-full refusal after this delay
        # keeps that loop (a TLS handshake and a log line each) slow. Resumption waits at most this.
        self.refuse_delay_s = refuse_delay_s
        self.min_timeout_ms = min_timeout_ms
        self.max_timeout_ms = max_timeout_ms
        self.replica = replica
        self.compat = compat
        self.site = site
        self.heartbeat_ms = heartbeat_ms
        self.allowed_peer = allowed_peer  # callable(channel) -> None, raises on a wrong peer
        self.link = LinkStats()
        self.status = StandbyStatus(committed_epoch=replica.committed_epoch, valid=replica.valid)
        self._lock = asyncio.Lock()
        self._slow_logged_at = float("-inf")  # when standby.slow_step was last logged
        self._current: Channel | None = None
        self._bar: Progress | None = None
        self._chained = False  # a checkpoint of this session was committed since its sync: the next follows it
        self._last_heard = time.monotonic()
        self.accepting = True
        self.on_commit = None
        self.on_switchover = None  # callable(epoch): the primary hands the guest over (planned)
        self.on_heard = None
        self.on_heartbeat = None  # (peer generation, LinkStats, peer's upstream-up ms or None)
        self.generation_fn = lambda: 0
        self.upstream_fn = lambda: None  # this site's upstream-up ms, for a primary that reads it
        self._peer_reads_upstream = False
        self.max_forwarded_bytes = max_forwarded_bytes
        self._forwarded: deque[bytes] = deque()  # guest frames for the resume, in arrival order
        self._forwarded_bytes = 0

    def take_forwarded(self) -> list[bytes]:
        """The guest frames the primary forwarded in its handover, oldest first (then none)."""
        frames = list(self._forwarded)
        self._forwarded.clear()
        self._forwarded_bytes = 0
        return frames

    def _keep_forwarded(self, frames: list[bytes]) -> None:
        for f in frames:
            if self._forwarded_bytes + len(f) > self.max_forwarded_bytes:
                self.status.frames_dropped += 1
                continue
            self._forwarded.append(f)
            self._forwarded_bytes += len(f)
        self.status.frames_received += len(frames)

    def silence_ms(self) -> float:
        return (time.monotonic() - self._last_heard) * 1000

    async def handle(self, ch: Channel) -> None:
        """One connection from the primary (the transport server calls this)."""
        if self.allowed_peer is not None:
            try:
                self.allowed_peer(ch)
            except Exception as e:
                log.warning("standby.peer_refused", peer=ch.peer, error=str(e))
                return
        if not self.accepting:
            await ch.refuse(f"site {self.site} has taken over the guest; it no longer accepts checkpoints")
            return
        hello = await asyncio.wait_for(ch.recv_json(MsgType.HELLO), 10)
        self._peer_reads_upstream = hello.get(HELLO_UPSTREAM_KEY) == 1
        if hello.get("proto") != PROTOCOL_VERSION:
            msg = (f"protocol mismatch: the primary {ch.peer} speaks replication protocol {hello.get('proto')!r}, "
                   f"site {self.site} speaks {PROTOCOL_VERSION}; run the same geomirror version at both sites")
            log.error("standby.refused", peer=ch.peer, reason=msg)
            await ch.refuse(msg)
            return
        bad = compat_mismatch(self.compat, hello.get("compat") or {})
        if bad:
            log.error("standby.refused", peer=ch.peer, reason=bad)
            await ch.refuse(bad)
            return
        if hello.get("ram_bytes") != self.replica.size:
            msg = f"guest RAM size mismatch: ours {self.replica.size}, theirs {hello.get('ram_bytes')}"
            await ch.refuse(msg)
            return
        bad = self._disk_mismatch(hello.get(HELLO_DISK_KEY, 0))
        if bad:
            log.error("standby.refused", peer=ch.peer, reason=bad)
            await ch.refuse(bad)
            return
        if self._current is not None:
            log.info("standby.replacing_session", old=self._current.peer, new=ch.peer)
            self._current.close()
        self._current = ch
        async with self._lock:
            try:
                # a failed write left work behind (a replay) or the disk is still full: refuse
                await asyncio.to_thread(self.replica.ready)
                await asyncio.to_thread(self.replica.bind, self.compat, str(hello.get("run_id", "")))
            except ReplicaStorageError as e:
                refused = e
            else:
                refused = None
                valid = self.replica.valid
                base = self.replica.resync_base
                nonce = new_nonce()
                await ch.send_json(MsgType.HELLO_REPLY, {
                    "proto": PROTOCOL_VERSION, "site": self.site, "nonce": nonce.hex(),
                    "committed_epoch": self.replica.committed_epoch, "valid": valid, "hashes": base,
                    "block_pages": BLOCK_PAGES, HELLO_UPSTREAM_KEY: 1, HELLO_FRAMES_KEY: 1,
                    HELLO_DISK_KEY: self.replica.disk_size})
                if base:
                    await ch.send(MsgType.HASHES, await asyncio.to_thread(self._hashes_blob))
                if self.replica.disk_size:
                    # always: they say truthfully what the replica disk holds, valid or not, so an
                    # initial sync sends only the chunks that differ (a fresh sparse file: the data)
                    await ch.send(MsgType.DISK_HASHES, b"".join(await asyncio.to_thread(self.replica.disk_hashes)))
        if refused is not None:
            if self._current is ch:
                self._current = None
            await self._refuse_storage(ch, refused, at_hello=True)
            return
        codec = codec_mod.Codec(session_key(bytes.fromhex(hello["nonce"]), nonce))
        self.status.sessions += 1
        self.status.peer = ch.peer
        self.status.peer_cert_serial = ch.peer_cert_serial()
        log.info("standby.session", peer=ch.peer, committed_epoch=self.replica.committed_epoch, valid=valid)
        beater = asyncio.create_task(self._heartbeats(ch))
        self._last_heard = time.monotonic()
        self._chained = False
        try:
            await self._watch(ch, asyncio.create_task(self._loop(ch, codec)))
        except ReplicaStorageError as e:
            await self._refuse_storage(ch, e, at_hello=False)
        except (ChannelError, codec_mod.CodecError, ReplicaError) as e:
            self.status.rejected_frames += isinstance(e, (codec_mod.CodecError, ReplicaError))
            log.warning("standby.session_ended", peer=ch.peer, error=str(e),
                        committed_epoch=self.replica.committed_epoch)
        finally:
            beater.cancel()
            if self._current is ch:
                self._current = None
                if self.status.state != "taken_over" and self.status.state not in _NOT_PROTECTING:
                    self.status.state = "waiting"

    def _disk_mismatch(self, theirs) -> str | None:
        """Why the primary's guest disk (its size in bytes, 0: none) cannot be replicated here."""
        ours, path = self.replica.disk_size, self.replica.disk_path
        if not isinstance(theirs, int) or isinstance(theirs, bool) or theirs < 0:
            return f"the primary sent a malformed guest disk size {theirs!r}"
        if theirs == ours:
            return None
        if not ours:
            return (f"the primary's guest has a disk of {theirs} bytes, but site {self.site} has no replica disk "
                    f"configured; give it a raw file of {theirs} bytes")
        if not theirs:
            return (f"the primary's guest has no disk, but site {self.site} replicates one into {path} "
                    f"({ours} bytes): the sites' guest configurations differ")
        return (f"guest disk size mismatch: the primary's disk is {theirs} bytes, the replica disk {path} at "
                f"site {self.site} is {ours} bytes; resize one of them")

    def _hashes_blob(self) -> bytes:
        return b"".join(self.replica.block_hashes(BLOCK_PAGES))

    async def _refuse_storage(self, ch: Channel, e: ReplicaStorageError, at_hello: bool) -> None:
        """The replica's disk cannot take checkpoints: say so (status, one log line per episode)
        and refuse the session with the sentence, so the primary knows why it is unprotected."""
        state = "disk_full" if e.disk_full else "disk_failed"
        problem = f"site {self.site} is not protecting the guest: its replica cannot store checkpoints: {e}"
        if self.status.problem is None:  # once per episode: the next committed epoch ends it
            log.warning("standby.not_protecting", peer=ch.peer, state=state, problem=problem,
                        committed_epoch=self.replica.committed_epoch, valid=self.replica.valid)
        else:
            log.debug("standby.still_not_protecting", peer=ch.peer, at_hello=at_hello, problem=problem)
        self.status.state = state
        self.status.problem = problem
        self.status.valid = self.replica.valid
        self.status.committed_epoch = self.replica.committed_epoch
        if self._bar is not None:
            self._bar.abandon()
            self._bar = None
        if self.refuse_delay_s:
            await asyncio.sleep(self.refuse_delay_s)
        await ch.refuse(problem)

    async def _loop(self, ch: Channel, codec) -> None:
        try:
            await self._messages(ch, codec)
        finally:
            if self._bar is not None:
                self._bar.abandon()
                self._bar = None

    async def _messages(self, ch: Channel, codec) -> None:
        while True:
            mtype, payload = await ch.recv()
            self._last_heard = time.monotonic()
            if self.on_heard:
                self.on_heard()
            if not self.accepting:
                raise ChannelError("this site has taken over; dropping the replication session")
            if await on_heartbeat_message(ch, mtype, payload, self.link, self.on_heartbeat):
                pass
            elif mtype is MsgType.SYNC_BEGIN:
                try:
                    info = json.loads(payload)
                except ValueError:
                    raise ChannelError("primary sent a malformed SYNC_BEGIN") from None
                self._chained = False  # the sync's epoch is the primary's: the next checkpoint follows it
                async with self._lock:
                    if info.get("mode") == "initial":
                        await asyncio.to_thread(self.replica.begin_initial_sync)
                    else:
                        await asyncio.to_thread(self.replica.begin_resync)
                self.status.state = "syncing"
                self.status.valid = self.replica.valid
                log.info("standby.sync_begin", mode=info.get("mode"), blocks=info.get("blocks"))
                pages = int(info.get("blocks") or 0) * int(info.get("block_pages") or 1)
                self._bar = Progress(f"{info.get('mode')} sync from {ch.peer}", pages,
                                     event="standby.sync_progress", mode=info.get("mode"), peer=ch.peer)
            elif mtype is MsgType.SYNC:
                async with self._lock:
                    end = await asyncio.to_thread(self._apply_sync, codec, payload)
                if self._bar is not None and end:
                    self._bar.update(end, self._bar.nbytes + len(payload))
            elif mtype is MsgType.CHECKPOINT:
                if self._bar is not None:  # the first checkpoint after a sync ends it
                    self._bar.finish()
                    self._bar = None
                await self._checkpoint(ch, codec, payload)
            elif mtype is MsgType.GUEST_FRAMES:
                self._keep_forwarded(unpack_frames(payload, ch.peer))
            elif mtype is MsgType.SWITCHOVER and len(payload) == _U64.size:
                (epoch,) = _U64.unpack(payload)
                if epoch != self.replica.committed_epoch or not self.replica.valid:
                    log.warning("standby.switchover_refused", epoch=epoch,
                                committed_epoch=self.replica.committed_epoch,
                                reason="the primary's final epoch is not the one committed here")
                elif self.on_switchover:
                    log.info("standby.switchover", epoch=epoch, peer=ch.peer)
                    self.on_switchover(epoch)
            else:
                raise ChannelError(f"primary sent unexpected {mtype.name}")

    def detection_timeout_ms(self) -> float:
        return self.link.detection_timeout_ms(self.min_timeout_ms, self.max_timeout_ms, self.heartbeat_ms)

    async def _watch(self, ch: Channel, loop_task: asyncio.Task) -> None:
        try:
            tick = self.heartbeat_ms / 1000
            while True:
                t0 = time.monotonic()
                done, _ = await asyncio.wait({loop_task}, timeout=tick)
                if done:
                    return loop_task.result()
                late = own_lateness(tick, time.monotonic() - t0)
                if late:  # our own loop was late: that is not the primary's silence
                    self._last_heard = min(time.monotonic(), self._last_heard + late)
                # a long initial sync is traffic, so silence means the link or the primary is gone
                if self.silence_ms() > max(self.detection_timeout_ms(), 2000 if self.status.state == "syncing" else 0):
                    raise ChannelError(f"no word from the primary for {self.silence_ms():.0f} ms")
        finally:
            loop_task.cancel()

    def _apply_sync(self, codec, payload: bytes) -> None:
        d = codec.decode(payload)
        if d.kind != codec_mod.KIND_FULL:
            raise ChannelError(f"a SYNC message carried a non-full frame (epoch {d.epoch})")
        pages = d.page_numbers
        if pages.size and not np.array_equal(pages, np.arange(int(pages[0]), int(pages[0]) + pages.size)):
            raise ChannelError("a SYNC frame's pages are not one contiguous run")
        if d.disk_zeroes is not None:
            raise ChannelError(f"a SYNC frame carried {len(d.disk_zeroes)} zeroed disk ranges (epoch {d.epoch})")
        if d.disk_blocks is not None:
            self.replica.write_disk_blocks(d.disk_blocks, d.disk_data)
        if pages.size:
            self.replica.write_block(int(pages[0]), d.payload)
            return int(pages[-1]) + 1
        return 0

    async def _on_diverged(self, ch: Channel, div: verify.Divergence) -> None:
        """The replica, at the epoch just applied, is not the primary's RAM. No ack: output of this
        epoch stays held at the primary. The replica is no longer trusted for a resume (only as a
        resync base), the primary is told, and the session ends: the next one resyncs."""
        self.status.diverged += 1
        self.status.last_divergence = div.as_dict()
        self.status.valid = False
        self.status.problem = (f"site {self.site} cannot resume the guest until the resync completes: "
                               f"{div.sentence()}")
        log.error("replica.diverged", peer=ch.peer, side="standby", diverged=self.status.diverged,
                  **div.as_dict(), hint="a checkpoint missed a write; the primary resyncs this replica")
        async with self._lock:
            await asyncio.to_thread(self.replica.mark_diverged, div.sentence())
        await ch.send_json(MsgType.DIVERGED, div.as_dict())
        raise ChannelError(f"replica diverged from {ch.peer}'s RAM at epoch {div.epoch}")

    async def _checkpoint(self, ch: Channel, codec, payload: bytes) -> None:
        """One epoch: verify and journal it (durable), acknowledge it, then apply it. The ACK says
        "durable in this site's journal" (docs/replication.md, "What the ACK means"): the apply
        follows under the same lock, run to its end even if this task is cancelled, so nothing
        that reads the replica (the next checkpoint, a new session, a takeover's stop_accepting)
        can see it before the apply is done; a crash in between replays it from the journal."""
        t0 = time.perf_counter()
        async with self._lock:
            epoch, diverged = await run_to_end(asyncio.ensure_future(
                asyncio.to_thread(self._journal_checkpoint, codec, payload)))
            self.status.last_journal_ms = journal_ms = (time.perf_counter() - t0) * 1000
            self.status.max_journal_ms = max(self.status.max_journal_ms, journal_ms)
            self._note_slow("journal", epoch, journal_ms)
            try:
                if diverged is None:
                    await ch.send(MsgType.ACK, _U64.pack(epoch))
                    _crash_point("after-ack")
            finally:
                t1 = time.perf_counter()
                await run_to_end(asyncio.ensure_future(asyncio.to_thread(self.replica.apply_journalled)))
                apply_ms = (time.perf_counter() - t1) * 1000
                self.status.max_apply_ms = max(self.status.max_apply_ms, apply_ms)
                self._note_slow("apply", epoch, apply_ms)
        self.status.last_apply_ms = (time.perf_counter() - t0) * 1000
        if diverged is not None:
            await self._on_diverged(ch, diverged)
        self.status.committed_epoch = epoch
        self._chained = True
        self.status.valid = True
        self.status.state = "replicating"
        if self.status.problem is not None:
            log.info("standby.protecting_again", epoch=epoch, peer=ch.peer, was=self.status.problem)
            self.status.problem = None
        if self._forwarded:  # a handover's frames, and the primary went on: they are its guest's
            self.status.frames_dropped += len(self._forwarded)
            self.take_forwarded()
        if self.on_commit:
            self.on_commit(epoch)

    def _note_slow(self, step: str, epoch: int, ms: float) -> None:
        """Say when a step held the guest's output back for long (at most one line a second, the
        rest counted in `slow_steps`): the primary releases epoch N's output only on ACK N, which
        waits for N's journal (its fsync); and this standby reads epoch N+1 only once N is applied
        (RAM write-back and three fsyncs), so a slow apply delays ACK N+1 by as much."""
        if ms < SLOW_STEP_MS:
            return
        self.status.slow_steps += 1
        now = time.monotonic()
        if now - self._slow_logged_at >= 1.0:
            self._slow_logged_at = now
            log.warning("standby.slow_step", step=step, epoch=epoch, ms=round(ms, 1), slow_total=self.status.slow_steps,
                        replica=str(self.replica.dir),
                        holds=f"the ACK of epoch {epoch}" if step == "journal" else f"the ACK of epoch {epoch + 1}",
                        hint="the replica's storage (fsync) or this host's load: the guest's output waited that long")

    def _journal_checkpoint(self, codec, payload: bytes) -> tuple[int, verify.Divergence | None]:
        """In a thread: decode, check and journal the epoch (durable, not applied yet); compare its
        replica check with the replica as it will be once applied."""
        hdr = codec_mod.peek_header(payload)
        if hdr.epoch <= self.replica.committed_epoch:
            raise ReplicaError(f"checkpoint for epoch {hdr.epoch} rejected: epoch {self.replica.committed_epoch} "
                               "is already committed (a replayed or stale frame)")
        if self._chained and hdr.epoch != self.replica.committed_epoch + 1:
            # a delta on top of a missing one would leave the replica neither epoch's RAM
            raise ReplicaError(f"checkpoint for epoch {hdr.epoch} rejected: epoch {self.replica.committed_epoch + 1} "
                               f"should come first (lost or out of order); the replica stays at epoch "
                               f"{self.replica.committed_epoch}")
        d = codec.decode(payload)
        if d.kind != codec_mod.KIND_DELTA:
            raise ChannelError(f"a CHECKPOINT message carried a non-delta frame (epoch {d.epoch})")
        old = self.replica.old_pages(d.page_numbers)
        new = d.new_pages(old)
        base = self.replica.device_state() if d.header.dev_delta else b""
        if d.check is not None and (why := verify.problem(d.check, self.replica.size)):
            raise ChannelError(f"the checkpoint of epoch {d.epoch} carries a bad replica check: {why}")
        self.replica.journal(d.epoch, d.page_numbers, new, d.device_state_from(base), d.disk_blocks, d.disk_data,
                             d.disk_zeroes)
        if d.check is None:
            return d.epoch, None
        div = verify.compare_range(d.epoch, d.check, self.replica.range_after(d.check.offset, d.check.length))
        if div is None:
            self.status.verified += 1
            self.status.verified_bytes += d.check.length
        return d.epoch, div

    async def _heartbeats(self, ch: Channel) -> None:
        try:
            await send_heartbeats(ch, self.heartbeat_ms / 1000, self.generation_fn,
                                  self.upstream_fn if self._peer_reads_upstream else None)
        except (ChannelError, ConnectionError, OSError):
            pass

    async def stop_accepting(self, last_word_s: float = 0.2) -> None:
        """Before a takeover: no more checkpoints; wait for any apply in progress to finish. The
        primary's last word from this session is a heartbeat with the generation this site holds
        now (the takeover's): a primary that handed over without reaching the lease authority
        learns from it that this site runs the guest (no other session carries heartbeats to it
        until it is the standby)."""
        self.accepting = False
        ch = self._current
        if ch is not None:
            up = self.upstream_fn() if self._peer_reads_upstream and self.upstream_fn else False
            try:
                await asyncio.wait_for(ch.send_heartbeat(heartbeat_payload(
                    0, time.monotonic_ns(), self.generation_fn(), up)), last_word_s)
            except (ChannelError, ConnectionError, OSError, asyncio.TimeoutError) as e:
                log.info("standby.last_heartbeat_lost", peer=ch.peer, error=str(e) or type(e).__name__)
            ch.close()
        await self.wait_applied()

    async def wait_applied(self) -> None:
        """Until no checkpoint is being journalled or applied: an acknowledged epoch (durable in
        the journal) is then the replica's committed epoch."""
        async with self._lock:
            pass


async def start_hot_standby(spec: GuestSpec) -> Guest:
    """A QEMU waiting in `-incoming defer` on the replica's RAM file: resume costs only the device state."""
    assert spec.incoming
    g = Guest(spec)
    await g.start()
    return g


async def resume(replica: Replica, spec: GuestSpec, hot: Guest | None = None) -> tuple[Guest, dict]:
    """Resume the guest from the committed replica. Returns the guest and a timing report."""
    if replica.pending:  # a journalled epoch not applied yet (acknowledged, maybe): it first
        try:
            await asyncio.to_thread(replica.settle)
        except ReplicaStorageError as e:  # the replica now says why it cannot be resumed
            log.warning("standby.resume_replay_failed", error=str(e))
    if not replica.valid:
        raise ReplicaError(replica.problem or "the replica is not valid (no committed epoch since the last "
                           "initial sync); cannot resume")
    t0 = time.perf_counter()
    timings = {"epoch": replica.committed_epoch, "hot_standby": hot is not None}
    guest = hot
    if guest is None:
        guest = Guest(spec)
        await guest.start()
        timings["qemu_start_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    t1 = time.perf_counter()
    # the files say the epoch too (group commit: a write-back under way, the epochs since), beside
    # the device-state load; QEMU maps ram.img, whose page cache already holds the epoch
    flushing = asyncio.ensure_future(asyncio.to_thread(replica.flush))
    try:
        await guest.load_device_state(await asyncio.to_thread(replica.device_state))
    finally:
        try:
            await run_to_end(flushing)
        except ReplicaStorageError as e:  # the journal still holds them: a later open replays them
            log.warning("standby.resume_write_back_failed", error=str(e))
    timings["device_state_ms"] = round((time.perf_counter() - t1) * 1000, 1)
    t2 = time.perf_counter()
    await guest.cont()
    timings["cont_ms"] = round((time.perf_counter() - t2) * 1000, 1)
    timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    log.info("standby.resumed", **timings)
    return guest, timings
