"""What watchers cost: (1) the step latency of one lock-step player with no watchers, with
readers that keep up, and with stalled ones that read nothing; (2) the server's CPU time per step
of 8 paced players alone and with ``--watchers`` watchers each — side by side on one server.

``python -m benchmarks.watchers``. Part 1 starts ``dreamstream serve`` (synthetic, raw 256×256
frames so that a stalled watcher's socket fills within a few steps, ``generate_ms`` like a small
model) and runs the same player for ``--steps`` lock-step steps under each condition, in turn,
twice (ABCABC: drift shows up as a difference between the rounds). Part 2 starts a default
synthetic server (64×64 JPEG) and runs ``dreamstream loadtest``'s engine: 8 sessions paced at
15 fps, alone and with watchers, twice (ABAB), reading the server's CPU time from ``/proc``.
Printed and written to ``--out``/watchers.json with the machine line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from benchmarks.machine import describe_machine
from clients.loadtest import LoadTestConfig, run_loadtest
from server.process import ServerProcess

SERVER_ARGS = [
    "--pipeline", "synthetic", "--set", "width=256", "--set", "height=256", "--set", "generate_ms=10",
    "--set", "finalize_ms=5", "--codec", "raw", "--torch-threads", "1", "--max-watchers", "16",
]  # fmt: skip


async def lockstep(ws: Any, steps: int, first: int) -> list[float]:
    """Round trips (ms) of ``steps`` steps sent one at a time."""
    rtts = []
    for k in range(first, first + steps):
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "step", "step": k, "action": None}))
        while True:
            message = await ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == "step_done":
                break
        rtts.append((time.perf_counter() - t0) * 1000.0)
    return rtts


async def drain(ws: Any) -> None:
    """Read (and drop) everything a keeping-up watcher gets."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass


async def watch(url: str, ready: dict[str, Any], max_queue: int | None = None) -> Any:
    ws = await websockets.connect(url, max_size=1 << 24, compression=None, max_queue=max_queue)
    await ws.send(
        json.dumps({"type": "watch", "session_id": ready["session_id"], "watch_token": ready["watch_token"]})
    )
    return ws


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (``VmRSS``), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def run(url: str, steps: int, watchers: int, pid: int) -> dict[str, Any]:
    """Round trips per condition, and the server's RSS growth while stalled watchers were on."""
    results: dict[str, list[float]] = {"none": [], "reading": [], "stalled": []}
    growth: list[float] = []
    async with websockets.connect(url, max_size=1 << 24, compression=None) as player:
        await player.send(json.dumps({"type": "start", "seed": 1}))
        ready = json.loads(await player.recv())
        next_step = 0
        await lockstep(player, 20, next_step)  # warm-up
        next_step += 20
        for _ in range(2):
            for condition in results:
                conns = []
                if condition != "none":
                    stalled = condition == "stalled"
                    conns = [await watch(url, ready, 1 if stalled else None) for _ in range(watchers)]
                    readers = [] if stalled else [asyncio.create_task(drain(c)) for c in conns]
                    await asyncio.sleep(0.2)
                rss0 = rss_mb(pid)
                results[condition] += await lockstep(player, steps, next_step)
                next_step += steps
                if condition == "stalled":
                    growth.append(rss_mb(pid) - rss0)
                for c in conns:
                    c.transport.abort()
                if condition == "reading":
                    await asyncio.gather(*readers, return_exceptions=True)
    return {"rtts": {k: np.asarray(v) for k, v in results.items()}, "stalled_rss_growth_mb": growth}


FLEET_ARGS = [
    "--pipeline", "synthetic", "--set", "generate_ms=10", "--set", "finalize_ms=5", "--codec", "jpeg",
    "--torch-threads", "1", "--max-watchers", "16",
]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fleet_case(url: str, pid: int, watchers: int, steps: int) -> dict[str, float]:
    """8 paced players (with ``watchers`` watchers each): server CPU ms per player step and more."""
    config = LoadTestConfig(
        url=url, sessions=8, steps=steps, shape="paced", target_fps=15.0, watchers_per_session=watchers
    )
    c0 = cpu_seconds(pid)
    report = run_loadtest(config)
    cpu_ms = (cpu_seconds(pid) - c0) * 1000.0
    w = report.watchers
    return {
        "steps": report.steps,
        "cpu_ms_per_step": cpu_ms / max(1, report.steps),
        "frames_per_s": report.rates.aggregate_frames_per_s,
        "p99_ms": report.step_latency.p99_ms or 0.0,
        "received_fraction": (w.received_fraction or 0.0) if w is not None else 1.0,
    }


def fleet(steps: int, watchers: int, out: Path) -> dict[str, Any]:
    """Part 2: 8 players alone vs with ``watchers`` watchers each (ABAB); means per case."""
    runs: dict[str, list[dict[str, float]]] = {"alone": [], "watched": []}
    with ServerProcess(FLEET_ARGS, log_path=out / "server-fleet.log") as srv:
        assert srv.proc is not None
        url = f"ws://127.0.0.1:{srv.port}/v1/stream"
        fleet_case(url, srv.proc.pid, 0, 20)  # warm-up
        for _ in range(2):
            runs["alone"].append(fleet_case(url, srv.proc.pid, 0, steps))
            runs["watched"].append(fleet_case(url, srv.proc.pid, watchers, steps))
    means = {k: {m: round(float(np.mean([r[m] for r in v])), 4) for m in v[0]} for k, v in runs.items()}
    ratio = means["watched"]["cpu_ms_per_step"] / means["alone"]["cpu_ms_per_step"]
    return {**means, "cpu_ratio": round(ratio, 3), "watchers_per_session": watchers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watchers", description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="steps per condition and round")
    parser.add_argument("--watchers", type=int, default=8, help="watchers per session in each watched case")
    parser.add_argument("--fleet-steps", type=int, default=150, help="steps per player in part 2")
    parser.add_argument("--out", type=Path, default=Path("runs/watchers"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with ServerProcess(SERVER_ARGS, log_path=args.out / "server.log") as srv:
        assert srv.proc is not None
        part1 = asyncio.run(
            run(f"ws://127.0.0.1:{srv.port}/v1/stream", args.steps, args.watchers, srv.proc.pid)
        )
        rtts = part1["rtts"]
        dropped = urllib_metric(srv.base_url, "dreamstream_watch_dropped_steps_total")
    base = {q: float(np.percentile(rtts["none"], q)) for q in (50, 99)}
    report: dict[str, Any] = {
        "machine": describe_machine("cpu").line(),
        "steps": args.steps,
        "watchers": args.watchers,
        "server": SERVER_ARGS,
        "dropped_steps": dropped,
    }
    print(f"machine: {report['machine']}")
    for condition, values in rtts.items():
        p50, p99 = (float(np.percentile(values, q)) for q in (50, 99))
        r50, r99 = p50 / base[50], p99 / base[99]
        report[condition] = {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "p50_ratio": round(r50, 3)}
        report[condition]["p99_ratio"] = round(r99, 3)
        print(f"{condition:8s} p50 {p50:6.2f} ms ({r50:.2f}x)  p99 {p99:6.2f} ms ({r99:.2f}x)")
    report["stalled_rss_growth_mb"] = [round(g, 1) for g in part1["stalled_rss_growth_mb"]]
    print(
        f"steps dropped for the stalled watchers: {dropped:g}; server RSS growth while they were on: "
        f"{', '.join(f'{g:+.1f}' for g in part1['stalled_rss_growth_mb'])} MB"
    )
    report["fleet"] = part2 = fleet(args.fleet_steps, args.watchers, args.out)
    for case in ("alone", "watched"):
        r = part2[case]
        print(
            f"8 players {case:8s}: server CPU {r['cpu_ms_per_step']:.2f} ms/step, {r['frames_per_s']:.1f} "
            f"frames/s, player p99 {r['p99_ms']:.1f} ms, watchers got {100 * r['received_fraction']:.2f} %"
        )
    print(f"server CPU per step, watched / alone: {part2['cpu_ratio']:.2f}x")
    (args.out / "watchers.json").write_text(json.dumps(report, indent=2))
    return 0


def urllib_metric(base_url: str, name: str) -> float:
    """One sample of the server's Prometheus text (no labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
