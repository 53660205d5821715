"""Writing files and folders so that a crash or a full disk never leaves half of one behind.

Everything is written under a hidden sibling name (``.tmp-<name>``) and renamed into place only
once complete: a rename within one folder is atomic, so readers see the old version or the new
one, never a mixture."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

from filelock import FileLock


def staging_path(final: str) -> str:
    """The hidden sibling that ``final`` is written as until it is complete."""
    return os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}")


def remove(path: str) -> None:
    """Delete a file or a folder tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def flush_to_disk(path: str) -> None:
    """fsync a file, or every file of a folder and the folders themselves, so that the rename
    that follows publishes data that is on the disk, not only in the page cache."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(directory)


def publish(partial: str, final: str, durable: bool = False) -> None:
    """Move a completely written ``partial`` to ``final``, replacing what was there."""
    if durable:
        flush_to_disk(partial)
    remove(final)  # os.replace cannot put a folder over a non-empty folder
    os.replace(partial, final)
    if durable:
        fsync_directory(os.path.dirname(os.path.abspath(final)))


@contextmanager
def atomic_path(final: str, durable: bool = False):
    """Yield a path to write a file or folder at; it becomes ``final`` only if the block completes.

    A block that raises leaves ``final`` as it was and removes what it wrote."""
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    partial = staging_path(final)
    remove(partial)  # left by a crash during an earlier attempt
    try:
        yield partial
    except BaseException:
        remove(partial)
        raise
    publish(partial, final, durable)


def write_json(path: str, values: dict) -> None:
    """Write ``values`` as indented JSON, atomically."""
    with atomic_path(path) as partial, open(partial, "w") as f:
        json.dump(values, f, indent=2, default=str)
        f.write("\n")


@contextmanager
def made_once(path: str):
    """Hold the lock beside ``path`` (``<path>.lock``, its folder created if need be) while the block
    checks for the file and makes it if missing: processes sharing a cache then make it once, the
    others waiting and reading it, instead of each computing its own."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        yield


def read_json(path: str) -> dict:
    """The JSON object in ``path``, or {} when there is none or it cannot be read: the callers read a
    run's records (statistics, evaluations, configs), any of which may not exist yet."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
