"""``dreamstream`` command line: ``serve``, ``rollout``, ``replay``, ``play``, ``watch``, ``loadtest``.

Each subcommand lives with the part it belongs to; this module only dispatches. Imports are lazy,
so ``dreamstream play`` does not load torch, and a command whose extra is not installed says how
to install it in one line instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

OWN_PACKAGES = frozenset({"protocol", "pipeline", "server", "clients", "dreamstream"})
"""Top-level packages of this distribution (a missing one of these is a bug, not an extra)."""


@dataclass(frozen=True)
class Command:
    module: str
    """Module with ``main(argv) -> int``."""
    help: str
    extra: str | None = None
    """Install extra the command needs beyond the base install (``None``: base is enough)."""


COMMANDS: dict[str, Command] = {
    "serve": Command("server.serve", "Run the WebSocket inference server", extra="server"),
    "rollout": Command(
        "dreamstream.rollout", "Run a pipeline in-process and save its frames (no server)", extra="server"
    ),
    "replay": Command(
        "dreamstream.replay", "Re-render a recorded session in-process (no server)", extra="server"
    ),
    "play": Command("clients.play", "Headless client: run N steps against a server and save a video"),
    "watch": Command("clients.watch", "Watch a session read-only from its watch link and save a video"),
    "loadtest": Command("clients.loadtest.cli", "Many concurrent sessions with SLO metrics"),
}


def _usage() -> str:
    lines = ["usage: dreamstream <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run 'dreamstream <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"dreamstream: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(command.module).main(rest) or 0)
    except ModuleNotFoundError as exc:  # at import, or a lazy import inside the command
        missing = (exc.name or "").partition(".")[0]
        if command.extra is None or not missing or missing in OWN_PACKAGES:
            raise
        print(
            f"dreamstream {name}: needs {missing!r}, which is not installed: "
            f"pip install 'dreamstream[{command.extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
