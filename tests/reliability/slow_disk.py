"""`coilsight` on a stalled disk, for the fault-injection suite: every fsync / fdatasync of a
regular file (the journal's segments) takes DELAY_S seconds longer, as on a disk that stalls under
load. The publisher then holds events it cannot journal yet, which is where a SIGKILL leaves the
agent owing them (agent/recovery.py re-sends them after the restart).

    python tests/reliability/slow_disk.py DELAY_S run --config agent.toml
"""
from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path


def slowed(real, delay_s: float):
    def call(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            time.sleep(delay_s)
        real(fd)

    return call


def main() -> int:
    delay_s = float(sys.argv[1])
    os.fsync = slowed(os.fsync, delay_s)
    os.fdatasync = slowed(os.fdatasync, delay_s)
    # the tree this file is in, as `python -m agent.cli` run from its root would import it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from agent.cli import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
