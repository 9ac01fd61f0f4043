"""`coilsight demo`: a simulated coil through a real agent process, on loopback.

Starts `coilsight run` as a child process with the profile's config (IPC endpoints in a
temporary folder, so nothing collides with a running agent), subscribes to its stream, streams
a coil from the camera simulator (frames of the profile's shape, with painted defects it keeps as
ground truth), prints the coil summary and how it compares with that ground truth, then stops the
agent with SIGTERM. It keeps the agent's log and says where (stderr); a failed run keeps its whole
folder (journal and state too).
"""
from __future__ import annotations

import json
import os
import shutil
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


def stop_process(proc: subprocess.Popen | None, grace_s: float = 20.0, kill_wait_s: float = 5.0) -> int | None:
    """SIGTERM, up to ``grace_s`` for a clean exit (an agent drains its queue and writes its
    checkpoint), then SIGKILL; nothing to send when it already exited. Its exit status (None: none)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait_s)
    return proc.returncode


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
        ("gated out", f["gated_out"]),
        ("rejected", f"{f['rejected']} " + ", ".join(f"{k} {v}" for k, v in (s["rejected_by_reason"] or {}).items())),
        ("shed", f["shed"]),
        ("missing", f"{f['missing']} " + ", ".join(f"{cam} {a}-{b}" for cam, ranges in (s["missing_ranges"] or {}).items()
                                                    for a, b in ranges)),
        ("lost", f["lost"]), ("duplicates", f["duplicates"]),
        ("coil length", f"{s['length_mm'] / 1000:.1f} m"),
        ("defects", s["defect_count"]),
    ]
    rows += [(f"  {k}", f"{n}  ({s['density_per_m'].get(k, 0):.2f}/m)") for k, n in s["defects"].items()]
    t = s["timing"]
    rows += [("wall time", f"{t['wall_s']:.1f} s of {t['budget_s']:.0f} s budget (slack {t['slack_s']:.1f} s)"),
             ("models", " ".join(f"{k}={v}" for k, v in s.get("models", {}).items())),
             ("backend", " ".join(f"{k}={v}" for k, v in s.get("backend", {}).items()))]
    if "grade" in s:  # the coil layer (docs/protocol.md 2.6)
        rows += [("tracks (stitched defects)", s["track_count"]),
                 ("grade", f"{s['grade']['grade']} ({s['grade']['rule']}: {s['grade']['reason']})")]
    width = max(len(r[0]) for r in rows)
    out = ["", "Coil summary", "=" * (width + 40)]
    out += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if s.get("worst"):
        out.append("worst defects:")
        for d in s["worst"][:5]:
            out.append(f"  {d['class']:<16} conf {d['confidence']:.2f}  frame {d['index']:>5}  "
                       f"along {d['along_mm'] / 1000:7.2f} m  across {d['across_mm']:7.1f} mm  "
                       f"{d['area_mm2']:.0f} mm2")
    out += [format_periodic(p) for p in s.get("periodic") or ()]
    return "\n".join(out)


def format_periodic(p: dict) -> str:
    return (f"periodic: {p['class']} every {p['pitch_mm']:.0f} mm at {p['across_mm']:.0f} mm, {p['count']} repeats "
            f"(roll diameter {p['roll_diameter_mm']:.0f} mm, along {p['first_along_mm'] / 1000:.2f}-"
            f"{p['last_along_mm'] / 1000:.2f} m, confidence {p['confidence']:.2f})")


def _per(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_box_score(score: dict) -> str:
    """camera_sim.score_events as one line of the ground-truth block: the same painted defects,
    matched by box (IoU), not by overlap."""
    t = score["true_defects"]
    return (f"  {score['matched']} of {t} painted defects matched one-to-one at IoU >= 0.5 "
            f"({_pct(score['matched'], t)}), {score['split']} split, {score['merged']} merged; "
            f"{_per(score['events_per_defect'])} events per painted defect; median best IoU "
            f"{_per(score['median_best_iou'])}; recall by size (sqrt of area, px) "
            + ", ".join(f"{k} {v['matched']}/{v['true']}" for k, v in score.get("recall_by_size", {}).items() if v["true"]))


class DemoError(RuntimeError):
    """The demo cannot run this profile; the message says what is missing."""


def _check_profile(config: Path):
    """The config and its model pack, or DemoError naming what is missing (chip, parts and wafer
    ship no pack yet)."""
    from agent.config import ConfigError
    from engines.modelpack import ModelPackError, load_model_pack

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise DemoError(f"{config}: " + "; ".join(exc.errors)) from None
    try:
        pack = load_model_pack(cfg.models_dir())
    except ModelPackError as exc:
        raise DemoError(f"profile {cfg.agent.profile} has no model pack to demo ({exc}); the shipped packs are "
                        f"steel, magnetic_tile, kolektorsdd, wafer, chip and parts; train one with `coilsight train --profile "
                        f"{cfg.agent.profile}` or set [models] dir in {config}") from None
    if pack.channels != 1:
        raise DemoError(f"profile {cfg.agent.profile}: the demo paints grey frames; its pack takes "
                        f"{pack.channels} channels")
    return cfg, pack


class GroundTruth:
    """What the demo painted, per frame: one box per painted defect. With a source that gives
    instances (``(image, masks, instances)``: the generator's own record of each defect it painted)
    those are the truth, the same ``score_events`` matches events against, so both count the same
    painted defects; else one box per class present in the frame's masks."""

    def __init__(self) -> None:
        self.boxes: dict[int, list[tuple[int, int, int, int]]] = {}
        self.frames = 0

    def record(self, frames):
        import numpy as np

        for index, item in enumerate(frames):  # (img, masks) or (img, masks, instances)
            masks = item[1]
            self.frames += 1
            if len(item) > 2 and item[2] is not None:
                boxes = [(int(x0), int(y0), int(x1), int(y1)) for _, x0, y0, x1, y1 in item[2]]
            elif masks is not None:
                boxes = []
                for m in masks:
                    if m.any():
                        ys, xs = np.nonzero(m)
                        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
            else:
                boxes = []
            if boxes:
                self.boxes[index] = boxes
            yield item

    def compare(self, events: list[dict], summary: dict, camera: str = "cam0") -> dict:
        """The agent's findings against what was painted (class-agnostic: a painted defect is found when
        a defect event on its frame overlaps its box). Which frames the gate passed comes from the final
        summary's ``inspected_ranges`` (docs/protocol.md 2.2); ``gate_decisions`` says whether it listed
        them all (``all``), only the first ranges (``partial``: the counts are then lower bounds), or
        none (``unknown``: an agent that does not send the key)."""
        by_frame: dict[int, list[list[int]]] = {}
        for ev in events:
            by_frame.setdefault(int(ev["index"]), []).append(ev["bbox_px"])

        def overlaps(a, b) -> bool:
            return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

        painted = sum(len(b) for b in self.boxes.values())
        found = sum(1 for i, boxes in self.boxes.items() for box in boxes
                    if any(overlaps(box, e) for e in by_frame.get(i, [])))
        flagged_defective = sum(1 for i in self.boxes if i in by_frame)
        flagged_clean = sum(1 for i in by_frame if i not in self.boxes)
        inspected = summary["frames"]["inspected"]
        gate = gate_vs_truth(summary, set(self.boxes), camera)
        decisions, passed_painted, passed_clean = gate["decisions"], gate["passed_defective"], gate["passed_clean"]
        return {"frames": self.frames, "painted_frames": len(self.boxes), "clean_frames": self.frames - len(self.boxes),
                "painted_defects": painted, "painted_defects_found": found,
                "painted_frames_with_events": flagged_defective, "clean_frames_with_events": flagged_clean,
                "gate_passed": inspected, "gate_decisions": decisions,
                "gate_passed_painted": passed_painted, "gate_passed_clean": passed_clean,
                "defect_events": len(events), "summary_defects": summary.get("defect_count"),
                "profile": summary.get("profile")}


def gate_vs_truth(summary: dict, defective: set[int], camera: str = "cam0") -> dict:
    """Which frames the gate passed (the final summary's ``inspected_ranges``, docs/protocol.md 2.2)
    joined with the frames known to carry defects: ``passed_defective``, ``passed_clean`` (None when
    the summary does not say), and ``decisions``: ``all`` listed, ``partial`` (the first ranges only:
    the counts are lower bounds) or ``unknown`` (an agent that does not send the key)."""
    ranges = summary.get("inspected_ranges")
    if ranges is None:
        return {"decisions": "unknown", "passed_defective": None, "passed_clean": None}
    passed = {i for a, b in ranges.get(camera, []) for i in range(a, b + 1)}
    cam_inspected = (summary.get("cameras", {}).get(camera) or {}).get("inspected", 0)
    on_defective = len(passed & defective)
    return {"decisions": "all" if len(passed) == cam_inspected else "partial", "passed_defective": on_defective,
            "passed_clean": len(passed) - on_defective}


def keep_only_log(work: Path, log_path: Path) -> None:
    """After a good run: the agent's log stays (a few lines), its journal and state go."""
    for path in work.iterdir():
        if path == log_path:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f} %" if b else "n/a"


def format_ground_truth(gt: dict) -> str:
    pf, cf = gt["painted_frames"], gt["clean_frames"]
    if gt.get("gate_decisions") in ("all", "partial"):
        pp, pc = gt["gate_passed_painted"], gt["gate_passed_clean"]
        gate = (f"  gate passed {pp} of {pf} painted frames ({_pct(pp, pf)}) and {pc} of {cf} clean frames "
                f"({_pct(pc, cf)}): {gt['gate_passed']} frames to segmentation")
        if gt["gate_decisions"] == "partial":
            gate += (f" (the summary lists the gate's decisions for {pp + pc} of them only: the painted and "
                     "clean counts are lower bounds)")
    else:
        gate = (f"  gate passed {gt['gate_passed']} of {gt['frames']} frames to segmentation (this agent's "
                "summary does not say which: no inspected_ranges)")
    lines = [
        "Against the demo's own ground truth",
        f"  painted: {pf} of {gt['frames']} frames carry {gt['painted_defects']} defects; {cf} frames are clean",
        gate,
        f"  defect events on {gt['painted_frames_with_events']} of {pf} painted frames "
        f"({_pct(gt['painted_frames_with_events'], pf)}) and on {gt['clean_frames_with_events']} of "
        f"{cf} clean frames ({_pct(gt['clean_frames_with_events'], cf)})",
        f"  {gt['painted_defects_found']} of {gt['painted_defects']} painted defects found "
        f"({_pct(gt['painted_defects_found'], gt['painted_defects'])}; found = an event's box overlaps it)",
    ]
    if gt.get("summary_defects") is not None and gt["summary_defects"] != gt["defect_events"]:
        lines.append(f"  note: the subscriber received {gt['defect_events']} defect events, the summary counts "
                     f"{gt['summary_defects']}: the figures above use the events received")
    if gt.get("profile") not in (None, "steel"):
        lines.append(f"  note: the painted defects are synthetic steel-strip shapes; the {gt['profile']} models were "
                     "trained on real images of their own line, so expect them to miss most of these")
    return "\n".join(lines)


def listen_for_coil(cfg) -> tuple[dict, threading.Thread, object]:
    """Subscribe to the agent of ``cfg`` from now on, on a thread: defect events into
    ``got["events"]``, the first final summary into ``got["summary"]`` (then the thread ends).
    Returns (got, thread, subscriber): join the thread, then close the subscriber."""
    from agent.subscriber import Subscriber

    sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=None)
    got: dict = {"events": [], "summary": None}

    def listen() -> None:
        for topic, msg in sub.messages(timeout_s=600):
            if topic == "defect":
                got["events"].append(msg)
            elif topic == "summary" and msg["final"]:
                got["summary"] = msg
                return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    time.sleep(0.3)  # let the SUB connect before the coil starts
    return got, t, sub


def _say(text: str) -> None:
    """Progress notes: stderr, so that stdout carries only the result (`demo --json | jq`)."""
    print(text, file=sys.stderr, flush=True)


def run_demo(config: Path, *, frames: int, defect_fraction: float, rate: float, as_json: bool,
             keep_dir: Path | None = None) -> int:
    """0 when the coil was summarised and frames were inspected; 1 otherwise, keeping the agent's log
    (its path is printed); 2 when the profile cannot be demonstrated here."""
    from agent.tools.camera_sim import CameraSim, score_events, synthetic_frames
    from agent.tools.rollmarks import RollMarks, with_roll_marks
    from training.synth import STEEL_CLASSES

    try:
        _, pack = _check_profile(config)
    except DemoError as exc:
        print(f"coilsight demo: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="coilsight-demo-", dir=keep_dir))
    ok = False
    log_path = work / "agent.log"
    try:
        cfg_path = isolated_config(config, work)
        cfg = load_config(cfg_path)
        _say(f"starting agent ({cfg.agent.profile} profile, log {log_path}) ...")
        proc = start_agent(cfg_path, log_path)
        try:
            try:
                wait_ready(proc, cfg.control.endpoint)
            except (RuntimeError, TimeoutError) as exc:
                print(f"coilsight demo: {exc}; agent log kept: {log_path}", file=sys.stderr)
                return 1
            got, t, sub = listen_for_coil(cfg)
            _say(f"streaming {frames} frames of {pack.width}x{pack.height} ({defect_fraction:.0%} with painted "
                 "defects) ...")
            t0 = time.monotonic()
            truth = GroundTruth()
            source = synthetic_frames(frames, defect_fraction, width=pack.width, height=pack.height, with_instances=True)
            geom = cfg.camera("cam0")
            mm_y = geom.mm_per_px_y if geom else 0.5
            # one roll mark series (agent/tools/rollmarks.py): the coil layer should report it as periodic
            marks = RollMarks(across_px=min(1100, pack.width - 60)) if pack.width >= 200 and pack.height >= 128 else None
            if marks is not None:
                source = with_roll_marks(source, marks, mm_per_px_y=mm_y)
            cam = CameraSim(cfg.ingest.endpoint, camera="cam0")
            # the painted defects are the synthetic strip's (steel) classes, whatever the pack's
            sent = cam.send_coil(f"demo-{time.strftime('%Y%m%d-%H%M%S')}", truth.record(source), rate_hz=rate,
                                 classes=STEEL_CLASSES, mm_per_px_y=mm_y)
            cam.close()
            t.join(timeout=300)
            sub.close()
            s = got["summary"]
            if s is None:
                print(f"coilsight demo: no coil summary arrived; agent log kept: {log_path}", file=sys.stderr)
                return 1
            gt = truth.compare(got["events"], s)
            score = score_events(sent, got["events"], len(STEEL_CLASSES))
            if marks is not None:
                gt["roll_marks"] = {"painted": marks.describe(STEEL_CLASSES, geom.mm_per_px_x if geom else 1.0,
                                                              geom.offset_x_mm if geom else 0.0),
                                    "pitch_mm": marks.pitch_mm, "positions_mm": marks.positions}
            f = s["frames"]
            if as_json:
                print(json.dumps({"summary": s, "ground_truth": gt, "box_score": score}, indent=2, default=str))
            else:
                print(format_summary(s))
                print()
                print(format_ground_truth(gt))
                print(format_box_score(score))
                if marks is not None:
                    found = s.get("periodic")
                    print(f"  roll marks painted: {gt['roll_marks']['painted']}; "
                          + (f"the agent found {len(found)} periodic series" if found is not None
                             else "the coil layer is off (coil.stitch.enabled)"))
                print(f"\n{len(got['events'])} defect events received by the subscriber; camera sent {sent.sent} "
                      f"frames in {time.monotonic() - t0:.1f} s")
            if f["inspected"] + f["gated_out"] == 0:
                print(f"coilsight demo: the agent inspected none of the {sent.sent} frames "
                      f"(rejected: {s['rejected_by_reason'] or f['rejected']}); agent log kept: {log_path}",
                      file=sys.stderr)
                return 1
            if f["rejected"] or not s["complete"]:
                print(f"coilsight demo: the coil is incomplete ({f['rejected']} rejected, {f['missing']} missing); "
                      f"agent log kept: {log_path}", file=sys.stderr)
                return 1
            ok = True
            return 0
        finally:
            stop_process(proc)
    finally:
        if ok:
            keep_only_log(work, log_path)
            _say(f"agent log: {log_path}")
