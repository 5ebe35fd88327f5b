"""How ``segment`` and ``batch`` write a store without ever destroying a good one (no zarr, no torch here).

A run on ``OUT.zarr`` never writes under that name:

- it holds an exclusive lock, :func:`output_lock` (``fcntl.flock`` on ``OUT.zarr.lock`` beside the store), so a
  second run on the same output is refused with one line instead of racing the first;
- it builds the store in the sibling ``OUT.zarr.partial`` (:func:`staging_path`), where an interrupted run is
  resumed; the store there is itself created under a temporary name (``OUT.zarr.creating-XXXX``) and renamed
  into place once it carries its histopan attributes, so a kill during creation leaves nothing that blocks a
  rerun;
- once the new store is complete it is swapped in (:func:`publish`): an old ``OUT.zarr`` (``--overwrite``) is
  renamed to ``OUT.zarr.replaced``, ``OUT.zarr.partial`` to ``OUT.zarr``, and the old one is deleted.

So ``OUT.zarr`` (and its ``tables/nuclei.parquet``) only ever holds a complete store, and a failed, killed or
disk-full ``--overwrite`` run leaves the old one untouched.  A kill between the two renames of the swap is
undone by the next run on that output (:func:`recover`, which runs under the lock), which then finds the
complete new store in ``OUT.zarr.partial`` and swaps it in.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

from histopan.errors import OutputError, StoreError

log = logging.getLogger(__name__)

__all__ = ["PARTIAL_SUFFIX", "STORE_FORMAT", "check_output_state", "creating_prefix", "lock_path", "output_lock",
           "publish", "read_histopan_attrs", "recover", "replaced_path", "staging_path"]

#: the ``format`` of a histopan store's attributes
STORE_FORMAT = "histopan-store"
PARTIAL_SUFFIX = ".partial"
_REPLACED_SUFFIX = ".replaced"
_LOCK_SUFFIX = ".lock"
_CREATING = ".creating-"


def staging_path(out: str | PathLike[str]) -> Path:
    """Where a run on ``out`` builds (and resumes) its store: ``OUT.zarr.partial``."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def replaced_path(out: str | PathLike[str]) -> Path:
    """Where the old store of an ``--overwrite`` run waits while the new one is swapped in."""
    out = Path(out)
    return out.with_name(out.name + _REPLACED_SUFFIX)


def lock_path(out: str | PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + _LOCK_SUFFIX)


def creating_prefix(path: str | PathLike[str]) -> str:
    """The name prefix of the temporary folders a store at ``path`` is created in (``tempfile.mkdtemp``)."""
    return Path(path).name + _CREATING


def read_histopan_attrs(path: str | PathLike[str]) -> dict[str, Any] | None:
    """The ``histopan`` attributes of the zarr v3 group at ``path`` read from its ``zarr.json`` (no zarr
    import), or None when there is no such file or it holds none."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"unreadable zarr.json: {exc}", path=meta,
                         fix="choose another output path, or move the folder away") from exc
    attrs = data.get("attributes", {}) if isinstance(data, dict) else {}
    value = attrs.get("histopan") if isinstance(attrs, dict) else None
    return value if isinstance(value, dict) else None


def _is_complete(path: Path) -> bool:
    attrs = read_histopan_attrs(path)
    return bool(attrs and attrs.get("complete"))


# ------------------------------------------------------------------------------------------------- lock

_held: dict[Path, list[int]] = {}  # lock file -> [descriptor, depth]: a process may re-enter its own lock
_held_guard = threading.Lock()


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file: {exc.strerror or exc}", path=path,
                              fix="choose an output folder you can write to") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError("another histopan run is writing this output", path=out,
                              fix=f"wait for it to finish (it holds {path.name}), or choose another output path") \
                from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot lock the output: {exc.strerror or exc}", path=path,
                              fix="write to a local filesystem that supports file locks") from exc
        # the previous holder removes the file when it lets go: make sure the file locked is still the one there
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


@contextmanager
def output_lock(out: str | PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``out`` for the block (re-entrant within a process); raises
    :class:`~histopan.errors.OutputError` at once when another process holds it.  The lock file is removed
    on release."""
    out = Path(out)
    path = Path(os.path.abspath(lock_path(out)))
    with _held_guard:
        entry = _held.get(path)
        if entry is None:
            entry = _held[path] = [_acquire(path, out), 0]
        entry[1] += 1
    try:
        yield path
    finally:
        with _held_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                path.unlink(missing_ok=True)  # still ours: others wait for the lock before they touch the file
                os.close(entry[0])


# ------------------------------------------------------------------------------------------ swap, recover


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _set_aside(out: Path, replaced: Path) -> None:
    """First step of the swap: the old store leaves ``out`` (the next run puts it back should this run stop
    before the new one is in place)."""
    _remove(replaced)
    os.rename(out, replaced)


def publish(out: str | PathLike[str]) -> Path:
    """Swap the complete store built in ``staging_path(out)`` in as ``out`` (an old store there is deleted
    once the new one is in place); call under :func:`output_lock`.  Returns ``out``."""
    out = Path(out)
    staging, replaced = staging_path(out), replaced_path(out)
    if not _is_complete(staging):
        raise StoreError("the new store is not complete, so it cannot replace the output", path=staging,
                         fix="rerun the same command to finish it")
    _remove(staging / "work")  # a finalize killed while dropping the resume state
    if out.exists():
        _set_aside(out, replaced)
    os.rename(staging, out)
    if replaced.exists():
        log.info("replaced the previous store %s", out)
        _remove(replaced)
    return out


def recover(out: str | PathLike[str]) -> None:
    """Undo what a killed run on ``out`` left half done (call under :func:`output_lock`): the temporary folders
    of an interrupted store creation are removed, and a swap stopped between its two renames is rolled back
    (the old store returns to ``out``; the complete new one waits in ``staging_path(out)``, where the same
    command finds it and swaps it in) or, stopped while deleting the old store, finished."""
    out = Path(out)
    prefix = creating_prefix(staging_path(out))
    if out.parent.is_dir():
        for leftover in out.parent.iterdir():
            if leftover.name.startswith(prefix):
                log.info("removing %s, left by a run killed while it created its store", leftover)
                _remove(leftover)
    replaced = replaced_path(out)
    if replaced.exists():
        if out.exists():
            _remove(replaced)
        else:
            log.info("a run was stopped while it swapped in its new store: %s is back in place", out)
            os.rename(replaced, out)


def check_output_state(out: str | PathLike[str], overwrite: bool) -> dict[str, Any] | None:
    """Whether a run may write the output ``out`` (call under :func:`output_lock`): what a killed run left is
    finished or undone first (:func:`recover`); then a complete store there is refused unless ``overwrite``
    (it stays until the new one is complete), and anything that is not a histopan store is refused (an empty
    folder is allowed).  Returns the ``histopan`` attributes of the store there, or None when there is none."""
    out = Path(out)
    recover(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    attrs = read_histopan_attrs(out)
    if attrs is None or attrs.get("format") != STORE_FORMAT:
        if overwrite:
            raise StoreError("refusing to overwrite something that is not a histopan store", path=out,
                             fix="choose another output path or delete it yourself")
        raise StoreError("the output path exists and is not a histopan store", path=out,
                         fix="choose another output path")
    if attrs.get("complete") and not overwrite:
        raise StoreError("the store already exists and is complete", path=out,
                         fix="pass --overwrite to replace it, or choose another output path")
    return attrs
