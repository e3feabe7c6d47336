"""Session recordings: one JSON Lines file per session, written off the event loop, and its reader.

Format (version :data:`FORMAT_VERSION`; ``docs/recording.md``), one JSON object per line::

    {"type":"header","format":1,"protocol":1,"pipeline":"tiny-world","source":"tiny-world",
     "fingerprint":"3f…","overrides":{},"config":{…},"device":"cpu","session_id":"q8V…",
     "seed":7,"codec":"raw","quality":85,"options":{…},"started_at":"2025-…Z","max_steps":100000}
    {"type":"step","step":0,"action":{"move":"up"},"t":0.0123,"timing":{"queue_ms":0.2,…},"batch":1}
    …
    {"type":"note","step":100000,"message":"recording stopped: …"}      (only if it stopped early)
    {"type":"end","reason":"ended","steps":42,"missing":0,"stopped":null,"ended_at":"…"}

``action`` is the action as validated (``model_dump(mode="json")``, or ``null``), ``t`` the
receipt of the step message in seconds since the session started, ``timing`` the server's timings
of the step, ``batch`` the rollouts in the generate call it ran in (batched floating-point kernels
may round differently from a rollout run alone, which is how replay runs it). Steps are those the
session ran, from 0, in order; a session resumed later keeps appending to the same file (its
:class:`SessionRecording` lives with the session).

Concurrency: a :class:`Recorder` (one per server) owns one daemon writer thread; only it opens,
writes, flushes (per line) and closes files. The event loop talks to it through a queue:
:meth:`Recorder.open`, :meth:`SessionRecording.step` and :meth:`SessionRecording.close` are O(1),
never block and never raise (call them from one thread, the event loop). Step lines are bounded:
when ``queue_size`` lines already wait, a step line is dropped and the session's recording stops
there (a file with a gap could not be replayed): a ``note`` line and the ``end`` line say so. The
few header, note and end lines (at most three per session) are always queued. Errors of the
writer (disk full, permissions) are logged and counted (:attr:`Recorder.errors`); that session's
recording stops, the server goes on. A recording is never the reason a step is slow or fails.

:func:`read_recording` validates a file with the pydantic models below; it needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO, Union

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.fingerprint import PipelineIdentity
from protocol import describe_validation_error
from protocol.constants import PROTOCOL_VERSION

FORMAT_VERSION = 1
"""Version of the recording format (``header.format``)."""
DEFAULT_QUEUE_SIZE = 4096
"""Step lines that may wait for the writer before new ones are dropped."""
SAFE_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Session ids that are safe as a file name (the server's are URL-safe base64)."""

StopReason = Literal["max_steps", "writer_behind"]


# ---- the format --------------------------------------------------------------------------------
class _Line(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RecordingHeader(_Line):
    """The first line: what the session was made with and how it started."""

    type: Literal["header"]
    format: int = Field(description="Recording format version")
    protocol: int = Field(description="Protocol version of the server that recorded it")
    pipeline: str = Field(description="The pipeline's name (ready.pipeline)")
    source: str = Field(description="What the pipeline was loaded from (--pipeline)")
    fingerprint: str = Field(description="Hash of the pipeline's name, config and weights")
    overrides: dict[str, Any] = Field(default_factory=dict, description="--set config overrides")
    config: dict[str, Any] | None = Field(None, description="The pipeline's whole config")
    device: str = Field("", description="Where the pipeline ran")
    session_id: str
    seed: int
    codec: str = Field(description="The session's frame codec")
    quality: int | None = Field(None, description="The session's JPEG quality")
    options: dict[str, Any] = Field(default_factory=dict, description="Start options as validated")
    started_at: str = Field(description="ISO 8601 UTC time the session started")
    max_steps: int = Field(description="Most step lines this recording may hold")


class StepLine(_Line):
    """One step the session ran."""

    type: Literal["step"]
    step: int = Field(ge=0)
    action: Any = Field(None, description="The action as validated (null: the default action)")
    t: float = Field(description="Receipt of the step message, seconds since the session started")
    timing: dict[str, Any] = Field(default_factory=dict, description="Server timings of the step")
    batch: int = Field(1, ge=1, description="Rollouts in the generate call the step ran in")


class NoteLine(_Line):
    """Why the recording stopped before the session did."""

    type: Literal["note"]
    step: int
    message: str


class EndLine(_Line):
    """The last line, written when the session ended."""

    type: Literal["end"]
    reason: str
    steps: int = Field(description="Step lines recorded")
    missing: int = Field(0, description="Steps the session ran that are not recorded")
    stopped: StopReason | None = Field(None, description="Why recording stopped early, if it did")
    ended_at: str


RecordLine = Annotated[Union[RecordingHeader, StepLine, NoteLine, EndLine], Field(discriminator="type")]  # noqa: UP007
_LINE = TypeAdapter(RecordLine)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _to_json(value: Any) -> Any:
    """``json.dumps`` default: validated models (dumped here, on the writer thread) and mappings."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ---- writing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    """A line for the writer thread; ``kind`` says what to do with the session's file."""

    recording: SessionRecording
    line: dict[str, Any]
    kind: Literal["open", "line", "close"] = "line"


class SessionRecording:
    """One session's recording (see the module docstring). Methods are called from the event
    loop only; they are O(1) and never raise. Made by :meth:`Recorder.open`."""

    def __init__(self, recorder: Recorder | None, session_id: str, max_steps: int = 0) -> None:
        self._recorder = recorder
        self.session_id = session_id
        self.path: Path | None = None if recorder is None else recorder.directory / f"{session_id}.jsonl"
        """The file (``None``: this session is not recorded)."""
        self.max_steps = max_steps
        self.t0 = time.monotonic()
        """``time.monotonic()`` when the session started (step times are relative to it)."""
        self.steps = 0
        """Step lines queued for the file."""
        self.missing = 0
        """Steps the session ran that will not be in the file (recording stopped)."""
        self.stopped: StopReason | None = None
        self.closed = False

    @property
    def active(self) -> bool:
        """Steps are still being recorded."""
        return self._recorder is not None and not self.closed and self.stopped is None

    def step(self, step: int, action: Any, t_received: float, timing: Any, batch: int = 1) -> None:
        """Record a step the session ran (call when its ``step_done`` is sent, in step order).

        ``action``: the validated action (a pydantic model, a mapping or ``None``); ``t_received``:
        ``time.monotonic()`` when its message arrived; ``timing``: the step's server timings (a
        mapping or model); ``batch``: rollouts in the generate it ran in. Models are serialized
        on the writer thread.
        """
        if self._recorder is None or self.closed:
            return
        if self.stopped is None and self.steps >= self.max_steps:
            self._stop("max_steps", step, f"recording stopped at its limit of {self.max_steps} steps")
        if self.stopped is None:
            t = round(t_received - self.t0, 6)
            line = {"type": "step", "step": step, "action": action, "t": t, "timing": timing, "batch": batch}
            if self._recorder._put(_Item(self, line)):
                self.steps += 1
                return
            self._stop("writer_behind", step, "recording stopped: its writer fell behind (lines dropped)")
        self.missing += 1
        if self.stopped == "writer_behind":
            self._recorder.dropped += 1

    def close(self, reason: str) -> None:
        """The session ended (``end``, fatal error, timeout, shutdown): write the end line."""
        if self._recorder is None or self.closed:
            return
        self.closed = True
        self._recorder._put(_Item(self, self.end_line(reason), "close"), force=True)

    def end_line(self, reason: str) -> dict[str, Any]:
        return {"type": "end", "reason": reason, "steps": self.steps, "missing": self.missing,
                "stopped": self.stopped, "ended_at": _now_iso()}  # fmt: skip

    def _stop(self, why: StopReason, step: int, message: str) -> None:
        self.stopped = why
        if self._recorder is not None:
            self._recorder._put(_Item(self, {"type": "note", "step": step, "message": message}), force=True)


def open_exclusive(path: Path) -> TextIO:
    """A new file for writing, UTF-8 (refuses to overwrite one)."""
    return path.open("x", encoding="utf-8")


class Recorder:
    """Writes the recordings of a server's sessions into ``directory`` (see module docstring).

    ``start()`` before the first :meth:`open` (it creates the directory, raising ``OSError`` if
    it cannot); ``close()`` at shutdown, after the sessions' recordings were closed (still open
    ones get an end line with reason ``server stopped``).
    """

    def __init__(
        self,
        directory: Path,
        identity: PipelineIdentity,
        *,
        max_steps: int = 100_000,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        open_file: Callable[[Path], TextIO] = open_exclusive,
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.max_steps = max_steps
        self.queue_size = queue_size
        self._open_file = open_file
        """Opens a session's file on the writer thread (tests pass a slow one)."""
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._files: dict[SessionRecording, TextIO] = {}
        """Files being written, by recording (writer thread only)."""
        self._closed = False
        self.dropped = 0
        """Steps not recorded because the writer fell behind (event loop)."""
        self.errors = 0
        """Recordings stopped by a write error (writer thread)."""
        self.written = 0
        """Lines written (writer thread)."""
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, close every file and stop the writer (waits up to ``timeout_s``)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def pending(self) -> int:
        """Lines waiting for the writer."""
        return self._queue.qsize()

    def open(
        self, session_id: str, *, options: Any, seed: int, codec: Any, quality: int | None = None
    ) -> SessionRecording:
        """Start recording a session (its header line); ``options``: the validated start options,
        ``codec``: the session's :class:`~protocol.Codec` or its wire name. A recorder that is
        closed, or an unsafe session id, gives a recording that records nothing."""
        if self._closed or not SAFE_SESSION_ID.fullmatch(session_id):
            if not self._closed:
                logger.error("not recording session {!r}: not a safe file name", session_id)
            return SessionRecording(None, session_id)
        recording = SessionRecording(self, session_id, self.max_steps)
        self._put(
            _Item(recording, self._header(session_id, options, seed, codec, quality), "open"), force=True
        )
        return recording

    def _header(
        self, session_id: str, options: Any, seed: int, codec: Any, quality: int | None
    ) -> dict[str, Any]:
        ident = self.identity
        return {"type": "header", "format": FORMAT_VERSION, "protocol": PROTOCOL_VERSION,
                "pipeline": ident.name, "source": ident.source, "fingerprint": ident.fingerprint,
                "overrides": ident.overrides, "config": ident.config, "device": ident.device,
                "session_id": session_id, "seed": seed, "codec": getattr(codec, "wire_name", codec),
                "quality": quality, "options": {} if options is None else options, "started_at": _now_iso(),
                "max_steps": self.max_steps}  # fmt: skip

    def _put(self, item: _Item, force: bool = False) -> bool:
        """Queue a line; False (not queued) when closed, or ``queue_size`` lines wait and not ``force``."""
        if self._closed or (not force and self._queue.qsize() >= self.queue_size):
            return False
        self._queue.put_nowait(item)
        return True

    # ---- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._write(item)
        for recording in list(self._files):
            self._write(_Item(recording, recording.end_line("server stopped"), "close"))

    def _write(self, item: _Item) -> None:
        recording = item.recording
        try:
            if item.kind == "open" and recording.path is not None:
                self._files[recording] = self._open_file(recording.path)
            file = self._files.get(recording)
            if file is None:  # its file failed (logged then)
                return
            file.write(json.dumps(item.line, default=_to_json, separators=(",", ":")) + "\n")
            file.flush()
            self.written += 1
            if item.kind == "close":
                del self._files[recording]
                file.close()
        except Exception as exc:
            self._fail(recording, exc)

    def _fail(self, recording: SessionRecording, exc: Exception) -> None:
        self.errors += 1
        logger.bind(session=recording.session_id).opt(exception=exc).error(
            "recording of session {} stopped: {!r}", recording.session_id, exc
        )
        file = self._files.pop(recording, None)
        if file is not None:
            with contextlib.suppress(Exception):  # the file already failed; its error was logged
                file.close()


# ---- reading -----------------------------------------------------------------------------------
class RecordingError(ValueError):
    """A recording that cannot be read or is not valid; the message is one line naming the place."""


@dataclass
class Recording:
    """A recording as read back: its header, steps (0, 1, … in order), notes and end line."""

    path: Path
    header: RecordingHeader
    steps: list[StepLine] = field(default_factory=list)
    notes: list[NoteLine] = field(default_factory=list)
    end: EndLine | None = None
    """``None``: the session had not ended (or the server stopped without closing it)."""

    @property
    def complete(self) -> bool:
        """Every step the session ran is here, and it ended."""
        return self.end is not None and self.end.stopped is None and self.end.missing == 0

    def incomplete_reason(self) -> str | None:
        """Why :attr:`complete` is False, in words; ``None`` when it is complete."""
        if self.end is None:
            return "it has no end line (the session had not ended, or the server stopped)"
        if self.end.stopped == "max_steps":
            limit = self.header.max_steps
            return f"it stopped at its step limit ({limit}); {self.end.missing} later steps are missing"
        if self.end.stopped == "writer_behind" or self.end.missing:
            return f"its writer fell behind; the last {self.end.missing} steps are missing"
        return None


def read_recording(path: str | Path) -> Recording:
    """Read and validate a recording; :class:`RecordingError` (one line) if it is not one.

    A last line without its newline (a writer stopped mid-line) is ignored.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"cannot read {p}: {exc}") from None
    lines = text.split("\n")[:-1]  # the last piece is "" or a line cut short
    if not lines:
        raise RecordingError(f"{p} is empty: a recording starts with its header line")
    header = _parse(p, 1, lines[0])
    if not isinstance(header, RecordingHeader):
        raise RecordingError(f"{p}:1: expected the header line, got a {header.type!r} line")
    if header.format > FORMAT_VERSION:
        raise RecordingError(
            f"{p} has recording format {header.format}; this dreamstream reads up to {FORMAT_VERSION}"
        )
    recording = Recording(p, header)
    for number, raw in enumerate(lines[1:], start=2):
        _add(recording, number, _parse(p, number, raw))
    _check_steps(recording)
    return recording


def _parse(path: Path, number: int, raw: str) -> RecordingHeader | StepLine | NoteLine | EndLine:
    try:
        return _LINE.validate_json(raw)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise RecordingError(f"{path}:{number}: not a JSON object") from None
        raise RecordingError(f"{path}:{number}: {describe_validation_error(exc, skip_loc=1)}") from None


def _add(recording: Recording, number: int, line: RecordingHeader | StepLine | NoteLine | EndLine) -> None:
    where = f"{recording.path}:{number}"
    if recording.end is not None:
        raise RecordingError(f"{where}: a {line.type!r} line after the end line")
    if isinstance(line, RecordingHeader):
        raise RecordingError(f"{where}: a second header line")
    if isinstance(line, StepLine):
        recording.steps.append(line)
    elif isinstance(line, NoteLine):
        recording.notes.append(line)
    else:
        recording.end = line


def _check_steps(recording: Recording) -> None:
    """Steps run 0, 1, 2, … (a rollout cannot skip one); sorted in place."""
    recording.steps.sort(key=lambda s: s.step)
    for expected, line in enumerate(recording.steps):
        if line.step < expected:
            raise RecordingError(f"{recording.path}: step {line.step} is recorded twice")
        if line.step > expected:
            raise RecordingError(
                f"{recording.path}: step {expected} is missing (the next recorded step is {line.step})"
            )
