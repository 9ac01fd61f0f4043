"""`coilsight demo`: a simulated coil through a real agent process, on loopback.

Starts `coilsight run` as a child process with the profile's config (IPC endpoints in a
temporary folder, so nothing collides with a running agent), subscribes to its stream, streams
a coil from the camera simulator, prints the coil summary, then stops the agent with SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import config_dict, dump_toml, load_config


def isolated_config(base: Path, workdir: Path, **overrides: dict) -> Path:
    """A copy of ``base`` with IPC endpoints and state under ``workdir``."""
    data = config_dict(load_config(base))
    data["ingest"]["endpoint"] = f"ipc://{workdir}/ingest.sock"
    data["publish"]["endpoint"] = f"ipc://{workdir}/events.sock"
    data["publish"]["replay_endpoint"] = f"ipc://{workdir}/replay.sock"
    data["control"]["endpoint"] = f"ipc://{workdir}/control.sock"
    data["agent"]["state_dir"] = str(workdir / "state")
    for section, values in overrides.items():
        data[section].update(values)
    path = workdir / "agent.toml"
    path.write_text(dump_toml(data))
    return path


def _die_with_parent() -> None:
    """Linux: the child agent gets SIGTERM when the demo/bench process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_agent(config: Path, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log_file,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def wait_ready(proc: subprocess.Popen, control_endpoint: str, timeout_s: float = 60.0) -> dict:
    from agent.service import status_request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with code {proc.returncode} before it was ready")
        try:
            reply = status_request(control_endpoint, timeout_ms=500)
            if reply.get("health", {}).get("state") == "ready":
                return reply
        except TimeoutError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"agent not ready within {timeout_s} s")


def format_summary(s: dict) -> str:
    f = s["frames"]
    rows = [
        ("coil", s["coil"]), ("final / complete", f"{s['final']} / {s['complete']}"),
        ("end reason", s["end_reason"]),
        ("frames sent", f["sent"]), ("received", f["received"]), ("inspected (gate passed)", f["inspected"]),
        ("gated out", f["gated_out"]), ("rejected", f"{f['rejected']} {s['rejected_by_reason'] or ''}".strip()),
        ("shed", f["shed"]), ("missing", f"{f['missing']} {s['missing_ranges'] or ''}".strip()),
        ("lost", f["lost"]), ("duplicates", f["duplicates"]),
        ("coil length", f"{s['length_mm'] / 1000:.1f} m"),
        ("defects", s["defect_count"]),
    ]
    rows += [(f"  {k}", f"{n}  ({s['density_per_m'].get(k, 0):.2f}/m)") for k, n in s["defects"].items()]
    t = s["timing"]
    rows += [("wall time", f"{t['wall_s']:.1f} s of {t['budget_s']:.0f} s budget (slack {t['slack_s']:.1f} s)"),
             ("models", " ".join(f"{k}={v}" for k, v in s.get("models", {}).items())),
             ("backend", " ".join(f"{k}={v}" for k, v in s.get("backend", {}).items()))]
    width = max(len(r[0]) for r in rows)
    out = ["", "Coil summary", "=" * (width + 40)]
    out += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if s.get("worst"):
        out.append("worst defects:")
        for d in s["worst"][:5]:
            out.append(f"  {d['class']:<16} conf {d['confidence']:.2f}  frame {d['index']:>5}  "
                       f"along {d['along_mm'] / 1000:7.2f} m  across {d['across_mm']:7.1f} mm  "
                       f"{d['area_mm2']:.0f} mm2")
    return "\n".join(out)


def _per(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def cfg_classes(cfg_path: Path) -> tuple[str, ...]:
    """The classes of the pack the agent of this config loads."""
    from engines.modelpack import load_model_pack

    return load_model_pack(load_config(cfg_path).models_dir(), verify_hashes=False).classes


def run_demo(config: Path, *, frames: int, defect_fraction: float, rate: float, as_json: bool) -> int:
    from agent.tools.camera_sim import CameraSim, score_events, synthetic_frames
    from agent.subscriber import Subscriber
    from training.synth import STEEL_CLASSES

    with tempfile.TemporaryDirectory(prefix="coilsight-demo-") as tmp:
        work = Path(tmp)
        cfg_path = isolated_config(config, work)
        cfg = load_config(cfg_path)
        log_path = work / "agent.log"
        print(f"starting agent ({cfg.agent.profile} profile, log {log_path}) ...", flush=True)
        proc = start_agent(cfg_path, log_path)
        try:
            wait_ready(proc, cfg.control.endpoint)
            sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=None)
            got: dict = {"defects": 0, "summary": None, "events": []}

            def listen() -> None:
                for topic, msg in sub.messages(timeout_s=600):
                    if topic == "defect":
                        got["defects"] += 1
                        got["events"].append(msg)
                    elif topic == "summary" and msg["final"]:
                        got["summary"] = msg
                        return

            t = threading.Thread(target=listen, daemon=True)
            t.start()
            time.sleep(0.3)  # let the SUB connect before the coil starts
            print(f"streaming {frames} frames of 1600x256 ({defect_fraction:.0%} with defects) ...", flush=True)
            t0 = time.monotonic()
            cam = CameraSim(cfg.ingest.endpoint, camera="cam0")
            sent = cam.send_coil(f"demo-{int(time.time())}",
                                 synthetic_frames(frames, defect_fraction, with_instances=True),
                                 rate_hz=rate, classes=STEEL_CLASSES)
            cam.close()
            t.join(timeout=300)
            sub.close()
            s = got["summary"]
            if s is None:
                print("no coil summary arrived; see the agent log", file=sys.stderr)
                return 1
            if as_json:
                print(json.dumps(s, indent=2, default=str))
            else:
                print(format_summary(s))
                print(f"\n{got['defects']} defect events received by the subscriber; camera sent {sent.sent} frames "
                      f"({len(sent.defective)} with defects) in {time.monotonic() - t0:.1f} s")
                score = score_events(sent, got["events"], len(cfg_classes(cfg_path)))
                print(f"{score['true_defects']} defects painted: {_per(score['events_per_defect'])} events per "
                      f"defect, {score['matched']} matched one-to-one at IoU >= 0.5, {score['split']} split, "
                      f"{score['merged']} merged; median best IoU {_per(score['median_best_iou'])}")
            return 0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
