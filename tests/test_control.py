"""The control API's answers (409 refusal, 400 malformed, 401 token, 500 bug) and the client's
one-sentence ControlError for each, and for a daemon that is not there or does not answer."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from structlog.testing import capture_logs

from geomirror import control
from geomirror.control import ControlClient, ControlError
from tests.control_server import PROMOTE_REFUSAL, SWITCHOVER_REFUSAL, FakeDaemon

TOKEN = "t0ken"


@pytest.fixture
def sockdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ctl")  # short: a UNIX socket path has at most 107 bytes


@pytest.fixture
async def served(sockdir):
    daemon = FakeDaemon()
    sock = sockdir / "control.sock"
    runner = await control.start(control.make_app(daemon, TOKEN), "127.0.0.1", 0, sock)
    yield daemon, ControlClient(TOKEN, sock, name="site-a's daemon"), sock
    await runner.cleanup()


async def raw(sock, method, path, data: bytes, token=TOKEN):
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        async with s.request(method, "http://localhost" + path, data=data,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)


async def test_status_and_a_good_checkpoint_call_answer_200(served):
    daemon, client, _ = served
    assert (await client.call("GET", "/v1/status"))["committed_epoch"] == 7
    assert await client.call("POST", "/v1/checkpoint", {"adaptive": False, "interval_ms": 50}) == \
        {"adaptive": False, "interval_ms": 50}
    assert daemon.calls == [("checkpoint", False, 50)]


@pytest.mark.parametrize("path, body, sentence", [
    ("/v1/promote", {"force": True}, PROMOTE_REFUSAL),
    ("/v1/switchover", {"timeout_s": 5}, SWITCHOVER_REFUSAL),
    ("/v1/checkpoint", {"interval_ms": 5000}, "interval 5000 ms is outside 1..1000"),
    ("/v1/reload-tls", None, "the certificate files were refused (see the log line tls.reload_refused); "
                             "still presenting the previous one"),
])
async def test_a_refusal_is_409_with_the_daemons_sentence(served, path, body, sentence):
    _, client, sock = served
    status, answer = await raw(sock, "POST", path, b"" if body is None else json.dumps(body).encode())
    assert (status, answer) == (409, {"error": sentence})
    with pytest.raises(ControlError) as e:
        await client.call("POST", path, body)
    assert str(e.value) == sentence and e.value.status == 409


async def test_a_bug_is_500_logged_with_its_traceback_not_a_refusal(served):
    daemon, client, sock = served
    with capture_logs() as logs:
        status, answer = await raw(sock, "POST", "/v1/fence", b'{"reason": "drill"}')
    assert status == 500
    assert answer == {"error": "internal error (KeyError); see the daemon log, event control.bug"}
    bug = [e for e in logs if e["event"] == "control.bug"]
    assert len(bug) == 1 and bug[0]["exc_info"] is True and bug[0]["path"] == "/v1/fence"
    assert daemon.calls == [("fence", "drill")]
    with pytest.raises(ControlError, match=r"^site-a's daemon failed on POST /v1/fence: internal error \(KeyError\); "
                                           r"see the daemon log, event control.bug$") as e:
        await client.call("POST", "/v1/fence", {"reason": "operator"})
    assert e.value.status == 500


@pytest.mark.parametrize("path, data, sentence", [
    ("/v1/promote", b"{not json", "the request body is not JSON"),
    ("/v1/promote", b"[true]", "the request body must be a JSON object"),
    ("/v1/promote", b'{"force": "yes"}', 'force must be true or false, not "yes"'),
    ("/v1/switchover", b'{"timeout_s": "soon"}', 'timeout_s must be a number, not "soon"'),
    ("/v1/switchover", b'{"timeout_s": true}', "timeout_s must be a number, not true"),
    ("/v1/checkpoint", b'{"interval_ms": [1]}', "interval_ms must be a number, not [1]"),
    ("/v1/fence", b'{"reason": 3}', "reason must be a string, not 3"),
])
async def test_a_malformed_request_is_400_and_never_reaches_the_daemon(served, path, data, sentence):
    daemon, _, sock = served
    assert await raw(sock, "POST", path, data) == (400, {"error": sentence})
    assert daemon.calls == []


async def test_a_malformed_request_is_one_sentence_at_the_client(served):
    _, client, _ = served
    with pytest.raises(ControlError, match=r"^site-a's daemon rejected POST /v1/promote as malformed: "
                                           r"force must be true or false, not 1$"):
        await client.call("POST", "/v1/promote", {"force": 1})


async def test_a_wrong_token_is_401_and_one_sentence(served):
    daemon, _, sock = served
    status, answer = await raw(sock, "POST", "/v1/promote", b"{}", token="wrong")
    assert status == 401 and "bearer token" in answer["error"]
    with pytest.raises(ControlError, match="^site-a's daemon refused the control token \\(HTTP 401\\)") as e:
        await ControlClient("wrong", sock, name="site-a's daemon").call("GET", "/v1/status")
    assert e.value.status == 401 and daemon.calls == []


async def test_no_socket_means_not_running(sockdir):
    sock = sockdir / "control.sock"
    with pytest.raises(ControlError) as e:
        await ControlClient(TOKEN, sock, name="site-a's daemon").call("GET", "/v1/status")
    assert str(e.value) == f"site-a's daemon is not running (nothing answers on {sock})" and e.value.status is None


async def test_a_stale_socket_file_means_not_running(sockdir):
    sock = sockdir / "control.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # the file of a dead daemon: nobody listens
    s.close()
    assert sock.exists()
    with pytest.raises(ControlError, match=r"^site-a's daemon is not running \(nothing answers on .*control.sock\)$"):
        await ControlClient(TOKEN, sock, name="site-a's daemon").call("POST", "/v1/promote", {})


async def test_a_daemon_that_does_not_answer_is_a_timeout_sentence(sockdir):
    sock = sockdir / "control.sock"
    hold = asyncio.Event()

    async def mute(reader, writer):
        await hold.wait()
        writer.close()

    server = await asyncio.start_unix_server(mute, path=str(sock))
    try:
        with pytest.raises(ControlError, match=r"^site-a's daemon did not answer GET /v1/status within 0.2 s"):
            await ControlClient(TOKEN, sock, name="site-a's daemon").call("GET", "/v1/status", timeout=0.2)
    finally:
        hold.set()
        server.close()


async def test_a_daemon_that_hangs_up_is_one_sentence(sockdir):
    sock = sockdir / "control.sock"

    async def hang_up(reader, writer):
        await reader.readline()
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=str(sock))
    try:
        with pytest.raises(ControlError, match=r"^site-a's daemon dropped GET /v1/status without an answer"):
            await ControlClient(TOKEN, sock, name="site-a's daemon").call("GET", "/v1/status")
    finally:
        server.close()
