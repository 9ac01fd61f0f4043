"""`coilsight bridge` end to end: a real agent on loopback fed by camera-sim, the bridge as a real
process, a real mosquitto, and a consumer that checks every seq arrives at least once and in order
per camera, through a broker restart mid-coil and a SIGKILL of the bridge."""
from __future__ import annotations

import json
import threading
import time

from mqtt_support import Consumer, broker, needs_mosquitto, procs, write_bridge_config  # noqa: F401
from tests_support_events import Collector, check_accounting
from tinypack import clean_frame

from agent.tools.camera_sim import CameraSim

pytestmark = needs_mosquitto


def frames(n: int, *, every: int = 2, squares: int = 3, on_frame=None):
    """n tiny-pack frames; every `every`-th carries `squares` bright squares (one defect each)."""
    for i in range(n):
        if on_frame is not None:
            on_frame(i)
        img = clean_frame()
        if i % every == 0:
            for k in range(squares):
                img[8:24, 16 + 64 * k:32 + 64 * k] = 255
        yield img, None


def send_both(cfg, coil: str, n: int, on_frame=None, rate_hz: float = 0.0) -> None:
    cams = [CameraSim(cfg.ingest.endpoint, camera=c) for c in ("cam0", "cam1")]
    threads = [threading.Thread(target=cam.send_coil, args=(coil, frames(n, on_frame=on_frame if i == 0 else None)),
                                kwargs={"rate_hz": rate_hz, "mm_per_px_y": 2.0}) for i, cam in enumerate(cams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for cam in cams:
        cam.close()


def last_seq(col: Collector) -> int:
    return max(m["seq"] for _, m in col.msgs)


def test_every_seq_arrives_through_broker_restart_and_bridge_sigkill(broker, procs, running_agent, tmp_path):
    b = broker()
    agent = running_agent()
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=180.0)
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    conf = write_bridge_config(tmp_path / "bridge.toml", agent_cfg=cfg, port=b.port, state_dir=tmp_path / "bstate",
                               bridge={"window": 50})
    bridge = procs("bridge", conf, tmp_path / "bridge.log")
    assert consumer.wait(lambda c: any(t == "coilsight/L1/status" and p == b"online" for t, p, _ in c.arrivals),
                         30), bridge.log()[-3000:]

    # Coil A: the broker restarts while the cameras are in the middle of the coil.
    send_both(cfg, "coil-A", 40, on_frame=lambda i: b.restart(0.3) if i == 20 else None, rate_hz=100)
    assert col.wait(lambda c: len(c.summaries("coil-A")) == 1, 60)
    check_accounting(col.summaries("coil-A")[0])

    # Coil B: the bridge is SIGKILLed mid-coil and started again (it resumes from its state file).
    def kill_and_restart(i: int) -> None:
        if i == 20:
            bridge.kill()
            bridge.start()

    send_both(cfg, "coil-B", 40, on_frame=kill_and_restart, rate_hz=100)
    assert col.wait(lambda c: len(c.summaries("coil-B")) == 1, 60)
    n = last_seq(col)
    assert consumer.wait(lambda c: c.seqs() >= set(range(1, n + 1)), 60), \
        (sorted(set(range(1, n + 1)) - consumer.seqs())[:20], bridge.log()[-3000:])
    figures = consumer.check(n)
    print(f"\n[figures] bridge e2e: last_seq={n}, {figures}, broker_starts={b.starts}")

    # Every defect went to its camera's topic, the summary (retained) to each of its cameras'.
    defects = consumer.messages("defect")
    assert defects and all(t == f"coilsight/L1/{m['camera']}/defect" for t, m in defects)
    assert {t for t, m in consumer.messages("summary")} == {"coilsight/L1/cam0/summary", "coilsight/L1/cam1/summary"}
    # The state file caught up with the last acknowledged seq.
    state = next((tmp_path / "bstate").glob("bridge-L1-*.json"))
    deadline = time.monotonic() + 10
    while json.loads(state.read_text())["acked_seq"] < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(state.read_text())["acked_seq"] == n
    consumer.close()
    col.close()
    # A clean stop says offline (retained): a new consumer sees it.
    assert bridge.terminate() == 0
    late = Consumer(b.port, "coilsight/L1/status", client_id="late")
    assert late.wait(lambda c: any(p == b"offline" for _, p, _ in c.arrivals), 10)
    late.close()


def test_bridge_resends_after_broker_outage_with_same_seq(broker, procs, running_agent, tmp_path):
    """The broker is down while a whole coil is published: nothing is lost, and the retained summary
    carries the agent's seq."""
    b = broker()
    agent = running_agent()
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=120.0)
    conf = write_bridge_config(tmp_path / "bridge.toml", agent_cfg=cfg, port=b.port, state_dir=tmp_path / "bstate",
                               bridge={"window": 20})
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    bridge = procs("bridge", conf, tmp_path / "bridge.log")
    assert consumer.wait(lambda c: any(p == b"online" for _, p, _ in c.arrivals), 30), bridge.log()[-3000:]
    b.stop()
    send_both(cfg, "coil-out", 20)
    assert col.wait(lambda c: len(c.summaries("coil-out")) == 1, 60)
    time.sleep(1.0)
    b.start()
    n = last_seq(col)
    assert consumer.wait(lambda c: c.seqs() >= set(range(1, n + 1)), 60)
    consumer.check(n)
    summary_seq = col.summaries("coil-out")[0]["seq"]
    assert bridge.events("mqtt_disconnected") and len(bridge.events("mqtt_connected")) >= 2
    consumer.close()
    retained = Consumer(b.port, "coilsight/L1/cam0/summary", client_id="retained")
    assert retained.wait(lambda c: any(r for *_, r in c.arrivals), 10)
    assert retained.messages()[-1][1]["seq"] == summary_seq
    retained.close()
    col.close()
