"""Server configuration: every ``dreamstream serve`` option, declared once.

Each field of :class:`ServerConfig` is at the same time a command-line flag (``--max-sessions``),
an environment variable (``DREAMSTREAM_MAX_SESSIONS``), a typed and validated value, and a line
of ``dreamstream serve --help`` with its default (pydantic-settings builds all four from the
field). Precedence: flags > keyword values (:func:`load_config`, ``ServerConfig(...)``) >
environment > defaults. Pipeline config
overrides are the one option with their own flag syntax: ``--set KEY=VALUE`` (repeatable), added
to those of the environment variable ``DREAMSTREAM_PIPELINE_OVERRIDES`` (a JSON object).
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliSettingsSource, CliSuppress, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.errors import ConfigError
from pipeline.overrides import parse_overrides
from pipeline.registry import DEFAULT_PIPELINE
from protocol import DEFAULT_HOST, DEFAULT_PORT, CodecName

ENV_PREFIX = "DREAMSTREAM_"
PROG = "dreamstream serve"
DESCRIPTION = (
    "Serve a world-model pipeline over WebSocket (protocol v1, see docs/protocol.md). Every option "
    f"is also the environment variable {ENV_PREFIX}<OPTION> (shown as [env: ...]); flags win."
)


class ConfigValueError(ValueError):
    """An option (from the CLI or an environment variable) has a value that cannot be used."""


class ServerConfig(BaseSettings):
    """Everything ``dreamstream serve`` can be told. Units are in the field names (_s, _ms, _bytes)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        cli_prog_name=PROG,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
        cli_exit_on_error=False,
    )

    host: str = DEFAULT_HOST
    """Interface to listen on."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """TCP port (0: any free port)."""
    pipeline: str = DEFAULT_PIPELINE
    """Registered pipeline name (synthetic, tiny-world) or import path 'package.module:ATTR'."""
    app_dir: str = "."
    """Directory put first on the import path, so 'package.module:ATTR' resolves from it."""
    pipeline_overrides: CliSuppress[dict[str, Any]] = Field(default_factory=dict)
    """Pipeline config overrides (--set KEY=VALUE; in the environment a JSON object)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    max_sessions: int = Field(default=64, ge=1)
    """Sessions held at once (attached or resumable); a new session takes the slot of the
    oldest resumable one when all are held."""
    max_sessions_per_client: int = Field(default=32, ge=0)
    """Sessions one client address (the peer IP; behind a proxy, the proxy's) may hold at once
    (attached or resumable); 0: no cap."""
    idle_timeout_s: float = Field(default=60.0, gt=0)
    """A session (or a connection without one) with no step this long ends."""
    resume_window_s: float = Field(default=30.0, ge=0)
    """How long a disconnected session is kept for 'resume' (0: never)."""
    max_inflight: int = Field(default=2, ge=1, le=64)
    """Steps a client may have outstanding (advertised in 'ready')."""
    max_watchers: int = Field(default=16, ge=0, le=1024)
    """Connections that may watch one session read-only (its watch link); 0: no watching."""
    max_batch: int = Field(default=8, ge=1, le=256)
    """Most sessions' steps run as one batched generate."""
    batch_sizes: Annotated[list[int] | None, NoDecode] = None
    """Only run batches of these sizes, e.g. 1,2,4,8 (for pipelines compiled for fixed shapes;
    the warm-up then runs each size once); none: any size."""
    naive: bool = False
    """Comparison mode: generate and finalize back to back before answering, one step at a time
    (no batching, no finalize overlap)."""
    codec: CodecName = "jpeg"
    """Default frame codec."""
    quality: int = Field(default=85, ge=1, le=100)
    """Default JPEG quality."""
    png_level: int = Field(default=1, ge=0, le=9)
    """zlib level of PNG frames."""
    codec_threads: int = Field(default=2, ge=1, le=64)
    """Threads that encode frames."""
    token: str | None = None
    """If set, clients must give it (Authorization: Bearer, or ?token=) for /v1/stream, /v1/info
    and /debug/timeline; it is never logged."""
    allowed_origins: Annotated[list[str] | None, NoDecode] = None
    """Web origins (scheme://host[:port], comma separated; '*': any) whose pages may open
    /v1/stream, besides pages of this server itself (same host and port) and clients that send
    no Origin header; others get HTTP 403."""
    json_logs: bool = False
    """Log one JSON object per line."""
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Minimum log level."""
    debug_timeline: bool = False
    """Serve the device worker's recent events at /debug/timeline."""
    record_dir: str | None = None
    """Write a recording of each session (JSON Lines, docs/recording.md; replay it with
    'dreamstream replay') into this directory. None: no recordings."""
    record_policy: Literal["all", "requested"] = "all"
    """With record_dir: record every session (all), or only those whose start asks (record: true)."""
    record_max_steps: int = Field(default=100_000, ge=1)
    """Steps recorded per session at most (then its recording stops, saying so)."""
    timeline_size: int = Field(default=4096, ge=16)
    """Events kept by the worker timeline."""
    max_message_bytes: int = Field(default=65536, ge=256)
    """Largest client text message; bigger ones get too_large and close 1009."""
    rate_limit_per_s: float = Field(default=200.0, gt=0)
    """Client messages per second one connection may send, sustained (a token bucket; WebSocket
    PINGs count; a message costs a token per 4 KiB or part): a 60 fps player sends 60 steps and
    a few pings a second. A message over the limit has no effect; the first of a run gets
    rate_limited, the rest no answer."""
    rate_burst: int = Field(default=400, ge=1)
    """Messages a connection may send at once above rate_limit_per_s (the bucket's size: 2 s of
    the sustained rate, for a client catching up after a stall); more refused than this in a run
    close the connection (fatal rate_limited, 1008)."""
    rate_limit_close_s: float = Field(default=2.0, gt=0)
    """A connection still refused this long after its first refused message (it never slowed down
    enough to win back half its burst) gets a fatal rate_limited and close 1008."""
    send_timeout_s: float = Field(default=10.0, gt=0)
    """A connection whose outgoing data (64 KiB buffered and more) has not moved for this long
    is dropped: its client stopped reading. Meanwhile nothing more is read from it."""
    ws_max_size_bytes: int = Field(default=1 << 20, ge=1024)
    """WebSocket frame limit (uvicorn closes the connection with 1009 above it)."""
    ping_interval_s: float = Field(default=20.0, gt=0)
    """WebSocket keepalive ping interval."""
    ping_timeout_s: float = Field(default=20.0, gt=0)
    """Close a connection whose keepalive pong is this late."""
    max_connections: int | None = Field(default=None, ge=1)
    """Open connections (HTTP and WebSocket) at once; above it new ones get 503, except
    /healthz, /readyz and /metrics (16 more connections are kept for them). None: the open-file
    limit (ulimit -n) minus 144, at most 4096."""
    max_connections_per_client: int = Field(default=64, ge=0)
    """Open connections from one client address (the peer IP, or see trusted_proxies): more
    get 503 (a few more are closed at once); 0: no cap."""
    trusted_proxies: str = ""
    """Reverse proxies whose X-Forwarded-For header names the client: comma-separated IPs or
    networks (127.0.0.1,10.0.0.0/8), or * for any peer. The client is then the rightmost address
    of that header not in this list (for the per-client caps and the logs). Empty: the TCP peer
    is the client and X-Forwarded-For is ignored."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A connection must send a complete request head (at most 64 KiB) this long after it opened
    or began a request; otherwise it gets 408 and is closed."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM, wait this long for in-flight steps before closing."""
    step_timeout_s: float = Field(default=30.0, gt=0)
    """A model call (generate, finalize, a session's cache creation) running longer than this means
    the device is stuck: every step is answered with an error, /healthz and /readyz fail and the
    server exits with status 3 for its supervisor to restart it. 30 s is 100x a slow real step,
    yet answers a stuck player within a human wait; calls in the warm-up are not timed."""
    warmup: bool = True
    """Run one full step (and each of --batch-sizes) before /readyz says ready."""
    cpus: int | None = Field(default=None, ge=1)
    """Cores this server sizes its torch threads by; none: every core the process may run on. A
    Ray replica sets it to the CPUs Ray gave it (2 replicas on 2 cores each sized by both cores
    spin-waited against each other: 9.9 instead of 88 frames/s)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads of the worker for small batches; none: all cores (cpus) but one,
    leaving one to the event loop and the codec."""
    batch_torch_threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads of the worker for batches of 4 or more sessions; none: all cores
    (cpus)."""
    gil_switch_ms: float = Field(default=1.0, gt=0, le=100)
    """Python's thread switch interval (Python's default is 5 ms): how long the event loop may wait
    for the GIL while the worker launches kernels."""

    ray: bool = False
    """Serve a fleet on Ray Serve (extra 'ray'): --replicas servers (one per device, each with every
    other option here) behind one URL on --host/--port; sessions stay on their replica."""
    replicas: int = Field(default=2, ge=1, le=1024)
    """With --ray: how many server replicas (on CUDA one GPU each, shared if there are fewer)."""
    ray_address: str | None = None
    """With --ray: the Ray cluster to join (e.g. 'auto', 'ray://head:10001'); none: start a local Ray.
    Its nodes must run with RAY_SERVE_SESSION_ID_HEADER_KEY=sec-websocket-protocol (docs/deploy.md)."""

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

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v] or None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str] | None) -> list[str] | None:
        from server.access import normalize_origin  # FastAPI only when origins are given

        if not value:
            return None
        return sorted({v if v == "*" else normalize_origin(v) for v in value})

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return value or None


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The root parser of ``dreamstream serve``: ``--set``; the fields' flags are added to it."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, add_help=add_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Pipeline config override, repeatable (e.g. --set generate_ms=40 --set width=128); "
        "the value is converted to the type of that config field "
        f"[env: {ENV_PREFIX}PIPELINE_OVERRIDES as a JSON object]",
    )
    return parser


def load_config(argv: list[str] | None = None, **values: Any) -> ServerConfig:
    """Flags in ``argv`` > ``values`` > ``DREAMSTREAM_*`` environment > defaults.

    ``--help`` prints the help and exits 0. Raises :class:`ConfigValueError` with one line naming
    the option and what was wrong.
    """
    try:
        pairs = build_parser(add_help=False).parse_known_args(argv or [])[0].set
        if pairs:
            values.setdefault("pipeline_overrides", parse_overrides(pairs))
        source: CliSettingsSource[ServerConfig] = CliSettingsSource(
            ServerConfig, root_parser=build_parser(), cli_parse_args=argv or []
        )
        return ServerConfig(_cli_settings_source=source, **values)  # type: ignore[call-arg]
    except ConfigError as exc:
        raise ConfigValueError(f"--set: {exc}") from None
    except SettingsError as exc:
        raise ConfigValueError(_settings_error(exc)) from None
    except ValidationError as exc:
        raise ConfigValueError(describe_config_error(exc)) from None


def _settings_error(exc: SettingsError) -> str:
    text = str(exc).replace("error parsing CLI: ", "")
    if "PIPELINE_OVERRIDES" in text.upper() or "pipeline_overrides" in text:
        return f"{ENV_PREFIX}PIPELINE_OVERRIDES must be a JSON object, e.g. '{{\"generate_ms\": 40}}'"
    return text


def describe_config_error(exc: ValidationError) -> str:
    """One line: ``--flag (DREAMSTREAM_NAME): problem (got value)`` for each bad option."""
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "option"
        flag = "--" + name.replace("_", "-")
        parts.append(f"{flag} ({ENV_PREFIX}{name.upper()}): {err['msg']} (got {err.get('input')!r})")
    return "invalid option: " + "; ".join(parts)
