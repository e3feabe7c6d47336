"""A bounded soak: many sessions stepping for minutes against a server this command starts.

``python -m benchmarks.soak --sessions 64 --minutes 10`` (the defaults; ``--seconds 60`` for a
short run) starts ``dreamstream serve`` with the synthetic pipeline (:class:`ServerProcess`), runs
``--sessions`` concurrent sessions (:class:`AsyncStreamClient`, ``max_inflight`` steps pipelined,
every frame compared with the synthetic ground truth) that at random drop or close their
connection and ``resume`` (sometimes with steps still in flight), or ``end`` and start anew, and
samples the server's resident memory (``VmRSS`` of ``/proc/<pid>/status``).

Reported (printed, and written as JSON to ``--out``/soak.json):

* steps sent, answered with frames, answered with an error (by code), abandoned (in flight when
  this client itself dropped the connection: not the server's to answer) and **lost** (sent, not
  abandoned, never answered: must be 0), frames that differ from the ground truth (must be 0);
* the RSS slope of the server in MB/min (least squares after a warm-up), start / end / peak RSS;
* the server's health at the end, its live caches once every session ended (must be 0) and its
  exit status after SIGTERM (must be 0).

Exit status 0 when every "must" holds, else 1. All clients share one asyncio loop in this process,
so on a small machine the clients compete with the server for the CPU; the soak checks
correctness and leaks, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe_machine
from clients import AsyncStreamClient, ClientError, StreamError
from clients.stream import StepResult
from pipeline.synthetic import expected_frames
from server.process import ServerProcess

MB = 1024 * 1024


@dataclass
class SoakConfig:
    """What the soak runs; probabilities are per step a session takes."""

    sessions: int = 64
    duration_s: float = 600.0
    out: Path = Path("runs/soak")
    overrides: dict[str, str] = field(default_factory=lambda: {"generate_ms": "10", "finalize_ms": "5"})
    """Synthetic pipeline costs (``--set``): a model of roughly that speed."""
    seed: int = 0
    p_reconnect: float = 1 / 250
    """Drop (TCP abort) or close the connection, then ``resume``."""
    p_end: float = 1 / 500
    """``end`` the session and start a new one."""
    rss_period_s: float = 2.0
    step_wait_s: float = 60.0
    """A step unanswered this long is lost (the server's step timeout is 30 s)."""


@dataclass
class Tally:
    """Counts of every session together."""

    sent: int = 0
    answered_frames: int = 0
    answered_error: int = 0
    abandoned: int = 0
    lost: int = 0
    wrong_frames: int = 0
    starts: int = 0
    ends: int = 0
    reconnects: int = 0
    errors_by_code: collections.Counter[str] = field(default_factory=collections.Counter)


class SoakSession:
    """One simulated player: sessions one after the other until the deadline."""

    def __init__(self, url: str, cfg: SoakConfig, tally: Tally, rng: random.Random) -> None:
        self.url, self.cfg, self.tally, self.rng = url, cfg, tally, rng
        self.seed = 0

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            client = AsyncStreamClient(self.url, request_timeout_s=30.0, step_timeout_s=None)
            pending: collections.deque[asyncio.Future[StepResult]] = collections.deque()
            try:
                await self._session(client, pending, deadline)
            except ClientError as exc:  # the session failed (the steps' answers are tallied)
                self.tally.errors_by_code[f"session:{exc.code}"] += 1
                await asyncio.sleep(0.1)
            finally:
                while pending:
                    await self._settle(pending.popleft())
                await client.close()

    async def _session(
        self,
        client: AsyncStreamClient,
        pending: collections.deque[asyncio.Future[StepResult]],
        deadline: float,
    ) -> None:
        self.seed = self.rng.randrange(2**31)
        await client.start(seed=self.seed, codec="raw")
        self.tally.starts += 1
        while time.monotonic() < deadline:
            dice = self.rng.random()
            if dice < self.cfg.p_reconnect:
                await self._reconnect(client, pending)
                continue
            if dice < self.cfg.p_reconnect + self.cfg.p_end:
                break
            action = {"x": self.rng.randint(-9, 9), "y": self.rng.randint(-9, 9)}
            pending.append(await client.submit(action, track=False))
            self.tally.sent += 1
            while pending and (pending[0].done() or len(pending) >= client.max_inflight):
                await self._settle(pending.popleft())
        while pending:
            await self._settle(pending.popleft())
        await client.end()
        self.tally.ends += 1

    async def _reconnect(
        self, client: AsyncStreamClient, pending: collections.deque[asyncio.Future[StepResult]]
    ) -> None:
        """Drop or close the connection (half the time with steps in flight), then resume."""
        if self.rng.random() < 0.5:
            while pending:
                await self._settle(pending.popleft())
        self.tally.abandoned += len(pending)
        pending.clear()  # they fail with ConnectionClosedError: ours to lose, not the server's
        await (client.drop() if self.rng.random() < 0.5 else client.close())
        await client.resume(attempts=5)
        self.tally.reconnects += 1

    async def _settle(self, fut: asyncio.Future[StepResult]) -> None:
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), self.cfg.step_wait_s)
        except StreamError as exc:
            self.tally.answered_error += 1
            self.tally.errors_by_code[exc.code] += 1
            return
        except (ClientError, asyncio.TimeoutError) as exc:  # no answer: the server lost it
            self.tally.lost += 1
            self.tally.errors_by_code[getattr(exc, "code", "timeout")] += 1
            return
        self.tally.answered_frames += 1
        if not self._frames_right(result):
            self.tally.wrong_frames += 1

    def _frames_right(self, result: StepResult) -> bool:
        want = expected_frames(self.seed, result.step, result.action)
        return bool(np.array_equal(result.array(), want))


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (``VmRSS``), or ``None`` if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


async def sample_rss(pid: int, period_s: float, samples: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while True:
        mb = rss_mb(pid)
        if mb is not None:
            samples.append((time.monotonic() - t0, mb))
        await asyncio.sleep(period_s)


def rss_slope(samples: list[tuple[float, float]], skip_s: float) -> float:
    """Least-squares slope of RSS in MB per minute, over the samples after ``skip_s``."""
    kept = [(t, mb) for t, mb in samples if t >= skip_s] or samples
    if len(kept) < 2:
        return float("nan")
    t = np.array([s[0] for s in kept]) / 60.0
    return float(np.polyfit(t, np.array([s[1] for s in kept]), 1)[0])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def live_caches(srv: ServerProcess, timeout_s: float = 15.0) -> float:
    """``dreamstream_live_caches`` once it is 0 (or its value after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = get(f"{srv.base_url}/metrics")[1]
        lines = text.splitlines()
        value = next(float(x.split()[-1]) for x in lines if x.startswith("dreamstream_live_caches "))
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def server_args(cfg: SoakConfig) -> list[str]:
    sets = [a for k, v in cfg.overrides.items() for a in ("--set", f"{k}={v}")]
    return ["--pipeline", "synthetic", "--max-sessions", str(2 * cfg.sessions), "--codec", "raw", *sets]


SERVER_ENV = {
    "DREAMSTREAM_MAX_SESSIONS_PER_CLIENT": "0",
    "DREAMSTREAM_MAX_CONNECTIONS_PER_CLIENT": "0",
    "DREAMSTREAM_TORCH_THREADS": "1",
    "DREAMSTREAM_BATCH_TORCH_THREADS": "1",
}
"""Every soak session comes from this one address: no per-client caps. One torch thread: the
clients share the machine, and a second OpenMP thread that has to wait for a busy core made
batches 10x slower on 2 shared cores."""


async def drive(
    srv: ServerProcess, cfg: SoakConfig, tally: Tally, samples: list[tuple[float, float]]
) -> float:
    """Run every session until the deadline; returns the seconds it took."""
    assert srv.proc is not None
    sampler = asyncio.create_task(sample_rss(srv.proc.pid, cfg.rss_period_s, samples))
    rng = random.Random(cfg.seed)
    players = [SoakSession(srv.ws_url, cfg, tally, random.Random(rng.random())) for _ in range(cfg.sessions)]
    t0 = time.monotonic()
    await asyncio.gather(*(p.run(t0 + cfg.duration_s) for p in players))
    elapsed = time.monotonic() - t0
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    return elapsed


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Start the server, soak it, stop it; returns the report."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    tally, samples = Tally(), []  # type: ignore[var-annotated]
    srv = ServerProcess(server_args(cfg), env=SERVER_ENV, log_path=cfg.out / "server.log")
    with srv:
        elapsed = asyncio.run(drive(srv, cfg, tally, samples))
        health = get(f"{srv.base_url}/healthz")[0]
        caches = live_caches(srv)
        exit_status = srv.stop(30)
    rss = [mb for _, mb in samples]
    report: dict[str, Any] = {
        "machine": describe_machine("cpu").line(),
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "elapsed_s": round(elapsed, 1),
        **{k: v for k, v in asdict(tally).items() if k != "errors_by_code"},
        "errors_by_code": dict(sorted(tally.errors_by_code.items())),
        "steps_per_s": round(tally.sent / elapsed, 1) if elapsed else 0.0,
        "rss_mb": {"start": rss[0], "end": rss[-1], "peak": max(rss)} if rss else {},
        "rss_slope_mb_per_min": round(rss_slope(samples, min(60.0, 0.2 * elapsed)), 3),
        "rss_samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
        "healthz_at_end": health,
        "live_caches_after": caches,
        "server_exit_status": exit_status,
    }
    report["ok"] = bool(
        tally.lost == 0 and tally.wrong_frames == 0 and health == 200 and caches == 0 and exit_status == 0
    )
    return report


def summary(r: dict[str, Any]) -> str:
    rss = r["rss_mb"]
    lines = [
        f"machine: {r['machine']}",
        f"soak: {r['config']['sessions']} sessions, {r['elapsed_s']} s, {r['steps_per_s']} steps/s",
        f"  steps sent {r['sent']}, answered {r['answered_frames']} with frames + {r['answered_error']} "
        f"with an error, abandoned by our drops {r['abandoned']}, LOST {r['lost']}",
        f"  wrong frames {r['wrong_frames']}; sessions started {r['starts']}, ended {r['ends']}, "
        f"reconnects+resumes {r['reconnects']}",
        f"  errors by code {r['errors_by_code'] or '{}'}",
        f"  server RSS {rss.get('start', 0):.1f} → {rss.get('end', 0):.1f} MB "
        f"(peak {rss.get('peak', 0):.1f}), slope {r['rss_slope_mb_per_min']:+.3f} MB/min after warm-up",
        f"  /healthz {r['healthz_at_end']}, live caches after {r['live_caches_after']:g}, "
        f"exit status {r['server_exit_status']}: {'OK' if r['ok'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> SoakConfig:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    parser.add_argument("--seconds", type=float, default=None, help="duration (wins over --minutes)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"), help="for soak.json, server.log")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="synthetic config")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sessions' random choices")
    args = parser.parse_args(argv)
    cfg = SoakConfig(sessions=args.sessions, out=args.out, seed=args.seed)
    cfg.duration_s = args.seconds if args.seconds is not None else args.minutes * 60.0
    cfg.overrides.update(dict(pair.split("=", 1) for pair in args.set))
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = run_soak(cfg)
    print(summary(report))
    path = cfg.out / "soak.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"  written to {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
