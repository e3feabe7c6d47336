"""``python -m benchmarks.run``: run the suite, write JSON + Markdown under benchmarks/results/.

python -m benchmarks.run                       # everything, tiny-world, ~10 minutes on 2 cores
python -m benchmarks.run --quick               # shorter runs, fewer session counts
python -m benchmarks.run --only overhead,memory --pipeline synthetic --set generate_ms=20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from loguru import logger

from benchmarks.machine import describe_machine
from benchmarks.report import BenchResult, write_results
from benchmarks.suite import (
    BENCHMARKS,
    MODES,
    SuiteConfig,
    bench_finalize_hiding,
    bench_memory,
    bench_overhead,
    bench_scaling,
)
from pipeline.overrides import parse_overrides
from server.app import worker_torch_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pipeline", default="tiny-world")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sessions", type=int, nargs="+", default=None, help="session counts for scaling (default 1..32)"
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated server modes for scaling, of {list(MODES)}"
    )
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        p.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; choose from {list(MODES)}")
    # The in-process baselines use the same intra-op threads as the servers they are compared with.
    torch.set_num_threads(worker_torch_threads(None))
    cfg = SuiteConfig(
        args.pipeline,
        parse_overrides(args.set),
        args.device,
        args.quick,
        args.out / "logs",
        args.sessions,
        modes,
    )
    machine = describe_machine(args.device)
    print(f"machine: {machine.line()}", flush=True)
    print(f"pipeline: {cfg.pipeline} {cfg.overrides}", flush=True)
    results: list[BenchResult] = []
    for name in only:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        if name == "overhead":
            results.append(bench_overhead(cfg))
        elif name == "finalize_hiding":
            results.append(bench_finalize_hiding(cfg))
        elif name == "scaling":
            results.extend(bench_scaling(cfg))
        elif name == "memory":
            results.append(bench_memory(cfg))
        for r in results[-2:] if name == "scaling" else results[-1:]:
            print(r.markdown(), flush=True)
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    path = write_results(results, machine, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
