"""Defects found by probing the running service from outside, each with the test that reproduces it.

Connection limits run against a real uvicorn server with the service's protocol (``service.protocol``); the
log tests run ``python -m service run`` as a real process at trace level (every ASGI message logged, request
headers included) with a known key and look for the key in every line it wrote.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.app import create_app
from service.protocol import ConnectionLimits, GuardedHttpProtocol
from service.settings import Settings
from tests.patience import HANG_GUARD_S, PATIENCE_S
from tests.service_support import (
    AUTH,
    KEY,
    ROOT,
    Artifact,
    assert_error,
    free_port,
    no_mmf_environment,  # noqa: F401 (autouse)
    serve,
    start_service,
    stop_process,
    wait_ready,
)

LIMITS = ConnectionLimits(max_header_bytes=16384, header_timeout_s=1.0, body_timeout_s=1.0)


@pytest.fixture(scope="module")
def guarded(artifact: Artifact, redis_url: str) -> Iterator[str]:
    """The app behind a real uvicorn server with the service's protocol and short limits."""
    namespace = "hardening-" + os.urandom(6).hex()
    app = create_app(Settings(artifacts=artifact.path, redis_url=redis_url, api_key=KEY, namespace=namespace))
    protocol = functools.partial(GuardedHttpProtocol, limits=LIMITS)
    with serve(app, http=protocol, timeout_keep_alive=1) as url:
        yield url
    from tests.service_support import delete_namespace

    delete_namespace(redis_url, namespace)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=PATIENCE_S)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_headers_are_refused_and_the_server_stays_responsive(guarded: str) -> None:
    sock = connect(guarded)
    sent, total = 0, 48 * 1024 * 1024
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < total:
            sock.sendall(b"a" * 65536)
            sent += 65536
    answer = read_all(sock)
    sock.close()
    # Refused before the 48 MB were accepted: the server closed the connection (what the kernel buffered
    # meanwhile is a few MB at most), and if its answer arrived before the reset, it is a 431.
    assert sent < total, "the server took the whole 48 MB header"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    if answer:
        assert b"16384" in answer and answer.endswith(b"}")
    assert httpx.get(f"{guarded}/healthz").status_code == 200
    # Headers just under the limit are fine, with or without a body.
    r = httpx.get(f"{guarded}/healthz", headers={"X-Pad": "a" * 12000})
    assert r.status_code == 200
    try:
        r = httpx.get(f"{guarded}/healthz", headers={"X-Pad": "a" * 17000})
    except httpx.TransportError:
        pass  # reset before the answer was read
    else:
        assert r.status_code == 431 and "16384" in r.json()["detail"]


def test_idle_connection_is_closed(guarded: str) -> None:
    sock = connect(guarded)
    assert read_all(sock) == b""  # closed by the server (the socket's own timeout is a hang guard)
    sock.close()


def test_trickled_headers_get_408(guarded: str) -> None:
    sock = connect(guarded)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:  # a header line now and then, never the end of the headers
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                sock.sendall(b"X-Slow: 1\r\n")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        answer = read_all(sock)
    finally:
        stop.set()
        thread.join()
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("request headers not complete")


def test_trickled_body_is_cut_off(guarded: str) -> None:
    sock = connect(guarded)
    body = json.dumps({"item_id": "slow", "features": {"x": [1.0]}}).encode()
    head = (f"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + body[:5])  # the rest never comes
    answer = read_all(sock)
    sock.close()
    assert answer == b"", answer  # closed without an answer: the app saw a disconnect
    assert httpx.get(f"{guarded}/items/slow").status_code == 404  # nothing was written


def test_kept_alive_connection_is_closed_when_idle_and_served_while_used(guarded: str) -> None:
    sock = connect(guarded)
    for _ in range(3):  # requests on one connection, each well within the limits
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, f"closed in the middle of an answer: {answer!r}"
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
        while len(body) < length:
            chunk = sock.recv(4096)
            assert chunk, f"closed in the middle of an answer: {answer!r}"
            body += chunk
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["status"] == "ok"
    assert read_all(sock) == b""  # then idle: closed after the keep-alive time
    sock.close()


def test_connection_limit_answers_503(artifact: Artifact, redis_url: str) -> None:
    namespace = "hardening-" + os.urandom(6).hex()
    app = create_app(Settings(artifacts=artifact.path, redis_url=redis_url, namespace=namespace))
    limits = ConnectionLimits(header_timeout_s=HANG_GUARD_S)  # the held connections stay for the whole test
    protocol = functools.partial(GuardedHttpProtocol, limits=limits)
    with serve(app, http=protocol, limit_concurrency=3) as url:
        held = [connect(url) for _ in range(3)]
        try:
            r = httpx.get(f"{url}/healthz")
            assert r.status_code == 503
        finally:
            for sock in held:
                sock.close()
        wait_until_ok = time.monotonic() + PATIENCE_S
        while httpx.get(f"{url}/healthz").status_code != 200:  # the server notices the closes
            assert time.monotonic() < wait_until_ok
            time.sleep(0.05)
    from tests.service_support import delete_namespace

    delete_namespace(redis_url, namespace)


def test_run_hands_the_limits_and_logging_to_uvicorn(monkeypatch, artifact: Artifact, redis_url: str) -> None:
    """``python -m service run`` passes the settings on: the guarded protocol, keep-alive, connection limit,
    and the logging configuration that every worker applies."""
    import uvicorn

    from service import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    monkeypatch.setenv("MMF_REDIS_URL", redis_url)
    monkeypatch.setenv("MMF_NAMESPACE", "hardening-" + os.urandom(6).hex())
    monkeypatch.setenv("MMF_MAX_HEADER_BYTES", "20000")
    monkeypatch.setenv("MMF_HEADER_TIMEOUT_S", "3.5")
    monkeypatch.setenv("MMF_KEEP_ALIVE_S", "7")
    monkeypatch.setenv("MMF_MAX_CONNECTIONS", "42")
    assert cli.main(["run", "--artifacts", str(artifact.path), "--workers", "2"]) == 0
    assert seen["http"].func is GuardedHttpProtocol
    assert seen["http"].keywords["limits"] == ConnectionLimits(20000, 3.5, 30.0)
    assert seen["timeout_keep_alive"] == 7 and seen["limit_concurrency"] == 42 and seen["workers"] == 2
    assert seen["timeout_worker_healthcheck"] == 60.0  # not uvicorn's 5 s: workers importing torch on a busy host
    handlers = seen["log_config"]["handlers"]
    assert all(h["filters"] == ["redact"] for h in handlers.values())
    assert seen["log_config"]["root"]["handlers"] == ["service"]  # the service's INFO lines, in every worker


# ------------------------------------------------------------------------------------------------------
# The API key never reaches a log line
# ------------------------------------------------------------------------------------------------------

SECRET = "k3y-" + "9f2c1e7d5b"  # distinctive: any occurrence in a log is a leak


def test_the_key_reaches_no_log_line(artifact: Artifact, redis_url: str, tmp_path: Path) -> None:
    port, ns = free_port(), "hardening-" + os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    env.update(MMF_REDIS_URL=redis_url, MMF_NAMESPACE=ns, MMF_API_KEY=SECRET)
    log_path = tmp_path / "server.log"
    server = start_service(artifact.path, port, env, log_path, "--log-level", "trace")
    base = f"http://127.0.0.1:{port}"
    auth = {"X-API-Key": SECRET}
    try:
        wait_ready(server, base, log_path)
        with httpx.Client(base_url=base, timeout=PATIENCE_S) as http:
            # the key where a client should never put it: ids, query strings, bodies, wrong places
            assert http.get(f"/items/{SECRET}").status_code == 404
            assert http.get(f"/recommend/{SECRET}", params={"token": SECRET, "k": SECRET}).status_code == 422
            assert http.get("/info", params={"api_key": SECRET, "password": "x"}).status_code == 200
            assert http.get(f"/items/a%0d%0a{SECRET}").status_code in (404, 422)
            assert http.post("/items", json={"item_id": SECRET, "features": {}}, headers=auth).status_code == 422
            body = b"\xff" + SECRET.encode()
            for content_type in (None, "text/plain", "application/json"):
                headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
                assert http.post("/interactions", content=body, headers=headers).status_code in (400, 422)
            assert (
                http.post(
                    "/items", json={"item_id": "x", "features": {}}, headers={"X-API-Key": SECRET + "x"}
                ).status_code
                == 401
            )
            r = http.post("/admin/reload", json={"artifacts": f"/nonexistent/{SECRET}"}, headers=auth)
            assert r.status_code == 422 and SECRET in r.json()["detail"]  # the client's own input, answered to it
            r = http.post("/admin/reload", json={"artifacts": f"/nonexistent/{SECRET}", "wait": False}, headers=auth)
            assert r.status_code == 202
            wait = time.monotonic() + PATIENCE_S
            while http.get("/admin/reload", headers=auth).json()["state"] == "loading":
                assert time.monotonic() < wait
                time.sleep(0.05)
            assert http.post("/admin/reload", json={"wait": SECRET}, headers=auth).status_code == 422
            assert http.get(f"/admin/check?key={SECRET}", headers=auth).status_code == 200
        # a request line no parser accepts
        with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as sock:
            sock.sendall(f"GET /{SECRET} HTTP/9\x00\r\n\r\n".encode())
            read_all(sock)
    finally:
        stop_process(server, timeout=PATIENCE_S)
        from tests.service_support import delete_namespace

        delete_namespace(redis_url, ns)
    out = log_path.read_text(errors="replace")
    assert "ASGI [" in out, "trace logging did not run"
    assert "Logging error" not in out, out[-3000:]
    assert SECRET not in out, [line for line in out.splitlines() if SECRET in line][:5]
    assert "GET /info?api_key=***&password=*** HTTP/1.1" in out  # access lines survive redaction
    assert "GET /items/*** HTTP/1.1" in out and "reload of '/nonexistent/***' failed" in out


def test_configuration_errors_name_the_variable_not_the_value(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    cases = [
        ({"MMF_API_KEY": SECRET, "MMF_IVF_NLIST": "10", "MMF_IVF_NPROBE": "20"}, "MMF_IVF_NPROBE=20", ["run"]),
        ({"MMF_API_KEY": "s3cr3t!"}, "MMF_API_KEY: at least 8 characters", ["run"]),
        ({"MMF_API_KEY": SECRET, "MMF_MAX_K": "many"}, "MMF_MAX_K", ["check"]),
        ({"MMF_API_KEY": SECRET, "MMF_KEEP_ALIVE_S": "-1"}, "MMF_KEEP_ALIVE_S", ["export-interactions", "--out", "x"]),
    ]
    for extra, needle, command in cases:
        done = subprocess.run(
            [sys.executable, "-m", "service", *command], cwd=tmp_path, env={**env, **extra},
            capture_output=True, text=True, timeout=HANG_GUARD_S,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert needle in output and "Traceback" not in output, output
        assert extra["MMF_API_KEY"] not in output, output


def test_redaction_keeps_access_records_and_tracebacks_whole() -> None:
    import logging

    from uvicorn.logging import AccessFormatter

    from service.logs import RedactSecrets

    redact = RedactSecrets([SECRET])
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', ("1.2.3.4:5", "GET",
        f"/items/{SECRET}?token=abc&k=3\r\nforged", "1.1", 404), None,
    )  # fmt: skip
    assert redact.filter(record)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record)
    assert line == '1.2.3.4:5 - "GET /items/***?token=***&k=3\\r\\nforged HTTP/1.1" 404 Not Found'
    try:
        raise KeyError(f"unknown item {SECRET!r}")
    except KeyError:
        record = logging.LogRecord("service", logging.ERROR, __file__, 1, "failed: %s", (SECRET,), sys.exc_info())
    assert redact.filter(record)
    text = logging.Formatter().format(record)
    assert "Traceback" in text and SECRET not in text and text.startswith("failed: ***")
    redact.add("short")  # shorter than the settings allow: never blanked out
    assert redact.redact("a short text") == "a short text"


# ------------------------------------------------------------------------------------------------------
# Non-UTF-8 bodies, ids, reload, 405, /info, docs
# ------------------------------------------------------------------------------------------------------

NOT_UTF8 = b'\xff\xfe{"item_id": "\xc3\x28"}'
CONTENT_TYPES = [
    None,
    "text/plain",
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "text/plain; charset=latin-1",
]
POSTS = ["/items", "/items:batch", "/interactions", "/admin/reload"]


def test_bodies_that_are_not_utf8_get_422(client) -> None:
    for path in POSTS:
        for content_type in CONTENT_TYPES:
            headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
            r = client.post(path, content=NOT_UTF8, headers=headers)
            assert r.status_code in (400, 422), (path, content_type, r.status_code, r.text)
            assert r.json()["detail"], r.text
            if r.status_code == 400:
                assert "not UTF-8" in r.json()["detail"], r.text


def test_dot_segment_ids_are_refused(client, artifact: Artifact) -> None:
    for item_id in (".", ".."):
        assert_error(client.post("/items", json={"item_id": item_id, "features": artifact.features(0)}, headers=AUTH),
                     422, "item_id")  # fmt: skip
        assert_error(client.post("/interactions", json={"user_id": item_id, "item_id": "0"}, headers=AUTH),
                     422, "user_id")  # fmt: skip
    for item_id in ("...", ".a", "a.", "..b"):  # ordinary ids with dots
        assert (
            client.post("/items", json={"item_id": item_id, "features": artifact.features(1)}, headers=AUTH).status_code
            == 201
        )
        assert client.get(f"/items/{item_id}").status_code == 200


def test_reload_wait_must_be_a_json_boolean(client) -> None:
    for wait in ("yes", 0, 1, "true", None):
        assert_error(client.post("/admin/reload", json={"wait": wait}, headers=AUTH), 422, "wait")


def test_background_reload_answers_its_starting_state(client, tmp_path: Path) -> None:
    """The 202 is the status the reload started with, never a failure already recorded under "loading"."""
    for _ in range(5):
        r = client.post("/admin/reload", json={"artifacts": str(tmp_path / "missing"), "wait": False}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "loading" and r.json()["detail"] is None and r.json()["finished_at"] is None
        wait = time.monotonic() + PATIENCE_S
        while (status := client.get("/admin/reload", headers=AUTH).json())["state"] == "loading":
            assert time.monotonic() < wait
            time.sleep(0.01)
        assert status["state"] == "failed" and "manifest.json" in status["detail"]


def test_a_reload_is_refused_while_one_runs_and_waits_for_one_that_has_finished(client) -> None:
    """409 while a reload is loading; once its outcome is recorded, the next one waits for the lock that the
    finished reload is about to let go of instead of answering 409."""
    runtime = client.app.state.runtime
    runtime._reload_lock.acquire()
    try:
        runtime.status.state = "loading"
        assert_error(client.post("/admin/reload", json={"wait": False}, headers=AUTH), 409, "already running")
        runtime.status.state = "failed"
        threading.Timer(0.2, runtime._reload_lock.release).start()
        r = client.post("/admin/reload", json={"wait": True}, headers=AUTH)
        assert r.status_code == 200, r.text
    finally:
        runtime._reload_lock.acquire(blocking=False)
        runtime._reload_lock.release()


def test_405_lists_every_method_of_the_path(client) -> None:
    r = client.put("/items/abc")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    r = client.delete("/recommend/abc")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert client.get("/items:batch").headers["allow"] == "POST"


def test_info_shows_the_artifact_path_to_key_holders_only(client, artifact: Artifact) -> None:
    assert client.get("/info").json()["artifacts"] is None
    assert client.get("/info", headers={"X-API-Key": "wrong-key"}).json()["artifacts"] is None
    assert client.get("/info", headers=AUTH).json()["artifacts"] == str(artifact.path)


def test_docs_work_offline(client) -> None:
    page = client.get("/docs").text
    assets = [part.split('"')[0] for part in page.split('="')[1:] if part.startswith("/docs/assets/")]
    assert len(assets) == 3 and "cdn" not in page.lower() and "http" not in page.replace("https://swagger.io", "")
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    redoc = client.get("/redoc").text
    assert "/docs/assets/redoc.standalone.js" in redoc and "fonts.googleapis" not in redoc
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")


# ------------------------------------------------------------------------------------------------------
# The embedded Redis does not outlive the service
# ------------------------------------------------------------------------------------------------------


def redis_pid(state_dir: Path) -> int:
    return redis.Redis(unix_socket_path=str(state_dir / "redis.sock")).info()["process_id"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # a child of this test: reap it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0 if Path(f"/proc/{pid}").exists() else True


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + PATIENCE_S
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_embedded_redis_stops_when_the_service_is_killed(artifact: Artifact, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    env.update(MMF_STATE_DIR=str(tmp_path / "state"), MMF_API_KEY=KEY)
    port, log_path = free_port(), tmp_path / "server.log"
    server = start_service(artifact.path, port, env, log_path, cwd=tmp_path)
    try:
        wait_ready(server, f"http://127.0.0.1:{port}", log_path)
        r = httpx.post(f"http://127.0.0.1:{port}/items", json={"item_id": "kept", "features": artifact.features(3)},
                       headers=AUTH, timeout=PATIENCE_S)  # fmt: skip
        assert r.status_code == 201
        pid = redis_pid(tmp_path / "state")
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert wait_gone(pid), "the embedded redis-server outlived the killed service"
        # The next start finds the item (the server shut down cleanly, the append-only file flushed).
        server = start_service(artifact.path, port, env, log_path, cwd=tmp_path)
        wait_ready(server, f"http://127.0.0.1:{port}", log_path)
        assert httpx.get(f"http://127.0.0.1:{port}/items/kept", timeout=PATIENCE_S).status_code == 200
    finally:
        stop_process(server, timeout=PATIENCE_S)


def test_an_orphaned_embedded_redis_is_adopted_and_stopped(artifact: Artifact, tmp_path: Path) -> None:
    """A server left running by a dead owner (one started without the parent-death signal, e.g. on another
    system) is reused by the next start, which then owns it: a clean stop stops it too. A server whose owner is
    alive (a running service, while ``service check`` borrows it) is left running."""
    from service.embedded_redis import EmbeddedRedis, find_redis_server

    state = tmp_path / "state"
    state.mkdir()
    orphan = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--unixsocket", str(state / "redis.sock"), "--dir", str(state),
         "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait = time.monotonic() + PATIENCE_S
        while not (state / "redis.sock").exists():
            assert time.monotonic() < wait
            time.sleep(0.02)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (state / "redis.owner").write_text(dead.stdout.strip())  # an owner that has exited

        borrower = EmbeddedRedis(state)  # first: the orphan is adopted
        borrower.start()
        assert borrower.adopted and redis_pid(state) == orphan.pid
        other = EmbeddedRedis(state).start()  # its owner (this process) is alive: shared, not adopted
        assert not other.adopted
        other.stop()
        assert orphan.poll() is None, "a borrower stopped a server it does not own"
        borrower.stop()
        orphan.wait(timeout=PATIENCE_S)
        assert not (state / "redis.owner").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


# ------------------------------------------------------------------------------------------------------
# export-interactions: each pair once, only pairs with the item's current content
# ------------------------------------------------------------------------------------------------------


def test_export_interactions_drops_repeats_and_stale_pairs(
    make_client, artifact: Artifact, redis_url: str, ns: str, tmp_path: Path
) -> None:
    training = artifact.item_ids
    with make_client() as c:
        post = lambda item_id, row: c.post(  # noqa: E731
            "/items", json={"item_id": item_id, "features": artifact.features(row)}, headers=AUTH
        )
        act = lambda user, item: c.post("/interactions", json={"user_id": user, "item_id": item}, headers=AUTH)  # noqa: E731
        assert post("same", 1).status_code == 201 and post("changed", 2).status_code == 201
        assert post("reposted", 3).status_code == 201 and post("deleted", 4).status_code == 201
        for user in ("u1", "u2"):
            for item in ("same", "changed", "reposted", "deleted", training[0], training[1], training[2]):
                assert act(user, item).status_code == 201
        assert act("u1", "same").status_code == 201  # a repeat
        assert post("same", 1).status_code == 201  # the same features again: the same content
        assert post("changed", 5).status_code == 201  # other features: earlier interactions are stale
        assert c.delete("/items/reposted", headers=AUTH).status_code == 200
        assert post("reposted", 3).status_code == 201  # deleted, then posted again: a new item
        assert c.delete("/items/deleted", headers=AUTH).status_code == 200
        assert c.delete(f"/items/{training[1]}", headers=AUTH).status_code == 200
        assert post(training[2], 6).status_code == 201  # a training item replaced online
        assert act("u3", "changed").status_code == 201 and act("u3", training[2]).status_code == 201
    out = tmp_path / "online.tsv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMF_")}
    env.update(MMF_REDIS_URL=redis_url, MMF_NAMESPACE=ns)
    done = subprocess.run(
        [sys.executable, "-m", "service", "export-interactions", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "userID\titemID\ttimestamp"
    pairs = [tuple(line.split("\t")[:2]) for line in lines[1:]]
    expected = [(u, i) for u in ("u1", "u2") for i in ("same", training[0])] + [("u3", "changed"), ("u3", training[2])]
    assert pairs == expected
    # 2 users x (changed, reposted, deleted, training[1], training[2]) stale; one repeat
    assert "wrote 6 online interactions" in done.stdout and "1 repeated pairs, 10 with an item" in done.stdout


@pytest.mark.parametrize("level", ["info", "debug"])
def test_faiss_loader_lines_are_left_out_of_the_service_log_unless_debugging(level: str) -> None:
    """faiss-cpu's loader logs, at INFO, each per-CPU module it lacks before loading its dispatching build; the
    service's logging keeps those lines for debug only (a fresh interpreter: faiss logs once, at import)."""
    code = f"from service.logs import configure_logging; configure_logging({level!r}); import faiss"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert ("faiss.loader" in done.stderr) == (level == "debug")
