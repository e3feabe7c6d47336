"""Run a dreamstream server as a child process on a free loopback port.

Used by the end-to-end tests and the benchmark suite: a real ``uvicorn`` server, started with
the same command line a user types (``python -m dreamstream serve ...``), reachable at
:attr:`ServerProcess.base_url`, stopped with SIGTERM (the graceful path) and killed if it hangs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


class ServerStartError(RuntimeError):
    """The server process exited or did not become ready in time; carries its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(["--pipeline", "synthetic"]) as srv: ... srv.base_url ...``."""

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = list(args or [])
        self.host = host
        self.port = port or free_port(host)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self.cwd = cwd
        """Working directory of the server (``python -m dreamstream`` imports from it first: another
        checkout's directory runs that checkout's code)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port/v1/stream``."""
        return f"ws://{self.host}:{self.port}/v1/stream"

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "dreamstream", "serve", "--host", self.host, "--port", str(self.port)]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log_file = out
        self.proc = subprocess.Popen(
            [*cmd, *self.args], env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Poll ``/readyz`` until it answers 200; raise :class:`ServerStartError` otherwise."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerStartError(f"server exited with code {self.proc.returncode}{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"server not ready after {self.ready_timeout_s:.0f} s{self._tail()}")

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return "; output:\n" + self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        closer = getattr(self._log_file, "close", None)
        if callable(closer):
            closer()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
