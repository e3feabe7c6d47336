"""Property-based fuzzing of a real server: whatever a client sends, every answer is documented.

Hypothesis generates client messages — valid ones, near-valid ones (a field set to any JSON
value, dropped, added, the type changed), hostile JSON (deep nesting, huge numbers, lone
surrogates, NaN), garbage text, binary messages and oversized ones — and sends them over one
connection (a new one after each close). After each, a ping with a fresh ``t`` marks the end
of the answers. Every text answer must parse as a server message (``parse_server_message``),
every binary one must carry a valid frame header, an error must not be ``internal``, a fatal
error must be followed by its documented close code, and every close code must be documented.
Afterwards the server is still ready and has logged no traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets

from protocol import CODEC_NAMES, FATAL_CLOSE, CloseCode, ErrorCode, FrameHeader, parse_server_message
from tests.conftest import RunningServer, ServerFactory, StreamClient
from tests.test_hostile import HOSTILE_JSON, assert_clean_log

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MAX_MESSAGE_BYTES = 4096
TIME_BUDGET_S = 60.0
"""Examples past this much time are skipped (the test stays bounded on slow machines)."""
DOCUMENTED_CLOSE_CODES = {int(c) for c in CloseCode} | {1007}
"""docs/protocol.md: the close codes after fatal errors, and 1007 for a text message that is not
UTF-8 (refused by the WebSocket layer)."""

pytestmark = pytest.mark.slow

# ---- strategies ---------------------------------------------------------------------------------
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | surrogates
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
actions = st.none() | st.fixed_dictionaries({}, optional={"x": st.integers(-3, 3), "y": st.integers(-3, 3)})
valid = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("start")},
        optional={
            "seed": st.integers(0, 2**31),
            "codec": st.sampled_from(CODEC_NAMES),
            "quality": st.integers(1, 100),
            "pipeline": st.just("synthetic"),
            "options": st.just({}),
            "record": st.booleans(),  # this server does not record: record=true is a bad_message
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("step"), "step": st.integers(0, 3)},
        optional={"action": actions, "client_ts": st.floats(0, 1e6)},
    ),
    st.fixed_dictionaries({"type": st.just("ping")}, optional={"t": json_value}),
    st.just({"type": "end"}),
    st.fixed_dictionaries(
        {"type": st.just("resume"), "session_id": st.text(max_size=24), "resume_token": st.text(max_size=44)}
    ),
    st.fixed_dictionaries(
        {"type": st.just("watch"), "session_id": st.text(max_size=140), "watch_token": st.text(max_size=140)}
    ),
)


@st.composite
def near_valid(draw: Any) -> dict[str, Any]:
    message = dict(draw(valid))
    key = draw(st.sampled_from(sorted(message)))
    how = draw(st.sampled_from(["set", "drop", "add", "type"]))
    if how == "set":
        message[key] = draw(json_value)
    elif how == "drop":
        del message[key]
    elif how == "add":
        message[draw(st.text(min_size=1, max_size=8))] = draw(json_value)
    else:
        message["type"] = draw(st.text(max_size=10) | json_value)
    return message


client_messages = st.one_of(
    valid.map(json.dumps),
    near_valid().map(json.dumps),
    st.sampled_from(HOSTILE_JSON),
    json_value.map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100),
    st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES).map(
        lambda n: json.dumps({"type": "ping", "t": "x" * n})
    ),
)


# ---- the fuzzing client ---------------------------------------------------------------------------
@dataclass
class Fuzzer:
    """One connection at a time to ``srv``, driven from a private event loop."""

    srv: RunningServer
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    client: StreamClient | None = None
    sent: int = 0
    closes: dict[int | None, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def exchange(self, payload: str | bytes) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self._exchange(payload), 30))

    async def _exchange(self, payload: str | bytes) -> None:
        if self.client is None:
            self.client = await StreamClient.connect(self.srv.ws_url)
        self.sent += 1
        marker = f"fuzz-{self.sent}"
        try:
            await self.client.send(payload)
            await self.client.send({"type": "ping", "t": marker})
            fatal: ErrorCode | None = None
            while True:
                answer = await self.client.recv()
                fatal = self._check(answer, fatal) or fatal
                if isinstance(answer, str) and json.loads(answer) == {"type": "pong", "t": marker}:
                    assert fatal is None, f"a fatal {fatal} was not followed by a close"
                    return
        except websockets.ConnectionClosed as exc:
            self._closed(exc, fatal)

    def _check(self, answer: str | bytes, fatal: ErrorCode | None) -> ErrorCode | None:
        """Validate one answer; the code of a fatal error."""
        assert fatal is None, f"an answer after a fatal {fatal}: {answer[:200]!r}"
        if isinstance(answer, bytes):
            header = FrameHeader.unpack(answer)
            assert header.count >= 1 and header.index < header.count, header
            return None
        message = parse_server_message(answer)
        if message.type != "error":
            return None
        self.errors[message.code.value] = self.errors.get(message.code.value, 0) + 1
        assert message.code is not ErrorCode.INTERNAL, message
        assert len(message.message) <= 500, message
        return message.code if message.fatal else None

    def _closed(self, exc: websockets.ConnectionClosed, fatal: ErrorCode | None) -> None:
        code = exc.rcvd.code if exc.rcvd is not None else None
        self.closes[code] = self.closes.get(code, 0) + 1
        self.client = None
        assert code in DOCUMENTED_CLOSE_CODES, f"close code {code} is not documented"
        if fatal is not None:
            assert code == FATAL_CLOSE.get(fatal, CloseCode.POLICY), (fatal, code)

    def close(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        pipeline_overrides={"generate_ms": 1, "finalize_ms": 1},
        max_message_bytes=MAX_MESSAGE_BYTES,
        resume_window_s=0.2,
    )


@pytest.fixture(scope="module")
def fuzzer(fuzz_srv: RunningServer) -> Iterator[Fuzzer]:
    f = Fuzzer(fuzz_srv)
    yield f
    f.close()


# ---- the property ---------------------------------------------------------------------------------
_started: list[float] = []


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payload=client_messages)
def test_every_answer_is_documented(fuzzer: Fuzzer, payload: str | bytes) -> None:
    _started.append(_started[0] if _started else time.monotonic())
    if time.monotonic() - _started[0] > TIME_BUDGET_S:
        return
    fuzzer.exchange(payload)


def test_server_is_healthy_after_fuzzing(fuzz_srv: RunningServer, fuzzer: Fuzzer) -> None:
    assert fuzzer.sent > 0
    print(f"sent {fuzzer.sent}; errors {fuzzer.errors}; closes {fuzzer.closes}")
    assert fuzz_srv.get("/readyz").status_code == 200
    assert fuzz_srv.alive()
    assert_clean_log(fuzz_srv)
