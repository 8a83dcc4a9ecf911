"""Primary side: the epoch loop. Pause, capture, resume at once; encode and ship after.

One epoch: stop the vCPUs → seal the gate at N → in parallel, the device state
(QEMU migration stream, RAM skipped) and the dirty-page scan in a thread → cont.
Everything else (XOR-delta, zstd, AES-GCM, sending) happens while the guest runs.
The standby's ack of N releases the gate's frames of epochs <= N.

A planned switchover (`handover`) holds the guest's inbound frames at the gate from the final
epoch on (the paused guest here never reads them) and, with the SWITCHOVER, sends them to the
standby in GUEST_FRAMES messages, followed by any that still arrive until the session ends; the
standby gives them to the guest it resumes. Abandoned, the handover gives them to this guest.

At most `max_in_flight` checkpoints are unacknowledged; when the link is slower than
the guest dirties memory, the loop waits, and the pages dirtied meanwhile simply
merge into the next checkpoint (the scan is against the shadow, not a log), so the
primary never buffers without bound. After a broken connection it reconnects with
backoff and resyncs: the standby sends its block hashes, only differing blocks move.

With a guest disk (`nbd`, the NbdServer QEMU's disk is served by), epoch N also carries the
disk blocks the guest wrote in N: the extent log is sealed right after `stop` (O(1)), and the
blocks travel in N's frame under the same AEAD as its RAM, so the standby applies both as one
transaction. Each session first syncs the disk by 64 KiB chunk hashes (the standby sends
them), so blocks of epochs that were sealed but never committed (a broken session, a
restarted service whose extent log died with it) reach the standby that way. For the same
reason the disk server records writes only while a session runs: from the start of its disk
sync to its end (`start_recording`/`stop_recording`); with no session nothing is kept, so the
service's memory does not grow with what the guest writes while its standby is away, and the
disk server's cap (backpressure) only ever holds the guest while a session can release it.
docs/disk.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
import structlog

from gmbase.stats import percentile
from replication.progress import Progress
from replication import codec as codec_mod
from replication import disksync, verify
from replication.capture import Capture, DirtySet
from replication.colo import ColoError, ColoSource
from replication.gate import Gate
from replication.nbd import NbdServer, SealedExtents
from replication.pacer import EpochSample
from replication.qemu import Guest, GuestError
from replication.session import (BLOCK_PAGES, HELLO_UPSTREAM_KEY, LinkStats, new_nonce, on_heartbeat_message, own_lateness,
                                 run_to_end, send_heartbeats,
                                 session_key)
from replication.transport import (HELLO_DISK_KEY, HELLO_FRAMES_KEY, PROTOCOL_VERSION, Channel, ChannelError,
                                   MsgType, pack_frames)

log = structlog.get_logger(__name__)
_U64 = struct.Struct(">Q")
# An epoch whose first output could have waited this long for its release is logged
# (primary.slow_epoch) and counted: well above the lab's ~100 ms (interval + pause + ACK), below
# the 500 ms after which a SIP client over UDP retransmits (T1) and a TCP peer's retransmission
# timer (200 ms minimum) has fired more than once.
SLOW_HOLD_MS = 300.0


@dataclass
class PrimaryConfig:
    site: str
    compat: dict
    run_id: str  # one booted guest and its continuation at the other site
    interval_ms: float = 100.0
    max_in_flight: int = 2
    heartbeat_ms: float = 100.0
    compression_level: int = 1
    block_pages: int = BLOCK_PAGES
    min_timeout_ms: float = 600.0
    max_timeout_ms: float = 5000.0
    # Bytes of live RAM hashed per epoch for the standby to compare with its replica (0: off);
    # replication/verify.py. The ranges cycle through all of RAM.
    verify_bytes_per_epoch: int = verify.DEFAULT_BYTES_PER_EPOCH
    # The capture through QEMU's dirty log (a `colo` source given to the Primary): every Nth
    # epoch also compares all of RAM with the shadow while the guest is stopped (0: never). A
    # page found there was missing from QEMU's set: it goes in the epoch anyway and is counted.
    colo_verify_every: int = 0


@dataclass
class EpochRecord:
    epoch: int
    pause_ms: float
    dirty_pages: int
    dirty_bytes: int
    wire_bytes: int
    device_state_bytes: int
    sent_at: float
    interval_ms: float
    acked_at: float | None = None
    disk_blocks: int = 0  # guest disk blocks written in the epoch (4 KiB each), in its frame
    disk_bytes: int = 0  # ... their bytes, and 16 per zeroed range (what counts against the disk cap)
    disk_zeroed_bytes: int = 0  # guest disk bytes zeroed in the epoch, carried as ranges
    encode_ms: float = 0.0  # from `cont` to its frame encoded (the codec thread)
    send_ms: float = 0.0  # writing the frame to the channel (to the kernel: its last byte queued)

    def held_ms(self, acked_at: float) -> float:
        """How long output the guest sent at this epoch's start waited for its release: the epoch's
        run, its pause, the encoding, and from the send to the ACK (acked_at: monotonic s)."""
        return self.interval_ms + self.pause_ms + self.encode_ms + (acked_at - self.sent_at) * 1000


@dataclass
class PrimaryStatus:
    state: str = "starting"  # starting | connecting | syncing | protected | disconnected | stopped
    epoch: int = 0
    committed_epoch: int = 0
    last_pause_ms: float = 0.0
    in_flight: int = 0
    backlog_epochs: int = 0
    interval_ms: float = 0.0
    sync_progress: float = 0.0
    sessions: int = 0
    peer_cert_serial: str | None = None
    ram_bytes: int = 0
    guest_restarts: int = 0  # times the guest watch found the guest stopped and resumed it
    last_sync_bytes: int = 0
    last_sync_mode: str = ""
    wire_bytes_total: int = 0  # checkpoint and sync frames sent to the standby since this primary began
    pause_total_ms: float = 0.0
    pauses_ms: list = field(default_factory=list)
    verify_bytes_per_epoch: int = 0
    verify_cycle_epochs: int = 0  # epochs for the replica checks to cover all of RAM once
    diverged: int = 0  # times the standby found its replica different from this RAM (replica.diverged)
    last_divergence: dict | None = None
    frames_forwarded: int = 0  # inbound guest frames sent to the standby in handovers (GUEST_FRAMES)
    frames_forward_lost: int = 0  # ... that could not be sent (the session ended first)
    disk_bytes: int = 0  # size of the guest's replicated disk (0: none)
    disk_blocks_total: int = 0  # disk blocks carried in checkpoints since this primary began
    disk_zeroed_bytes_total: int = 0  # guest disk bytes zeroed, carried as ranges in checkpoints
    last_disk_sync_bytes: int = 0  # wire bytes of the last session's disk sync
    last_disk_sync_chunks: int = 0  # 64 KiB chunks it sent (of disk_bytes / 64 KiB)
    disk_recording: bool = False  # the disk server records writes (a session runs)
    disk_unsent_bytes: int = 0  # recorded disk bytes not yet sent (open epoch + sealed epochs)
    disk_unsent_cap_bytes: int = 0  # the write cap (0: none)
    disk_write_delays: int = 0  # guest writes whose reply the cap held
    disk_write_delay_ms: float = 0.0  # the time they were held, summed
    epochs_woken: int = 0  # epochs ended early because the gate held output (the pacer's ``idle``)
    slow_epochs: int = 0  # epochs whose output could have been held SLOW_HOLD_MS or more (primary.slow_epoch)
    max_held_ms: float = 0.0  # the longest such hold: from an epoch's start to its ACK
    capture: str = "scan"  # how epochs find their pages: scan (all RAM vs the shadow) | colo (QEMU's dirty log)
    colo_error: str | None = None  # why the colo capture is not in use (it was asked for)
    colo_start_s: float = 0.0  # the last COLO start (its initial stream of all RAM)
    colo_verified_epochs: int = 0  # epochs whose pages were checked against a full compare
    colo_missed_pages: int = 0  # pages that full compare found and QEMU's set lacked (should stay 0)
    colo_sent_pages: int = 0  # pages QEMU sent, summed; vs the epochs' dirty pages: unchanged rewrites


def epoch_latency(records: list[EpochRecord]) -> dict:
    """Where acknowledged epochs' time went, [p50, p99] ms per step: the pause, the encoding
    after it, the write to the channel, and from the write to the standby's ACK (the link's
    RTT, the frame's transfer and the standby's verify + journal fsync)."""
    steps = {"pause": [r.pause_ms for r in records], "encode": [r.encode_ms for r in records],
             "send": [r.send_ms for r in records],
             "ack": [(r.acked_at - r.sent_at) * 1000 for r in records if r.acked_at is not None]}
    return {name: [round(percentile(xs, 50), 2), round(percentile(xs, 99), 2)] if xs else None
            for name, xs in steps.items()}


def pacer_sample(rec: EpochRecord, link: LinkStats, in_flight: int, release_offset_ms: float | None = None,
                 quiet_ms: float | None = None, reply_ms: float | None = None,
                 released: bool = True, now_s: float | None = None, frames: int | None = None) -> EpochSample:
    """What epoch `rec` tells the pacer. Its RTT is the path's (`LinkStats.pacer_rtt`: TCP's, which
    the channel's queue does not inflate), not the heartbeats' channel RTT: a heartbeat that waits
    behind checkpoint frames measures our own queue, and the pacer would pace for a WAN that is not
    there (docs/pacer.md)."""
    rtt, var = link.pacer_rtt()
    return EpochSample(interval_ms=rec.interval_ms, pause_ms=rec.pause_ms, dirty_bytes=rec.dirty_bytes,
                       wire_bytes=rec.wire_bytes, rtt_ms=rtt, rtt_var_ms=var,
                       bandwidth_bytes_per_s=link.bandwidth_bps, in_flight=in_flight,
                       release_offset_ms=release_offset_ms, quiet_ms=quiet_ms, reply_ms=reply_ms,
                       released=released, now_s=now_s, frames=frames)


class Primary:
    def __init__(self, cfg: PrimaryConfig, guest: Guest, capture: Capture, gate: Gate,
                 connect: Callable[[], Awaitable[Channel]],
                 interval_fn: Callable[["Primary", EpochRecord | None], float] | None = None,
                 nbd: NbdServer | None = None,
                 wake_fn: Callable[[float], float | None] | None = None, colo: ColoSource | None = None):
        self.cfg = cfg
        self.colo = colo  # the capture through QEMU's dirty log (None: the full scan)
        self.nbd = nbd  # the guest's disk (started: its size is known), or None
        self._disk_unreleased = 0  # bytes of sealed disk extents not yet handed back to nbd.release
        self.guest = guest
        self.capture = capture
        self.gate = gate
        self._connect = connect
        self._interval_fn = interval_fn
        # Once the gate holds output in the open epoch (its first frame came `ms` into the epoch):
        # when the epoch ends instead (ms into it), or None = as planned (the pacer's `wake_at`).
        self._wake_fn = wake_fn
        self._resumed_at: float | None = None  # when the guest last ran on after a pause (monotonic)
        self.link = LinkStats()
        self.status = PrimaryStatus(interval_ms=cfg.interval_ms, ram_bytes=capture.size,
                                    verify_bytes_per_epoch=cfg.verify_bytes_per_epoch,
                                    disk_bytes=nbd.size if nbd is not None else 0)
        if cfg.verify_bytes_per_epoch:
            self.status.verify_cycle_epochs = verify.cycle_epochs(capture.size, cfg.verify_bytes_per_epoch,
                                                                  capture.page_size)
        self.records: dict[int, EpochRecord] = {}
        self.history: list[EpochRecord] = []
        self._acked = asyncio.Event()
        self._last_heard = time.monotonic()
        self._slow_logged_at = float("-inf")  # primary.slow_epoch: one line a second
        self._pause_lock = asyncio.Lock()  # one checkpoint at a time (also vs. operator actions)
        # One checkpoint from its pause to the end of its send: the pause lock ends with the pause,
        # and an epoch's encoding (in a thread) could let a handover's final epoch, taken meanwhile,
        # reach the standby first; the standby then committed N+1 without N and refused N.
        self._ship_lock = asyncio.Lock()
        self.on_commit: Callable[[int], None] | None = None
        # (peer generation, the link, the peer's upstream-up ms or None)
        self.on_heartbeat: Callable[[int, LinkStats, int | None], None] | None = None
        self.generation_fn: Callable[[], int] = lambda: 0
        # this site's upstream-up ms for the peer's heartbeats (None: not reported); sent only to a
        # standby whose HELLO_REPLY says it reads them
        self.upstream_fn: Callable[[], int | None] = lambda: None
        self._peer_reads_upstream = False
        self._stop = asyncio.Event()
        self._hold_checkpoints = asyncio.Event()
        self._hold_checkpoints.set()
        # Output commit starts with the first epoch of a session, not with its first ack: the
        # owner of the gate's mode (the site's gate policy) is told before the first seal, so a
        # gate left open (a site that took over and runs unprotected, or continue-unprotected)
        # holds from then on and nothing released can be newer than what the standby will ack.
        # When the session ends it is told whether any epoch was acknowledged.
        self.on_session_commits: Callable[[], None] | None = None
        self.on_session_ended: Callable[[bool], None] | None = None
        self._session_committing = False
        self._session_acked = False
        self._ch: Channel | None = None  # the current session (for a planned switchover)
        self._codec = None
        self._frozen = False  # a handover paused the guest: no epoch may `cont` it
        # Handover: hold the guest's inbound frames from the final epoch on and send them to the
        # standby with the SWITCHOVER (read at each handover: an operator may switch it at run time)
        self.forward_frames_fn: Callable[[], bool] = lambda: True
        self._peer_takes_frames = False  # the standby's HELLO_REPLY said it takes GUEST_FRAMES
        self._holding_inbound = False  # this handover holds the gate's inbound frames
        self._fwd: deque[bytes] = deque()  # frames waiting to be sent to the standby, in order
        self._fwd_ch: Channel | None = None  # the session they go over
        self._fwd_task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        self._disk_recording(False, "no session yet")
        watch = asyncio.create_task(self._guest_watch())
        try:
            await self._start_colo()  # before any session: its initial stream is off the reprotect path
            await self._run_sessions()
        finally:
            watch.cancel()

    async def _guest_watch(self, every_s: float = 1.0) -> None:
        """Safety net: the guest must be running whenever no checkpoint (or handover) holds it.
        A vCPU stop that escaped its `cont` (say, an outgoing migration that completed after
        the session gave up on it) would otherwise freeze the guest for good."""
        while True:
            await asyncio.sleep(every_s)
            async with self._pause_lock:
                if self._frozen:
                    continue
                try:
                    st = await self.guest.status()
                except Exception:
                    continue
                if st in ("paused", "postmigrate", "finish-migrate"):
                    self.status.guest_restarts += 1
                    log.warning("primary.guest_found_stopped", status=st, restarts=self.status.guest_restarts,
                                hint="no checkpoint holds it: resuming the guest")
                    try:
                        await self.guest.cont()
                    except Exception as e:
                        log.error("primary.guest_cont_failed", error=str(e))

    async def _run_sessions(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            self.status.state = "connecting"
            try:
                ch = await self._connect()
            except (OSError, asyncio.TimeoutError, ChannelError) as e:
                log.info("primary.connect_failed", error=str(e) or type(e).__name__, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            try:
                await self._session(ch)
            except ChannelError as e:
                log.warning("primary.session_lost", peer=ch.peer, error=str(e),
                            committed_epoch=self.status.committed_epoch, epoch=self.status.epoch)
            except (OSError, asyncio.TimeoutError) as e:
                log.warning("primary.session_lost", peer=ch.peer, error=str(e) or type(e).__name__)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a guest failure: say so, keep trying
                log.exception("primary.session_failed", peer=ch.peer, error=repr(e))
                await asyncio.sleep(1.0)
            finally:
                ch.close()
                # sealed extents that never left: the next session's disk sync carries their blocks,
                # and it finds the blocks written until then too: keep none of them meanwhile
                self._release_disk(self._disk_unreleased)
                self._disk_recording(False, "session ended")
                if self._ch is ch:
                    self._ch = self._codec = None
                if self._fwd_ch is ch:
                    self._stop_forwarding()
                if self._session_committing:
                    self._session_committing = False
                    if not self._session_acked:
                        log.info("primary.output_commit_abandoned", peer=ch.peer,
                                 hint="no epoch of this session was acknowledged")
                    if self.on_session_ended:
                        self.on_session_ended(self._session_acked)
            self.status.state = "disconnected"
            self.records.clear()
            self.status.in_flight = 0
            await asyncio.sleep(0.2)
        self.status.state = "stopped"

    def stop(self) -> None:
        self._stop.set()

    def pause_checkpoints(self, paused: bool) -> None:
        """Operator/test hook: hold off new checkpoints (e.g. a quiesced client)."""
        if paused:
            self._hold_checkpoints.clear()
        else:
            self._hold_checkpoints.set()

    # ------------------------------------------------------------ session
    async def _session(self, ch: Channel) -> None:
        nonce = new_nonce()
        await ch.send_json(MsgType.HELLO, {
            "proto": PROTOCOL_VERSION, "site": self.cfg.site, "compat": self.cfg.compat, "run_id": self.cfg.run_id,
            "nonce": nonce.hex(), "ram_bytes": self.capture.size, HELLO_UPSTREAM_KEY: 1,
            HELLO_DISK_KEY: self.status.disk_bytes})
        reply = await asyncio.wait_for(ch.recv_json(MsgType.HELLO_REPLY), 30)
        self._peer_reads_upstream = reply.get(HELLO_UPSTREAM_KEY) == 1
        self._peer_takes_frames = reply.get(HELLO_FRAMES_KEY) == 1
        if reply.get("proto") != PROTOCOL_VERSION:
            raise ChannelError(f"protocol mismatch: the standby {ch.peer} speaks replication protocol "
                               f"{reply.get('proto')!r}, site {self.cfg.site} speaks {PROTOCOL_VERSION}; run the same "
                               "geomirror version at both sites")
        theirs = reply.get(HELLO_DISK_KEY, 0)
        if theirs != self.status.disk_bytes:
            raise ChannelError(f"standby {ch.peer} has a replica disk of {theirs} bytes, the guest's disk "
                               f"{self.nbd.image if self.nbd else '(none)'} is {self.status.disk_bytes} bytes")
        hashes = None
        if reply.get("valid") or reply.get("hashes"):  # a replica, or a seeded one: resync by block hashes
            mtype, raw = await asyncio.wait_for(ch.recv(), 30)
            if mtype is not MsgType.HASHES or len(raw) % 16:
                raise ChannelError(f"standby sent {mtype.name} where its block hashes were expected")
            hashes = [raw[i:i + 16] for i in range(0, len(raw), 16)]
        self._hashes = hashes
        self._disk_hashes = None
        if self.nbd is not None:  # the standby always describes its replica disk
            mtype, raw = await asyncio.wait_for(ch.recv(), 60)
            if mtype is not MsgType.DISK_HASHES:
                raise ChannelError(f"standby sent {mtype.name} where its disk hashes were expected")
            try:
                self._disk_hashes = disksync.split_hashes(raw, self.nbd.size)
            except ValueError as e:
                raise ChannelError(f"standby {ch.peer} sent bad disk hashes: {e}") from None
        self._prev_dev = None  # a session starts with a full device state; then XOR against the last
        key = session_key(nonce, bytes.fromhex(reply["nonce"]))
        codec = codec_mod.Codec(key, level=self.cfg.compression_level)
        self._ch, self._codec = ch, codec
        self.status.sessions += 1
        self.status.peer_cert_serial = ch.peer_cert_serial()
        self.status.committed_epoch = max(self.status.committed_epoch, int(reply.get("committed_epoch", 0)))
        # Epoch numbers only grow: a restarted primary (its counter from 0) continues after what
        # the standby committed, which it would refuse otherwise.
        self.status.epoch = max(self.status.epoch, self.status.committed_epoch)
        self._last_heard = time.monotonic()
        reader = asyncio.create_task(self._reader(ch))
        beater = asyncio.create_task(self._heartbeats(ch))
        work = asyncio.create_task(self._work(ch, codec, reader))
        try:
            await self._watchdog(ch, work)
        finally:
            for t in (beater, reader, work):
                t.cancel()
            # A checkpoint in flight runs on to its `cont` before `work` ends: wait for that,
            # even if this task is cancelled meanwhile, so the guest is never left paused.
            await run_to_end(asyncio.gather(beater, reader, work, return_exceptions=True))

    async def _work(self, ch: Channel, codec, reader: asyncio.Task) -> None:
        await self._start_colo()
        await self._sync(ch, codec, self._hashes)
        self._session_committing, self._session_acked = True, False
        if self.on_session_commits:
            self.on_session_commits()
        log.info("primary.output_commit_begins", peer=ch.peer, hint="output waits for acks from the first epoch on")
        self.status.state = "protected"
        log.info("primary.protected", peer=ch.peer, epoch=self.status.epoch)
        await self._epochs(ch, codec, reader)

    def detection_timeout_ms(self) -> float:
        c = self.cfg
        return self.link.detection_timeout_ms(c.min_timeout_ms, c.max_timeout_ms, c.heartbeat_ms)

    async def _watchdog(self, ch: Channel, work: asyncio.Task) -> None:
        """The session ends when the work fails or the standby falls silent (a dead link
        only fills socket buffers; TCP alone would wait for minutes)."""
        tick = self.cfg.heartbeat_ms / 1000
        while True:
            t0 = time.monotonic()
            done, _ = await asyncio.wait({work}, timeout=tick)
            if done:
                work.result()
                return
            # A starved event loop (or a frozen host) is not the standby's silence: the reader
            # could not run either. Do not count this loop's own lateness against the peer.
            late = own_lateness(tick, time.monotonic() - t0)
            if late:
                self._last_heard = min(time.monotonic(), self._last_heard + late)
                log.info("primary.watchdog_late", late_ms=round(late * 1000, 1),
                         hint="the loop overran its sleep; that time is not counted as silence")
            if self.status.state != "syncing" and self.silence_ms() > self.detection_timeout_ms():
                raise ChannelError(f"no word from the standby for {self.silence_ms():.0f} ms "
                                   f"(timeout {self.detection_timeout_ms():.0f} ms)")

    async def _start_colo(self) -> None:
        """When the primary begins, and before each session's sync (which copies all of RAM into
        the shadow, so a page written after the COLO start is in QEMU's log or in the copy; the
        initial stream must have ended first): start the COLO capture if it is wanted and not
        running. If it cannot start, epochs use the full scan, with the reason."""
        if self.colo is None or self.colo.active:
            return
        async with self._pause_lock:
            if self.colo.active:  # started meanwhile
                return
            try:
                info = await self.colo.start()
            except (ColoError, GuestError) as e:
                self.status.capture, self.status.colo_error = "scan", str(e)
                log.error("primary.colo_unavailable", error=str(e),
                          hint="checkpoints use the full scan of RAM (O(RAM) pauses)")
                return
        self.status.capture, self.status.colo_error = "colo", None
        self.status.colo_start_s = info["seconds"]
        log.info("primary.colo_started", **info)

    async def _sync(self, ch: Channel, codec, hashes) -> None:
        """Initial sync (hashes None) or resync: stream every block the standby lacks, guest running."""
        mode = "resync" if hashes is not None else "initial"
        self.status.state = "syncing"
        self.status.last_sync_mode = mode
        bp = self.cfg.block_pages
        n_blocks = -(-self.capture.n_pages // bp)
        await ch.send_json(MsgType.SYNC_BEGIN, {"mode": mode, "blocks": n_blocks, "block_pages": bp,
                                                "disk_chunks": -(-self.status.disk_bytes // disksync.CHUNK)})
        t0 = time.monotonic()
        sent = sent_blocks = 0
        ps = self.capture.page_size
        bar = Progress(f"{mode} sync to {ch.peer}", self.capture.n_pages, event="primary.sync_progress",
                       mode=mode, peer=ch.peer)
        it = self.capture.sync_blocks(bp, hashes)
        batch_first, batch = None, []
        try:
            for b, (first, pages) in enumerate(it):
                # Group consecutive blocks into frames of up to 4 MiB to keep per-frame cost low.
                if batch and (first != batch_first + sum(p.shape[0] for p in batch) or len(batch) >= 64):
                    sent += await self._send_sync(ch, codec, batch_first, batch)
                    batch_first, batch = None, []
                if not batch:
                    batch_first = first
                batch.append(pages)
                sent_blocks += 1
                done = first + pages.shape[0]
                self.status.sync_progress = done / self.capture.n_pages
                bar.update(done, sent)
            if batch:
                sent += await self._send_sync(ch, codec, batch_first, batch)
        except BaseException:
            bar.abandon()
            raise
        bar.nbytes = sent
        bar.finish(blocks_sent=sent_blocks, blocks=n_blocks)
        if self.nbd is not None:
            sent += await self._sync_disk(ch, codec, mode)
        self.status.sync_progress = 1.0
        self.status.last_sync_bytes = sent
        self.status.wire_bytes_total += sent
        log.info("primary.sync_done", mode=mode, blocks_sent=sent_blocks, blocks=n_blocks,
                 wire_bytes=sent, ram_bytes=self.capture.size, seconds=round(time.monotonic() - t0, 2),
                 page_size=ps)

    async def _sync_disk(self, ch: Channel, codec, mode: str) -> int:
        """Send every 64 KiB chunk of the guest's disk whose hash differs from the standby's, the
        guest running: a block written after it was read here is in the open epoch, which the
        first checkpoint carries (applied after these). Returns the wire bytes."""
        nbd, t0 = self.nbd, time.monotonic()
        # before the first read: a write that lands before its chunk is read is in what the sync
        # reads, one after it is recorded in the open epoch, which the first checkpoint carries
        self._disk_recording(True, "disk sync begins")
        fd = os.open(nbd.image, os.O_RDONLY | os.O_CLOEXEC)
        sent = chunks = 0
        bar = Progress(f"{mode} disk sync to {ch.peer}", nbd.size, event="primary.disk_sync_progress",
                       mode=mode, peer=ch.peer)
        try:
            it = disksync.differing_chunks(fd, nbd.size, self._disk_hashes or [])
            while True:
                frame, k, reached = await asyncio.to_thread(self._disk_sync_frame, codec, it)
                if not k:
                    break
                await ch.send(MsgType.SYNC, frame)
                sent += len(frame)
                chunks += k
                bar.update(reached, sent)
        except BaseException:
            bar.abandon()
            raise
        finally:
            os.close(fd)
        bar.nbytes = sent
        bar.finish(chunks_sent=chunks)
        self.status.last_disk_sync_bytes = sent
        self.status.last_disk_sync_chunks = chunks
        log.info("primary.disk_sync_done", mode=mode, chunks_sent=chunks,
                 chunks=-(-nbd.size // disksync.CHUNK), wire_bytes=sent, disk_bytes=nbd.size,
                 seconds=round(time.monotonic() - t0, 2))
        return sent

    def _disk_sync_frame(self, codec, it, max_chunks: int = 64) -> tuple[bytes, int, int]:
        """(a SYNC frame of up to `max_chunks` differing chunks, how many, the disk offset reached)
        from `it`; (b"", 0, 0) at the end."""
        blocks, data = [], []
        for first, contents in it:
            blocks.append(np.arange(first, first + contents.shape[0], dtype=np.uint64))
            data.append(contents)
            if len(data) >= max_chunks:
                break
        if not data:
            return b"", 0, 0
        ps = self.capture.page_size
        frame = codec.encode(epoch=self.status.epoch, kind=codec_mod.KIND_FULL, page_size=ps,
                             page_numbers=np.empty(0, np.uint64), new_pages=np.empty((0, ps), np.uint8),
                             disk_blocks=np.concatenate(blocks), disk_data=np.concatenate(data))
        reached = (int(blocks[-1][-1]) + 1) * codec_mod.DISK_BLOCK
        return frame, len(data), reached

    def _disk_recording(self, on: bool, why: str) -> None:
        """Start or stop the disk server's recording of writes (see the module docstring)."""
        if self.nbd is None:
            return
        dropped = self.nbd.start_recording() if on else self.nbd.stop_recording()
        self.status.disk_recording = on
        log.info("primary.disk_recording", recording=on, why=why, dropped_bytes=dropped)

    def _release_disk(self, nbytes: int) -> None:
        """Sealed disk bytes have left (or are given up): the guest's writes may go on (nbd cap)."""
        nbytes = min(nbytes, self._disk_unreleased)
        if self.nbd is not None and nbytes > 0:
            self._disk_unreleased -= nbytes
            self.nbd.release(nbytes)

    async def _send_checkpoint(self, ch: Channel, rec: EpochRecord, frame: bytes) -> None:
        rec.sent_at = time.monotonic()
        try:
            await ch.send(MsgType.CHECKPOINT, frame)
            rec.send_ms = (time.monotonic() - rec.sent_at) * 1000
        finally:
            self._release_disk(rec.disk_bytes)

    async def _send_sync(self, ch: Channel, codec, first: int, batch: list) -> int:
        pages = np.concatenate(batch) if len(batch) > 1 else batch[0]
        numbers = np.arange(first, first + pages.shape[0], dtype=np.uint64)
        frame = await asyncio.to_thread(
            codec.encode, epoch=self.status.epoch, kind=codec_mod.KIND_FULL, page_size=self.capture.page_size,
            page_numbers=numbers, new_pages=pages, old_pages=None, device_state=b"")
        await ch.send(MsgType.SYNC, frame)
        return len(frame)

    # ------------------------------------------------------------ epochs
    async def _epochs(self, ch: Channel, codec, reader: asyncio.Task) -> None:
        last: EpochRecord | None = None
        self._resumed_at = None  # a new session: its first epoch runs a whole interval from now
        while True:
            self._sample_path(ch)
            interval = self._interval_fn(self, last) if self._interval_fn else self.cfg.interval_ms
            self.status.interval_ms = interval
            # The interval is the guest's run between two pauses: it counts from the `cont` of the
            # last one, not from here (the frame's encoding and send, and the pacer, came in between:
            # 4-8 ms in the lab, which made every interval that much longer than asked: a fixed 25 ms
            # ran 29-31 ms, the pacer's 35.5 ms target 40.7 ms)
            start = self._resumed_at if self._resumed_at is not None else time.monotonic()
            await self._wait_interval(interval, start)
            await self._hold_checkpoints.wait()
            while self.status.in_flight >= self.cfg.max_in_flight:
                self.status.backlog_epochs = self.status.in_flight
                self._acked.clear()
                try:
                    await asyncio.wait_for(self._acked.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                if reader.done():
                    reader.result()  # raises the channel error
                    raise ChannelError("reader stopped")
            self.status.backlog_epochs = 0
            if reader.done():
                reader.result()
                raise ChannelError("reader stopped")
            # the epoch's real length (woken early, or held by a backlog): the pacer's rates are per ms of it
            async with self._ship_lock:
                taken = await self.checkpoint(codec, (time.monotonic() - start) * 1000)
                if taken is None:  # a handover froze the guest meanwhile
                    continue
                rec, frame = taken
                await self._send_checkpoint(ch, rec, frame)
            last = rec

    async def _wait_interval(self, interval_ms: float, t0: float) -> None:
        """Wait until the interval from `t0` (the epoch's start) is over, or less: with a `wake_fn`,
        the epoch ends when it says once the gate holds a frame of the open epoch (an interval
        lengthened for an idle guest must not delay the first reply after it; counted in
        `epochs_woken`). The caller measures the epoch's length itself, from `t0`."""
        end = t0 + interval_ms / 1000
        if self._wake_fn is None:
            await asyncio.sleep(max(end - time.monotonic(), 0.0))
            return
        loop = asyncio.get_running_loop()
        if self.gate.first_held_at is None:  # else: held before the wait began (a checkpoint's send)
            held = asyncio.Event()
            timer = loop.call_later(max(end - time.monotonic(), 0.0), held.set)
            self.gate.on_first_held = held.set
            try:
                await held.wait()
            finally:
                self.gate.on_first_held = None
                timer.cancel()
        first = self.gate.first_held_at
        if first is None or time.monotonic() >= end:
            return
        at = self._wake_fn(max(first - t0, 0.0) * 1000)
        if at is None:
            await asyncio.sleep(max(end - time.monotonic(), 0.0))
            return
        await asyncio.sleep(max(t0 + at / 1000 - time.monotonic(), 0.0))
        if at < interval_ms:
            self.status.epochs_woken += 1

    # ------------------------------------------------------------ planned switchover
    async def handover(self, timeout: float = 10.0) -> int:
        """Planned switchover, step 1: take a last epoch with the vCPUs left stopped and wait
        until the standby has committed it. Returns that epoch. The guest stays paused: the
        caller fences this site, tells the standby (`announce_switchover`) and then stops
        the guest, or gives up (`abort_handover`)."""
        ch, codec = self._ch, self._codec
        if ch is None or self.status.state != "protected":
            raise ChannelError(f"no protected session to hand over on (replication is {self.status.state})")
        self._hold_checkpoints.clear()
        if self.forward_frames_fn():
            # before the final pause: a frame given to the guest now may never be read by it
            self._holding_inbound = True
            self.gate.hold_inbound()
        try:
            async with self._ship_lock:  # after the epoch being sent, if one is
                taken = await self.checkpoint(codec, self.status.interval_ms, final=True)
                if taken is None:
                    raise ChannelError("the guest was frozen by another handover")
                rec, frame = taken
                await self._send_checkpoint(ch, rec, frame)
            deadline = time.monotonic() + timeout
            while self.status.committed_epoch < rec.epoch:
                if time.monotonic() > deadline or self._ch is not ch:
                    raise ChannelError(f"the standby did not commit the final epoch {rec.epoch} "
                                       f"within {timeout:g}s")
                self._acked.clear()
                try:
                    await asyncio.wait_for(self._acked.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass
        except BaseException:
            await self.abort_handover()
            raise
        log.info("primary.handover_ready", epoch=rec.epoch, peer=ch.peer)
        return rec.epoch

    async def announce_switchover(self, epoch: int) -> None:
        """Step 2: tell the standby to take over from `epoch` (which it has committed). The guest's
        inbound frames held since the final epoch go first, and any arriving later follow."""
        ch = self._ch
        if ch is None:
            raise ChannelError("the session to the standby is gone")
        if self._holding_inbound and self._peer_takes_frames:
            self._fwd_ch = ch
            self.gate.forward_inbound(self._forward)
            if self._fwd_task is not None:
                await self._fwd_task
            if self._ch is not ch:
                raise ChannelError("the session to the standby ended while sending the guest's frames")
            log.info("primary.frames_forwarded", frames=self.status.frames_forwarded, peer=ch.peer,
                     lost=self.status.frames_forward_lost)
        elif self._holding_inbound:
            log.warning("primary.frames_not_forwarded", peer=ch.peer,
                        why="the standby does not take GUEST_FRAMES (an older build): frames for the guest "
                            "that arrive here until the route moves are lost, as before")
        await ch.send(MsgType.SWITCHOVER, _U64.pack(epoch))

    def _forward(self, frames: list[bytes]) -> None:
        """The gate's sink during a handover: queue, and one pump sends them in order."""
        self._fwd.extend(frames)
        if self._fwd_task is None or self._fwd_task.done():
            self._fwd_task = asyncio.get_running_loop().create_task(self._pump_frames(self._fwd_ch),
                                                                    name="primary.forward_frames")

    async def _pump_frames(self, ch: Channel) -> None:
        fwd = self._fwd
        while fwd and self._fwd_ch is ch:
            payload, n = pack_frames(list(fwd)[:1024])
            for _ in range(n):
                fwd.popleft()
            try:
                await ch.send(MsgType.GUEST_FRAMES, payload)
            except (ChannelError, OSError) as e:
                self.status.frames_forward_lost += n + len(fwd)
                fwd.clear()
                log.info("primary.frames_forward_failed", peer=ch.peer, error=str(e) or type(e).__name__)
                return
            self.status.frames_forwarded += n

    def _stop_forwarding(self) -> None:
        """The session the frames went over ended: hold them at the gate again (the guest's
        stop drops them, an abandoned handover delivers them)."""
        self._fwd_ch = None
        if self._fwd:
            self.status.frames_forward_lost += len(self._fwd)
            self._fwd.clear()
        if self._holding_inbound:
            self.gate.forward_inbound(None)

    async def abort_handover(self) -> None:
        """The switchover did not happen: run the guest again and take epochs as before (the
        inbound frames held meanwhile reach it first)."""
        if self._holding_inbound:
            self._holding_inbound = False
            self._fwd_ch = None
            self.gate.end_inbound_hold(deliver=True)
        if self._frozen:
            self._frozen = False
            if self.colo is not None and self.colo.open_checkpoint:
                self.colo.finish()  # the final epoch's checkpoint: QEMU starts the guest
            else:
                await self.guest.cont()
            log.warning("primary.handover_aborted", epoch=self.status.epoch)
        self._hold_checkpoints.set()

    async def checkpoint(self, codec, interval_ms: float, final: bool = False) -> tuple[EpochRecord, bytes] | None:
        """Take epoch N: the pause is stop → (device state ∥ dirty scan) → cont. `final`
        (a handover): leave the vCPUs stopped. None if a handover froze the guest."""
        async with self._pause_lock:
            if self._frozen:
                return None
            if self.colo is not None and self.colo.active:
                try:  # QEMU asks `delay` after the last checkpoint; the guest runs until we answer
                    await self.colo.wait_request()
                except (ColoError, GuestError) as e:
                    await self._colo_failed(e)
                    raise ChannelError(f"the COLO capture failed: {e}") from None
            n = self.status.epoch + 1
            t0 = time.perf_counter()
            self.gate.stopping()  # the epoch's output ends here for the pacer, not at the seal
            # One unit, in its own task: cancelling this caller (session teardown) waits for
            # the `cont` instead of cutting the pause short and leaving the guest stopped.
            (dirty, check), dev, sealed = await run_to_end(asyncio.ensure_future(self._pause(n, final)))
            pause_ms = (time.perf_counter() - t0) * 1000
            self._resumed_at = time.monotonic()  # the next epoch's interval counts from here
            if not final:
                self.gate.resumed()
        self.status.epoch = n
        self.status.last_pause_ms = pause_ms
        self.status.pause_total_ms += pause_ms
        self.status.pauses_ms.append(pause_ms)
        del self.status.pauses_ms[:-1000]
        t1 = time.perf_counter()
        frame = await asyncio.to_thread(
            self._encode_epoch, codec, n, dirty, dev, getattr(self, "_prev_dev", None), check, sealed)
        encode_ms = (time.perf_counter() - t1) * 1000
        self._prev_dev = dev
        disk_blocks, disk_bytes, zeroed = ((len(sealed), sealed.nbytes, sealed.zeroed_bytes) if sealed is not None
                                           else (0, 0, 0))
        rec = EpochRecord(n, pause_ms, len(dirty.page_numbers), dirty.nbytes, len(frame), len(dev),
                          time.monotonic(), interval_ms, disk_blocks=disk_blocks, disk_bytes=disk_bytes,
                          disk_zeroed_bytes=zeroed, encode_ms=encode_ms)
        self.status.disk_blocks_total += disk_blocks
        self.status.disk_zeroed_bytes_total += zeroed
        self.records[n] = rec
        self.status.wire_bytes_total += rec.wire_bytes
        self.status.in_flight = len(self.records)
        self.link.add_dirty(dirty.nbytes + disk_bytes, interval_ms / 1000)  # the pacer sees disk load too
        log.debug("primary.checkpoint", epoch=n, pause_ms=round(pause_ms, 2), dirty_pages=rec.dirty_pages,
                  wire_bytes=rec.wire_bytes, device_state_bytes=rec.device_state_bytes, disk_blocks=disk_blocks)
        return rec, frame

    def _encode_epoch(self, codec, n: int, dirty: DirtySet, dev: bytes, base: bytes | None,
                      check: verify.RangeCheck | None, sealed: SealedExtents | None) -> bytes:
        """In the codec thread, after `cont`: epoch n's frame; the disk blocks sorted (one copy) and
        the zeroed disk ranges (the standby applies the ranges, then the blocks)."""
        blocks = data = zeroes = None
        if sealed is not None and len(sealed):
            blocks, data = sealed.block_numbers(), sealed.contents()
        if sealed is not None and sealed.zero_starts:
            zeroes = sealed.zero_ranges()
        return codec.encode(epoch=n, kind=codec_mod.KIND_DELTA, page_size=self.capture.page_size,
                            page_numbers=dirty.page_numbers, new_pages=dirty.new_pages, old_pages=dirty.old_pages,
                            device_state=dev, device_base=base, check=check, disk_blocks=blocks, disk_data=data,
                            disk_zeroes=zeroes)

    async def _pause(self, n: int, final: bool):
        if self.colo is not None and self.colo.active:
            return await self._pause_colo(n, final)
        return await self._pause_scan(n, final)

    async def _pause_colo(self, n: int, final: bool):
        """QEMU stops the guest when we answer its request, sends the pages it logged and the
        device state; we copy the pages that changed, seal the gate and the disk at n, and let
        the guest run (not when `final`: the open checkpoint keeps it stopped). A broken COLO
        stream ends COLO (the guest runs on alone) and fails the epoch: the session resyncs."""
        nbd, sealed = self.nbd, None
        if nbd is not None:
            nbd.checkpoint_starting()  # QEMU's stop waits for the disk's in-flight writes too
        full = bool(self.cfg.colo_verify_every) and n % self.cfg.colo_verify_every == 0
        try:
            cp, (dirty, check, missed) = await self.colo.checkpoint(lambda cp: self._capture_colo(n, cp, full))
        except (ColoError, GuestError) as e:
            await self._colo_failed(e)
            raise ChannelError(f"the COLO capture failed at epoch {n}: {e}") from None
        self.gate.seal(n)
        if nbd is not None:
            sealed = nbd.seal(n)
            self._disk_unreleased += sealed.nbytes
        st = self.status
        st.colo_sent_pages += len(cp.pages)
        if full:
            st.colo_verified_epochs += 1
        if missed:
            st.colo_missed_pages += missed
            log.error("primary.colo_missed_pages", epoch=n, pages=missed, total=st.colo_missed_pages,
                      hint="QEMU's dirty log lacked pages the full compare found; they are in the epoch")
        dev = self.colo.device_state(cp)
        if final:
            self._frozen = True
        else:
            self.colo.finish()
        return (dirty, check), dev, sealed

    def _capture_colo(self, n: int, cp, full: bool) -> tuple[DirtySet, verify.RangeCheck | None, int]:
        """In the pause (QEMU's COLO thread holds the guest stopped): the pages QEMU sent whose
        content differs from the shadow (a page rewritten with the same bytes is logged too);
        with `full`, the rest of RAM compared as well."""
        dirty = self.capture.take_changed(cp.pages)
        missed = 0
        if full:
            extra = self.capture.scan()
            if extra.size:
                missed = int(extra.size)
                dirty = dirty.merge(self.capture.take(extra))
        nbytes = self.cfg.verify_bytes_per_epoch
        check = verify.take(n, self.capture.ram, nbytes, self.capture.page_size) if nbytes else None
        return dirty, check, missed

    async def _colo_failed(self, e: Exception) -> None:
        self._frozen = False
        self.status.capture, self.status.colo_error = "scan", str(e)
        log.error("primary.colo_failed", error=str(e), hint="COLO ends (the guest runs on); epochs use the full "
                  "scan until the next session starts COLO again")
        try:
            await self.colo.end()
        except (GuestError, OSError) as e2:
            log.error("primary.colo_end_failed", error=str(e2))

    async def end_colo(self) -> None:
        """Leave COLO (the primary's replication ends with the guest running on here)."""
        if self.colo is not None and self.colo.active:
            async with self._pause_lock:
                await self.colo.end()
            self.status.capture = "scan"

    async def _pause_scan(self, n: int, final: bool):
        """stop → seal the gate and the disk's extent log at n → (device state ∥ dirty scan) →
        cont (not when `final`). `cont` follows even a failed or unanswered `stop`: QEMU may have
        stopped anyway. QEMU completes in-flight disk writes before `stop` returns, so the seal
        right after it cuts the disk exactly between epochs n and n+1."""
        nbd, sealed = self.nbd, None
        if nbd is not None:
            nbd.checkpoint_starting()  # write replies held by backpressure go: `stop` waits for them
        try:
            await self.guest.stop_vcpus()
            self.gate.seal(n)
            if nbd is not None:
                sealed = nbd.seal(n)
                self._disk_unreleased += sealed.nbytes
            scan = asyncio.create_task(asyncio.to_thread(self._capture, n))
            try:
                dev = await self.guest.save_device_state()
            finally:
                dirty = await scan
            return dirty, dev, sealed
        finally:
            if final:
                self._frozen = True
            else:
                await self.guest.cont()

    def _capture(self, n: int) -> tuple[DirtySet, verify.RangeCheck | None]:
        """In the pause (a thread): epoch n's dirty pages, then the digest of this epoch's range
        of live RAM (the vCPUs are still stopped, so it is the RAM the standby must hold at n)."""
        dirty = self.capture.capture()
        nbytes = self.cfg.verify_bytes_per_epoch
        check = verify.take(n, self.capture.ram, nbytes, self.capture.page_size) if nbytes else None
        return dirty, check

    # ------------------------------------------------------------ incoming
    async def _reader(self, ch: Channel) -> None:
        while True:
            mtype, payload = await ch.recv()
            self._last_heard = time.monotonic()
            if mtype is MsgType.ACK:
                (epoch,) = _U64.unpack(payload)
                self._on_ack(epoch)
            elif mtype is MsgType.DIVERGED:
                self._on_diverged(ch, payload)
            elif await on_heartbeat_message(ch, mtype, payload, self.link, self.on_heartbeat):
                pass
            else:
                raise ChannelError(f"standby sent unexpected {mtype.name}")

    def _on_ack(self, epoch: int) -> None:
        if epoch > self.status.epoch:
            raise ChannelError(f"standby acknowledged epoch {epoch}, which was never sent "
                               f"(latest {self.status.epoch})")
        self._session_acked = True  # protected now: losing the standby is the HA layer's to handle
        now = time.monotonic()
        for e in [e for e in self.records if e <= epoch]:
            rec = self.records.pop(e)
            rec.acked_at = now
            log.debug("primary.acked", epoch=e, ack_ms=round((now - rec.sent_at) * 1000, 2))
            self.link.add_transfer(rec.wire_bytes, now - rec.sent_at)
            self.history.append(rec)
            held = rec.held_ms(now)
            self.status.max_held_ms = max(self.status.max_held_ms, round(held, 1))
            if held >= SLOW_HOLD_MS:
                self._note_slow_epoch(rec, held, now)
        del self.history[:-2000]
        if epoch > self.status.committed_epoch:
            self.status.committed_epoch = epoch
        self.gate.release(epoch)
        self.status.in_flight = len(self.records)
        self._acked.set()
        if self.on_commit:
            self.on_commit(epoch)

    def _note_slow_epoch(self, rec: EpochRecord, held_ms: float, now: float) -> None:
        """Say where an epoch's output waited long (at most one line a second; all counted in
        `slow_epochs`): a long run (the epoch waited for earlier ACKs: `max_in_flight`), a long
        pause, or a late ACK (the link, or the standby's journal: its `standby.slow_step`)."""
        self.status.slow_epochs += 1
        if now - self._slow_logged_at < 1.0:
            return
        self._slow_logged_at = now
        log.warning("primary.slow_epoch", epoch=rec.epoch, held_ms=round(held_ms, 1), ran_ms=round(rec.interval_ms, 1),
                    pause_ms=round(rec.pause_ms, 1), encode_ms=round(rec.encode_ms, 1),
                    send_ms=round(rec.send_ms, 1), ack_ms=round((now - rec.sent_at) * 1000, 1),
                    in_flight=len(self.records), slow_total=self.status.slow_epochs,
                    hint="the guest's output waited that long for its release; ack_ms is the link and the "
                         "standby (see its standby.slow_step), ran_ms over the interval an earlier late ACK")

    def _on_diverged(self, ch: Channel, payload: bytes) -> None:
        """The standby's replica is not this RAM: the epoch it names is not acknowledged (its output
        stays held), the session ends, and the next one resyncs by block hashes."""
        try:
            info = json.loads(payload)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise ChannelError(f"standby {ch.peer} sent a malformed DIVERGED")
        self.status.diverged += 1
        self.status.last_divergence = info
        log.error("replica.diverged", peer=ch.peer, side="primary", diverged=self.status.diverged,
                  **{k: info.get(k) for k in ("epoch", "offset", "length", "expected", "found")},
                  hint="a checkpoint missed a write; resyncing the standby by block hashes")
        raise ChannelError(f"standby {ch.peer} found its replica different from this RAM at epoch "
                           f"{info.get('epoch')} (bytes {info.get('offset')}+{info.get('length')}); resyncing")

    async def _heartbeats(self, ch: Channel) -> None:
        await send_heartbeats(ch, self.cfg.heartbeat_ms / 1000, self.generation_fn,
                              self.upstream_fn if self._peer_reads_upstream else None)

    def _sample_path(self, ch: Channel) -> None:
        """The kernel's RTT of the channel's connection, once an epoch (at its start: the link is
        idler then than at any other time of the epoch)."""
        info = ch.tcp_info()
        if info is not None:
            self.link.add_tcp_info(info, time.monotonic())

    def silence_ms(self) -> float:
        return (time.monotonic() - self._last_heard) * 1000

    def summary(self) -> dict:
        s = self.status
        if self.nbd is not None:
            ext = self.nbd.extents
            s.disk_unsent_bytes, s.disk_unsent_cap_bytes = ext.unsent_bytes, ext.cap_bytes or 0
            s.disk_write_delays, s.disk_write_delay_ms = ext.delayed_replies, round(ext.delayed_s * 1000, 1)
        d = {k: v for k, v in s.__dict__.items() if k != "pauses_ms"}
        d.update(self.link.as_dict())
        d["latency_ms"] = epoch_latency(self.history[-200:])
        return json.loads(json.dumps(d, default=str))
