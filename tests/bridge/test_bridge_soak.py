"""Soak (slow): 100,000 events from a real agent through the bridge while mosquitto restarts every
10 s; 0 lost, duplicates counted. Run: pytest --run-slow tests/bridge/test_bridge_soak.py -s
(COILSIGHT_SOAK_EVENTS sets another count)."""
from __future__ import annotations

import os
import threading
import time

import pytest
from mqtt_support import Consumer, broker, needs_mosquitto, procs, write_bridge_config  # noqa: F401
from tests_support_events import Collector
from tinypack import clean_frame

from agent.tools.camera_sim import CameraSim

pytestmark = [needs_mosquitto, pytest.mark.slow]


def busy_frame():
    """64 separate 8x8 bright squares: 64 defect events per frame."""
    img = clean_frame()
    for y in range(4, 64, 16):
        for x in range(4, 256, 16):
            img[y:y + 8, x:x + 8] = 255
    return img


@pytest.mark.timeout(3600)
def test_soak_broker_restart_every_10s(broker, procs, running_agent, tmp_path):
    target = int(os.environ.get("COILSIGHT_SOAK_EVENTS", "100000"))
    b = broker()
    agent = running_agent(coil={"max_events_per_frame": 64}, ingest={"overload": "backpressure"})
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=3600.0)
    consumer = Consumer(b.port, "coilsight/L1/+/defect")
    assert consumer.connected.wait(10)
    conf = write_bridge_config(tmp_path / "bridge.toml", agent_cfg=cfg, port=b.port, state_dir=tmp_path / "bstate",
                               bridge={"state_interval_s": 0.5})
    bridge = procs("bridge", conf, tmp_path / "bridge.log")
    assert consumer.wait(lambda c: c.client.is_connected(), 10)

    done = threading.Event()
    restarts = []

    def restarter():
        while not done.wait(10.0):
            b.restart(0.5)
            restarts.append(time.monotonic())

    t0 = time.monotonic()
    rt = threading.Thread(target=restarter, daemon=True)
    rt.start()
    frame = busy_frame()
    coil = 0
    while not col.msgs or max(m["seq"] for _, m in col.msgs) < target:
        cam = CameraSim(cfg.ingest.endpoint, camera=f"cam{coil % 2}")
        cam.send_coil(f"soak-{coil}", [(frame, None)] * 100, mm_per_px_y=2.0)
        cam.close()
        coil += 1
        col.wait(lambda c, k=coil: len(c.summaries()) >= k - 1, 120)
    assert col.wait(lambda c: len(c.summaries()) == coil, 300)
    n = max(m["seq"] for _, m in col.msgs)
    defect_seqs = {m["seq"] for t, m in col.msgs if t == "defect"}
    ok = consumer.wait(lambda c: {m["seq"] for _, m in c.messages("defect")} >= defect_seqs, 600)
    done.set()
    rt.join(30)
    wall = time.monotonic() - t0
    got = [m["seq"] for _, m in consumer.messages("defect")]
    lost = len(defect_seqs - set(got))
    print(f"\n[figures] soak: events={len(defect_seqs)} last_seq={n} coils={coil} broker_restarts={len(restarts)} "
          f"lost={lost} arrivals={len(got)} duplicates={len(got) - len(set(got))} wall_s={wall:.0f} "
          f"bridge_stats={bridge.events('bridge_stats')[-1:]}", flush=True)
    assert ok and lost == 0
    assert len(defect_seqs) >= target * 0.95 and len(restarts) >= 1
    consumer.close()
    col.close()
