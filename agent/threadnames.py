"""Give the OS thread the Python thread's name, so `top -H`, `ps -L` and /proc/PID/task/*/comm
show "ingest" or "inference-0" instead of "python3" (and the bench can split CPU by thread)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # no libc to call: names stay as they are
        _libc = None


def name_this_thread(name: str | None = None) -> bool:
    """Sets the calling thread's OS name (Linux keeps 15 bytes); True if it was set."""
    if _libc is None:
        return False
    raw = (name or threading.current_thread().name).encode("ascii", "replace")[:15]
    return _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
