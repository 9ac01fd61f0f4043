"""systemd notification protocol (sd_notify) and a progress-gated watchdog.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'). Written here in
a few lines instead of pulling in libsystemd. Without $NOTIFY_SOCKET every call is a no-op,
so the agent runs the same on a developer machine.

The watchdog is never pinged from a free-running thread: `Watchdog.maybe_ping()` (main
loop) sends WATCHDOG=1 only while the inference loop keeps calling `mark_alive()` (after
each batch, and each time it waits idle on an empty queue). A hung inference loop stops the
pings and systemd restarts the service after WatchdogSec.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when systemd wants none.

    $WATCHDOG_PID, when set, must name this process; a child that inherited the variables
    must not ping on the parent's behalf.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError as exc:
        raise ValueError(f"WATCHDOG_USEC={raw!r} is not an integer number of microseconds") from exc
    if usec <= 0:
        raise ValueError(f"WATCHDOG_USEC={raw!r} must be positive")
    return usec / 2 / 1_000_000


class Notifier:
    """Sends sd_notify datagrams; `enabled` is False (and sends nothing) without a socket."""

    def __init__(self, address: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = address or None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send the lines as one datagram; True when sent, False (and logged) on failure."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(lines).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, target)
            except OSError as exc:
                log.warning("sd_notify_failed", socket=self.address, message=lines[0], error=str(exc))
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the later READY=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (long warm-up, draining a big coil)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """WATCHDOG=1 only while the inference loop proves it is alive.

    interval_s: seconds between pings (default `watchdog_interval()`; None disables pings).
    stall_s: how old the last `mark_alive()` may be before pings stop (default 2 x interval,
    so systemd restarts a hung loop at most stall_s + WatchdogSec after its last batch).
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None = None,
        stall_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.interval_s = watchdog_interval() if interval_s is None else interval_s
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError(f"watchdog interval_s={self.interval_s} must be positive")
        if stall_s is None:
            stall_s = 2 * self.interval_s if self.interval_s else 10.0
        if stall_s <= 0:
            raise ValueError(f"watchdog stall_s={stall_s} must be positive")
        self.stall_s = stall_s
        self._clock = clock
        self._last_alive = clock()
        self._last_ping: float | None = None
        self._last_token: object = None
        self._stalled = False

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval_s is not None

    @property
    def stalled(self) -> bool:
        """True when the last `mark_alive()` is older than stall_s."""
        return self._clock() - self._last_alive > self.stall_s

    def mark_alive(self) -> None:
        """Inference loop: a batch finished, or it waited idle on an empty queue."""
        self._last_alive = self._clock()  # a float store is atomic under the GIL

    def beat(self, progress_token: object, idle: bool = False) -> bool:
        """Main-loop variant: counts as alive when `progress_token` (e.g. frames inferred)
        changed since the last beat, or when the line is idle (no frames queued)."""
        if idle or progress_token != self._last_token:
            self._last_token = progress_token
            self.mark_alive()
        return self.maybe_ping()

    def maybe_ping(self) -> bool:
        """Main loop, every tick: send WATCHDOG=1 when due and the inference loop is alive."""
        if not self.enabled:
            return False
        now = self._clock()
        age = now - self._last_alive
        if age > self.stall_s:
            if not self._stalled:
                self._stalled = True
                log.error("watchdog_withheld", since_alive_s=round(age, 3), stall_s=self.stall_s)
            return False
        if self._stalled:
            self._stalled = False
            log.warning("watchdog_resumed", since_alive_s=round(age, 3))
        if self._last_ping is not None and now - self._last_ping < self.interval_s:
            return False
        if self.notifier.watchdog():
            self._last_ping = now
            return True
        return False
