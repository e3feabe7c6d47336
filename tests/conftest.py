"""Shared test fixtures: a real dreamstream server in a subprocess, and a small protocol client.

Server fixtures
---------------
``server_factory`` (function scope) and ``module_server_factory`` (module scope) are
:class:`ServerFactory` objects. Call one to start ``python -m dreamstream serve`` on a free port::

    def test_x(server_factory):
        srv = server_factory(max_inflight=4, pipeline_overrides={"generate_ms": 5})
        httpx.get(srv.url("/readyz"))          # http://127.0.0.1:<port>/readyz
        websockets.connect(srv.ws_url)         # ws://127.0.0.1:<port>/v1/stream

Keyword arguments are :class:`server.config.ServerConfig` field names (``max_sessions``,
``idle_timeout_s``, ``naive``, ``token``, ``pipeline_overrides``, ...); they reach the server as
``DREAMSTREAM_<FIELD>`` environment variables, so every option works without knowing its CLI flag.
Positional strings are extra CLI arguments. Defaults: ``pipeline="synthetic"``,
``torch_threads=1`` (no OpenMP stalls on shared CPUs), ``codec="raw"``, ``debug_timeline=True``.
The call returns once ``/readyz`` answers 200 (or raises ``server.process.ServerStartError`` with
the log). Processes are run by :class:`server.process.ServerProcess`.
Every server still running is stopped (SIGTERM, then SIGKILL) when its fixture scope ends.

Client helpers
--------------
:class:`StreamClient` wraps a ``websockets`` connection with ``start`` / ``step`` / ``expect_error``
and every receive has a timeout, so no test hangs. :func:`decode_frame` turns a frame payload
(raw, JPEG or PNG) into a uint8 ``[H, W, 3]`` array.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from clients.codec import decode_frame as client_decode_frame
from protocol import FrameHeader
from server.process import ServerProcess, ServerStartError
from server.worker import StepResult

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECV_TIMEOUT_S = 15.0

DEFAULT_SERVER_OPTIONS: dict[str, Any] = {
    "pipeline": "synthetic",
    "torch_threads": 1,
    "codec": "raw",
    "debug_timeline": True,
}


@dataclass
class RunningServer:
    """A server process started by :class:`ServerFactory` (wraps :class:`ServerProcess`)."""

    server: ServerProcess
    options: dict[str, Any]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self.server.proc is None:
            raise ServerStartError("the server process was never started")
        return self.server.proc

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(self.url(path), timeout=timeout)

    def get_json(self, path: str) -> Any:
        response = self.get(path)
        response.raise_for_status()
        return response.json()

    def metric(self, name: str) -> float:
        """Value of an unlabelled metric from ``/metrics`` (e.g. ``dreamstream_live_caches``)."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"metric {name!r} not found")

    def timeline(self) -> dict[str, Any]:
        """``/debug/timeline`` (needs ``debug_timeline=True``, the default here)."""
        return dict(self.get_json("/debug/timeline"))

    def log(self) -> str:
        path = self.server.log_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout_s``)."""
        return self.server.stop(timeout_s)

    def wait_until(self, predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
        """Poll ``predicate()`` until true or ``timeout_s``; returns whether it became true."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval_s)


@dataclass
class ServerFactory:
    """Starts dreamstream servers as subprocesses; :meth:`close` stops them all."""

    tmp_dir: Path
    servers: list[RunningServer] = field(default_factory=list)

    def __call__(
        self, *cli_args: str, ready_timeout_s: float = 60.0, env: dict[str, str] | None = None,
        **options: Any,
    ) -> RunningServer:  # fmt: skip
        merged = {**DEFAULT_SERVER_OPTIONS, **options}
        process_env = {"PYTHONUNBUFFERED": "1", **(env or {})}
        for key, value in merged.items():
            if value is None:
                continue
            text = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
            process_env[f"DREAMSTREAM_{key.upper()}"] = text
        for attempt in range(3):  # a port taken between choosing and binding: try another
            proc = ServerProcess(
                list(cli_args),
                env=process_env,
                ready_timeout_s=ready_timeout_s,
                log_path=self.tmp_dir / f"server-{len(self.servers)}-{attempt}.log",
            )
            srv = RunningServer(proc, merged)
            self.servers.append(srv)
            try:
                proc.start()
                return srv
            except ServerStartError:
                proc.stop(5)
                if attempt == 2 or "address already in use" not in srv.log().lower():
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for srv in self.servers:
            srv.terminate(10)
        self.servers.clear()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers for one test (see module docstring)."""
    factory = ServerFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_server_factory() -> Iterator[ServerFactory]:
    """Like ``server_factory`` but servers live for the whole test module (faster suites)."""
    with tempfile.TemporaryDirectory(prefix="dreamstream-test-") as tmp:
        factory = ServerFactory(Path(tmp))
        yield factory
        factory.close()


# ---- protocol client helpers -------------------------------------------------------------------
def decode_frame(header: FrameHeader, payload: bytes) -> np.ndarray:
    """A frame's payload → uint8 ``[H, W, 3]`` (the Python client's decoder)."""
    return client_decode_frame(header.codec, payload, header.width, header.height)


@dataclass
class StepFrames:
    """Everything received for one step."""

    step: int
    headers: list[FrameHeader]
    payloads: list[bytes]
    done: dict[str, Any]

    def frames(self) -> np.ndarray:
        """Decoded ``[T, H, W, 3]``."""
        return np.stack([decode_frame(h, p) for h, p in zip(self.headers, self.payloads, strict=True)])


class StreamClient:
    """A test client of protocol v1; every receive times out (``DEFAULT_RECV_TIMEOUT_S``)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ready: dict[str, Any] | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> StreamClient:
        kwargs.setdefault("max_size", 1 << 24)
        kwargs.setdefault("open_timeout", 10)
        kwargs.setdefault("compression", None)
        return cls(await websockets.connect(url, **kwargs))

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def recv(self, timeout: float = DEFAULT_RECV_TIMEOUT_S) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), timeout)  # type: ignore[no-any-return]

    async def recv_json(self, timeout: float = DEFAULT_RECV_TIMEOUT_S) -> dict[str, Any]:
        message = await self.recv(timeout)
        if isinstance(message, bytes):
            raise AssertionError(f"expected a JSON message, got {len(message)} binary bytes")
        return dict(json.loads(message))

    async def start(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "start", **fields})
        ready = await self.recv_json()
        if ready.get("type") != "ready":
            raise AssertionError(f"expected ready, got {ready}")
        self.ready = ready
        return ready

    async def resume(self, session_id: str, resume_token: str) -> dict[str, Any]:
        await self.send({"type": "resume", "session_id": session_id, "resume_token": resume_token})
        return await self.recv_json()

    async def send_step(self, step: int, action: Any = None, **extra: Any) -> None:
        await self.send({"type": "step", "step": step, "action": action, **extra})

    async def collect_step(self, timeout: float = DEFAULT_RECV_TIMEOUT_S) -> StepFrames:
        """Receive one step's binary frames and its ``step_done``; JSON errors raise."""
        headers: list[FrameHeader] = []
        payloads: list[bytes] = []
        while True:
            message = await self.recv(timeout)
            if isinstance(message, bytes):
                headers.append(FrameHeader.unpack(message))
                payloads.append(message[FrameHeader.SIZE :])
                continue
            data = json.loads(message)
            if data["type"] != "step_done":
                raise AssertionError(f"expected frames/step_done, got {data}")
            return StepFrames(data["step"], headers, payloads, data)

    async def step(self, step: int, action: Any = None, **extra: Any) -> StepFrames:
        await self.send_step(step, action, **extra)
        return await self.collect_step()

    async def expect_error(self, code: str, timeout: float = DEFAULT_RECV_TIMEOUT_S) -> dict[str, Any]:
        message = await self.recv_json(timeout)
        if message.get("type") != "error" or message.get("code") != code:
            raise AssertionError(f"expected error {code!r}, got {message}")
        return message

    async def expect_close(self, timeout: float = DEFAULT_RECV_TIMEOUT_S) -> int | None:
        """Wait for the server to close; returns the close code. Other messages are skipped."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        raise AssertionError("the server did not close the connection in time")


class Sink:
    """Thread-safe collector of everything delivered to it."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.cond = threading.Condition()

    def __call__(self, item: Any) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait(self, n: int, timeout_s: float = 20.0) -> list[Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.items) >= n, timeout_s):
                raise TimeoutError(f"{len(self.items)} of {n} items after {timeout_s} s")
            return list(self.items)

    def results(self) -> dict[tuple[str, int], StepResult]:
        with self.cond:
            return {(r.session_id, r.step): r for r in self.items}
