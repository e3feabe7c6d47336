"""What machine a benchmark ran on (printed with every result)."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    cores: int
    torch_version: str
    device: str
    python: str
    torch_threads: int
    """Intra-op threads of the in-process baselines and of the server's device worker."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores, torch {self.torch_version}, "
            f"device {self.device}, Python {self.python}, {self.torch_threads} torch thread(s)"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str = "auto") -> MachineInfo:
    """CPU model, usable cores, torch version and the device the pipelines ran on."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name()})"
    return MachineInfo(
        cpu_model=_cpu_model(),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        torch_version=torch.__version__,
        device=device,
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
    )
