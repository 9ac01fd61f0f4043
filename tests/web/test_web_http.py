"""`coilsight web` over HTTP (Starlette's TestClient, the real app): the security rules, probes,
the upload through the real tiny pack, crops by validated id only."""
from __future__ import annotations

import base64
import json
import os

import cv2
import numpy as np
import pytest
from tinypack import frame_with

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from agent.config import with_overrides  # noqa: E402
from agent.crops import CropStore  # noqa: E402
from agent.tracks import part_key  # noqa: E402
from agent.web.guard import COOKIE, session_value  # noqa: E402
from agent.web.settings import WebSettingsError, web_settings  # noqa: E402

from .conftest import png  # noqa: E402


def test_probes_and_version(client, running_agent):
    from agent.service import status_request

    c, _ = client(status=lambda: status_request("tcp://127.0.0.1:9", timeout_ms=300))
    assert c.get("/healthz").json()["ok"] is True
    r = c.get("/readyz")
    assert r.status_code == 503 and "not reachable" in r.json()["error"]
    v = c.get("/version").json()
    assert v["protocol"] == 1 and v["agent"] == "test-agent" and v["coilsight"]
    agent = running_agent()
    c2, _ = client(agent.cfg, status=lambda: status_request(agent.cfg.control.endpoint, timeout_ms=2000))
    r = c2.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"agent_reachable": True, "models_loaded": True, "ingest_bound": True}
    c3, _ = client(status=None)
    assert c3.get("/readyz").status_code == 503


def test_security_headers_and_loopback_host_only(client):
    c, _ = client()
    r = c.get("/")
    assert r.status_code == 200 and "strip-map" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    # DNS rebinding: a page on loopback answers only to loopback host names
    assert c.get("/api/live", headers={"Host": "attacker.example:8470"}).status_code == 421
    assert c.get("/api/live", headers={"Host": "localhost:8470"}).status_code == 200
    # a POST from another origin is refused before anything runs
    r = c.post("/api/inspect", content=b"x", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403


def test_request_body_limits(client, agent_config):
    cfg = with_overrides(agent_config(), web={"max_upload_bytes": 2048})
    c, _ = client(cfg)
    r = c.post("/api/inspect", content=b"\x89PNG" + b"0" * 4000)
    assert r.status_code == 413 and "2048" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"0" * 1000

    r = c.post("/api/inspect", content=chunks())
    assert r.status_code == 413
    assert c.post("/login", content=b"token=" + b"a" * 5000).status_code == 413  # 4 KiB elsewhere


def test_upload_content_checks_and_overlay(client):
    c, _ = client()
    r = c.post("/api/inspect", content=b"GIF89a" + b"0" * 100)
    assert r.status_code == 415 and "not a PNG or JPEG" in r.json()["error"]
    good = png(frame_with("bright", x=64, y=16))
    assert c.post("/api/inspect", content=good[:40]).status_code == 415  # cut short
    huge = bytearray(good)
    huge[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000 x 100000
    r = c.post("/api/inspect", content=bytes(huge))
    assert r.status_code == 413 and "max_upload_pixels" in r.json()["error"]
    ok, prog = cv2.imencode(".jpg", frame_with("bright", x=64, y=16), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    r = c.post("/api/inspect", content=prog.tobytes())
    assert r.status_code == 415 and "progressive" in r.json()["error"]
    assert c.post("/api/inspect", content=b"").status_code == 400

    r = c.post("/api/inspect", content=good, headers={"X-File-Name": "square.png"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert [(e["class"], e["bbox_px"]) for e in data["events"]] == [("bright", [64, 16, 80, 32])]
    assert data["passed"] and data["shape"] == [64, 256] and data["name"] == "square.png"
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(data["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (64, 256, 3)
    assert not np.array_equal(overlay[:, :, 0], overlay[:, :, 2])  # coloured marks drawn on a grey image
    clean = c.post("/api/inspect", content=png(np.full((64, 256), 100, np.uint8))).json()
    assert clean["events"] == [] and clean["passed"] is False


def test_upload_can_be_turned_off(client, agent_config):
    cfg = with_overrides(agent_config(), web={"upload": False})
    c, web = client(cfg)
    r = c.post("/api/inspect", content=png(frame_with("bright", x=64, y=16)))
    assert r.status_code == 403 and "web.upload" in r.json()["error"]
    assert web.inspector is None  # the pack was never opened
    assert c.get("/api/live").json()["config"]["upload"] is False
    c2, _ = client(upload=False)  # --no-upload
    assert c2.post("/api/inspect", content=b"x").status_code == 403


def test_no_request_path_reaches_the_filesystem(client, agent_config, tmp_path):
    cfg = agent_config()
    c, web = client(cfg)
    # track 7's crop, written by the agent's own crop thread into its crop file (agent/crops.py)
    store = CropStore(web.s.crops_dir)
    store.start()
    part = {"coil": "coil-A", "camera": "cam0", "index": 3, "bbox_px": [2, 2, 20, 20], "class_id": 0}
    assert store.offer(np.zeros((64, 64), np.uint8), [part])
    assert store.request("coil-A", 7, part_key(part)) == "coil-A/7"
    store.stop()
    assert store.written == 1
    # a crop the agent never named is not served, even though the file exists
    assert c.get("/crops/coil-A/7.png").status_code == 404
    assert web.crops.note("coil-B", "coil-A/7") == "/crops/coil-A/7.png"  # the coil layer's COIL/TRACK_ID
    r = c.get("/crops/coil-A/7.png")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")  # no agent: the file
    assert "immutable" in r.headers["cache-control"]  # a page redrawing its table does not ask again
    web.crops.note("coil-A", 8)
    assert c.get("/crops/coil-A/8.png").status_code == 404  # named, but the agent wrote none
    for coil, crop in (("..", 7), ("coil-A", "../x"), ("coil-A", "a/../../x"), ("coil-A", "x.png"),
                       ("coil-A", True), ("coil-A", 1.5), (None, 3), ("coil-A", "/7")):
        assert web.crops.note(coil, crop) is None, (coil, crop)
    for path in ("/crops/../../etc/passwd.png", "/crops/%2e%2e/%2e%2e/etc/passwd.png", "/crops/coil-A/..%2F7.png",
                 "/crops/..%2F..%2Fetc/passwd.png", "/static/../settings.py", "/static/..%2Fapp.py",
                 "/static/index.html", "/static/login.html", "/api/coils/..%2F..%2Fetc%2Fpasswd", "/etc/passwd"):
        r = c.get(path)
        assert r.status_code == 404, path
        assert b"root:" not in r.content


def test_token_guards_every_page_but_the_probes(client, agent_config, tmp_path):
    token_file = tmp_path / "web.token"
    token_file.write_text("s3cret-token-0123456789\n")
    os.chmod(token_file, 0o640)
    c, _ = client(token_file=str(token_file))
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 503
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    for path in ("/api/live", "/events", "/api/coils", "/version", "/static/app.js"):
        assert c.get(path).status_code == 401, path
    assert c.post("/api/inspect", content=png(frame_with("bright", x=64, y=16))).status_code == 401
    assert c.post("/login", data={"token": "wrong-token-0123456789"}).status_code == 401
    assert c.post("/login", data={"token": "wrong-tökén-0123456789"}).status_code == 401  # not a 500
    assert c.get("/api/live", headers={"Authorization": "Bearer t\xf6k\xe9n".encode("latin-1")}).status_code == 401
    assert c.get("/api/live", headers={"Cookie": f"{COOKIE}=\xe9\xe9".encode("latin-1")}).status_code == 401
    r = c.post("/login", data={"token": "s3cret-token-0123456789"}, follow_redirects=False)
    assert r.status_code == 303
    assert r.cookies[COOKIE] == session_value("s3cret-token-0123456789") != "s3cret-token-0123456789"
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/api/live").status_code == 200  # the cookie
    c.cookies.clear()
    assert c.get("/api/live").status_code == 401
    assert c.get("/api/live", headers={"Authorization": "Bearer s3cret-token-0123456789"}).status_code == 200


def test_token_rules(agent_config, tmp_path):
    curve = {"enabled": True, "cameras_dir": str(tmp_path), "subscribers_dir": str(tmp_path),
             "operators_dir": str(tmp_path)}
    web_keys = {"subscriber_key": str(tmp_path / "web.key_secret"), "server_key": str(tmp_path / "server.key")}
    cfg = with_overrides(agent_config(), auth=curve, web=web_keys)
    with pytest.raises(WebSettingsError, match=r"needs an access token: set web.token_file"):
        web_settings(cfg, host="0.0.0.0")
    assert web_settings(cfg).token is None  # on loopback, no token needed
    no_keys = with_overrides(agent_config(), auth=curve)
    with pytest.raises(WebSettingsError, match=r"web.subscriber_key"):
        web_settings(no_keys)
    token_file = tmp_path / "web.token"
    token_file.write_text("s3cret-token-0123456789")
    os.chmod(token_file, 0o644)
    with pytest.raises(WebSettingsError, match=r"readable by every user"):
        web_settings(cfg, host="0.0.0.0", token_file=str(token_file))
    os.chmod(token_file, 0o600)
    assert web_settings(cfg, host="0.0.0.0", token_file=str(token_file)).token == "s3cret-token-0123456789"
    token_file.write_text("short")
    with pytest.raises(WebSettingsError, match=r"at least 16 characters"):
        web_settings(cfg, token_file=str(token_file))


def test_uploads_off_loopback_need_a_token_even_without_curve(agent_config, tmp_path):
    cfg = agent_config()
    assert not cfg.auth.enabled and cfg.web.upload
    with pytest.raises(WebSettingsError, match=r"takes uploads \(web.upload\) without an access token"):
        web_settings(cfg, host="0.0.0.0")
    assert web_settings(cfg, host="0.0.0.0", upload=False).upload is False  # a page that only reads
    assert web_settings(cfg).upload is True  # on loopback, no token needed
    token_file = tmp_path / "web.token"
    token_file.write_text("s3cret-token-0123456789")
    os.chmod(token_file, 0o600)
    s = web_settings(cfg, host="0.0.0.0", token_file=str(token_file))
    assert s.upload is True and s.token == "s3cret-token-0123456789"


def test_cli_errors_are_one_line_and_non_zero(agent_config, tmp_path, capsys):
    import socket

    from agent.cli import main
    from agent.config import config_dict, dump_toml

    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text("[web]\nport = 0x\n")
    assert main(["web", "--config", str(cfg_path)]) == 2
    assert "config error" in capsys.readouterr().err
    cfg_path.write_text(dump_toml(config_dict(agent_config())))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        assert main(["web", "--config", str(cfg_path), "--port", str(held.getsockname()[1])]) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["web", "--config", str(cfg_path), "--token-file", str(tmp_path / "none")]) == 2
    assert "web.token_file: cannot read" in capsys.readouterr().err


def test_live_snapshot_is_json_without_64_bit_times(client):
    c, web = client()
    web.state.on_defect({"v": 1, "type": "defect", "seq": 3, "ts_ns": 1763771523041000000, "coil": "C1",
                         "camera": "cam0", "index": 2, "class": "bright", "class_id": 0, "confidence": 0.9,
                         "across_mm": 10.0, "along_mm": 20.0, "width_mm": 8.0, "length_mm": 8.0, "area_mm2": 64.0,
                         "bbox_px": [0, 0, 16, 16], "frame_ts_ns": 1763771523000000000, "crop": "../../etc"})
    snap = c.get("/api/live").json()
    d = snap["defects"][0]
    assert snap["coil"] == "C1" and d["time_ms"] == 1763771523041 and "crop_url" not in d
    assert not any(k.endswith("_ns") for k in d)
    json.dumps(snap)


def test_an_image_the_pack_cannot_take_is_a_clear_422(client, agent_config, tmp_path):
    from tinypack import make_pack

    fixed = make_pack(tmp_path / "fixed", gate_input_pool=2)  # its gate takes 32x128 pooled frames only
    c, _ = client(with_overrides(agent_config(), models={"dir": str(fixed)}))
    r = c.post("/api/inspect", content=png(frame_with("bright", x=16, y=16, height=32, width=128)))
    assert r.status_code == 422 and "fixed" in r.json()["error"]
    broken = with_overrides(agent_config(), models={"dir": str(tmp_path / "no-pack")})
    c2, _ = client(broken)
    r = c2.post("/api/inspect", content=png(frame_with("bright", x=16, y=16)))
    assert r.status_code == 503 and "could not be opened" in r.json()["error"]
    assert c2.get("/healthz").status_code == 200


def test_without_the_web_extra_the_command_says_what_to_install(monkeypatch, capsys):
    import sys

    from agent.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as on a box installed without the web extra
    assert main(["web"]) == 2
    err = capsys.readouterr().err
    assert "install the web extra" in err and "missing: uvicorn" in err
