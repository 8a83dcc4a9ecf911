"""Reading sipp's results: its statistics CSV and its message log (pure parsers)."""

from __future__ import annotations

from lab.sipp import SippRun, parse_stats, response_gaps

STATS = (
    "StartTime;TotalCallCreated;SuccessfulCall(P);SuccessfulCall(C);FailedCall(C);OutOfCallMsgs(C);"
    "DeadCallMsgs(C);Retransmissions(C);\n"
    "t0;3;1;1;0;0;0;0;\n"
    "t1;20;2;20;0;0;0;8;\n"
)


def msg(ts: str, kind: str, first: str, callid: str, cseq: str) -> str:
    return (f"----------------------------------------------- 2026-11-30 06:54:{ts}\n{kind}\n\n{first}\n"
            f"Via: SIP/2.0/UDP 198.18.10.2:5061\nCall-ID: {callid}\nCSeq: {cseq}\nContent-Length: 0\n\n\n")


LOG = "".join([
    msg("28.400000", "UDP message sent (523 bytes):", "INVITE sip:echo@198.51.100.10:5060 SIP/2.0", "1-x", "1 INVITE"),
    msg("28.900000", "UDP message sent (523 bytes):", "INVITE sip:echo@198.51.100.10:5060 SIP/2.0", "1-x", "1 INVITE"),
    msg("29.900000", "UDP message received [305] bytes :", "SIP/2.0 100 Trying", "1-x", "1 INVITE"),
    msg("29.950000", "UDP message received [486] bytes :", "SIP/2.0 200 OK", "1-x", "1 INVITE"),
    msg("40.000000", "UDP message sent (358 bytes):", "BYE sip:echo@198.51.100.10:5060 SIP/2.0", "1-x", "2 BYE"),
    msg("40.100000", "UDP message received [312] bytes :", "SIP/2.0 200 OK", "1-x", "2 BYE"),
    msg("41.000000", "UDP message sent (358 bytes):", "BYE sip:echo@198.51.100.10:5060 SIP/2.0", "2-x", "2 BYE"),
])


def test_stats_are_the_last_row_by_column():
    s = parse_stats(STATS)
    assert s["TotalCallCreated"] == "20" and s["Retransmissions(C)"] == "8"
    assert parse_stats("") == {}


def test_response_gap_runs_from_the_first_send_to_the_final_response():
    gaps = response_gaps(LOG)
    assert [(round(g, 3), w) for g, w in gaps] == [(1.55, "INVITE 1-x"), (0.1, "BYE 1-x")]


def run(stats: str, rc: int = 0, transport: str = "u1", ports=()) -> SippRun:
    return SippRun(transport=transport, rc=rc, stats=parse_stats(stats), longest_response_gap_s=0.0,
                   longest_gap_request="", tcp_local_ports=list(ports))


def test_a_clean_run_has_no_problems_and_each_fault_is_named():
    assert run(STATS).problems == []
    assert run(STATS.replace("t1;20;2;20;0;0;0;8;", "t1;20;2;19;1;0;2;8;"), rc=1).problems == [
        "sipp exited 1: ", "19 of 20 calls succeeded", "FailedCall 1", "DeadCallMsgs 2"]
    assert run(STATS, transport="t1", ports=(40000, 40001)).problems == [
        "the TCP connection was reopened (local ports [40000, 40001])"]
