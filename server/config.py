"""Server configuration: one typed object, filled from defaults, environment and the command line.

Every field can be set by an environment variable ``DREAMSTREAM_<FIELD NAME IN CAPITALS>``
(e.g. ``DREAMSTREAM_MAX_SESSIONS=32``, ``DREAMSTREAM_PIPELINE_OVERRIDES='{"generate_ms": 40}'``);
explicit arguments (the CLI) win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.registry import DEFAULT_PIPELINE

ENV_PREFIX = "DREAMSTREAM_"


class ConfigValueError(ValueError):
    """An option (from the CLI or an environment variable) has a value that cannot be used."""


class ServerConfig(BaseModel):
    """Everything ``dreamstream serve`` can be told. Units are in the field names (_s, _ms, _bytes)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    pipeline: str = Field(
        DEFAULT_PIPELINE, description="Registered pipeline name or import path 'pkg.module:ATTR'"
    )
    pipeline_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Config overrides passed to load_pipeline (--set k=v)"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    max_sessions: int = Field(64, ge=1, description="Sessions held at once (attached or resumable)")
    idle_timeout_s: float = Field(
        60.0, gt=0, description="A session (or connection without one) with no step this long ends"
    )
    resume_window_s: float = Field(
        30.0, ge=0, description="How long a disconnected session is kept for 'resume' (0: never)"
    )
    max_inflight: int = Field(
        2, ge=1, le=64, description="Steps a client may have outstanding (advertised in 'ready')"
    )
    max_batch: int = Field(8, ge=1, le=256, description="Most sessions' steps run as one batched generate")
    batch_sizes: list[int] | None = Field(
        None,
        description="Only run batches of these sizes, e.g. '1,2,4,8' (for pipelines compiled "
        "for fixed shapes; the warm-up then runs each size once). Default: any size",
    )
    gather_window_ms: float = Field(
        0.0, ge=0, le=1000, description="Wait this long for more ready steps before a batch"
    )
    naive: bool = Field(
        False,
        description="Comparison mode: generate and finalize back to back before answering, "
        "one step at a time (no batching, no finalize overlap)",
    )
    codec: Literal["jpeg", "png", "raw"] = Field("jpeg", description="Default frame codec")
    quality: int = Field(85, ge=1, le=100, description="Default JPEG quality")
    png_level: int = Field(1, ge=0, le=9, description="zlib level of PNG frames")
    token: str | None = Field(
        None, description="If set, clients must give it (Authorization: Bearer or ?token=)"
    )
    json_logs: bool = Field(False, description="Log one JSON object per line")
    log_level: str = Field("INFO", description="Minimum log level")
    debug_timeline: bool = Field(False, description="Serve the worker timeline at /debug/timeline")
    timeline_size: int = Field(4096, ge=16, description="Events kept by the worker timeline")
    max_message_bytes: int = Field(
        65536, ge=256, description="Largest client text message; bigger ones get too_large + 1009"
    )
    ws_max_size_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Protocol-level frame limit (the connection is closed 1009 by uvicorn above it)",
    )
    ping_interval_s: float = Field(20.0, gt=0, description="WebSocket keepalive ping interval")
    ping_timeout_s: float = Field(20.0, gt=0, description="Close if a keepalive pong is this late")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, wait this long for in-flight steps before closing"
    )
    warmup: bool = Field(True, description="Run one full step before /readyz says ready")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the worker (None: all cores but one, leaving one "
        "to the event loop and codec)",
    )
    batch_torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the worker for batches of 4 or more sessions "
        "(None: all cores; big batches keep every thread busy)",
    )
    codec_threads: int = Field(2, ge=1, le=64, description="Threads that encode frames")
    send_first_ms: float = Field(
        0.0,
        ge=0,
        le=100,
        description="CUDA only: before launching finalize, wait up to this long for the step's "
        "frames to be sent (kernel launches and the event loop share the GIL); 0 (default, the "
        "measured behaviour): launch at once. Not yet measured on a GPU",
    )
    gil_switch_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval; Python's default is "
        "5 ms): how long the event loop may wait for the GIL while the worker launches kernels",
    )

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            try:
                return [int(v) for v in text.replace(",", " ").split()] or None
            except ValueError:
                raise ValueError(f"expected sizes like '1,2,4,8', got {value!r}") from None
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _check_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v < 1 for v in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return sorted(set(value)) if value else None

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Defaults ← ``DREAMSTREAM_*`` environment ← ``overrides`` (explicit values win).

        Raises :class:`ConfigValueError` naming the option and what was expected.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _env_value(name, raw)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            raise ConfigValueError(f"invalid server option(s): {problems}") from None


def _env_value(name: str, raw: str) -> Any:
    if name == "pipeline_overrides":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigValueError(
                f"{ENV_PREFIX}PIPELINE_OVERRIDES must be a JSON object, e.g. '{{\"generate_ms\": 40}}': {exc}"
            ) from None
        if not isinstance(value, dict):
            raise ConfigValueError(f"{ENV_PREFIX}PIPELINE_OVERRIDES must be a JSON object")
        return value
    if name == "token":
        return raw or None
    return raw
