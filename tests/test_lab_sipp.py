"""Reading sipp's results: its statistics CSV and its message log (pure parsers)."""

from __future__ import annotations

from lab.sipp import SippRun, duplicate_answers, parse_stats, response_gaps

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


def dead(callid: str, first: str, cseq: str) -> str:
    return (f"2026-12-01\t11:57:36.396667\t1796126256.396667: Dead call {callid} (successful), received "
            f"'{first}\r\nVia: SIP/2.0/UDP 198.18.10.2:5064\r\nCall-ID: {callid}\r\nCSeq: {cseq}\r\n"
            f"Content-Length: 0\r\n\r\n'\n")


# BYE 1-x sent twice (the first answer took longer than T1); both copies answered.
RETRANSMITTED_BYE = LOG + "".join([
    msg("40.500000", "UDP message sent (358 bytes):", "BYE sip:echo@198.51.100.10:5060 SIP/2.0", "1-x", "2 BYE"),
    msg("40.600000", "UDP message received [312] bytes :", "SIP/2.0 200 OK", "1-x", "2 BYE"),
])


def test_a_second_answer_to_a_retransmitted_request_is_not_a_dead_call_problem():
    errors = "The following events occurred:\n" + dead("1-x", "SIP/2.0 200 OK", "2 BYE")
    assert duplicate_answers(RETRANSMITTED_BYE, errors) == 1
    stats = STATS.replace("t1;20;2;20;0;0;0;8;", "t1;20;2;20;0;0;1;9;")
    r = run(stats)
    r.duplicate_answers = 1
    assert r.problems == []
    assert "dead-call 1 (answers to sipp's own retransmissions: 1)" in r.summary()


def test_a_dead_call_message_that_is_not_such_a_duplicate_stays_a_problem():
    # BYE 1-x sent once: an answer after the call ended is not explained by a retransmission
    assert duplicate_answers(LOG, dead("1-x", "SIP/2.0 200 OK", "2 BYE")) == 0
    # a request from the far end into an ended call, and a provisional answer: never counted
    assert duplicate_answers(RETRANSMITTED_BYE, dead("1-x", "BYE sip:sipp@198.18.10.2:5064 SIP/2.0", "2 BYE")) == 0
    assert duplicate_answers(RETRANSMITTED_BYE, dead("1-x", "SIP/2.0 100 Trying", "2 BYE")) == 0
    # two dead-call messages, one explained: the run still fails, and says which
    stats = STATS.replace("t1;20;2;20;0;0;0;8;", "t1;20;2;20;0;0;2;9;")
    r = run(stats)
    r.duplicate_answers = 1
    assert r.problems == ["DeadCallMsgs 2 (answers to sipp's own retransmissions among them: 1)"]
