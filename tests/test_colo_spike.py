"""The COLO spike's migration-stream parser (bench/colo_spike.py) rebuilds RAM from a stream laid
out as QEMU 10.0 writes it: file header with a configuration section, a command, the RAM START
section (block list), PART sections of pages where CONTINUE refers to the block of the previous
page also across sections, ZERO pages that clear what an earlier page wrote, and EOF."""

import socket
import struct

import numpy as np

from bench import colo_spike as cs

PS = cs.PAGE_SIZE


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
    return head + body + be64(cs.F_EOS) + bytes([cs.VM_FOOTER]) + be32(sid)


def page(offset: int, flags: int, block: str | None, data: bytes) -> bytes:
    return be64(offset | flags) + (counted(block) if block is not None else b"") + data


def build_stream(a: bytes, b: bytes, c: bytes, d: bytes) -> bytes:
    machine = b"pc-i440fx-7.2"
    header = (be32(cs.VM_MAGIC) + be32(cs.VM_VERSION) + bytes([cs.VM_CONFIGURATION]) + be32(len(machine))
              + machine + bytes([cs.VM_SUBSECTION]) + counted("configuration/capabilities") + be32(1)
              + be32(1) + counted("x-ignore-shared"))
    command = bytes([cs.VM_COMMAND]) + struct.pack(">HH", 8, 0)  # MIG_CMD_ENABLE_COLO
    blocks = counted("ram0") + be64(3 * PS) + counted("pc.rom") + be64(PS)
    start = ram_section(cs.SEC_START, 2, be64(4 * PS | cs.F_MEM_SIZE) + blocks, start=True)
    part1 = ram_section(cs.SEC_PART, 2, page(0, cs.F_PAGE, "ram0", a)
                        + page(PS, cs.F_PAGE | cs.F_CONTINUE, None, c))
    part2 = ram_section(cs.SEC_PART, 2, page(2 * PS, cs.F_PAGE | cs.F_CONTINUE, None, b)  # block of part1
                        + page(PS, cs.F_ZERO | cs.F_CONTINUE, None, b"\x00")
                        + page(0, cs.F_PAGE, "pc.rom", d))
    return header + command + start + part1 + part2 + bytes([cs.VM_EOF])


def test_parser_rebuilds_ram_across_sections():
    a, b, c, d = (bytes([v]) * PS for v in (0x11, 0x22, 0x33, 0x44))
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(build_stream(a, b, c, d))
        sec = cs.Secondary(cs.Reader(ours, timeout=5), main_block_size=3 * PS)
        sec.read_header()
        st, eof = sec.read_until_eof(1, allow_full=False)
    finally:
        ours.close()
        theirs.close()
    assert eof
    assert sec.main == "ram0"
    assert sec.blocks["ram0"].tobytes() == a + bytes(PS) + b  # the ZERO page cleared what part1 wrote
    assert sec.blocks["pc.rom"].tobytes() == d
    assert (st.pages, st.zero) == (5, 1)
    assert sorted(set(st.page_numbers)) == [0, 1, 2]
    assert sec.header.startswith(be32(cs.VM_MAGIC)) and sec.header.endswith(counted("x-ignore-shared"))
    assert np.array_equal(sec.last_sent, [1, 1, 1])


def test_initial_device_part_must_end_with_eof_or_vmdescription():
    desc = b'{"page_size": 4096}'
    assert cs.device_tail_ok(b"\x04dev\x00")
    assert cs.device_tail_ok(b"\x04dev\x00" + bytes([cs.VM_VMDESC]) + be32(len(desc)) + desc)
    assert not cs.device_tail_ok(b"\x04dev\x00" + bytes([cs.VM_VMDESC]) + be32(len(desc) + 1) + desc)
