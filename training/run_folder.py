"""A run owns its output folder: one advisory lock for the whole run, and checkpoints that appear whole or not at all.

Two runs started into the same empty ``--output_dir`` would both pass a start-up check ("the folder holds no run")
and then write over each other's model, results and checkpoints. So the process that writes (the main process)
takes an exclusive ``fcntl.flock`` on ``<output_dir>/.mopro-run.lock`` before its first write and keeps it until the
run ends; a second run is refused with the holder's pid. The kernel drops the lock when the process dies (also by
SIGKILL), so a crashed run never blocks the folder. Every save checks that the lock is still ours and its file still
the one in the folder (a folder removed or replaced during the run is an error, not a write into a new folder).

A checkpoint is written under a hidden staging name (``.partial-checkpoint-N``, which the Trainer's ``checkpoint-N``
pattern does not match) and renamed into place once complete: a full disk or a kill during the save leaves the
staging folder, never a ``checkpoint-N`` that cannot resume. `newest_complete_checkpoint` skips incomplete
``checkpoint-N`` folders all the same (written by older versions, or copied in part), naming them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".mopro-run.lock"
PARTIAL_PREFIX = ".partial-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class OutputFolderInUseError(OSError):
    """Another process holds the output folder's lock (a user error: one line through `modeling_mopro.cli`)."""


class _Claim:
    """An open, locked lock file of one folder (held by this process)."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self.fd = folder, fd

    def check(self) -> None:
        """Raise if the lock file was removed or replaced (the folder deleted or swapped during the run)."""
        path = self.folder / LOCK_FILE
        try:
            same = os.stat(path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise OutputFolderInUseError(
                f"--output_dir {self.folder} was removed or replaced while this run wrote into it (its lock file "
                f"{LOCK_FILE} is gone): nothing more is saved there; start again into a folder left alone."
            )


_claims: dict[str, _Claim] = {}


def claim_output_dir(folder: str | os.PathLike) -> None:
    """Take (or, when this process holds it already, check) the exclusive lock of `folder`, creating the folder.

    Raises:
        OutputFolderInUseError: Another process holds it, or the folder was replaced since this process took it.
    """
    folder = Path(folder).resolve()
    held = _claims.get(str(folder))
    if held is not None:
        held.check()
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise OutputFolderInUseError(
                f"--output_dir {folder} is in use by another run (pid {holder}): wait for it to end, or pass "
                "another --output_dir."
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _claims[str(folder)] = _Claim(folder, fd)


def release_output_dir(folder: str | os.PathLike) -> None:
    """Give up this process's lock of `folder` (the lock file stays: removing it would race with a new claimer)."""
    held = _claims.pop(str(Path(folder).resolve()), None)
    if held is not None:
        os.close(held.fd)  # closing the last descriptor releases the flock


def holds_output_dir(folder: str | os.PathLike) -> bool:
    return str(Path(folder).resolve()) in _claims


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_folders(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of `folder`, newest (largest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), reverse=True)


def newest_complete_checkpoint(folder: str | os.PathLike, check: Callable[[str], None]) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-N`` of `folder` that `check` accepts, and the reasons of the newer ones it refused
    (one line each, naming the folder)."""
    refused = []
    for candidate in checkpoint_folders(folder):
        try:
            check(str(candidate))
        except ValueError as error:
            refused.append(" ".join(str(error).split()))
            continue
        return str(candidate), refused
    return None, refused


def staging_folder(run_dir: str | os.PathLike, checkpoint_name: str) -> Path:
    """Where a checkpoint is written before it is renamed to ``run_dir/checkpoint_name``."""
    return Path(run_dir) / f"{PARTIAL_PREFIX}{checkpoint_name}"


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Rename a completely written checkpoint into place (an older folder of the same name is replaced whole)."""
    _fsync_tree(staged)
    if final.exists():
        old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync_dir(final.parent)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk, so that the rename never publishes files still in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "LOCK_FILE",
    "OutputFolderInUseError",
    "PARTIAL_PREFIX",
    "checkpoint_folders",
    "claim_output_dir",
    "holds_output_dir",
    "newest_complete_checkpoint",
    "publish_checkpoint",
    "release_output_dir",
    "staging_folder",
]
