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
from pathlib import Path
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
        # One write of the whole line: print() writes the text and its newline separately, and the lines of processes
        # refusing at the same moment then interleave ("...in the YAMLerror: launched as 2...", seen in a 2-process run).
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        # Leave torch.distributed's group before exiting: a process that exits with its gloo group alive races the
        # peers' exits in gloo's threads and can abort (status -6, "terminate called") instead of exiting 2.
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()
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


class OutputFolderNotEmptyError(FileExistsError, ValueError):
    """An output folder holding what a command would replace (a user error: both an OSError and a ValueError)."""


def check_output_dir(
    folder: str | os.PathLike,
    overwrite: bool,
    held: Callable[[Path], Sequence[str]],
    what: str,
    flag: str = "--output_dir",
    overwrite_flag: str | None = "--overwrite (overwrite=True)",
    hint: str | Callable[[], str] = "",
) -> Path:
    """The one guard of every command's output folder: never a file, nor over what it holds (`held(folder)`: what
    the command would replace; `what` describes it, with `{names}` and their count `{n}`) unless `overwrite` is on
    and an `overwrite_flag` allows it. `hint`: another way out, ending in ", " (a callable: called only on refusal)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder} is a file, not a folder; give a folder ({flag})")
    names = list(held(folder)) if folder.is_dir() else []
    if names and not (overwrite and overwrite_flag):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        replace = f"pass {overwrite_flag} to replace it, " if overwrite_flag else ""
        ways = f"{hint() if callable(hint) else hint}{replace}"
        raise OutputFolderNotEmptyError(
            f"{flag} {folder} already holds {what.format(n=len(names), names=shown)}; {ways}{'or ' if ways else ''}"
            f"choose another {flag}"
        )
    return folder


__all__ = ["USER_ERRORS", "OutputFolderNotEmptyError", "check_output_dir", "fraction", "positive_int", "run_command"]
