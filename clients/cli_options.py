"""Command-line options shared by ``dreamstream play`` and ``dreamstream loadtest``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_server_options(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token``: where the server is and how to authenticate."""
    p.add_argument(
        "--url",
        default="ws://127.0.0.1:8000/v1/stream",
        help="stream endpoint or host:port (default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("DREAMSTREAM_TOKEN"),
        help="server auth token (default: $DREAMSTREAM_TOKEN)",
    )


def add_session_options(p: argparse.ArgumentParser) -> None:
    """``--pipeline``, ``--codec``, ``--quality``, ``--options``: what each session starts with."""
    p.add_argument("--pipeline", default=None, help="pipeline name to request")
    p.add_argument("--codec", choices=("jpeg", "png", "raw"), default=None)
    p.add_argument("--quality", type=int, default=None, help="JPEG quality 1..100")
    p.add_argument("--options", default=None, help="start options as a JSON object")


def parse_options(text: str | None) -> dict[str, Any] | None:
    """The ``--options`` value: a JSON object, or ``None`` when not given.

    Raises ``ValueError`` (``json.JSONDecodeError`` is one) saying what was expected.
    """
    options = json.loads(text) if text else None
    if options is not None and not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    return options
