"""Folders lmtune owns: the marker that makes a folder lmtune's, the lock a run holds for its life, and creating,
taking over and clearing them (only what lmtune made).

Every folder lmtune creates for its outputs (a run, a several-seed run, a compare, a search, an export) gets a
marker file, `.lmtune`, at creation. `overwrite` empties only a folder that holds this marker, and only what is
inside it; a folder lmtune did not make is never emptied or removed. A run (and a several-seed run, a compare)
holds an exclusive lock on its marker for its whole life, so a second process on the same folder is refused while
the first one lives, and a folder is only "left by a run that stopped before training" when nobody holds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from lmtune.errors import FolderError

log = logging.getLogger("lmtune")

MARKER = ".lmtune"


class FolderLock:
    """An exclusive lock on a folder's marker file, held until `release` (or the process ends: the system drops
    the lock of a dead process, so a crash never leaves a folder locked)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MARKER
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise FolderError(f"{self.path} is not a plain file (a link, a folder): lmtune does not use {folder}")
        # O_NOFOLLOW: a link put there after the check is refused too, never written through.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                          0o644)
        try:
            _lock(self.fd)
        except OSError:
            os.close(self.fd)
            raise FolderError(f"{folder} is in use by another lmtune process ({_holder(self.path)}); wait for it to "
                              "end or choose another output.name") from None

    def note(self, kind: str) -> None:
        """Write what the folder is and who holds it into the marker (read by those who are refused)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"kind": kind, "pid": os.getpid(),
                                       "since": f"{datetime.now():%Y-%m-%d %H:%M:%S}"}).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the lock
            self.fd = -1


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _holder(marker: Path) -> str:
    info = read_marker(marker.parent) or {}
    return f"pid {info['pid']}, since {info.get('since')}" if "pid" in info else "its lock is held"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's contents ({} while the first process is still writing it), or None for an unmarked folder (a
    marker that is a link or a folder marks nothing)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        text = marker.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def refuse_special(folder: Path) -> None:
    """The working directory, a folder above it, the home folder and the file system's root are never an output
    folder (they cannot be emptied by `overwrite`, nor replaced by an export)."""
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == cwd:
        what = "the working directory"
    elif cwd.is_relative_to(resolved):
        what = "a folder above the working directory"
    elif resolved in (Path.home().resolve(), Path(resolved.anchor)):
        what = "the home folder" if resolved == Path.home().resolve() else "the root of the file system"
    else:
        return
    raise FolderError(f"{folder} is {what}; lmtune never writes its outputs there: choose a folder of their own")


def make_parent(parent: Path) -> None:
    """Create output.dir (and the folders above it) with an error that names a file standing in the way."""
    for folder in (parent, *parent.parents):
        if folder.exists() and not folder.is_dir():
            raise FolderError(f"{folder} is a file, not a folder: output.dir ({parent}) must be a folder")
    parent.mkdir(parents=True, exist_ok=True)


def claim(folder: Path, kind: str, *, overwrite: bool = False, resume: bool = False, clear: bool = True,
          lock: bool = True) -> FolderLock | None:
    """Create `folder` for outputs of `kind` (run, seeds, compare, search), or take over one lmtune made.

    A new or empty folder is marked and (with `lock`) locked. An existing marked folder is locked first (refused
    while another process holds it); then, unless `resume`, what it holds stays only if it is just the config of a
    run that stopped before training (replaced) or `overwrite` allows replacing it (emptied when `clear`, else
    kept: a compare trains into it again). A folder holding anything without a marker is refused, except a run or
    search written before markers existed, taken over as it is by `--resume` (or a search that continues)."""
    refuse_special(folder)
    make_parent(folder.parent)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file, not a folder: choose another output.name")
    folder.mkdir(exist_ok=True)
    info = read_marker(folder)
    if info is None and any(folder.iterdir()) and not _legacy(folder, kind, resume):
        raise FolderError(f"{folder} exists and lmtune did not make it (it has no {MARKER} marker): lmtune only "
                          "writes into, and replaces, folders it made; choose another output.name (or output.dir), "
                          "or move that folder away yourself")
    if info and info.get("kind") not in (None, kind):
        raise FolderError(f"{folder} holds a {info['kind']}, not a {kind}: choose another output.name or --output")
    held = FolderLock(folder) if lock else None
    try:
        if not lock:
            (folder / MARKER).touch()
        contents = {p.name for p in folder.iterdir()} - {MARKER}
        if not resume and contents:
            if contents <= {"config.yaml"}:
                log.info("replacing %s: it holds only the config of a run that stopped before training", folder)
                empty(folder)
            elif not overwrite:
                resumable = kind == "run" and (folder / "checkpoints" / "last").is_dir() \
                    and not (folder / "model").is_dir()
                raise FolderError(f"{folder} exists; choose another output.name" + (
                    ", set output.overwrite=true, or pass --resume to continue it" if resumable
                    else " or set output.overwrite=true"))
            elif clear:
                empty(folder)
        if held is not None:
            held.note(kind)
        elif not read_marker(folder):
            (folder / MARKER).write_text(json.dumps({"kind": kind}), encoding="utf-8")
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def _legacy(folder: Path, kind: str, resume: bool) -> bool:
    """A folder of an older lmtune, without a marker, that may be continued (never emptied: overwrite needs one)."""
    if kind == "search":
        return (folder / "search.db").is_file()
    return resume and (folder / "config.yaml").is_file()


def empty(folder: Path) -> None:
    """Remove what a marked folder holds, the marker (and its lock) excepted; links are removed, never followed."""
    if read_marker(folder) is None:  # the one rule that keeps every other folder safe
        raise FolderError(f"refusing to empty {folder}: lmtune did not make it (no {MARKER} marker)")
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
