"""The COLO stream parser (replication/colo.py) on a stream laid out as QEMU 10.0 writes it: file
header with a configuration section, a command, the RAM START section (block list), PART
sections whose CONTINUE pages refer to the block of the previous page also across sections, ZERO
pages, pages of another block (a ROM), EOF; then a checkpoint: request, reply, vmstate-send, the
logged pages, EOF, vmstate-size and the device blob. The real QEMU: tests/test_colo.py."""

import socket
import struct

import numpy as np
import pytest

from replication import colo
from replication.capture import Capture

PS = 4096


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def counted(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def ram_section(kind: int, sid: int, body: bytes, start: bool = False) -> bytes:
    head = bytes([kind]) + be32(sid)
    if start:
        head += counted("ram") + be32(0) + be32(4)
    return head + body + be64(colo.F_EOS) + bytes([colo.VM_FOOTER]) + be32(sid)


def page(offset: int, flags: int, block: str | None, data: bytes) -> bytes:
    return be64(offset | flags) + (counted(block) if block is not None else b"") + data


HEADER = (be32(colo.VM_MAGIC) + be32(colo.VM_VERSION) + bytes([colo.VM_CONFIGURATION]) + be32(13)
          + b"pc-i440fx-7.2" + bytes([colo.VM_SUBSECTION]) + counted("configuration/capabilities") + be32(1)
          + be32(1) + counted("x-ignore-shared"))


def initial_stream() -> bytes:
    a, b, c, d = (bytes([v]) * PS for v in (0x11, 0x22, 0x33, 0x44))
    command = bytes([colo.VM_COMMAND]) + struct.pack(">HH", 8, 0)  # MIG_CMD_ENABLE_COLO
    blocks = counted("ram0") + be64(3 * PS) + counted("pc.rom") + be64(PS)
    start = ram_section(colo.SEC_START, 2, be64(4 * PS | colo.F_MEM_SIZE) + blocks, start=True)
    part1 = ram_section(colo.SEC_PART, 2, page(0, colo.F_PAGE, "ram0", a)
                        + page(PS, colo.F_PAGE | colo.F_CONTINUE, None, c))
    part2 = ram_section(colo.SEC_PART, 2, page(2 * PS, colo.F_PAGE | colo.F_CONTINUE, None, b)  # block of part1
                        + page(PS, colo.F_ZERO | colo.F_CONTINUE, None, b"\x00")
                        + page(0, colo.F_PAGE, "pc.rom", d))
    devices = bytes([colo.SEC_FULL]) + b"device sections" + bytes([colo.VM_EOF])
    desc = b'{"page_size": 4096}'
    return HEADER + command + start + part1 + part2 + devices + bytes([colo.VM_VMDESC]) + be32(len(desc)) + desc


def checkpoint(blob: bytes) -> bytes:
    end = ram_section(colo.SEC_END, 2, page(2 * PS, colo.F_PAGE, "ram0", bytes(PS))
                      + page(0, colo.F_ZERO | colo.F_CONTINUE, None, b"\x00")
                      + page(2 * PS, colo.F_PAGE | colo.F_CONTINUE, None, bytes(PS))  # twice: counted once
                      + page(0, colo.F_PAGE, "pc.rom", bytes(PS)))
    return (be32(colo.REQUEST) + be32(colo.SEND) + end + bytes([colo.VM_EOF]) + be32(colo.SIZE)
            + be64(len(blob)) + blob)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_initial_stream_then_a_checkpoint(pair):
    ours, theirs = pair
    theirs.sendall(initial_stream())
    s = colo.ColoStream(ours, ram_bytes=3 * PS, page_size=PS, timeout=5)
    pages = s.read_initial(quiet_s=0.05)
    assert s.main == "ram0" and s.blocks == {"ram0": 3 * PS, "pc.rom": PS}
    assert sorted(pages.main) == [0, 1, 1, 2] and pages.other == 1 and pages.zero == 1
    assert s.header == HEADER
    s.send(colo.READY)
    assert theirs.recv(4) == be32(colo.READY)

    blob = b"\x04device\x00"
    theirs.sendall(checkpoint(blob))
    s.wait_request()
    s.begin()
    assert theirs.recv(4) == be32(colo.REPLY)
    cp = s.read_checkpoint()
    assert cp.pages.tolist() == [0, 2] and cp.other_pages == 1 and cp.device_blob == blob
    s.finish()
    assert theirs.recv(8) == be32(colo.RECEIVED) + be32(colo.LOADED)
    assert s.checkpoints == 1
    stream = colo.device_stream(s.header, cp.device_blob)
    assert stream.startswith(HEADER + blob) and stream.endswith(colo.EMPTY_VMDESC)
    assert colo.header_of(stream) == HEADER


def test_a_wrong_message_names_both(pair):
    ours, theirs = pair
    s = colo.ColoStream(ours, ram_bytes=PS, timeout=5)
    theirs.sendall(be32(colo.LOADED))
    with pytest.raises(colo.ColoError, match="QEMU sent COLO vmstate-loaded where checkpoint-request belongs"):
        s.wait_request()


def test_silence_and_a_closed_stream_are_errors(pair):
    ours, theirs = pair
    s = colo.ColoStream(ours, ram_bytes=PS, timeout=0.05)
    with pytest.raises(colo.ColoTimeout, match="sent nothing for 0.05s while we waited for COLO checkpoint-request"):
        s.wait_request()
    theirs.close()
    with pytest.raises(colo.ColoError, match="closed the COLO stream"):
        s.wait_request()


def test_not_a_migration_stream(pair):
    ours, theirs = pair
    theirs.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(colo.ColoError, match="not a QEMU migration stream"):
        colo.ColoStream(ours, ram_bytes=PS, timeout=1).read_initial()


def test_the_initial_device_part_ends_with_eof_or_a_vmdescription():
    desc = b'{"page_size": 4096}'
    assert colo._ends_like_devices(bytearray(b"\x04dev\x00"))
    assert colo._ends_like_devices(bytearray(b"\x04dev\x00" + bytes([colo.VM_VMDESC]) + be32(len(desc)) + desc))
    assert not colo._ends_like_devices(bytearray(b"\x04dev\x00" + bytes([colo.VM_VMDESC]) + be32(len(desc) + 1)
                                                 + desc))


def test_take_changed_keeps_only_pages_whose_bytes_differ(tmp_path):
    ram = np.zeros(4 * PS, np.uint8)
    ram[PS:2 * PS] = 7
    (tmp_path / "ram").write_bytes(ram.tobytes())
    cap = Capture(tmp_path / "ram", 4 * PS)
    try:
        d = cap.take_changed(np.array([0, 1, 3], np.uint64))  # 0 and 3 rewritten with the same zeros
        assert d.page_numbers.tolist() == [1] and d.new_pages[0][0] == 7 and d.old_pages[0][0] == 0
        assert cap.take_changed(np.array([1], np.uint64)).page_numbers.size == 0  # the shadow has it now
    finally:
        cap.close()
