"""The page's requests to the agent's control socket (docs/protocol.md section 3): `status` for
/readyz and the open coil's progress, `crop` for a track's crop (issue 19's coil layer)."""
from __future__ import annotations

import os
from typing import Callable

import msgpack
import zmq

from agent.web.settings import WebSettings


def control_request(endpoint: str, request: dict, *, timeout_ms: int = 1000,
                    curve: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None) -> dict:
    """One request, one reply map; TimeoutError when the agent does not answer in time."""
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        if curve is not None:
            from agent.auth import make_curve_client

            make_curve_client(s, *curve)
        s.connect(endpoint)
        s.send(msgpack.packb(request))
        reply = msgpack.unpackb(s.recv(), raw=False)
    except zmq.Again:
        raise TimeoutError(f"no answer from {endpoint} within {timeout_ms} ms") from None
    finally:
        s.close()
    if not isinstance(reply, dict):
        raise ValueError(f"{endpoint} answered with a {type(reply).__name__}, not a map")
    return reply


def control_functions(settings: WebSettings) -> tuple[Callable[[], dict] | None,
                                                      Callable[[str, int], bytes | None] | None]:
    """(status, crop) for this page, or (None, None) when it may not use the control socket: with
    CURVE on a tcp:// control socket it needs an operator key (web.operator_key)."""
    cfg = settings.cfg
    if cfg.auth.enabled and cfg.control.endpoint.startswith("tcp://") and settings.operator_curve is None:
        return None, None
    endpoint, curve = cfg.control.endpoint, settings.operator_curve

    def status() -> dict:
        return control_request(endpoint, {"cmd": "status"}, curve=curve)

    def crop(coil: str, track_id: int) -> bytes | None:
        reply = control_request(endpoint, {"cmd": "crop", "coil": coil, "track_id": int(track_id)}, curve=curve)
        png = reply.get("png") if reply.get("ok") else None
        return png if isinstance(png, bytes) else None

    return status, crop
