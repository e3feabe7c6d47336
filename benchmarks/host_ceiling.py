"""The host ceiling: how many frames/s the server's per-step host path can move when the model
costs nothing (``synthetic`` at ``generate_ms=0 finalize_ms=0``), and how evenly it shares them.

``python -m benchmarks.host_ceiling --base /tmp/wt-base`` starts one ``dreamstream serve`` per
checkout (this one, ``new``; and ``--base``, another checkout run with its own code: its
directory is the server's working directory and ``PYTHONPATH``) and saturates each in turn with
N sessions of one lean client (2 steps in flight each; the client does no more per message than
read it). Every session count runs for every checkout, round after round (ABAB…), so drift
hits both alike. Per case: aggregate frames/s, the per-session frames/s spread (max/min), step
round trip p50/p99, and the CPU the server process and the client used (a client near a whole
core means the client, not the server, was the limit).

Frames are raw RGB 64×64 (12 KiB): encoding one is a copy, so what is measured is the per-step
machinery (parse, queue, hand-off, send, step_done, metrics), not a codec's C code.
Printed, and written to ``--out`` (default benchmarks/results/host_ceiling.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.machine import describe_machine
from server.process import ServerProcess

SERVER_ARGS = [
    "--pipeline", "synthetic", "--set", "generate_ms=0", "--set", "finalize_ms=0", "--codec", "raw",
    "--torch-threads", "1", "--batch-torch-threads", "1", "--max-batch", "64", "--max-sessions", "256",
    "--max-inflight", "2", "--max-sessions-per-client", "0", "--max-connections-per-client", "0",
    "--idle-timeout-s", "120", "--rate-limit-per-s", "100000", "--rate-burst", "100000",
    "--log-level", "WARNING",
]  # fmt: skip
"""Saturating clients step far faster than a player: the rate limit must not be what is measured.
One torch thread for every batch size: the model does next to nothing, and a second OpenMP thread
would only spin against the event loop for the second core."""
INFLIGHT = 2


@dataclass
class SessionLoad:
    """One session's count inside the measuring window."""

    frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class Window:
    """The measuring window (``time.perf_counter()``); ``stop`` ends sending."""

    t_start: float
    t_end: float
    stop: asyncio.Event


async def drive(ws: ClientConnection, load: SessionLoad, window: Window) -> None:
    """Keep :data:`INFLIGHT` steps outstanding until the window ends; count what lands inside it."""
    sent: dict[int, float] = {}
    step = 0

    async def send_next() -> None:
        nonlocal step
        sent[step] = time.perf_counter()
        await ws.send(f'{{"type":"step","step":{step}}}')
        step += 1

    for _ in range(INFLIGHT):
        await send_next()
    while sent:
        message = await ws.recv()
        if isinstance(message, bytes):
            continue
        done = json.loads(message)
        if done.get("type") != "step_done":
            raise RuntimeError(f"unexpected message: {message[:200]}")
        now = time.perf_counter()
        t_sent = sent.pop(done["step"])
        if window.t_start <= now < window.t_end:
            load.frames += done["frames"]
            load.latencies_ms.append((now - t_sent) * 1000.0)
        if not window.stop.is_set():
            await send_next()
    await ws.send('{"type":"end"}')


@dataclass
class Case:
    """What one measuring window saw."""

    loads: list[SessionLoad]
    server_cpu_s: float
    client_cpu_s: float


async def measure(url: str, pid: int, sessions: int, warmup_s: float, duration_s: float) -> Case:
    """``sessions`` saturating sessions; the per-session counts of the window after ``warmup_s``
    and the CPU seconds the server (``pid``) and this client used in it."""
    conns = [await connect(url, max_size=1 << 24, compression=None) for _ in range(sessions)]
    try:
        for i, ws in enumerate(conns):
            await ws.send(json.dumps({"type": "start", "seed": i, "codec": "raw"}))
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                raise RuntimeError(f"start failed: {ready}")
        t0 = time.perf_counter() + warmup_s
        window = Window(t0, t0 + duration_s, asyncio.Event())
        loads = [SessionLoad() for _ in conns]
        tasks = [asyncio.create_task(drive(ws, load, window)) for ws, load in zip(conns, loads, strict=True)]
        await asyncio.sleep(warmup_s)
        cpu0 = cpu_seconds(pid), time.process_time()
        await asyncio.sleep(duration_s)
        cpu1 = cpu_seconds(pid), time.process_time()
        window.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        return Case(loads, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(srv: ServerProcess, sessions: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    assert srv.proc is not None
    case = asyncio.run(measure(srv.ws_url, srv.proc.pid, sessions, warmup_s, duration_s))
    frames = np.array([s.frames for s in case.loads])
    fps = frames / duration_s
    lat = np.concatenate([s.latencies_ms for s in case.loads])
    return {
        "agg_fps": round(float(fps.sum()), 1),
        "fps_spread_max_min": round(float(fps.max() / fps.min()), 3) if fps.min() > 0 else None,
        "per_session_fps_min": round(float(fps.min()), 2),
        "per_session_fps_max": round(float(fps.max()), 2),
        "lat_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "lat_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "server_cpu_cores": round(case.server_cpu_s / duration_s, 2),
        "server_cpu_us_per_frame": round(case.server_cpu_s / max(1, int(frames.sum())) * 1e6, 1),
        "client_cpu_cores": round(case.client_cpu_s / duration_s, 2),
    }


def start_server(name: str, repo: Path, log_dir: Path) -> ServerProcess:
    env = {"PYTHONPATH": str(repo), "DREAMSTREAM_LOG_LEVEL": "WARNING"}
    srv = ServerProcess(SERVER_ARGS, env=env, cwd=repo, log_path=log_dir / f"server-{name}.log")
    return srv.start()


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each number over the rounds (and the rounds themselves)."""
    keys = [k for k in cases[0] if isinstance(cases[0][k], (int, float))]
    out = {k: round(float(np.median([c[k] for c in cases if c[k] is not None])), 3) for k in keys}
    return {**out, "rounds": cases}


def paired_ratios(new: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """new/base of frames/s and of server CPU per frame, round by round (the two ran back to back,
    so their ratio is steadier than either number on a busy machine), and the medians."""
    pairs = list(zip(new, base, strict=True))
    fps = [n["agg_fps"] / b["agg_fps"] for n, b in pairs]
    cpu = [n["server_cpu_us_per_frame"] / b["server_cpu_us_per_frame"] for n, b in pairs]
    return {
        "agg_fps": round(float(np.median(fps)), 3),
        "server_cpu_us_per_frame": round(float(np.median(cpu)), 3),
        "agg_fps_per_round": [round(r, 3) for r in fps],
        "server_cpu_us_per_frame_per_round": [round(r, 3) for r in cpu],
    }


def print_table(summary: dict[str, dict[str, dict[str, Any]]], sessions: list[int]) -> None:
    """Medians: frames/s, spread and server CPU per frame of each checkout; new/base frames/s."""
    names = [n for n in summary if n != "new/base"]
    print(f"\n{'sessions':>8} " + " ".join(f"{n:>6} fps spread us/frame" for n in names), end="")
    print("  new/base fps, us/frame (paired medians)" if "new/base" in summary else "")
    for s in sessions:
        cells = [summary[n][str(s)] for n in names]
        row = " ".join(
            f"{c['agg_fps']:10.0f} {c['fps_spread_max_min']:6.2f} {c['server_cpu_us_per_frame']:8.0f}"
            for c in cells
        )
        paired = summary.get("new/base", {}).get(str(s))
        ratio = f"  {paired['agg_fps']:6.2f} {paired['server_cpu_us_per_frame']:6.2f}" if paired else ""
        print(f"{s:8d} {row}{ratio}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_ceiling", description=__doc__)
    p.add_argument("--base", type=Path, help="another checkout to compare with (e.g. a git worktree)")
    p.add_argument("--sessions", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/host_ceiling.json"))
    args = p.parse_args(argv)
    log_dir = args.out.parent.resolve() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    repos = {"new": Path.cwd()} | ({"base": args.base.resolve()} if args.base else {})
    machine = describe_machine("cpu").line()
    print(f"machine: {machine}", flush=True)
    servers = {name: start_server(name, repo, log_dir) for name, repo in repos.items()}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {s: [] for s in args.sessions} for n in repos}
    try:
        for srv in servers.values():  # warm both up before anything counts
            run_case(srv, max(args.sessions), 0.5, 1.0)
        for rnd in range(args.rounds):
            for sessions in args.sessions:
                for name, srv in servers.items():
                    case = run_case(srv, sessions, args.warmup_s, args.duration_s)
                    results[name][sessions].append(case)
                    print(f"round {rnd} {name:5s} N={sessions:<3d} {json.dumps(case)}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    summary = {name: {str(s): summarize(c) for s, c in per.items()} for name, per in results.items()}
    if "base" in results:
        new, base = results["new"], results["base"]
        summary["new/base"] = {str(s): paired_ratios(new[s], base[s]) for s in args.sessions}
    report = {
        "machine": machine,
        "server_args": SERVER_ARGS,
        "inflight": INFLIGHT,
        "duration_s": args.duration_s,
        "rounds": args.rounds,
        "repos": {k: str(v) for k, v in repos.items()},
        "results": summary,
    }
    print_table(summary, args.sessions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
