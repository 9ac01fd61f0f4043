"""The page's data from a real agent: the live feed (event stream + replay + control socket) and
past coils read from the journal files, read-only."""
from __future__ import annotations

import shutil
import time

import pytest

from tinypack import clean_frame, frame_with

from agent.service import status_request
from agent.tools.camera_sim import CameraSim
from agent.web.history import JournalHistory
from agent.web.live import Hub, LiveFeed, LiveState


def send_coil(agent, coil: str, squares: int) -> None:
    frames = [(frame_with("bright", x=16 + 16 * i, y=16), None) if i % 3 == 0 else (clean_frame(), None)
              for i in range(3 * squares)]
    cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam0")
    try:
        cam.send_coil(coil, frames, mm_per_px_y=2.0)
    finally:
        cam.close()


def wait_for(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def feed_for(agent) -> tuple[LiveState, LiveFeed]:
    cfg = agent.cfg
    state = LiveState(cfg.coil.budget_s)
    feed = LiveFeed(events_endpoint=cfg.publish.endpoint, replay_endpoint=cfg.publish.replay_endpoint, state=state,
                    hub=Hub(), status=lambda: status_request(cfg.control.endpoint, timeout_ms=1000), progress_s=0.2)
    feed.start()
    return state, feed


def test_live_state_follows_the_coil_and_late_pages_get_it_by_replay(running_agent):
    agent = running_agent()
    state, feed = feed_for(agent)
    try:
        assert wait_for(lambda: state.health is not None), "no heartbeat reached the page's feed"
        send_coil(agent, "web-A", squares=4)
        assert wait_for(lambda: state.summary is not None and state.summary.get("final")), state.snapshot()
        snap = state.snapshot()
        assert snap["coil"] == "web-A" and len(snap["defects"]) == 4
        assert snap["summary"]["defect_count"] == 4 and snap["summary"]["complete"]
        assert [d["class"] for d in snap["defects"]] == ["bright"] * 4
        assert sorted(d["index"] for d in snap["defects"]) == [0, 3, 6, 9]
        seqs = [d["seq"] for d in snap["defects"]]
        assert seqs == sorted(set(seqs))
    finally:
        feed.stop()
    # A page started after the coil: its feed reaches back through the replay socket.
    late, late_feed = feed_for(agent)
    try:
        assert wait_for(lambda: late.summary is not None and late.summary.get("final")), late.snapshot()
        assert late.snapshot()["coil"] == "web-A" and len(late.snapshot()["defects"]) == 4
        # and follows the next coil live; the control socket's progress names it while it is open
        send_coil(agent, "web-B", squares=2)
        assert wait_for(lambda: late.coil == "web-B" and late.summary is not None and late.summary.get("final"))
        assert len(late.snapshot()["defects"]) == 2
    finally:
        late_feed.stop()
    assert feed.errors == 0 and late_feed.errors == 0


def test_past_coils_from_the_journal_files(running_agent, tmp_path):
    agent = running_agent()
    journal = agent.cfg.state_path() / "journal" / agent.cfg.agent.name
    history = JournalHistory(journal)
    history.refresh()
    assert history.coils() == []
    state, feed = feed_for(agent)
    try:
        send_coil(agent, "hist-A", squares=2)
        assert wait_for(lambda: state.summary is not None and state.summary.get("final"))
        history.refresh()
        assert [s["coil"] for s in history.coils()] == ["hist-A"]
        assert history.coil("hist-A")["defect_count"] == 2
        send_coil(agent, "hist-B", squares=1)
        assert wait_for(lambda: state.coil == "hist-B" and state.summary is not None and state.summary.get("final"))
    finally:
        feed.stop()
    history.refresh()  # reads only what was appended
    assert [s["coil"] for s in history.coils()] == ["hist-B", "hist-A"]
    before = {p.name: p.read_bytes() for p in journal.iterdir()}
    # the reader never writes: the agent's files are byte for byte what they were
    assert {p.name: p.read_bytes() for p in journal.iterdir()} == before

    # a copy with a flipped byte in a record and a torn tail: the rest is still read, damage counted
    copy = tmp_path / "journal-copy"
    shutil.copytree(journal, copy)
    seg = sorted(copy.glob("segment-*.log"))[0]
    data = bytearray(seg.read_bytes())
    data[40] ^= 0xFF  # inside the first record
    seg.write_bytes(bytes(data) + data[:30])  # and half a record at the end
    damaged = JournalHistory(copy)
    damaged.refresh()
    assert [s["coil"] for s in damaged.coils()] == ["hist-B", "hist-A"]
    assert damaged.damaged == 1


def test_with_curve_the_page_uses_its_own_subscriber_and_operator_keys(running_agent, tmp_path):
    from agent import auth
    from agent.config import with_overrides
    from agent.web.commands import _socket_setup
    from agent.web.control import control_functions
    from agent.web.settings import web_settings

    creds = tmp_path / "creds"
    dirs = {role: tmp_path / role for role in ("cameras", "subscribers", "operators")}
    for d in (creds, *dirs.values()):
        d.mkdir()
    auth.generate_keys(creds, "curve-server")
    keys = {}
    for role, d in (("camera", dirs["cameras"]), ("subscriber", dirs["subscribers"]),
                    ("operator", dirs["operators"])):
        pub, keys[role] = auth.generate_keys(tmp_path, f"web-{role}", role=role)
        (d / pub.name).write_bytes(pub.read_bytes())
    agent = running_agent(auth={"enabled": True, "credentials_dir": str(creds),
                                **{f"{k}_dir": str(v) for k, v in dirs.items()}})
    server = str(creds / "curve-server.key")
    settings = web_settings(with_overrides(agent.cfg, web={
        "subscriber_key": str(keys["subscriber"]), "operator_key": str(keys["operator"]), "server_key": server}))
    status, _ = control_functions(settings)
    assert status()["health"]["state"] == "ready"  # the operator key opens the CURVE control socket
    state = LiveState(agent.cfg.coil.budget_s)
    feed = LiveFeed(events_endpoint=agent.cfg.publish.endpoint, replay_endpoint=agent.cfg.publish.replay_endpoint,
                    state=state, hub=Hub(), status=status, socket_setup=_socket_setup(settings), progress_s=0.2)
    feed.start()
    try:
        assert wait_for(lambda: state.health is not None), "the page's subscriber key was not admitted"
        cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam0",
                        socket_setup=lambda s: auth.make_curve_client(s, keys["camera"], server))
        try:
            cam.send_coil("curve-coil", [(frame_with("bright", x=16, y=16), None)] * 3, mm_per_px_y=2.0)
        finally:
            cam.close()
        assert wait_for(lambda: state.summary is not None and state.summary.get("final"))
        assert state.coil == "curve-coil" and len(state.snapshot()["defects"]) == 3
    finally:
        feed.stop()
    # without an operator key the page cannot ask the control socket: it says so instead of hanging
    no_op = web_settings(with_overrides(agent.cfg, web={"subscriber_key": str(keys["subscriber"]),
                                                        "server_key": server}))
    assert control_functions(no_op) == (None, None)


def test_past_coil_report_page(running_agent):
    """/report/COIL renders `coilsight report` (agent/tools/report.py) for a coil the journal holds;
    where that tool is not installed the page says so."""
    import importlib.util

    from starlette.testclient import TestClient

    from agent.web.app import REPORT_CSP, create_app
    from agent.web.settings import web_settings

    agent = running_agent()
    state, feed = feed_for(agent)
    try:
        send_coil(agent, "rep-A", squares=2)
        assert wait_for(lambda: state.summary is not None and state.summary.get("final"))
    finally:
        feed.stop()
    app, web = create_app(web_settings(agent.cfg), start_feed=False)
    with TestClient(app, base_url="http://127.0.0.1:8470") as c:
        assert c.get("/api/coils").json()["coils"][0]["coil"] == "rep-A"
        for bad in ("/report/unknown-coil", "/report/..%2F..%2Fetc%2Fpasswd", "/report/latest"):
            assert c.get(bad).status_code == 404, bad
        r = c.get("/report/rep-A")
        if importlib.util.find_spec("agent.tools.report") is None:
            assert r.status_code == 404 and "not installed" in r.json()["error"]
            assert c.get("/api/live").json()["config"]["reports"] is False
        else:
            assert r.status_code == 200, r.text
            assert "rep-A" in r.text and r.headers["content-security-policy"] == REPORT_CSP
            assert c.get("/api/live").json()["config"]["reports"] is True


def test_a_page_that_cannot_keep_up_is_cut_off_not_waited_for():
    import asyncio

    from agent.web.live import CLIENT_QUEUE

    async def scenario():
        hub = Hub()
        hub.attach(asyncio.get_running_loop())
        slow, fast = hub.add(), hub.add()
        for i in range(CLIENT_QUEUE + 5):
            hub.publish({"type": "defect", "defect": {"seq": i}})
            if i % 100 == 0:
                await asyncio.sleep(0)  # the loop delivers
                while not fast.empty():
                    fast.get_nowait()  # this page reads
        await asyncio.sleep(0.05)
        return hub, slow, fast

    hub, slow, fast = asyncio.run(scenario())
    assert hub.is_cut(slow) and not hub.is_cut(fast)
    assert slow.qsize() == CLIENT_QUEUE and hub.clients == 1
    assert slow.get_nowait().startswith("event: defect\ndata: ")


def test_crops_of_tracks_reach_the_page_through_the_control_socket(running_agent):
    """With the coil layer (issue 19: tracks, crops), a track's crop is fetched from the agent by its
    id and shown with the track's defects; no file path is built by the page."""
    pytest.importorskip("agent.crops", reason="the agent on this branch keeps no crops (issue 19's coil layer)")
    from starlette.testclient import TestClient

    from agent.web.app import create_app
    from agent.web.control import control_functions
    from agent.web.settings import web_settings

    agent = running_agent()
    settings = web_settings(agent.cfg)
    status, crop = control_functions(settings)
    app, web = create_app(settings, status=status, crop=crop, start_feed=False)
    feed = LiveFeed(events_endpoint=agent.cfg.publish.endpoint, replay_endpoint=agent.cfg.publish.replay_endpoint,
                    state=web.state, hub=Hub(), status=status, progress_s=0.2)
    feed.start()
    try:
        send_coil(agent, "crop-A", squares=2)
        assert wait_for(lambda: web.state.summary is not None and web.state.summary.get("final"))
        assert wait_for(lambda: all("crop_url" in d for d in web.state.snapshot()["defects"]))
    finally:
        feed.stop()
    urls = {d["crop_url"] for d in web.state.snapshot()["defects"]}
    assert len(urls) == 2 and all(u.startswith("/crops/crop-A/") for u in urls)
    with TestClient(app, base_url="http://127.0.0.1:8470") as c:
        for url in urls:
            r = c.get(url)
            assert r.status_code == 200 and r.content.startswith(b"\x89PNG") and r.headers["content-type"] == "image/png"
        assert c.get("/crops/crop-A/999.png").status_code == 404  # a track the agent never named
