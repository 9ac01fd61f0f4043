"""CURVE end to end through the real agent: keys from files, allow-list through ZAP."""
from __future__ import annotations

import time

from tinypack import frame_with

from agent import auth
from agent.tools.camera_sim import CameraSim
from agent.subscriber import Subscriber


def test_only_allowed_peers_get_in_or_out(tmp_path, running_agent, capsys):
    creds, allow, other = tmp_path / "creds", tmp_path / "allow", tmp_path / "other"
    for d in (creds, allow, other):
        d.mkdir()
    auth.generate_keys(creds, "curve-server")
    cam_pub, cam_sec = auth.generate_keys(tmp_path, "camera")
    sub_pub, sub_sec = auth.generate_keys(tmp_path, "subscriber")
    _, stranger_sec = auth.generate_keys(other, "stranger")
    (allow / "camera.key").write_bytes(cam_pub.read_bytes())
    (allow / "subscriber.key").write_bytes(sub_pub.read_bytes())
    server_pub = creds / "curve-server.key"

    agent = running_agent(auth={"enabled": True, "credentials_dir": str(creds), "allow_dir": str(allow)})
    cfg = agent.cfg
    client = lambda secret: (lambda s: auth.make_curve_client(s, secret, server_pub))  # noqa: E731

    good_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=1,
                          socket_setup=client(sub_sec))
    stranger_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, socket_setup=client(stranger_sec))
    plain_sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint)
    time.sleep(0.5)

    # Peers without an allowed key: nothing gets in.
    for setup in (None, client(stranger_sec)):
        cam = CameraSim(cfg.ingest.endpoint, camera="intruder", socket_setup=setup, send_timeout_ms=300)
        cam.send_coil("intruder-coil", [(frame_with("bright", 8, 8), None)] * 3)
        cam.close(linger_ms=0)
    # The allowed camera gets every frame in.
    cam = CameraSim(cfg.ingest.endpoint, camera="cam0", socket_setup=client(cam_sec))
    cam.send_coil("good-coil", [(frame_with("bright", 8, 8), None)] * 5)
    cam.close()

    got = []
    for topic, msg in good_sub.messages(timeout_s=20):
        got.append((topic, msg))
        if topic == "summary":
            break
    summary = got[-1][1]
    assert summary["coil"] == "good-coil" and summary["frames"]["inspected"] == 5
    assert sum(1 for t, _ in got if t == "defect") == 5
    assert "intruder-coil" not in agent.coils.open_coils()
    assert agent.ingest.received_messages == 7  # the allowed camera's start + 5 frames + end

    for sub in (stranger_sub, plain_sub):
        assert list(sub.messages(timeout_s=1.0)) == []
        sub.close()
    good_sub.close()
    logged = capsys.readouterr().out
    assert "curve_peer_denied" in logged  # the stranger's key, refused by the ZAP allow-list
    assert "curve_handshake_failed" in logged  # the plain-text camera and subscriber, seen by the watch
