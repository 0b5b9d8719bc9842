"""Entry point of the ``vicifast-agent`` command: parse arguments and dispatch; no logic here."""

from __future__ import annotations

import sys

from agent.cli import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
