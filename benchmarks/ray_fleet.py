"""What Ray Serve costs and gives: (1) one lock-step tiny-world player through Ray's proxy (a fleet
of 1 replica) vs the single server, side by side in one run: step latency p50 / p99 and time to
first frame, as ratios and added ms; (2) aggregate frames/s of saturating players on a fleet of 1
and of 2 replicas.

``python -m benchmarks.ray_fleet``. Both servers run at once (the single server and the fleet's
replica are the same app with the same options); the player alternates between them in rounds
(ABAB…), so drift shows up in both. Part 2 restarts the fleet with 2 replicas. On a machine with
one device (or 2 CPU cores) a second replica cannot add throughput — the numbers show what the
routing costs there, not the scaling. Printed and written to ``--out`` (default
``benchmarks/results/ray.json``) with the machine line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe_machine
from clients.stream import AsyncStreamClient
from server.process import ServerProcess

SERVER_ARGS = ["--pipeline", "tiny-world", "--codec", "jpeg", "--max-sessions-per-client", "0"]


async def lockstep(url: str, steps: int) -> tuple[list[float], float]:
    """Per-step latency (ms) of ``steps`` lock-step steps of a new session, and its time to first
    frame (connect + start + first step, ms)."""
    t0 = time.perf_counter()
    async with AsyncStreamClient(url) as client:
        await client.start(seed=1)
        first = await client.step({"move": "right"})
        ttff = (time.perf_counter() - t0) * 1000.0 - first.latency_ms + first.first_frame_ms
        latencies = [(await client.step({"move": "up"})).latency_ms for _ in range(steps)]
    return latencies, ttff


async def saturate(url: str, players: int, seconds: float) -> float:
    """Frames/s of ``players`` sessions stepping pipelined (``max_inflight``) for ``seconds``."""
    clients = [AsyncStreamClient(url) for _ in range(players)]
    for i, client in enumerate(clients):
        await client.start(seed=i)
    frames = 0
    deadline = time.perf_counter() + seconds

    async def play(client: AsyncStreamClient) -> None:
        nonlocal frames

        async def actions() -> Any:
            while time.perf_counter() < deadline:
                yield {"move": "left"}

        async for result in client.run(actions()):
            frames += len(result.packets)

    t0 = time.perf_counter()
    await asyncio.gather(*(play(c) for c in clients))
    wall = time.perf_counter() - t0
    for client in clients:
        await client.end()
        await client.close()
    return frames / wall


def stats(values: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 2) for q in (50, 99)}


def fleet_args(replicas: int) -> list[str]:
    return [*SERVER_ARGS, "--ray", "--replicas", str(replicas)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_fleet", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="lock-step steps per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--players", type=int, default=8, help="saturating players in part 2")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each part-2 run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray.json"))
    parser.add_argument("--logs", type=Path, default=Path("runs/ray_fleet"))
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    lat: dict[str, list[float]] = {"single": [], "ray": []}
    ttff: dict[str, list[float]] = {"single": [], "ray": []}
    fps: dict[str, float] = {}
    with (
        ServerProcess(SERVER_ARGS, log_path=args.logs / "single.log") as single,
        ServerProcess(fleet_args(1), log_path=args.logs / "fleet1.log", ready_timeout_s=180) as fleet,
    ):
        urls = {"single": single.ws_url, "ray": fleet.ws_url}
        for _ in range(args.rounds):
            for name, url in urls.items():
                values, first = asyncio.run(lockstep(url, args.steps))
                lat[name] += values
                ttff[name].append(first)
        fps["single"] = asyncio.run(saturate(single.ws_url, args.players, args.seconds))
        fps["ray_1_replica"] = asyncio.run(saturate(fleet.ws_url, args.players, args.seconds))
    with ServerProcess(fleet_args(2), log_path=args.logs / "fleet2.log", ready_timeout_s=180) as fleet2:
        time.sleep(3.0)  # both replicas up (the command is ready once one is)
        fps["ray_2_replicas"] = asyncio.run(saturate(fleet2.ws_url, args.players, args.seconds))
    single_s, ray_s = stats(lat["single"]), stats(lat["ray"])
    ttff_single, ttff_ray = float(np.median(ttff["single"])), float(np.median(ttff["ray"]))
    report: dict[str, Any] = {
        "machine": describe_machine("cpu").line(),
        "server": SERVER_ARGS,
        "steps": args.steps * args.rounds,
        "lockstep": {
            "single": {**single_s, "ttff_ms": round(ttff_single, 1)},
            "ray": {**ray_s, "ttff_ms": round(ttff_ray, 1)},
            "p50_ratio": round(ray_s["p50_ms"] / single_s["p50_ms"], 3),
            "p50_added_ms": round(ray_s["p50_ms"] - single_s["p50_ms"], 2),
            "p99_ratio": round(ray_s["p99_ms"] / single_s["p99_ms"], 3),
            "p99_added_ms": round(ray_s["p99_ms"] - single_s["p99_ms"], 2),
            "ttff_added_ms": round(ttff_ray - ttff_single, 1),
        },
        "frames_per_s": {k: round(v, 1) for k, v in fps.items()},
        "players": args.players,
        "note": "2 CPU cores: one device's worth of compute; a second replica cannot add throughput here",
    }
    print(f"machine: {report['machine']}")
    print(json.dumps(report["lockstep"], indent=1))
    print(json.dumps(report["frames_per_s"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
