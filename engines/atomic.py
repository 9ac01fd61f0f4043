"""Atomic file writes: the project's one home for "temp file, fsync, rename, fsync the folder".

Readers see the old file or the new one, never half of one, and after the call returns the new
file survives a power cut. Model packs, calibration files, engine manifests, model cards, the
agent's crash checkpoint and its published-seq watermark are all written through here.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644,
                 durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: write, fsync, rename over
    ``path``, fsync the folder. ``mode`` is the new file's permission bits (mkstemp makes 0600; the
    agent's service user must be able to read what the tools write).

    ``durable=False`` keeps the rename (a reader, and a restart after a crash of the process, see the
    old file or the new one) but skips both fsyncs: for state the agent's main loop rewrites every few
    seconds (crash checkpoint, published-seq watermark), where a disk that stalls on fsync must not
    stall the loop that pings the watchdog; after a power cut the journal, which is fsynced, is the
    record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a folder's entries (a rename, a new or removed file) durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str | Path, document: Any, *, indent: int | None = 2, durable: bool = True) -> None:
    """``document`` as JSON (and a final newline), written by write_atomic."""
    text = json.dumps(document, indent=indent, separators=None if indent else (",", ":"))
    write_atomic(path, text + "\n", durable=durable)
