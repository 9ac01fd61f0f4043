"""A real full disk for tests: a tmpfs of a few hundred KiB mounted on a test's directory (needs
root and mount rights; tests skip, saying so, where the box does not give them)."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


class TinyFs:
    def __init__(self, path: Path, size_kib: int):
        self.path = path
        self.size_kib = size_kib
        self.filler = path / "filler.bin"

    def fill(self) -> int:
        """Take every free page with a filler file; returns the bytes it took. ENOSPC ends it."""
        n = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                n += os.write(fd, b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        return n

    def free(self) -> None:
        self.filler.unlink()


def mount_tiny_fs(path: Path, size_kib: int):
    """Mount a tmpfs of ``size_kib`` on ``path`` (created); yields a TinyFs; unmounts after."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and that needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no mount rights in this container?): {r.stderr.strip()}")
    try:
        yield TinyFs(path, size_kib)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)
