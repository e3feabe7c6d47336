"""``dreamstream`` command line: ``serve``, ``rollout``, ``play``, ``loadtest``.

Each subcommand lives with the part it belongs to; this module only dispatches (imports are lazy,
so ``dreamstream play`` does not load torch).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.serve", "Run the WebSocket inference server"),
    "rollout": ("pipeline.rollout", "Run a pipeline in-process and save its frames (no server)"),
    "play": ("clients.play", "Headless client: run N steps against a server and save a video"),
    "loadtest": ("clients.loadtest.cli", "Many concurrent sessions with SLO metrics"),
}


def _usage() -> str:
    lines = ["usage: dreamstream <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'dreamstream <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"dreamstream: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
