"""The bridge as a CURVE client of an agent with per-role allow-lists: with a subscriber key it
forwards; with a camera key the agent never lets it in, and it forwards nothing (and keeps trying)."""
from __future__ import annotations

import shutil
import time

import pytest
import zmq
from mqtt_support import Consumer, broker, needs_mosquitto, procs, write_bridge_config  # noqa: F401
from tinypack import frame_with

from agent import auth
from agent.tools.camera_sim import CameraSim

pytestmark = [needs_mosquitto, pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")]


def test_bridge_needs_a_subscriber_key(tmp_path, running_agent, broker, procs):
    creds = tmp_path / "creds"
    creds.mkdir()
    auth.generate_keys(creds, "curve-server")
    dirs = {role: tmp_path / f"{role}s" for role in auth.ROLES}
    secret = {}
    for d in dirs.values():
        d.mkdir()
    for name, role in (("cam0", "camera"), ("bridge", "subscriber"), ("op0", "operator")):
        public, secret[name] = auth.generate_keys(tmp_path / "peers", name, role)
        shutil.copy(public, dirs[role] / public.name)
    agent = running_agent(auth={"enabled": True, "credentials_dir": str(creds), "cameras_dir": str(dirs["camera"]),
                                "subscribers_dir": str(dirs["subscriber"]), "operators_dir": str(dirs["operator"])})
    cfg = agent.cfg
    b = broker()
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    server = str(creds / "curve-server.key")
    good = write_bridge_config(tmp_path / "good.toml", line="good", agent_cfg=cfg, port=b.port,
                               state_dir=tmp_path / "s1", stream={"server_key": server,
                                                                 "client_key": str(secret["bridge"])})
    wrong = write_bridge_config(tmp_path / "wrong.toml", line="wrong", agent_cfg=cfg, port=b.port,
                                state_dir=tmp_path / "s2", stream={"server_key": server,
                                                                  "client_key": str(secret["cam0"])})
    procs("bridge", good, tmp_path / "good.log")
    intruder = procs("bridge", wrong, tmp_path / "wrong.log")
    assert consumer.wait(lambda c: sum(p == b"online" for _, p, _ in c.arrivals) == 2, 30)
    time.sleep(1.0)
    cam = CameraSim(cfg.ingest.endpoint, camera="cam0",
                    socket_setup=lambda s: auth.make_curve_client(s, secret["cam0"], creds / "curve-server.key"))
    cam.send_coil("curve-coil", [(frame_with("bright", 8, 8), None)] * 3, mm_per_px_y=2.0)
    cam.close()
    assert consumer.wait(lambda c: any(t == "coilsight/good/cam0/summary" for t, _ in c.messages()), 30)
    # 3 defects, 3 tracks (the three marks do not touch: the coil layer stitches none) and the summary
    assert consumer.check(7)["unique"] == 7
    assert not [t for t, _ in consumer.messages() if t.startswith("coilsight/wrong/")]
    assert intruder.proc.poll() is None  # refused, not dead: it keeps trying, as a subscriber should
    consumer.close()
