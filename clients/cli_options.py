"""Command-line options shared by ``dreamstream play`` and ``dreamstream loadtest``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from protocol import CODEC_NAMES, DEFAULT_URL


def add_server_options(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token``: where the server is and how to authenticate."""
    p.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="stream endpoint or host:port (default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("DREAMSTREAM_TOKEN"),
        help="server auth token (default: $DREAMSTREAM_TOKEN)",
    )


def add_session_options(p: argparse.ArgumentParser) -> None:
    """``--pipeline``, ``--codec``, ``--quality``, ``--options``: what each session starts with."""
    p.add_argument("--pipeline", default=None, help="pipeline name to request (default: the server's)")
    p.add_argument(
        "--codec", choices=CODEC_NAMES, default=None, help="frame codec to request (default: the server's)"
    )
    p.add_argument("--quality", type=int, default=None, help="JPEG quality 1..100 (default: the server's)")
    p.add_argument(
        "--options",
        default=None,
        help="start options as a JSON object, e.g. '{\"world_seed\": 3}' (default: the pipeline's)",
    )


def parse_options(text: str | None) -> dict[str, Any] | None:
    """The ``--options`` value: a JSON object, or ``None`` when not given.

    Raises ``ValueError`` (``json.JSONDecodeError`` is one) saying what was expected.
    """
    options = json.loads(text) if text else None
    if options is not None and not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    return options


def show_progress(no_progress: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: not asked off (``--no-progress``) and ``stream`` (default
    ``sys.stderr``) is a terminal, so logs, pipes and CI output carry no bar redraws."""
    if no_progress:
        return False
    out = sys.stderr if stream is None else stream
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
