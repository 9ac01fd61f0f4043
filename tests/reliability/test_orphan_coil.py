"""Issue 16, item 6: a short coil that starts and ends between two crash checkpoints, SIGKILLed
while its frames are still going through the models, gets its summary after the restart."""
from __future__ import annotations

import json
import threading
import time

from harness import Collector, agent_process, check_accounting, figures  # noqa: F401 (agent_process: a fixture)
from test_crash_recovery import coil_frames, journal_records

from agent.tools.camera_sim import CameraSim


def test_a_short_coil_the_checkpoint_never_saw_gets_its_summary_after_sigkill(agent_process):
    n = 120
    ap = agent_process(ingest={"coil_idle_timeout_s": 1.0, "overload": "backpressure"})
    ap.start()
    tries = []
    coil = None
    for attempt in range(8):
        name = f"Q{attempt}"
        live = Collector(ap.cfg, from_seq=None)
        time.sleep(0.3)
        cam = CameraSim(ap.cfg.ingest.endpoint, camera="cam0", sndhwm=1000, send_timeout_ms=15_000)
        # The whole coil, coil_end included, at full speed: it starts after the last checkpoint, and the
        # kill lands as soon as its first defect event is out, while its frames are still in the models.
        sender = threading.Thread(target=cam.send_coil, args=(name, coil_frames(n)), daemon=True)
        sender.start()
        assert live.wait(lambda c, name=name: c.defects(name), 30), ap.log()[-3000:]
        ap.kill()
        live.close()
        sender.join(30)
        cam.close()
        # Was the path reached? The checkpoint on disk must not know the coil, and the journal must hold
        # events of it but no final summary.
        ck = json.loads((ap.cfg.state_path() / "journal" / ap.cfg.agent.name / "coils.checkpoint.json").read_text())
        records = journal_records(ap.cfg)
        journaled = [b for _, t, b in records if b["coil"] == name]
        reached = (name not in ck["coils"] and name not in ck["closed"]
                   and any(b["type"] == "defect" for b in journaled)
                   and not any(b["type"] == "summary" and b["final"] for b in journaled))
        tries.append(reached)
        ap.start()
        if reached:
            coil = name
            break
    assert coil is not None, f"the kill never landed between a coil's first event and its summary: {tries}"
    after = Collector(ap.cfg)  # from seq 1
    assert after.wait(lambda c: c.summaries(coil), 30), ap.log()[-3000:]
    time.sleep(0.3)
    after.close()
    (s,) = after.summaries(coil)
    check_accounting(s)
    assert (s["final"], s["complete"], s["end_reason"]) == (True, False, "agent_restart")
    defects = after.defects(coil)
    assert defects, "the coil's events were published before the kill"
    assert s["defect_count"] == len(defects), "the summary counts every event published for the coil"
    assert s["frames"]["inspected"] >= len({d["index"] for d in defects})
    assert s["frames"]["sent"] <= n
    restored = [json.loads(line) for line in ap.log().splitlines() if '"coils_restored"' in line]
    assert restored[-1]["orphans"] == [coil], "recovery reopened the coil from the journal"
    figures("orphan coil after sigkill", tries=len(tries), coil=coil, defects=len(defects),
            inspected=s["frames"]["inspected"], missing=s["frames"]["missing"], lost=s["frames"]["lost"],
            sent=s["frames"]["sent"])
