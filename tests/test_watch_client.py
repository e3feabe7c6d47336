"""Watching from the Python client: ``parse_watch_link``, the bounded :class:`WatchBuffer`,
``AsyncStreamClient.watch`` against a stub server and a real one, and ``dreamstream watch``."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.server import ServerConnection, serve

from clients import (
    AsyncStreamClient,
    ConnectionClosedError,
    NotConnectedError,
    ProtocolViolation,
    StepResult,
    StreamError,
    WatchedStep,
    parse_watch_link,
    watch_link,
)
from clients.stream import WatchBuffer
from clients.watch import build_parser
from clients.watch import main as watch_main
from dreamstream.cli import main as dreamstream_main
from pipeline.synthetic import expected_frames
from protocol import Codec, ErrorCode, FrameHeader, StepTiming, WatchingMessage
from tests.conftest import RunningServer, ServerFactory, StreamClient
from tests.test_cli_help import DESCRIBED_DEFAULT, RST_MARKUP, option_blocks, options

TIMING = StepTiming(queue_ms=0.1, generate_ms=1.0, encode_ms=0.1, server_ms=1.5)


# ---- watch links -------------------------------------------------------------------------------
def test_parse_watch_link() -> None:
    link = parse_watch_link("http://10.0.0.5:8000/?watch=q8V-_x&wt=mB0_-y")
    assert link == ("ws://10.0.0.5:8000/v1/stream", "q8V-_x", "mB0_-y", None)
    url, sid, wt, token = parse_watch_link("https://demo.example/?wt=T&token=s3cret&watch=S&seed=3")
    assert (url, sid, wt, token) == ("wss://demo.example/v1/stream", "S", "T", "s3cret")
    assert parse_watch_link(" 127.0.0.1:8000/?watch=a&wt=b ").url == "ws://127.0.0.1:8000/v1/stream"
    assert parse_watch_link("ws://h:1/v1/stream?watch=a&wt=b").url == "ws://h:1/v1/stream"


@pytest.mark.parametrize(
    ("link", "message"),
    [
        ("http://h:8000/?watch=a", "no 'wt' parameter; expected http://HOST:PORT/?watch=SESSION_ID&wt="),
        ("http://h:8000/?wt=b&watch=", "no 'watch' parameter"),
        ("http://h:8000/?watch=a&watch=c&wt=b", "2 'watch' parameters"),
        ("ftp://h/?watch=a&wt=b", "not a watch link"),
        ("http:///?watch=a&wt=b", "not a watch link"),
        ("http://h:99999/?watch=a&wt=b", "out of range"),
    ],
)
def test_parse_watch_link_says_what_is_wrong(link: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_watch_link(link)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_watch_link_round_trips_through_the_parser() -> None:
    for base in ("ws://127.0.0.1:8000/v1/stream", "http://127.0.0.1:8000", "127.0.0.1:8000"):
        link = watch_link(base, "id+/=&x", "tok en", token="a&b")
        assert link.startswith("http://127.0.0.1:8000/?watch=")
        assert parse_watch_link(link) == ("ws://127.0.0.1:8000/v1/stream", "id+/=&x", "tok en", "a&b")
    assert watch_link("wss://h:443/v1/stream", "s", "w").startswith("https://h:443/?")


# ---- the bounded buffer ------------------------------------------------------------------------
def watched(step: int, dropped: int = 0) -> WatchedStep:
    return WatchedStep(step, [], 0.0, TIMING, dropped=dropped)


async def drain(buffer: WatchBuffer) -> list[WatchedStep]:
    return [item async for item in _iterate(buffer)]


async def _iterate(buffer: WatchBuffer) -> AsyncIterator[WatchedStep]:
    while True:
        try:
            yield await buffer.get()
        except StopAsyncIteration:
            return


async def test_watch_buffer_drops_the_oldest_whole_steps_and_reports_them() -> None:
    buffer = WatchBuffer(3)
    for k in range(5):
        buffer.put(watched(k))
    for k in (7, 8, 9, 10):  # the server dropped steps 5 and 6 before step 7
        buffer.put(watched(k, dropped=2 if k == 7 else 0))
    assert len(buffer) == 3 and buffer.dropped == 6  # steps 0..4 and 7, whole
    first = await buffer.get()
    assert (first.step, first.dropped) == (8, 8)  # every step before it: 6 here, 2 at the server
    buffer.put(watched(11))
    buffer.close()
    buffer.put(watched(12))  # ignored once closed
    rest = await drain(buffer)
    assert [(w.step, w.dropped) for w in rest] == [(9, 0), (10, 0), (11, 0)]
    with pytest.raises(StopAsyncIteration):
        await buffer.get()
    with pytest.raises(ValueError, match="at least one step"):
        WatchBuffer(0)


async def test_watch_buffer_waits_then_raises_the_closing_error_after_the_steps() -> None:
    buffer = WatchBuffer(2)
    getter = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    buffer.put(watched(0))
    assert (await asyncio.wait_for(getter, 1)).step == 0
    buffer.put(watched(1))
    buffer.close(ConnectionClosedError(1011, "bye"))
    buffer.close()  # only the first close counts
    assert (await buffer.get()).step == 1
    for _ in range(2):
        with pytest.raises(ConnectionClosedError, match="1011"):
            await buffer.get()


# ---- against a stub server ---------------------------------------------------------------------
WATCHING = WatchingMessage(
    session_id="stub", pipeline="stub", width=2, height=2, frames_per_step=2, fps=10.0,
    codec="raw", next_step=0, watchers=1,
)  # fmt: skip
STUB_STEPS = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (7, 2), (8, 0), (9, 0), (10, 0), (11, 0)]
"""(step, dropped by the server before it) sent by the stub: it skipped steps 5 and 6."""

Finish = Callable[[ServerConnection], Awaitable[None]]


def stub_frames(step: int, frames: int = 2) -> list[bytes]:
    return [
        FrameHeader(Codec.RAW, step, i, frames, 2, 2).pack() + bytes([step, i] * 6) for i in range(frames)
    ]


def stub_step_done(step: int, dropped: int, frames: int = 2) -> str:
    done = {"type": "step_done", "step": step, "frames": frames, "client_ts": None}
    extra = {"watchers": 1, "dropped": dropped, "behind_ms": 0.5}
    return json.dumps({**done, "timing": TIMING.model_dump(), **extra})


async def end_normally(ws: ServerConnection) -> None:
    await ws.send(json.dumps({"type": "ended"}))
    await ws.close(1000, "session ended")


async def close_1011(ws: ServerConnection) -> None:
    await ws.close(1011, "stub failed")


async def short_step(ws: ServerConnection) -> None:
    await ws.send(stub_frames(99)[0])
    await ws.send(stub_step_done(99, 0))  # says 2 frames, sent 1


async def stub_server(finish: Finish) -> AsyncIterator[str]:
    """A server that answers ``watch`` of ("stub", "wt") with all of STUB_STEPS at once, then
    ``finish``es; any other watch gets unknown_session."""

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] != "watch" or msg["watch_token"] != "wt":
                error = {"type": "error", "code": "unknown_session", "message": "no", "fatal": False}
                await ws.send(json.dumps(error))
                continue
            await ws.send(WATCHING.model_dump_json())
            for step, dropped in STUB_STEPS:
                for frame in stub_frames(step):
                    await ws.send(frame)
                await ws.send(stub_step_done(step, dropped))
            await finish(ws)
            return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/stream"


async def wait_closed(client: AsyncStreamClient) -> None:
    for _ in range(500):
        if not client.connected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stub did not close the connection")


async def test_slow_watch_reader_keeps_the_newest_steps_and_counts_the_rest() -> None:
    async for url in stub_server(end_normally):
        client = AsyncStreamClient(url)
        with pytest.raises(StreamError) as info:
            await client.watch("stub", "wrong")
        assert info.value.error_code is ErrorCode.UNKNOWN_SESSION and not info.value.fatal
        assert client.connected and client.watching is None
        stream = await client.watch("stub", "wt", buffer_steps=3)
        assert stream.watching == client.watching == WATCHING
        with pytest.raises(NotConnectedError, match="read-only"):
            await client.step(None)
        await wait_closed(client)  # everything arrived while nobody read
        got = [w async for w in stream]
        assert [(w.step, w.dropped) for w in got] == [(9, 9), (10, 0), (11, 0)]
        assert stream.buffer.dropped == 7 and client.close_code == 1000
        assert got[0].array().shape == (2, 2, 2, 3) and got[0].frames[1][0, 0, 0] == 9
        assert got[0].behind_ms == 0.5 and got[0].watchers == 1 and got[0].nbytes == 24
        await client.close()


@pytest.mark.parametrize(
    ("finish", "error", "match"),
    [(close_1011, ConnectionClosedError, "1011"), (short_step, ProtocolViolation, "2 frames, received 1")],
)
async def test_watch_failures_raise_after_the_steps_received(
    finish: Finish, error: type[Exception], match: str
) -> None:
    async for url in stub_server(finish):
        client = AsyncStreamClient(url)
        stream = await client.watch("stub", "wt", buffer_steps=len(STUB_STEPS))
        seen = []
        with pytest.raises(error, match=match):
            async for w in stream:
                seen.append(w.step)
        assert seen == [step for step, _ in STUB_STEPS]
        await client.close()


# ---- against a real server ---------------------------------------------------------------------
MAX_WATCHERS = 2


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        codec="raw", max_watchers=MAX_WATCHERS, pipeline_overrides={"generate_ms": 2}
    )


async def collect(stream: AsyncIterator[WatchedStep], into: list[WatchedStep]) -> None:
    async for w in stream:
        into.append(w)


async def test_watcher_sees_the_players_frames_bit_exact(server: RunningServer) -> None:
    async with AsyncStreamClient(server.ws_url) as player:
        ready = await player.start(seed=21, codec="raw")
        assert ready.watch_token and player.watch_token == ready.watch_token != ready.resume_token
        for k in range(2):
            await player.step({"x": k, "y": 1})
        watcher = AsyncStreamClient(server.ws_url)
        stream = await watcher.watch(ready.session_id, ready.watch_token)
        w = stream.watching
        assert (w.session_id, w.pipeline, w.codec, w.next_step, w.watchers) == (
            ready.session_id, ready.pipeline, "raw", 2, 1,
        )  # fmt: skip
        assert (w.width, w.height, w.frames_per_step, w.fps) == (
            ready.width, ready.height, ready.frames_per_step, ready.fps,
        )  # fmt: skip
        seen: list[WatchedStep] = []
        reader = asyncio.create_task(collect(stream, seen))
        actions = [{"x": -k, "y": k % 3} for k in range(2, 10)]
        played: list[StepResult] = [r async for r in player.run(actions)]
        await player.end()
        await asyncio.wait_for(reader, 15)  # the session ended: the iteration ends, no error
    assert [s.step for s in seen] == list(range(2, 10)) and all(s.dropped == 0 for s in seen)
    for mine, theirs in zip(seen, played, strict=True):
        assert [p.payload for p in mine.packets] == [p.payload for p in theirs.packets]
        assert [p.header for p in mine.packets] == [p.header for p in theirs.packets]
        np.testing.assert_array_equal(mine.array(), expected_frames(21, theirs.step, theirs.action))
        assert mine.timing == theirs.timing and mine.watchers == 1 and mine.behind_ms >= 0
    assert watcher.close_code == 1000 and not watcher.connected
    await watcher.close()


async def test_watcher_cannot_act_and_can_stop_watching(server: RunningServer) -> None:
    async with AsyncStreamClient(server.ws_url) as player:
        ready = await player.start(seed=3)
        async with await StreamClient.connect(server.ws_url) as raw:
            await raw.send(
                {"type": "watch", "session_id": ready.session_id, "watch_token": ready.watch_token}
            )
            assert (await raw.recv_json())["type"] == "watching"
            await raw.send_step(0, None)
            assert (await raw.expect_error("not_controller"))["fatal"] is False
            for message in ({"type": "start"}, {"type": "resume", "session_id": "x", "resume_token": "y"}):
                await raw.send(message)
                await raw.expect_error("not_controller")
            await raw.send(
                {"type": "watch", "session_id": ready.session_id, "watch_token": ready.watch_token}
            )
            await raw.expect_error("already_started")
            await raw.send({"type": "ping", "t": 5})
            assert await raw.recv_json() == {"type": "pong", "t": 5}
            result = await player.step({"x": 1, "y": 0})  # the watcher's step changed nothing
            assert result.step == 0
            watched = await raw.collect_step()
            assert watched.step == 0 and watched.payloads == [p.payload for p in result.packets]
            await raw.send({"type": "end"})
            assert (await raw.recv_json())["type"] == "ended"
            assert await raw.expect_close() == 1000
        assert (await player.step(None)).step == 1  # stopping to watch does not end the session


async def test_watch_refusals_raise_stream_errors(server: RunningServer) -> None:
    async with AsyncStreamClient(server.ws_url) as player:
        ready = await player.start(seed=4)
        assert ready.watch_token is not None
        client = AsyncStreamClient(server.ws_url)
        for sid, token in ((ready.session_id, "wrong"), ("no-such-session", ready.watch_token)):
            with pytest.raises(StreamError) as info:
                await client.watch(sid, token)
            assert info.value.error_code is ErrorCode.UNKNOWN_SESSION and not info.value.fatal
        with pytest.raises(StreamError) as info:  # a player's connection cannot watch
            await player.watch(ready.session_id, ready.watch_token)
        assert info.value.error_code is ErrorCode.ALREADY_STARTED
        others = [AsyncStreamClient(server.ws_url) for _ in range(MAX_WATCHERS)]
        for other in others:  # fill the session's watcher slots
            await other.watch(ready.session_id, ready.watch_token)
        with pytest.raises(StreamError) as info:  # the same connection, still usable
            await client.watch(ready.session_id, ready.watch_token)
        assert info.value.error_code is ErrorCode.OVERLOADED and not info.value.fatal
        with pytest.raises(StreamError) as info:
            await others[0].watch(ready.session_id, ready.watch_token)
        assert info.value.error_code is ErrorCode.ALREADY_STARTED
        await others[0].close()
        for _ in range(100):  # the server notices the close: a slot frees up
            try:
                await client.watch(ready.session_id, ready.watch_token)
                break
            except StreamError:
                await asyncio.sleep(0.05)
        assert client.watching is not None and client.watching.watchers == MAX_WATCHERS
        for c in (client, *others):
            await c.close()


async def test_watch_ends_when_the_player_ends(server: RunningServer) -> None:
    async with AsyncStreamClient(server.ws_url) as player:
        ready = await player.start(seed=5)
        assert ready.watch_token is not None
        watcher, quitter = AsyncStreamClient(server.ws_url), AsyncStreamClient(server.ws_url)
        stream = await watcher.watch(ready.session_id, ready.watch_token)
        quitting = await quitter.watch(ready.session_id, ready.watch_token)
        await player.step(None)
        first = await asyncio.wait_for(stream.__anext__(), 10)
        assert first.step == 0 and first.watchers == 2
        assert (await asyncio.wait_for(quitting.__anext__(), 10)).step == 0
        await quitter.end()  # stops watching: its stream ends, the session goes on
        assert [w.step async for w in quitting] == [] and quitter.close_code == 1000
        assert (await player.step(None)).step == 1
        assert (await asyncio.wait_for(stream.__anext__(), 10)).watchers == 1
        await player.end()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 10)
        assert watcher.close_code == 1000
        await watcher.close()


# ---- dreamstream watch -------------------------------------------------------------------------
async def play_until(player: AsyncStreamClient, done: asyncio.Future[Any], limit: int = 400) -> int:
    """Step (lock-step, a little paced) until ``done`` or ``limit`` steps; returns the count."""
    k = 0
    while not done.done() and k < limit:
        await player.step({"x": 1, "y": k % 2})
        await asyncio.sleep(0.01)
        k += 1
    return k


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
async def test_watch_cli_writes_a_video_of_the_steps_watched(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    out_file = tmp_path / f"x{suffix}"
    async with AsyncStreamClient(server.ws_url) as player:
        ready = await player.start(seed=6)
        assert ready.watch_token is not None
        link = watch_link(server.ws_url, ready.session_id, ready.watch_token)
        args = ["watch", link, "--steps", "3", "--out", str(out_file), "--scale", "2"]
        cli = asyncio.ensure_future(asyncio.to_thread(dreamstream_main, args))
        played = await play_until(player, cli)
        assert await asyncio.wait_for(cli, 20) == 0
    assert played < 400
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        f"watched 3 steps (3 frames) of session {ready.session_id} (synthetic 64x64, raw)"
    )
    assert " 0 dropped, " in out[0] and "frames/s" in out[0] and "ms behind the player" in out[0]
    assert out[1] == f"  wrote {out_file}"
    if suffix == ".gif":
        with Image.open(out_file) as image:
            assert image.n_frames == 3 and image.size == (128, 128)  # type: ignore[attr-defined]
    else:
        import imageio_ffmpeg

        assert imageio_ffmpeg.count_frames_and_secs(str(out_file))[0] == 3


def test_watch_cli_errors_are_one_line_with_exit_codes(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gif = str(tmp_path / "w.gif")
    bad = [
        ([], "give a watch link, or --session-id and --watch-token"),
        (["http://h:1/?watch=a", "--out", gif], "no 'wt' parameter"),
        (["http://h:1/?watch=a&wt=b", "--session-id", "a"], "not both"),
        (["--session-id", "a", "--watch-token", "b", "--out", "w.png"], "--out must end in .gif or .mp4"),
        (["http://h:1/?watch=a&wt=b", "--steps", "0"], "--steps must be >= 1"),
    ]
    for argv, message in bad:
        assert watch_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dreamstream watch: ") and err.count("\n") == 1 and message in err, err
    link = watch_link(server.ws_url, "no-such-session", "nope")
    assert watch_main([link, "--out", gif]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown_session" in err and "Traceback" not in err
    assert watch_main(["--url", "127.0.0.1:9", "--session-id", "a", "--watch-token", "b", "--out", gif]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert not Path(gif).exists()


def test_watch_help_is_plain_text_and_shows_real_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_info:
        dreamstream_main(["watch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dreamstream watch ") and not RST_MARKUP.search(text)
    blocks = option_blocks(text)
    for action in options(build_parser()):
        help_text = action.help or ""
        assert len(help_text) > 8 and not RST_MARKUP.search(help_text), action.option_strings
        words = help_text.replace("default %(default)s", "")
        for mention in re.finditer("default", words):
            assert DESCRIBED_DEFAULT.match(words, mention.start()), (action.option_strings, help_text)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"default {action.default}" in blocks[action.option_strings[0]]
    dreamstream_main(["--help"])
    assert "  watch " in capsys.readouterr().out
