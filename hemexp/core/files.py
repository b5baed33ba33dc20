"""Small shared helpers: atomic writes, JSON, logging, seeding.

Every product is written to a temporary sibling and renamed into place, so a killed job never leaves
a half-written file that Snakemake (or a person) would mistake for a finished one.

A temporary sibling is named ``.<stem>.<host>-<pid>-<random>.tmp<suffix>`` (a folder:
``.<name>.<host>-<pid>-<random>.tmp``). A job killed with SIGKILL cannot remove its temporaries, so
the next write of the *same product* removes the stale ones (:func:`remove_stale_temps`): those whose
writer is gone (same host, that process no longer alive) and, for names without a live writer to ask
(another host, an older naming), only those last modified before the running job started. Another
product's temporaries never match, and a live writer's are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Temporary names: the writer (host + pid) is part of the name, so a later job can tell a dead
# writer's leftovers from a live one's. mkstemp/mkdtemp append 8 characters of [a-z0-9_].
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMP_WRITER = r"(?:(?P<host>[^./]+)-(?P<pid>\d+)-)?[a-z0-9_]+"
STALE_GRACE_S = 2.0  # a temp without a checkable writer must be older than our start by this much


def _process_start() -> float:
    """This process's start time (epoch seconds): /proc on Linux, else the time this module loaded."""
    loaded = time.time()
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return min(loaded, btime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return loaded


PROCESS_START = _process_start()


def _temp_prefix(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}-"


def temp_pattern(final: str | Path, is_dir: bool = False) -> re.Pattern[str]:
    """Regex of the temporary siblings :func:`atomic_path` (or :func:`atomic_dir`) makes for ``final``."""
    final = Path(final)
    if is_dir:
        return re.compile(rf"^\.{re.escape(final.name)}\.{_TEMP_WRITER}\.tmp$")
    suffix = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return re.compile(rf"^\.{re.escape(stem)}\.{_TEMP_WRITER}\.tmp{re.escape(suffix)}$")


ANY_TEMP = re.compile(rf"^\..+\.{_TEMP_WRITER}\.tmp(\.[^/]*)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _pid_started_before(pid: int, mtime: float) -> bool:
    """Whether process ``pid`` (alive) started before ``mtime``: it may be the temp's writer."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return True  # cannot tell: assume it is the writer
    return btime + ticks / os.sysconf("SC_CLK_TCK") <= mtime + 1.0


def is_stale_temp(path: Path, match: re.Match[str]) -> bool:
    """A temporary whose writer is certainly gone (see the module docstring)."""
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    host, pid = match.group("host"), match.group("pid")
    if host == _HOST and pid is not None:
        pid = int(pid)
        if pid == os.getpid():
            return False
        return not (_pid_alive(pid) and _pid_started_before(pid, mtime))
    return mtime < PROCESS_START - STALE_GRACE_S


def remove_stale_temps(folder: str | Path, pattern: re.Pattern[str] = ANY_TEMP) -> list[Path]:
    """Remove the stale temporaries in ``folder`` whose names match ``pattern``; returns them."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not is_stale_temp(Path(entry.path), match):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it into place, on error remove it.

    The temporary name keeps the final suffix (``.x.<host>-<pid>-<rand>.tmp.nii.gz``) so writers that
    infer the format from the extension (nibabel, SimpleITK, matplotlib) still do the right thing.
    Stale temporaries of the same product (left by a killed job) are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, temp_pattern(final))
    suffix = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(stem), suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A scratch folder ``parent/.<name>.<host>-<pid>-<rand>.tmp``, removed on exit (stale ones of the
    same name are removed first): scratch space under results that a killed job does not leak."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parent, temp_pattern(parent / name, is_dir=True))
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory of outputs: build in a temp dir, then swap it in.

    The old folder is first renamed to a temporary name, so a kill between the two renames leaves the
    product missing (rebuilt by the next run), never half old and half new; stale temporaries of the
    same product are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, temp_pattern(final, is_dir=True))
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
            final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Write a matplotlib figure atomically and release it (figures pile up in long jobs otherwise)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    plt.close(fig)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Any) -> None:
    """Atomic, pretty, numpy-aware JSON write."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


