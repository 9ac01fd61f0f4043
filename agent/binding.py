"""Binding the agent's sockets: a failure names the endpoint and ends start-up at once.

A port already in use (or an ipc:// path in a missing directory, or an address not on this box)
must not leave the agent waiting: the thread that binds records a ``BindError`` and
``wait_bound`` returns as soon as either the socket is bound or the thread has failed, so the
process exits non-zero well within a second of the failure, with the endpoint in its one line
(issue 16, item 15).
"""
from __future__ import annotations

import threading
import time

import zmq


class BindError(RuntimeError):
    """A socket could not be bound; the message names its role and endpoint."""


def bind(sock: zmq.Socket, endpoint: str, role: str) -> str:
    """Bind ``sock``; returns the endpoint it is bound to (the port chosen for ``:0`` / ``*``)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise BindError(f"cannot bind the {role} socket to {endpoint}: {exc.strerror}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def wait_bound(thread: threading.Thread, bound: threading.Event, what: str, timeout_s: float = 5.0) -> None:
    """Wait until ``thread`` has bound its sockets (``bound`` set). Raises BindError as soon as the
    thread reports an error or ends without binding, or when ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not bound.wait(0.01):
        error = getattr(thread, "error", None)
        if error is not None:
            raise BindError(str(error) if isinstance(error, BindError) else f"{what}: {error}")
        if not thread.is_alive():
            raise BindError(f"{what}: the {thread.name} thread ended before binding")
        if time.monotonic() > deadline:
            raise BindError(f"{what}: not bound within {timeout_s:g} s")
