"""The bridge on a broker as plants run them: TLS (a CA made here with the openssl CLI), a client
certificate and a user name with a password from a file; clients without them are refused."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time

import pytest
from mqtt_support import Consumer, broker, needs_mosquitto, procs, write_bridge_config  # noqa: F401
from tests_support_events import Collector
from tinypack import frame_with

from agent.cli import main as cli_main
from agent.tools.camera_sim import CameraSim

pytestmark = [needs_mosquitto,
              pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None,
                                 reason="needs the openssl CLI and mosquitto_passwd (package mosquitto)")]


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path):
    """ca.crt; server.crt/key for 127.0.0.1; client.crt/key; another CA's client cert (rogue)."""
    d = tmp_path / "pki"
    d.mkdir()
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "bridge", "s3cret"], check=True, timeout=30)
    (d / "bridge.password").write_text("s3cret\n")
    return d


def tls_broker(broker, pki):
    return broker(extra=f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
                        f"require_certificate true\npassword_file {pki / 'passwd'}\nallow_anonymous false\n")


def client_ctx(pki, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def never_connects(port: int, ctx: ssl.SSLContext | None, user: str | None, password: str | None,
                   name: str) -> list[str]:
    """Try to connect for 3 s; what the broker said (CONNACK refusals, TLS errors). Fails if it got in."""
    import paho.mqtt.client as mqtt

    said: list[str] = []
    ok = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    if ctx:
        c.tls_set_context(ctx)
    if user:
        c.username_pw_set(user, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: said.append(str(rc)) if rc.is_failure else ok.set()
    c.on_connect_fail = lambda *_: said.append("connect_failed")
    try:
        c.connect("127.0.0.1", port, keepalive=5)
    except (OSError, ssl.SSLError) as exc:
        return [f"{type(exc).__name__}: {exc}"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not ok.is_set() and not said:
        try:
            c.loop(0.1)
        except (OSError, ssl.SSLError) as exc:
            said.append(f"{type(exc).__name__}: {exc}")
    c.disconnect()
    assert not ok.is_set(), f"{name} was admitted"
    return said


def test_bridge_over_tls_with_client_cert_and_password(broker, procs, running_agent, pki, tmp_path):
    b = tls_broker(broker, pki)
    agent = running_agent()
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=60.0)
    conf = write_bridge_config(tmp_path / "bridge.toml", agent_cfg=cfg, port=b.port, state_dir=tmp_path / "bstate",
                               mqtt={"tls": True, "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "client.crt"),
                                     "key_file": str(pki / "client.key"), "username": "bridge",
                                     "password_file": str(pki / "bridge.password")})
    consumer = Consumer(b.port, tls=client_ctx(pki, "client"), username="bridge", password="s3cret")
    assert consumer.connected.wait(10), consumer.refused
    bridge = procs("bridge", conf, tmp_path / "bridge.log")
    cam = CameraSim(cfg.ingest.endpoint, camera="cam0")
    cam.send_coil("tls-coil", [(frame_with("bright", 8, 8), None)] * 3, mm_per_px_y=2.0)
    cam.close()
    assert col.wait(lambda c: len(c.summaries("tls-coil")) == 1, 30)
    n = max(m["seq"] for _, m in col.msgs)
    assert consumer.wait(lambda c: c.seqs() >= set(range(1, n + 1)), 30), bridge.log()[-3000:]
    consumer.check(n)
    consumer.close()
    col.close()

    # Refused: no client certificate; a certificate from another CA; a good certificate without the
    # password; plain TCP on the TLS port.
    no_cert = never_connects(b.port, client_ctx(pki, None), "bridge", "s3cret", "no-cert")
    rogue = never_connects(b.port, client_ctx(pki, "rogue"), "bridge", "s3cret", "rogue")
    no_password = never_connects(b.port, client_ctx(pki, "client"), None, None, "no-password")
    wrong_password = never_connects(b.port, client_ctx(pki, "client"), "bridge", "guess", "wrong-password")
    plain = never_connects(b.port, None, "bridge", "s3cret", "plain")
    assert any("Not authorized" in s or "user name or password" in s for s in no_password + wrong_password), \
        (no_password, wrong_password)
    # The broker's own reasons, one per refused client.
    log = b.log()
    for reason in ("peer did not return a certificate", "certificate verify failed", "not authorised",
                   "wrong version number"):
        assert reason in log, (reason, log[-3000:])
    print(f"\n[figures] refusals: no_cert={no_cert} rogue={rogue} no_password={no_password} "
          f"wrong_password={wrong_password} plain={plain}")


def test_bridge_with_unreadable_tls_file_exits_with_reason(tmp_path, capsys):
    conf = write_bridge_config(tmp_path / "bridge.toml", port=1883, state_dir=tmp_path / "s",
                               mqtt={"tls": True, "ca_file": str(tmp_path / "nope.crt")})
    assert cli_main(["bridge", "--config", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "mqtt TLS files" in err and "nope.crt" in err
