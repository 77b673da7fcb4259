"""Files written whole or not at all: write to a temporary name, flush to disk, then rename into place."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_file(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then move the finished (flushed) file into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place: its files are flushed to disk first, the old folder is moved aside
    under a name of its own and removed only after the swap (`training.checkpoint.recover_dir` mends a crash between the two renames of a checkpoint)."""
    sync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    _sync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def sync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk (a rename must not outrun its data)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(root))


def _sync_dir(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder inside output.dir (None if it can): one plain path component."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}: it names output.dir itself or the folder above it, not a run folder inside output.dir"
    seps = {os.sep, "/", "\\"} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps) or os.path.isabs(name) or Path(name).drive:
        return "holds a path separator; a run name is one folder name inside output.dir (set output.dir for where)"
    if "\0" in name:
        return "holds a NUL character"
    return None
