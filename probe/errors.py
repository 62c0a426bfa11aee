"""One exception type for bad user input, and the CLI wrapper that turns it into exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


class BadInput(Exception):
    """Raised for anything the user can fix: a missing file, an unknown alias, an out-of-range head."""


def cli_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a CLI entry point: exit 2 with one line for BadInput, 1 for anything unexpected."""
    try:
        return main(argv)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
