"""The browser demo (clients/web) in a real headless Chromium, driven by Playwright.

Uses Debian's ``/usr/bin/chromium`` through ``executable_path`` (never a Playwright browser
download). Skipped with the reason when chromium or playwright is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.process import ServerProcess
from tests.conftest import RunningServer, ServerFactory

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DREAMSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(
        f"Debian chromium not found at {CHROMIUM} (apt-get install -y chromium; or set DREAMSTREAM_CHROMIUM)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(codec="jpeg", pipeline_overrides={"generate_ms": 1})


@contextlib.contextmanager
def open_page(browser: Any) -> Iterator[Any]:
    """A page in a fresh browser context (a person of its own); no uncaught page errors allowed."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with open_page(browser) as pg:
        yield pg


@pytest.fixture
def watcher_page(browser: Any) -> Iterator[Any]:
    """A second person's page, in the same browser."""
    with open_page(browser) as pg:
        yield pg


def canvas_signature(page: Any) -> list[int]:
    """Sum of each colour channel of the canvas pixels."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('screen');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const s = [0, 0, 0];
            for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i+1]; s[2] += d[i+2]; }
            return s;
        }"""
    )


def wait_frames(page: Any, at_least: int, timeout_ms: int = 20_000) -> None:
    page.wait_for_function(
        f"window.dreamstream && window.dreamstream.counters.framesDrawn >= {at_least}",
        timeout=timeout_ms,
    )


def test_page_connects_and_canvas_changes(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.base_url}/?seed=3")
    wait_frames(page, 3)
    assert page.evaluate("window.dreamstream.connection") == "ready"
    assert page.evaluate("window.dreamstream.ready.pipeline") == "synthetic"
    first = canvas_signature(page)
    drawn = page.evaluate("window.dreamstream.counters.framesDrawn")
    wait_frames(page, drawn + 5)
    assert canvas_signature(page) != first, "canvas pixels did not change between frames"
    overlay = page.inner_text("#overlay")
    assert "ms" in overlay and "/ 30" in overlay  # latency and fps of a 30 fps stream
    assert page.evaluate("window.dreamstream.ttffMs") > 0
    assert page.is_hidden("#error")


def test_key_press_changes_the_action_sent(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.base_url}/?seed=4")
    wait_frames(page, 2)
    assert page.evaluate("window.dreamstream.lastAction") == {"x": 0, "y": 0}
    page.keyboard.press("ArrowRight")
    page.keyboard.press("d")
    page.keyboard.press("w")
    page.wait_for_function(
        "JSON.stringify(window.dreamstream.lastAction) === JSON.stringify({x: 2, y: -1})",
        timeout=10_000,
    )
    page.click("button[data-action='down']")  # on-screen buttons do the same
    page.wait_for_function("window.dreamstream.lastAction.y === 0", timeout=10_000)


def test_dropped_connection_resumes(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.base_url}/?seed=5")
    wait_frames(page, 3)
    session = page.evaluate("window.dreamstream.sessionId")
    page.evaluate("window.dreamstream.debugDrop()")
    page.wait_for_function("window.dreamstream.counters.resumes >= 1", timeout=15_000)
    assert page.evaluate("window.dreamstream.sessionId") == session
    drawn = page.evaluate("window.dreamstream.counters.framesDrawn")
    wait_frames(page, drawn + 3)
    assert page.evaluate("window.dreamstream.connection") == "ready"


def test_server_error_is_shown_and_start_options_are_sent(page: Any, server: RunningServer) -> None:
    """Start options come from the options schema (and the URL); a fatal error lands in #error."""
    page.goto(f"{server.base_url}/?seed=2&fail_at_step=3")
    assert page.input_value("#opt-fail_at_step") == "3"
    page.wait_for_selector("#error", state="visible", timeout=15_000)
    assert "internal" in page.inner_text("#error")
    assert page.evaluate("window.dreamstream.lastError.code") == "internal"
    assert page.evaluate("window.dreamstream.counters.stepsDone") == 3
    page.wait_for_function("window.dreamstream.connection === 'error'", timeout=10_000)


def test_stopped_server_is_reported(page: Any, server_factory: ServerFactory) -> None:
    srv = server_factory(codec="jpeg")
    page.goto(f"{srv.base_url}/?seed=6")
    wait_frames(page, 2)
    srv.terminate()
    page.wait_for_selector("#error", state="visible", timeout=15_000)
    text = page.inner_text("#error")
    assert "shutting_down" in text or "connection" in text, text
    deadline = time.monotonic() + 10
    while page.evaluate("window.dreamstream.connection") == "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.evaluate("window.dreamstream.connection") in {"reconnecting", "error", "closed"}


def test_restarted_server_gets_a_new_session(page: Any, tmp_path: Path) -> None:
    """The page keeps retrying; a restarted server no longer knows the session, so it starts anew."""
    env = {"DREAMSTREAM_TORCH_THREADS": "1", "DREAMSTREAM_CODEC": "jpeg"}
    first = ServerProcess(["--pipeline", "synthetic"], env=env, log_path=tmp_path / "a.log").start()
    try:
        page.goto(f"{first.base_url}/?seed=8")
        wait_frames(page, 2)
        old_session = page.evaluate("window.dreamstream.sessionId")
    finally:
        first.stop()
    page.wait_for_function("window.dreamstream.counters.reconnects >= 1", timeout=15_000)
    with ServerProcess(["--pipeline", "synthetic"], port=first.port, env=env, log_path=tmp_path / "b.log"):
        page.wait_for_function("window.dreamstream.counters.restarts >= 1", timeout=40_000)
        drawn = page.evaluate("window.dreamstream.counters.framesDrawn")
        wait_frames(page, drawn + 3)
        assert page.evaluate("window.dreamstream.connection") == "ready"
        assert page.evaluate("window.dreamstream.sessionId") != old_session


MOVE_SCHEMA = {
    "$defs": {
        "Move": {
            "enum": ["none", "up", "down", "left", "right", "up_left", "up_right", "down_left", "down_right"],
            "type": "string",
        }
    },
    "properties": {"move": {"$ref": "#/$defs/Move", "default": "none"}},
    "title": "TinyWorldAction",
    "type": "object",
}


def test_enum_action_schema_builds_a_pad_and_maps_keys(page: Any, server: RunningServer) -> None:
    """Controls come from the schema: an enum of moves gets a button pad and WASD/arrow keys."""
    info = {"pipeline": "tiny-world", "stream": {"width": 64, "height": 64}, "action_schema": MOVE_SCHEMA}
    page.route("**/v1/info", lambda route: route.fulfill(json=info))
    page.goto(f"{server.base_url}/?autostart=0")
    page.wait_for_selector("button[data-action='up_left']")
    assert page.locator("#actions button").count() == 9
    action = "window.dreamstream.currentAction()"
    assert page.evaluate(action) == {"move": "none"}
    page.keyboard.down("w")
    assert page.evaluate(action) == {"move": "up"}
    page.keyboard.down("ArrowLeft")
    assert page.evaluate(action) == {"move": "up_left"}
    page.keyboard.up("w")
    assert page.evaluate(action) == {"move": "left"}
    page.keyboard.up("ArrowLeft")
    page.keyboard.down("s")
    assert page.evaluate(action) == {"move": "down"}
    page.keyboard.up("s")
    box = page.locator("button[data-action='right']").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    assert page.evaluate(action) == {"move": "right"}
    assert "active" in (page.get_attribute("button[data-action='right']", "class") or "")
    page.mouse.up()


IDLE_PSNR_FLOOR_DB = 30.0
"""The demo's idle world must look still: canvas PSNR between an early and a later idle frame."""


def canvas_psnr_to_snapshot(page: Any) -> float:
    """PSNR (dB) of the canvas now against ``window.__snapshot`` (taken by :func:`snapshot_canvas`)."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('screen');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const s = window.__snapshot;
            let se = 0, n = 0;
            for (let i = 0; i < d.length; i += 4) {
                for (let k = 0; k < 3; k++) { const e = d[i + k] - s[i + k]; se += e * e; n++; }
            }
            return se === 0 ? 99 : 10 * Math.log10(255 * 255 / (se / n));
        }"""
    )


def snapshot_canvas(page: Any) -> None:
    page.evaluate(
        """() => {
            const c = document.getElementById('screen');
            window.__snapshot = c.getContext('2d').getImageData(0, 0, c.width, c.height).data.slice();
        }"""
    )


def test_tiny_world_controls_from_schema(page: Any, server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline="tiny-world", codec="jpeg", ready_timeout_s=180)
    page.goto(f"{srv.base_url}/?seed=1")
    wait_frames(page, 2, timeout_ms=60_000)
    # The demo starts idle (`none`): the world holds still rather than melting (issue #16).
    snapshot_canvas(page)
    wait_frames(page, 40, timeout_ms=60_000)
    assert page.evaluate("window.dreamstream.lastAction.move") == "none"
    idle_psnr = canvas_psnr_to_snapshot(page)
    assert idle_psnr >= IDLE_PSNR_FLOOR_DB, f"idle frames 2 -> 40 differ: {idle_psnr:.1f} dB"
    assert page.locator("button[data-action='up']").count() == 1
    page.keyboard.down("a")
    page.wait_for_function("window.dreamstream.lastAction.move === 'left'", timeout=10_000)
    page.keyboard.up("a")
    page.wait_for_function("window.dreamstream.lastAction.move !== 'left'", timeout=10_000)


def test_share_link_shows_the_session_read_only(page: Any, watcher_page: Any, server: RunningServer) -> None:
    """The player's Share yields a watch link; opened elsewhere it streams the session read-only with its
    own stats, the player sees the viewer, and the watcher learns when the player ends the session."""
    page.goto(f"{server.base_url}/?seed=9")
    wait_frames(page, 2)
    assert page.is_hidden("#share-box")
    page.click("#share")
    assert page.is_visible("#share-link")
    link = page.input_value("#share-link")
    session = page.evaluate("window.dreamstream.sessionId")
    assert link.startswith(f"{server.base_url}/?watch={session}&wt="), link

    watcher_page.goto(link)
    watcher_page.wait_for_function("window.dreamstream.connection === 'watching'", timeout=15_000)
    wait_frames(watcher_page, 3)
    first = canvas_signature(watcher_page)
    drawn = watcher_page.evaluate("window.dreamstream.counters.framesDrawn")
    wait_frames(watcher_page, drawn + 5)
    assert canvas_signature(watcher_page) != first, "the watcher's canvas did not change between frames"
    watcher_page.wait_for_function(
        "document.getElementById('ov-behind').textContent.endsWith('ms')"
        " && Number(document.getElementById('ov-viewers').textContent) >= 1"
        " && document.getElementById('ov-fps').textContent.endsWith('/ 30')",
        timeout=10_000,
    )
    assert watcher_page.inner_text("#ov-dropped").isdigit()
    assert watcher_page.evaluate("window.dreamstream.watch.sessionId") == session
    assert watcher_page.is_hidden("#error")

    # read-only: nothing that acts is there or enabled, and keys send nothing
    assert watcher_page.locator("#actions button").count() == 0
    assert watcher_page.is_hidden("#start") and watcher_page.is_disabled("#start")
    enabled = watcher_page.locator("#panel button:enabled, #panel input:enabled, #panel select:enabled")
    assert enabled.count() == 0
    watcher_page.keyboard.press("ArrowRight")
    assert watcher_page.evaluate("window.dreamstream.counters.stepsSent") == 0

    page.wait_for_function("document.getElementById('ov-viewers').textContent === '1'", timeout=10_000)
    assert page.evaluate("window.dreamstream.watchers") == 1

    page.click("#stop")
    watcher_page.wait_for_function("window.dreamstream.watch.ended === true", timeout=15_000)
    assert "ended" in watcher_page.inner_text("#conn")
    assert "ended" in watcher_page.inner_text("#watch-status")
    assert watcher_page.evaluate("window.dreamstream.connection") == "ended"
    assert watcher_page.is_hidden("#error")
    assert page.is_disabled("#share") and page.is_hidden("#share-box")  # no session, nothing to share


def test_watch_link_of_an_unknown_session_shows_the_error(page: Any, server: RunningServer) -> None:
    page.goto(f"{server.base_url}/?watch=nosuchsession&wt=nosuchtoken")
    page.wait_for_selector("#error", state="visible", timeout=15_000)
    assert "unknown_session" in page.inner_text("#error")
    assert page.evaluate("window.dreamstream.connection") == "error"
    assert page.evaluate("window.dreamstream.counters.stepsSent") == 0
