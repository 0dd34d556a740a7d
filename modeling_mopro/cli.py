"""How every command of the project ends on a user error: one line on stderr naming the problem, exit status 2.

A bad flag, path, file or label set is the user's to fix, and a traceback only hides the one line that says how.
Errors of the kinds below are reported that way; every other exception is a bug and keeps its traceback.
`MOPRO_TRACEBACK=1` shows the traceback of a user error too (to report a message that is wrong).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from safetensors import SafetensorError
from yaml import YAMLError

# ValueError covers the project's own validation (configs, arguments, labels, readers); OSError covers paths
# that do not exist, are not readable, or are of the wrong kind (and a folder another run holds). The library
# errors below are only ever raised about a file the user gave: a YAML file that does not parse, a weights file
# whose header or data cannot be read. Nothing broader (no KeyError, RuntimeError, TypeError): a lookup or type
# error is a bug, and the readers turn the user-data cases of those into ValueErrors naming the input.
USER_ERRORS = (ValueError, OSError, YAMLError, SafetensorError)


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a command's `main(argv)`; a user error becomes `error: <message>` and exit status 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        if os.environ.get("MOPRO_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of neighbours, shots, runs)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (a share of the data)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


__all__ = ["USER_ERRORS", "fraction", "positive_int", "run_command"]
