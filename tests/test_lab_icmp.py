"""The lab's ICMP echo probe (lab/icmp.py): packets it builds and replies it accepts."""

from __future__ import annotations

import struct

import pytest

from lab import icmp


def ipv4(payload: bytes, ihl_words: int = 5) -> bytes:
    head = bytes([0x40 | ihl_words]) + bytes(ihl_words * 4 - 1)
    return head + payload


def test_checksum_matches_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement: 220d)
    assert icmp.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_an_echo_request_carries_a_valid_checksum():
    req = icmp.echo_request(0x1234, 77)
    assert req[0] == icmp.ICMP_ECHO_REQUEST
    assert icmp.checksum(req) == 0  # a packet with its checksum in place sums to zero
    assert struct.unpack("!HH", req[4:8]) == (0x1234, 77)
    assert icmp.checksum(icmp.echo_request(1, 2, b"odd")) == 0  # an odd length is padded with a zero byte


def test_only_replies_to_our_identifier_are_counted():
    reply = bytes([icmp.ICMP_ECHO_REPLY, 0, 0, 0]) + struct.pack("!HH", 0x1234, 9) + b"data"
    assert icmp.parse_reply(ipv4(reply), 0x1234) == 9
    assert icmp.parse_reply(ipv4(reply, ihl_words=6), 0x1234) == 9  # IP options
    assert icmp.parse_reply(ipv4(reply), 0x4321) is None  # someone else's probe
    request = bytes([icmp.ICMP_ECHO_REQUEST]) + reply[1:]
    assert icmp.parse_reply(ipv4(request), 0x1234) is None  # our own request, looped back
    assert icmp.parse_reply(ipv4(reply)[:24], 0x1234) is None  # truncated
    assert icmp.parse_reply(b"\x45", 0x1234) is None


def test_more_requests_than_sequence_numbers_are_refused():
    with pytest.raises(ValueError, match="count 65537"):
        icmp.echo("198.51.100.10", 0x10001, rate=1000)
