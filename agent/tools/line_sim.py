"""The generated product lines (wafer, chip, parts) for the camera simulator and the demo.

``line_frames(profile, n, defect_fraction, seed)`` yields (frame, masks) as the camera simulator
sends them: wafer maps (52x52, die codes 0/1/2; masks = the dies each pattern made fail, so the
truth is the set of patterns), chip dies (224x224x6 HWC), painted-part photos (4608x3072 RGB; a
scene takes seconds to draw). ``run_line_demo`` streams a lot/batch through a real agent and prints
what it found against that truth, frame by frame.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

LINE_PROFILES = ("wafer", "chip", "parts")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def line_classes(profile: str) -> tuple[str, ...]:
    if profile == "wafer":
        from training.gen_wafer import WAFER_PATTERNS

        return WAFER_PATTERNS
    if profile == "chip":
        from training.gen_chip import CHIP_CLASSES

        return CHIP_CLASSES
    if profile == "parts":
        from training.gen_parts import PARTS_CLASSES

        return PARTS_CLASSES
    raise ValueError(f"no generator for profile {profile!r} (generated lines: {', '.join(LINE_PROFILES)})")


def line_frames(profile: str, n: int, defect_fraction: float, *, seed: int = 0
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """n generated frames of the line; a deterministic ``defect_fraction`` of them with defects."""
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    line_classes(profile)  # unknown profile: a clear error before anything is sent
    rng = np.random.default_rng([seed, 0xD3])
    if profile == "wafer":
        from training.gen_wafer import LABEL_SETS, WaferGenerator

        gen = WaferGenerator(seed)
        for i in range(n):
            k = int(rng.integers(1, len(LABEL_SETS))) if rng.random() < defect_fraction else 0
            s = gen.sample(i, label_set=k)
            yield s.wafer, s.masks
    elif profile == "chip":
        from training.gen_chip import ChipGenerator

        gen = ChipGenerator(seed)
        for i in range(n):
            s = gen.sample(i, defective=bool(rng.random() < defect_fraction))
            yield s.image, s.masks
    else:
        from training.gen_parts import SCALE, PartsGenerator

        gen = PartsGenerator(seed)
        for i in range(n):
            s = gen.sample(i, defective=bool(rng.random() < defect_fraction))
            mask = np.repeat(np.repeat(s.mask, SCALE, axis=0), SCALE, axis=1)
            yield s.frame(), mask[None]


def run_line_demo(profile: str, *, frames: int, defect_fraction: float, rate: float, as_json: bool,
                  seed: int = 0, config: Path | None = None) -> int:
    """A generated lot through a real agent: the coil summary, then found vs truth per class and frame.
    Keeps the agent's log (a failed run: its whole folder) and says where."""
    from agent.config import load_config
    from agent.tools.camera_sim import CameraSim
    from agent.tools.demo import (_say, format_summary, gate_vs_truth, isolated_config, keep_only_log, listen_for_coil,
                                  start_agent, stop_process, wait_ready)

    classes = line_classes(profile)
    work = Path(tempfile.mkdtemp(prefix=f"coilsight-demo-{profile}-"))
    log_path = work / "agent.log"
    ok = False
    try:
        cfg_path = isolated_config(config or CONFIGS / f"{profile}.toml", work)
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
            events = got["events"]
            _say(f"streaming {frames} generated {profile} frames ({defect_fraction:.0%} with defects) ...")
            camera = cfg.cameras[0].id if cfg.cameras else "cam0"
            cam = CameraSim(cfg.ingest.endpoint, camera=camera)
            sent = cam.send_coil(f"demo-{profile}-{int(time.time())}", line_frames(profile, frames, defect_fraction,
                                                                                    seed=seed),
                                 rate_hz=rate, classes=classes)
            cam.close()
            t.join(timeout=300)
            sub.close()
            s = got["summary"]
            if s is None:
                print(f"coilsight demo: no coil summary arrived; agent log kept: {log_path}", file=sys.stderr)
                return 1
            table = found_vs_truth(profile, classes, sent.sent, sent.classes, events)
            table["gate"] = {**gate_vs_truth(s, set(sent.defective), camera), "inspected": s["frames"]["inspected"],
                             "defective": len(sent.defective), "clean": sent.sent - len(sent.defective)}
            if as_json:
                print(json.dumps({"summary": s, "found_vs_truth": table}, indent=2, default=str))
            else:
                print(format_summary(s))
                if s.get("lot"):
                    lot = s["lot"]
                    print(f"lot: {lot['wafers']} wafers, yield {lot['yield']:.4f} ({lot['good_dies']} good of "
                          f"{lot['dies']} dies), {lot['wafers_with_patterns']} with patterns, {lot['wafers_mixed']} "
                          "mixed; wafers per pattern: " + ", ".join(f"{k} {v}" for k, v in lot["patterns"].items()))
                print(render_found_vs_truth(table))
            ok = True
            return 0
        finally:
            stop_process(proc)
    finally:
        if ok:
            keep_only_log(work, log_path)
            _say(f"agent log: {log_path}")


def found_vs_truth(profile: str, classes: tuple[str, ...], n_frames: int, truth: dict[int, set[str]],
                   events: list[dict]) -> dict:
    """Per class: frames that hold it (truth), frames the agent reported it on (found), both; and the
    frames where the two differ. A wafer event's found classes are its ``patterns``."""
    found: dict[int, set[str]] = {}
    for ev in events:
        names = {p["class"] for p in ev["patterns"]} if "patterns" in ev else {ev["class"]}
        found.setdefault(int(ev["index"]), set()).update(names)
    per_class = {}
    for c in classes:
        t = {i for i, cs in truth.items() if c in cs}
        f = {i for i, cs in found.items() if c in cs}
        per_class[c] = {"truth": len(t), "found": len(f), "both": len(t & f)}
    differ = [{"index": i, "truth": sorted(truth.get(i, ())), "found": sorted(found.get(i, ()))}
              for i in range(n_frames) if truth.get(i, set()) != found.get(i, set())]
    exact = n_frames - len(differ)
    return {"profile": profile, "frames": n_frames, "frames_exact": exact, "per_class": per_class,
            "defect_events": len(events), "differ": differ}


def render_found_vs_truth(t: dict) -> str:
    out = ["", f"Found vs truth ({t['frames']} frames; {t['frames_exact']} with exactly the true classes, "
               f"{t['defect_events']} defect events)",
           f"{'class':<12} {'truth':>6} {'found':>6} {'both':>6}"]
    for c, v in t["per_class"].items():
        out.append(f"{c:<12} {v['truth']:>6} {v['found']:>6} {v['both']:>6}")
    g = t.get("gate")
    if g and g["decisions"] != "unknown":
        pct = lambda a, b: f"{100.0 * a / b:.1f} %" if b else "n/a"  # noqa: E731
        out.append(f"gate passed {g['passed_defective']} of {g['defective']} frames with defects "
                   f"({pct(g['passed_defective'], g['defective'])}) and {g['passed_clean']} of {g['clean']} clean "
                   f"frames ({pct(g['passed_clean'], g['clean'])}): {g['inspected']} frames to the models"
                   + (" (the summary lists only the first of them: lower bounds)" if g["decisions"] == "partial" else ""))
    for d in t["differ"][:10]:
        out.append(f"  frame {d['index']:>4}: truth {', '.join(d['truth']) or '-'}; found {', '.join(d['found']) or '-'}")
    if len(t["differ"]) > 10:
        out.append(f"  ... and {len(t['differ']) - 10} more frames that differ")
    return "\n".join(out)
