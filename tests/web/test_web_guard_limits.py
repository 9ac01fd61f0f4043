"""The page's guard and upload checks at their edges: the exact byte and pixel limits, a body that
arrives in many small pieces, IPv6 loopback, the refusals' own security headers, a cookie holding
the raw token, and the decoded upload equal to `coilsight inspect`'s. Each test here was written
for a deliberate bug the older tests let through (docs/testing.md)."""
from __future__ import annotations

import asyncio
import os

import cv2
import numpy as np
import pytest
from tinypack import frame_with

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from agent.config import with_overrides  # noqa: E402
from agent.web.app import create_app  # noqa: E402
from agent.web.guard import COOKIE, SMALL_BODY, session_value  # noqa: E402
from agent.web.settings import web_settings  # noqa: E402
from agent.web.upload import UploadRejected, decode_upload  # noqa: E402

from .conftest import BASE, png  # noqa: E402


def drive(app, path: str, pieces: list[bytes], headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, int]:
    """One POST through the real ASGI app, its body in ``pieces`` (one ASGI message each, no
    Content-Length, as a chunked upload arrives) -> (status, how many pieces were taken)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 8470), "client": ("127.0.0.1", 5555),
             "headers": [(b"host", b"127.0.0.1:8470"), *headers]}
    taken, sent = 0, []

    async def receive():
        nonlocal taken
        if taken < len(pieces):
            taken += 1
            return {"type": "http.request", "body": pieces[taken - 1], "more_body": taken < len(pieces)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), taken


def test_the_byte_limits_are_exact(client, agent_config):
    c, _ = client(with_overrides(agent_config(), web={"max_upload_bytes": 2048}))
    at_limit = c.post("/api/inspect", content=b"GIF89a" + b"0" * (2048 - 6))
    assert at_limit.status_code == 415  # taken in, then refused for what it is, not for its size
    over = c.post("/api/inspect", content=b"GIF89a" + b"0" * (2049 - 6))
    assert over.status_code == 413 and "2048" in over.json()["error"]
    # the 4 KiB limit for every other path holds even when uploads may be far larger (the default 8 MiB)
    c2, _ = client()
    r = c2.post("/login", content=b"token=" + b"a" * (SMALL_BODY + 1))
    assert r.status_code == 413 and str(SMALL_BODY) in r.json()["error"]


def test_a_body_in_many_small_pieces_is_counted_as_a_whole(client, agent_config):
    c, _ = client(with_overrides(agent_config(), web={"max_upload_bytes": 2048}))
    app = c.app  # the guard around the page, as the client drives it
    status, taken = drive(app, "/api/inspect", [b"0" * 500] * 10)
    assert status == 413 and taken == 5  # refused at the piece that crossed 2048, the rest never read
    status, _ = drive(app, "/api/inspect", [b"GIF89a" + b"0" * 506] + [b"0" * 512] * 3)  # exactly 2048
    assert status == 415
    status, _ = drive(app, "/api/inspect", [b"GIF89a" + b"0" * 506] + [b"0" * 512] * 3 + [b"0"])  # 2049
    assert status == 413
    status, taken = drive(app, "/login", [b"a" * 1000] * 10)
    assert status == 413 and taken == 5  # 4 KiB elsewhere


def test_ipv6_loopback_host_is_answered_and_lookalikes_are_not(client):
    c, _ = client()
    assert c.get("/api/live", headers={"Host": "[::1]:8470"}).status_code == 200
    assert c.get("/api/live", headers={"Host": "[::1]"}).status_code == 200
    for host in ("localhost.attacker.example:8470", "127.0.0.1.attacker.example", "[::2]:8470", ""):
        assert c.get("/api/live", headers={"Host": host}).status_code == 421, host


def test_refusals_carry_the_security_headers_too(client, agent_config, tmp_path):
    token_file = tmp_path / "web.token"
    token_file.write_text("s3cret-token-0123456789\n")
    os.chmod(token_file, 0o600)
    c, _ = client(with_overrides(agent_config(), web={"max_upload_bytes": 2048}), token_file=str(token_file))
    auth = {"Authorization": "Bearer s3cret-token-0123456789"}
    refused = [c.get("/api/live"),  # 401
               c.get("/api/live", headers={"Host": "attacker.example"}),  # 421
               c.post("/api/inspect", content=b"0" * 4000, headers=auth),  # 413
               c.post("/api/inspect", content=b"x", headers={**auth, "Origin": "http://attacker.example"})]  # 403
    assert [r.status_code for r in refused] == [401, 421, 413, 403]
    for r in refused:
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], r.status_code
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"


def test_the_cookie_is_the_derived_session_never_the_raw_token(client, tmp_path):
    token_file = tmp_path / "web.token"
    token_file.write_text("s3cret-token-0123456789\n")
    os.chmod(token_file, 0o600)
    c, _ = client(token_file=str(token_file))
    assert c.get("/api/live", headers={"Cookie": f"{COOKIE}=s3cret-token-0123456789"}).status_code == 401
    assert c.get("/api/live", headers={"Cookie": f"{COOKIE}="}).status_code == 401
    assert c.get("/api/live", headers={"Authorization": "Bearer "}).status_code == 401
    assert c.get("/api/live", headers={"Authorization": "Basic s3cret-token-0123456789"}).status_code == 401
    good = session_value("s3cret-token-0123456789")
    assert c.get("/api/live", headers={"Cookie": f"other=1; {COOKIE}={good}"}).status_code == 200


def test_the_pixel_limit_is_exact_and_other_header_checks(client, agent_config):
    image = png(frame_with("bright", x=64, y=16))  # 64 x 256
    assert decode_upload(image, 64 * 256).shape == (64, 256)
    with pytest.raises(UploadRejected, match="max_upload_pixels") as exc:
        decode_upload(image, 64 * 256 - 1)
    assert exc.value.status == 413
    zero = bytearray(image)
    zero[16:20] = (0).to_bytes(4, "big")  # IHDR width 0
    with pytest.raises(UploadRejected, match="no image size"):
        decode_upload(bytes(zero), 1 << 20)
    deep = png(np.full((64, 256), 40000, np.uint16))  # a 16-bit PNG: not what the models take
    with pytest.raises(UploadRejected, match="8-bit"):
        decode_upload(deep, 1 << 20)
    c, _ = client(with_overrides(agent_config(), web={"max_upload_pixels": 64 * 256 - 1}))
    r = c.post("/api/inspect", content=image)
    assert r.status_code == 413 and "max_upload_pixels" in r.json()["error"]


def test_the_page_decodes_an_upload_as_coilsight_inspect_does():
    from agent.tools.inspect import decode_image_bytes

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((32, 48), 200, np.uint8)])
    grey = rng.integers(0, 256, (32, 48), dtype=np.uint8)
    for name, bgr in (("colour", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), ("rgba", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)),
                      ("grey", grey)):
        data = png(bgr)
        page = decode_upload(data, 1 << 20)
        np.testing.assert_array_equal(page, decode_image_bytes(data), err_msg=name)
    np.testing.assert_array_equal(decode_upload(png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), 1 << 20), rgb)


def test_the_upload_uses_the_agents_calibration_file_not_the_packs(client, agent_config, tmp_path):
    import json

    cfg = agent_config()
    image = png(frame_with("bright", x=64, y=16))
    c, _ = client(cfg)  # the pack's own calibration: the frame passes
    score = c.post("/api/inspect", content=image).json()["gate_score"]
    strict = json.loads((cfg.models_dir() / "calibration.json").read_text())
    assert strict["gate"]["threshold"] < score < 1.0
    strict["gate"]["threshold"] = float(np.nextafter(score, 2.0))  # just above this frame's score
    (tmp_path / "strict.json").write_text(json.dumps(strict))
    c2, _ = client(with_overrides(cfg, models={"calibration": str(tmp_path / "strict.json")}))
    r = c2.post("/api/inspect", content=image)
    assert r.status_code == 200, r.text
    assert r.json()["passed"] is False and r.json()["events"] == []



def test_a_crop_that_is_not_a_regular_file_is_a_404(agent_config):
    app, web = create_app(web_settings(agent_config()), start_feed=False)
    (web.s.crops_dir / "coil-A" / "9.png").mkdir(parents=True)  # a folder where a crop would be
    os.mkfifo(web.s.crops_dir / "coil-A" / "10.png")  # a pipe: opening it must not wait for a writer
    for crop in (9, 10):
        assert web.crops.note("coil-A", crop) == f"/crops/coil-A/{crop}.png"
    with TestClient(app, base_url=BASE) as c:
        for crop in (9, 10):
            r = c.get(f"/crops/coil-A/{crop}.png")
            assert r.status_code == 404, (crop, r.status_code)


def test_token_file_rules_at_their_edges(agent_config, tmp_path):
    from agent.web.settings import MIN_TOKEN_CHARS, WebSettingsError

    token_file = tmp_path / "web.token"
    token_file.write_text("t" * MIN_TOKEN_CHARS + "\n")
    os.chmod(token_file, 0o600)
    assert web_settings(agent_config(), token_file=str(token_file)).token == "t" * MIN_TOKEN_CHARS
    token_file.write_text("t" * (MIN_TOKEN_CHARS - 1))
    with pytest.raises(WebSettingsError, match="at least"):
        web_settings(agent_config(), token_file=str(token_file))
    token_file.write_text("two words-0123456789abcdef")  # a pasted line, not one token
    with pytest.raises(WebSettingsError, match="without spaces"):
        web_settings(agent_config(), token_file=str(token_file))


@pytest.mark.parametrize("host", ["10.0.0.5", "192.168.1.20", "::", "[::]", "example.internal"])
def test_a_curve_page_on_any_non_loopback_address_needs_a_token(agent_config, tmp_path, host):
    from agent.web.settings import WebSettingsError

    curve = {"enabled": True, "cameras_dir": str(tmp_path), "subscribers_dir": str(tmp_path),
             "operators_dir": str(tmp_path)}
    web_keys = {"subscriber_key": str(tmp_path / "web.key_secret"), "server_key": str(tmp_path / "server.key")}
    cfg = with_overrides(agent_config(), auth=curve, web=web_keys)
    with pytest.raises(WebSettingsError, match="needs an access token"):
        web_settings(cfg, host=host)
    for loopback in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert web_settings(cfg, host=loopback).token is None
