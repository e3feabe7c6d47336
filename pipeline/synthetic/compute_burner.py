"""Device work of a requested duration: real matmuls standing in for a model's compute.

On CPU the burner runs matmuls until the deadline (exact under any load). On CUDA it issues a
fixed number of matmuls calibrated once at construction, so at run time it never synchronizes:
the work is queued like a real model's kernels.
"""

from __future__ import annotations

import time

import torch


class ComputeBurner:
    """Spends ``ms`` milliseconds on ``size × size`` matmuls on ``device``."""

    def __init__(self, device: torch.device, size: int = 64) -> None:
        self.device = device
        self.a = torch.randn(size, size, device=device)
        self.b = torch.randn(size, size, device=device) / size
        self.matmuls_per_ms = self._calibrate() if device.type == "cuda" else 0.0

    def _run(self, n: int) -> torch.Tensor:
        x = self.a
        for _ in range(n):
            x = torch.tanh(x @ self.b)
        return x

    def _calibrate(self, budget_ms: float = 20.0) -> float:
        best = 0.0
        n = 64
        for _ in range(3):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self._run(n)
            torch.cuda.synchronize(self.device)
            elapsed = (time.perf_counter() - t0) * 1000.0
            best = max(best, n / max(elapsed, 1e-6))
            n = max(n, int(best * budget_ms))
        return best

    def burn(self, ms: float) -> None:
        """Spend about ``ms`` milliseconds of device time."""
        if ms <= 0:
            return
        if self.device.type == "cuda":
            self._run(max(1, round(ms * self.matmuls_per_ms)))
            return
        deadline = time.perf_counter() + ms / 1000.0
        while time.perf_counter() < deadline:
            self._run(4)
