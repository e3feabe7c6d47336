"""Who may use a server: Origin checks of /v1/stream, the token on each endpoint, no token in logs.

Every test drives a real server subprocess (``server_factory``); docs/security.md is the contract.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import RunningServer, ServerFactory, StreamClient

FAST = {"generate_ms": 2, "finalize_ms": 2}
TOKEN = "s3cret-Token-7f2a9c"
WRONG = "wrong-Guess-41d8e0"


@pytest.fixture(scope="module")
def open_srv(module_server_factory: ServerFactory) -> RunningServer:
    """No token, default origins (same-origin and no Origin)."""
    return module_server_factory(pipeline_overrides=FAST)


async def refused(url: str, **kwargs: object) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        await StreamClient.connect(url, **kwargs)
    return info.value


async def raw_handshake(port: int, host_header: str, origin: str) -> str:
    """Send a WebSocket handshake with exactly these Host and Origin headers; the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: {host_header}\r\nOrigin: {origin}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
    )
    try:
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()


async def test_same_origin_and_originless_clients_are_accepted(open_srv: RunningServer) -> None:
    # A page of this server (what a browser sends for the demo at http://127.0.0.1:<port>/) ...
    async with await StreamClient.connect(open_srv.ws_url, origin=open_srv.base_url) as c:
        await c.start(seed=1)
        assert len((await c.step(0)).payloads) == 1
    # ... and a client that sends no Origin at all (Python, curl, game engines).
    async with await StreamClient.connect(open_srv.ws_url) as c:
        await c.start(seed=2)


async def test_foreign_origins_are_refused_with_403(open_srv: RunningServer) -> None:
    for origin in ("http://evil.example", f"http://127.0.0.1:{open_srv.port + 1}", "null"):
        err = await refused(open_srv.ws_url, origin=origin)
        assert err.response.status_code == 403, origin
        body = bytes(err.response.body or b"").decode()
        assert "--allowed-origins" in body and origin in body
    # DNS rebinding: a hostile name pointed at 127.0.0.1 is "same origin" with itself, but a
    # server on a loopback address only takes same-origin pages of a loopback Host.
    name = f"rebind.example:{open_srv.port}"
    assert " 403 " in await raw_handshake(open_srv.port, name, f"http://{name}")
    local = f"127.0.0.1:{open_srv.port}"
    assert " 101 " in await raw_handshake(open_srv.port, local, f"http://{local}")
    assert open_srv.get("/readyz").status_code == 200


async def test_allowed_origins_option(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, allowed_origins="https://game.example, http://a.test:81")
    for origin in ("https://game.example", "HTTPS://game.example:443", "http://a.test:81"):
        async with await StreamClient.connect(srv.ws_url, origin=origin) as c:
            await c.start(seed=3)
    for origin in ("http://game.example", "https://other.example", "http://a.test"):
        assert (await refused(srv.ws_url, origin=origin)).response.status_code == 403, origin
    async with await StreamClient.connect(srv.ws_url, origin=srv.base_url) as c:  # same origin
        await c.start(seed=4)
    any_srv = server_factory(pipeline_overrides=FAST, allowed_origins="*")
    async with await StreamClient.connect(any_srv.ws_url, origin="http://evil.example") as c:
        await c.start(seed=5)
    assert "without a token: any web page" in any_srv.log()


def test_bad_allowed_origin_is_a_usage_error(server_factory: ServerFactory) -> None:
    from server.process import ServerStartError

    with pytest.raises(ServerStartError) as info:
        server_factory(allowed_origins="game.example/path", ready_timeout_s=30)
    assert "exited with code 2" in str(info.value)
    assert "--allowed-origins" in str(info.value) and "is not an origin" in str(info.value)


@pytest.mark.parametrize("json_logs", [False, True])
async def test_tokens_never_reach_the_log(server_factory: ServerFactory, json_logs: bool) -> None:
    srv = server_factory(pipeline_overrides=FAST, token=TOKEN, json_logs=json_logs, log_level="DEBUG")
    assert (await refused(f"{srv.ws_url}?token={WRONG}")).response.status_code == 403
    wrong_header = {"Authorization": f"Bearer {WRONG}"}
    assert (await refused(srv.ws_url, additional_headers=wrong_header)).response.status_code == 403
    async with await StreamClient.connect(f"{srv.ws_url}?token={TOKEN}") as c:
        ready = await c.start(seed=6)
        await c.step(0)
    async with await StreamClient.connect(
        srv.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        # a resume with a wrong token for a known id: its message is answered and logged
        await c.send({"type": "resume", "session_id": ready["session_id"], "resume_token": WRONG})
        await c.expect_error("unknown_session")
        await c.send(
            {"type": "watch", "session_id": ready["session_id"], "watch_token": ready["watch_token"]}
        )
        assert (await c.recv_json())["type"] == "watching"  # logged at DEBUG with its payload
    watch_link = f"/?watch={ready['session_id']}&wt={ready['watch_token']}&token={TOKEN}"
    for path in (
        f"/v1/info?token={WRONG}",
        f"/v1/info?token={TOKEN}",
        f"/debug/timeline?token={TOKEN}",
        watch_link,
    ):
        srv.get(path)
    assert srv.terminate() == 0
    log = srv.log()
    assert "token=***" in log  # uvicorn's handshake line was there, redacted
    for secret in (TOKEN, WRONG, ready["resume_token"], ready["watch_token"]):
        assert secret not in log, f"{secret!r} is in the log"


async def test_endpoint_protection_with_a_token(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    wrong = {"Authorization": f"Bearer {WRONG}"}

    def get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(srv.url(path), headers=headers, timeout=10)

    async with await StreamClient.connect(srv.ws_url, additional_headers=bearer) as c:
        session_id = (await c.start(seed=7))["session_id"]
        await c.step(0)
        for path in ("/healthz", "/readyz", "/metrics", "/"):  # probes and the demo page: open
            response = get(path)
            assert response.status_code == 200 and session_id not in response.text, path
        for path in ("/v1/info", "/debug/timeline"):  # server details and session ids: token only
            for denied in (get(path), get(path, wrong), get(f"{path}?token={WRONG}")):
                assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer", path
                assert "Authorization: Bearer" in denied.json()["detail"]
            assert get(path, bearer).status_code == 200 and get(f"{path}?token={TOKEN}").status_code == 200
        assert session_id in get("/debug/timeline", bearer).text
        for path in ("/docs", "/redoc", "/openapi.json"):  # no OpenAPI pages at all
            assert get(path).status_code == 404 and get(path, bearer).status_code == 404, path
    info = get("/v1/info", bearer).json()
    assert info["auth"] is True and info["limits"]["max_sessions_per_client"] == 32


def test_endpoints_without_a_token_and_the_exposure_warning(
    open_srv: RunningServer, server_factory: ServerFactory
) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/info", "/debug/timeline"):
        assert open_srv.get(path).status_code == 200, path
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert open_srv.get(path).status_code == 404, path
    assert "WITHOUT A TOKEN" not in open_srv.log()  # loopback: no warning
    exposed = server_factory("--host", "0.0.0.0", pipeline_overrides=FAST)
    assert "listening on 0.0.0.0 (not a loopback address) WITHOUT A TOKEN" in exposed.log()
    assert "WARNING" in next(line for line in exposed.log().splitlines() if "WITHOUT A TOKEN" in line)


@pytest.mark.browser
def test_a_real_browser_page_of_another_origin_is_refused(server_factory: ServerFactory) -> None:
    chromium = os.environ.get("DREAMSTREAM_CHROMIUM", "/usr/bin/chromium")
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        pytest.skip(f"Debian chromium not found at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright not installed")
    here = server_factory(pipeline_overrides=FAST)
    other = server_factory(pipeline_overrides=FAST)  # e.g. another local service's port
    probe = """(url) => new Promise((resolve) => {
        const ws = new WebSocket(url);
        ws.onopen = () => { ws.close(); resolve("open"); };
        ws.onerror = () => resolve("refused");
    })"""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless=new", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(here.url("/healthz"))  # a page of origin http://127.0.0.1:<here.port>
            assert page.evaluate(probe, here.ws_url) == "open"
            assert page.evaluate(probe, other.ws_url) == "refused"
        finally:
            browser.close()
    assert f"origin 'http://127.0.0.1:{here.port}' may not open /v1/stream" in other.log()
