"""Entry point of the ``vicifast-agent`` command: parse arguments and dispatch; no logic here
beyond reporting usage errors and interrupts the one way (``agent.cli_contract``)."""

from __future__ import annotations

import sys

from agent.cli import build_parser
from agent.cli_contract import Exit, UsageError, report


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    json_output = "--json" in words
    parser = build_parser()
    try:
        args = parser.parse_args(words)
    except UsageError as exc:
        if not json_output:
            sys.stderr.write(exc.usage)
        return report(exc.failure(), json_output=json_output)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return Exit.USAGE
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
