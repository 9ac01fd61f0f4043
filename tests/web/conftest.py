"""What the page's tests share: the ``client`` fixture (the real app under Starlette's TestClient)
and ``png``. Starlette and httpx are imported when a test asks for a client, so the suite's own
``pytest.importorskip`` lines still decide what is skipped."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

BASE = "http://127.0.0.1:8470"


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@pytest.fixture
def client(agent_config):
    """``client(cfg=None, *, status=None, **web_settings)`` -> (TestClient, WebApp): a page for the
    config (the tiny pack's by default; no agent running unless a test starts one). ``c.app`` is
    the ASGI app the client drives (the guard around the page)."""
    from starlette.testclient import TestClient

    from agent.web.app import create_app
    from agent.web.settings import web_settings

    clients = []

    def make(cfg=None, *, status=None, **settings_kw):
        app, web = create_app(web_settings(cfg or agent_config(), **settings_kw), status=status, start_feed=False)
        c = TestClient(app, base_url=BASE)
        c.__enter__()
        clients.append(c)
        return c, web

    yield make
    for c in clients:
        c.__exit__(None, None, None)
