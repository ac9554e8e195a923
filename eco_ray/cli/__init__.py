"""The ``eco-ray`` command line: a parser (eco_ray/cli/parser.py), one thin function per command
(eco_ray/cli/commands.py) and the text reports (eco_ray/cli/format.py). Every EcoRayError a command raises is
one line on stderr and exit status 2."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from eco_ray.cli.parser import build_parser
    from eco_ray.errors import EcoRayError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EcoRayError as e:
        print(f"eco-ray: error: {e}", file=sys.stderr)
        return 2
