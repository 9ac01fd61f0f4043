"""`coilsight bench`: the real agent against the camera simulator on loopback.

For each scenario (a coil of N frames of 1600x256 uint8; clean 0 %, typical 10 %, heavy 50 %
defective frames) it runs the agent as its own process (its sockets, threads and backends),
streams the coil as fast as the agent takes it, and measures from coil start to the final
summary: wall time, frames/s, per-stage time (from the agent's own metrics), gate pass rate,
frame-to-event latency and the agent's peak RSS. In the same run, before the agent starts, it
measures the reference figures on the same frames with the same backends and thread counts:
bare model throughput (no sockets, threads or post-processing), hence efficiency = end-to-end
frames/s / bare frames/s, and the ungated baseline (segmentation on every frame). Before each
scenario it also runs the agent's inference stage alone in this process on the scenario's frames
(no sockets, ingest or simulator), which splits the loss between the agent's own code and the frame
path in front of it.
The coil layer (tracks, periodic series, grade, crops: agent/intel.py) is measured on the heavy coil:
the same coil with the layer on and off (`coil.stitch.enabled = false`) in the same run, in the order
on, off, off, on, each run a fresh agent with its own state (``ab_rounds``), the fastest of each mode
compared (a shared machine only ever slows a run down) and each adjacent pair's ratio beside it: wall
time, frames/s and agent CPU (``coil_layer`` in the results; the target: within 5 %).
A latency scenario streams at a fixed line rate (default 20 frames/s) and reports p50/p99.
Each scenario also scores the agent's events against the defects the camera painted (camera-sim's
ground-truth instances, metrics.instances): events per true defect, the median best IoU of each
defect with any event of its frame, matched one-to-one at IoU >= 0.5, split and merged.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SCENARIOS = {"clean": 0.0, "typical": 0.1, "heavy": 0.5}
POOL = 48  # distinct frames per kind; the coil cycles through them (the simulator must stay cheap)


STRIPS = ("plain", "textured")  # synthetic backgrounds: training.synth, training.strip


def _pool(defective: bool, width: int, height: int, seed: int, compose_from: Path | None = None,
          profile: str = "steel", truth: list | None = None, strip: str = "plain") -> list[np.ndarray]:
    """Distinct frames of one kind: synthetic strips (``strip``: plain, training.synth; textured,
    training.strip's realistic strip with stains that are not defects), or line frames composed from
    real crops. Each frame's painted defects ((class_id, x0, y0, x1, y1) tuples) are appended to
    ``truth`` when given."""
    if strip not in STRIPS:
        raise ValueError(f"strip {strip!r}: expected one of {STRIPS}")
    if compose_from is not None:
        from agent.tools.camera_sim import composed_frames

        items = list(composed_frames(POOL, 1.0 if defective else 0.0, profile=profile, data_root=compose_from,
                                     split="val", seed=seed, width=width, height=height, with_instances=True))
    elif strip == "textured":
        from training.strip import RealisticStripGenerator

        gen = RealisticStripGenerator(width=width, height=height, seed=seed)
        items = [(f.image, None, f.instances()) for f in (gen.frame(i, defective) for i in range(POOL))]
    else:
        from training.synth import StripGenerator

        gen = StripGenerator(width=width, height=height, seed=seed)
        items = [gen.frame_with_instances(i, defective) for i in range(POOL)]
    if truth is not None:
        truth.extend(item[2] for item in items)
    return [item[0] for item in items]


def coil_frames(n: int, fraction: float, clean: list, bad: list, seed: int = 0, truth: tuple | None = None):
    """The scenario's coil; with ``truth`` (the clean and bad pools' instances) each frame carries its
    painted defects for camera-sim's ground truth."""
    rng = np.random.default_rng(seed)
    flags = rng.random(n) < fraction
    for i in range(n):
        pool, defect_mask, kind = (bad, np.ones((1, 1, 1), bool), 1) if flags[i] else (clean, None, 0)
        if truth is None:
            yield pool[i % POOL], defect_mask
        else:
            yield pool[i % POOL], defect_mask, truth[kind][i % POOL]


def _rss_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _stat(proc_dir: Path) -> list[str] | None:
    """The fields of <proc_dir>/stat after the command name: /proc/PID or /proc/PID/task/TID (Linux)."""
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _stat_cpu_s(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far."""
    f = _stat(Path(f"/proc/{pid}"))
    return None if f is None else _stat_cpu_s(f)


def _task_cpu_s(task: Path) -> float | None:
    """CPU seconds one thread (/proc/PID/task/TID) has used since it started: the scheduler's run
    time in nanoseconds (schedstat, first field) where the kernel keeps it, else user + system from
    stat, which counts whole clock ticks (10 ms: a thread that ran 7 ms in all reads 0.0)."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        f = _stat(task)
        return None if f is None else _stat_cpu_s(f)


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds by OS thread name (agent.threadnames names them), workers of one kind summed:
    "inference-0" and "inference-1" count as "inference"; libzmq's I/O threads as "ZMQbg". Each
    thread's absolute total since it started (``_task_cpu_s``), read now."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended between listing and reading
        cpu = _task_cpu_s(task)
        if cpu is None:
            continue
        key = name.split("-")[0] if name.startswith("inference-") else name.split("/")[0]
        out[key] = out.get(key, 0.0) + cpu
    return out


def _minor_faults(pid: int) -> int | None:
    """Minor page faults so far: each one a page of fresh memory the kernel had to map and zero."""
    f = _stat(Path(f"/proc/{pid}"))
    return None if f is None else int(f[7])


def latency_percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 in seconds; None for both when no event was timed (NaN is not JSON)."""
    if not latencies:
        return None, None
    lat = np.asarray(latencies, dtype=float)
    return round(float(np.percentile(lat, 50)), 4), round(float(np.percentile(lat, 99)), 4)


def _or_dash(value):
    return "-" if value is None else value


def bare_throughput(cfg, frames: list[np.ndarray], min_frames: int = 320, passes: int = 3) -> dict:
    """Gate and segmentation frames/s on these frames with the agent's own backends and thread set-up
    (``models.threads`` intra-op threads, ``models.workers`` concurrent callers) and nothing else: no
    sockets, no queues, no post-processing. The limit this machine allows for these models.

    Each model is timed in `passes` passes of at least `min_frames` frames and the fastest counts: on
    a shared machine other work only ever slows a pass down, and one slowed pass made the reference
    slower than the agent itself (efficiency 1.13)."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.inference import open_models

    workers = cfg.models.workers
    models = open_models(cfg)
    batch = models.batch  # what the agent's workers take: models.max_batch, capped on the CPU
    try:
        batches = [np.stack([f[None] for f in frames[i:i + batch]]) for i in range(0, len(frames) - batch + 1, batch)]
        models.warm_up(batch)
        out = {}
        per_worker = max(len(batches), -(-min_frames // (batch * workers)))
        for role, backend in (("gate", models.gate), ("seg", models.seg)):
            if backend is None:
                continue
            prepare = models.pack.models[role].prepare  # the model's own input pooling counts as its time

            def run(w: int) -> None:
                for j in range(per_worker):
                    backend.infer(prepare(batches[(j + w) % len(batches)]))

            backend.infer(prepare(batches[0]))
            rates = []
            with ThreadPoolExecutor(workers) as pool:
                for _ in range(max(1, passes)):
                    t0 = time.perf_counter()
                    list(pool.map(run, range(workers)))
                    rates.append(per_worker * workers * batch / (time.perf_counter() - t0))
            out[f"{role}_fps"] = max(rates)
            out[f"{role}_fps_passes"] = [round(r, 1) for r in rates]
        out["backend"] = {r: d["backend"] for r, d in models.describe().items()}
        out["threads"], out["workers"], out["batch"] = cfg.models.threads, workers, batch
        return out
    finally:
        models.close()


def pipeline_throughput(cfg, n: int, fraction: float, clean: list, bad: list) -> dict:
    """The agent's own inference stage in this process, with nothing in front of it: the coil's
    frames (views on the same pools the simulator sends) already in a real frame queue, the real
    workers (`Inference`, its threads, queue, gate, segmentation, post-processing, coil
    accounting), events handed to a sink instead of the publisher. No sockets, no ingest thread, no
    simulator. Between the bare models and end to end, it says which share of the loss is the
    pipeline's own code and which the transport's and the harness's."""
    from agent.batcher import Frame, FrameQueue
    from agent.coil import CoilRegistry
    from agent.ingest import wire_to_chw
    from agent.inference import Inference, open_models
    from agent.protocol import FrameHeader

    models = open_models(cfg)
    try:
        coils = CoilRegistry.for_config(cfg, models.pack.classes)
        coil = "pipeline"
        coils.coil_start("cam0", coil)
        queue = FrameQueue(max(1, n))
        for i, (img, _) in enumerate(coil_frames(n, fraction, clean, bad)):
            coils.admit("cam0", coil, i, 0.0)
            h = FrameHeader("cam0", coil, i, i, 0, img.shape, str(img.dtype), "raw", 0.0)
            queue.put(Frame(h, wire_to_chw(img), 0.0, 0))
        models.warm_up(models.batch)
        done = threading.Event()
        sink = {"defect": 0, "summary": 0}

        def submit(topic: str, body: dict) -> None:
            sink[topic] += 1
            if topic == "summary":
                done.set()

        inf = Inference(cfg=cfg, frames=queue, coils=coils, models=models, submit=submit)
        coils.coil_end("cam0", coil, n, None)  # the summary comes when the last frame is through
        t0 = time.perf_counter()
        inf.start()
        finished = done.wait(timeout=max(120.0, n / 5.0))
        wall = time.perf_counter() - t0
        inf.stop()
        if not finished or inf.inspected + inf.gated_out != n:
            raise RuntimeError(f"in-process pipeline: {inf.inspected + inf.gated_out} of {n} frames through")
        return {"wall_s": round(wall, 3), "fps": round(n / wall, 1), "inspected": inf.inspected,
                "gated_out": inf.gated_out, "events": sink["defect"]}
    finally:
        models.close()


def best_bare(*runs: dict) -> dict:
    """The fastest of several bare measurements, model by model (taken before and after the
    scenarios, so the reference brackets them)."""
    best = dict(runs[0])
    for role in ("gate_fps", "seg_fps"):
        rates = [r[role] for r in runs if role in r]
        if rates:
            best[role] = max(rates)
            best[f"{role}_passes"] = [p for r in runs for p in r.get(f"{role}_passes", [r[role]])]
    return best


def derive_reference_figures(r: dict, bare: dict, n: int) -> dict:
    """A scenario's figures against the bare models of the same run: the bare frames/s at the
    scenario's gate pass rate, efficiency, the models' own CPU, the ungated baseline, and the
    speed-up over it both as measured and as the models alone would allow (with no agent around
    them: what the 10x target can at best reach with these models on this machine)."""
    p = r["pass_rate"]
    bare_fps = 1.0 / (1.0 / bare["gate_fps"] + p / bare["seg_fps"])
    r["bare_fps"] = round(bare_fps, 1)
    r["efficiency"] = round(r["fps"] / bare_fps, 3)
    # The same question in CPU time, the agent's own: the models' CPU seconds at bare speed
    # (the bare run keeps threads x workers cores busy) against what the agent process used.
    # Unlike wall-clock efficiency it leaves out the simulator and subscriber, which share
    # these cores here and run on other machines on a line.
    cores = (bare["threads"] or os.cpu_count() or 1) * bare["workers"]
    model_cpu = n * cores / bare_fps
    r["model_cpu_s"] = round(model_cpu, 4)
    if r.get("agent_cpu_s"):  # None off Linux; 0.0 when a fast-mode coil took under a clock tick
        r["agent_cpu_overhead"] = round(r["agent_cpu_s"] / model_cpu - 1.0, 3)
    r["ungated_baseline_s"] = round(n / bare["seg_fps"], 2)
    r["speedup_vs_ungated"] = round(r["ungated_baseline_s"] / r["wall_s"], 2)
    r["models_limit_speedup"] = round(bare_fps / bare["seg_fps"], 2)
    if "pipeline" in r:  # the inference stage alone, in process (pipeline_throughput)
        r["pipeline"]["efficiency"] = round(r["pipeline"]["fps"] / bare_fps, 3)
    return r


def machine_facts() -> dict:
    """What the figures were measured on: cores, CPU model, Python, ONNX Runtime."""
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"cpus": os.cpu_count(), "cpu": cpu or platform.processor() or None, "python": sys.version.split()[0],
            "onnxruntime": ort}


def run_scenario(cfg_path: Path, cfg, n: int, fraction: float, clean: list, bad: list, *, rate: float = 0.0,
                 log_path: Path, truth: tuple | None = None, n_classes: int = 1, attach=None) -> dict:
    """One coil through a fresh agent process. ``attach`` (bench_bridge.BridgeAttach): a process started on
    the agent once it is ready (``attach.start(cfg)``) and finished after the final summary, outside the
    timed span (``attach.finish(last_seq)``: its report goes under "bridge")."""
    from agent.tools.camera_sim import CameraSim, score_events
    from agent.tools.demo import start_agent, stop_process, wait_ready
    from agent.service import status_request
    from agent.subscriber import Subscriber

    proc = start_agent(cfg_path, log_path)
    try:
        wait_ready(proc, cfg.control.endpoint, timeout_s=120)
        if attach is not None:
            attach.start(cfg)
        sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=None)
        got = {"latency": [], "events": 0, "summary": None, "t_summary": None, "boxes": []}

        def listen():
            for topic, msg in sub.messages(timeout_s=1800):
                now = time.time_ns()
                if topic == "defect":
                    got["events"] += 1
                    got["boxes"].append({k: msg[k] for k in ("index", "class_id", "bbox_px")})
                    got["latency"].append((now - msg["frame_ts_ns"]) / 1e9)
                elif msg["final"]:
                    got["summary"], got["t_summary"] = msg, time.perf_counter()
                    return

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        time.sleep(0.3)
        cam = CameraSim(cfg.ingest.endpoint, camera="cam0", sndhwm=16, send_timeout_ms=60_000)
        agent_cpu0, bench_cpu0, faults0 = _cpu_s(proc.pid), time.process_time(), _minor_faults(proc.pid)
        threads0 = _thread_cpu_s(proc.pid)
        t0 = time.perf_counter()
        # A fresh coil id per run: the agent (rightly) rejects frames of a coil it already summarised.
        coil = f"bench-{fraction}-{n}-{time.time_ns()}"
        from agent.tools.progress import ProgressLine

        progress = ProgressLine(f"bench {fraction:.0%} defective", n)
        geom = cfg.camera("cam0")  # frames follow each other along the strip at the camera's own scale
        sent = cam.send_coil(coil, _with_progress(coil_frames(n, fraction, clean, bad, truth=truth), progress), rate_hz=rate,
                             mm_per_px_y=geom.mm_per_px_y if geom else 0.5)
        progress.close()
        cam.close()
        t.join(timeout=max(120.0, n / 5.0))
        sub.close()
        s = got["summary"]
        if s is None:
            raise RuntimeError(f"no summary for the scenario; see {log_path}")
        wall = got["t_summary"] - t0
        agent_cpu, bench_cpu, faults = _cpu_s(proc.pid), time.process_time() - bench_cpu0, _minor_faults(proc.pid)
        threads_end = _thread_cpu_s(proc.pid)  # absolute, at the end: what each thread used in all
        threads = {k: round(v - threads0.get(k, 0.0), 2) for k, v in threads_end.items()}
        status = status_request(cfg.control.endpoint)
        rss = _rss_peak_mb(proc.pid)
        attached = attach.finish(status["last_seq"]) if attach is not None else None
        stages = {k: round(v.get("sum_s", 0.0), 4) for k, v in status["metrics"]["stages"].items()}
        stage_counts = {k: int(v.get("count", 0)) for k, v in status["metrics"]["stages"].items()}
        p50, p99 = latency_percentiles(got["latency"])
        f = s["frames"]
        return {
            "frames": n, "defect_fraction": fraction, "sent": sent.sent, "not_sent": len(sent.dropped),
            "accounting": f, "accounted": f["received"] == f["inspected"] + f["gated_out"] + f["rejected"]
            + f["shed"] + f["pending"] + f["lost"] and f["sent"] == n == f["received"] + f["missing"],
            "wall_s": round(wall, 3), "agent_wall_s": s["timing"]["wall_s"], "fps": round(n / wall, 1),
            "pass_rate": round(f["inspected"] / max(1, f["received"]), 4), "events": got["events"],
            "stage_s": stages, "stage_count": stage_counts, "latency_p50_s": p50,
            "latency_p99_s": p99, "peak_rss_mb": rss,
            "rate_hz": rate, "backend": s.get("backend"),
            # On a 2-core box the simulator and subscriber (this process) compete with the agent.
            "agent_cpu_s": round(agent_cpu - agent_cpu0, 2) if agent_cpu is not None else None,
            "simulator_cpu_s": round(bench_cpu, 2),
            # where the agent's CPU went, by thread: the part outside "inference" is the pipeline's cost
            "agent_thread_cpu_s": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
            # the same threads' absolute CPU since the agent started (start-up included), read at the end:
            # never a difference of two readings, so a thread that ran at all reads above 0
            "agent_thread_cpu_total_s": {k: round(v, 4) for k, v in sorted(threads_end.items(), key=lambda kv: -kv[1])},
            "agent_minor_faults_per_frame": round((faults - faults0) / n, 1) if faults is not None else None,
            # the events against the defects the camera painted (None: the frames carry no truth)
            "instances": score_events(sent, got["boxes"], n_classes) if sent.instances else None,
            **({"bridge": attached} if attached is not None else {}),
        }
    finally:
        if attach is not None:
            attach.abort()
        stop_process(proc, grace_s=30.0)


def _with_progress(frames, progress):
    for i, item in enumerate(frames, start=1):
        yield item
        progress.update(i)


def _say(text: str) -> None:
    """Bench's own progress notes: stderr, so stdout carries only the result."""
    print(text, file=sys.stderr, flush=True)


def run_bench(args) -> int:
    from agent.config import load_config
    from agent.tools.demo import isolated_config

    n = 40 if args.fast else args.frames
    scenarios = args.scenario or list(SCENARIOS)
    if getattr(args, "data_root", None) is not None and (getattr(args, "strip", None) or "plain") != "plain":
        print(f"coilsight bench: --strip {args.strip} paints synthetic strip; --data-root composes frames from real "
              "crops instead: choose one", file=sys.stderr)
        return 2
    results: dict = {"machine": machine_facts(),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "frames": n, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="coilsight-bench-") as tmp:
        work = Path(tmp)
        overrides = {"agent": {"log_format": "json"}}
        models = {}
        if args.backend:
            models["backends"] = args.backend
        if args.batch:
            models["max_batch"] = models["opt_batch"] = models["cpu_max_batch"] = args.batch
        if getattr(args, "models", None) is not None:  # a candidate pack, benched with the config's settings
            models["dir"] = str(Path(args.models).resolve())
        if models:
            overrides["models"] = models
        from agent.config import ConfigError
        from engines.modelpack import ModelPackError, load_model_pack

        try:
            cfg_path = isolated_config(args.config, work, **overrides)
            cfg = load_config(cfg_path)
            pack = load_model_pack(cfg.models_dir())
        except ConfigError as exc:
            exc.tell("coilsight bench: config error: ")
            return 2
        except ModelPackError as exc:
            print(f"coilsight bench: cannot bench the model pack {cfg.models_dir()}: {exc}", file=sys.stderr)
            return 2
        results["models"] = {"dir": str(cfg.models_dir()), "profile": pack.profile,
                             **{f"{role}_sha256": entry.sha256 for role, entry in pack.models.items()}}
        from agent.tools.line_sim import LINE_PROFILES

        if pack.profile in LINE_PROFILES:
            print(f"coilsight bench: the {pack.profile} line's frames are generated per line, not painted strip: "
                  f"`coilsight demo --profile {pack.profile}` streams a lot through the agent; the bench runs the "
                  "strip profiles (steel, magnetic_tile, kolektorsdd)", file=sys.stderr)
            return 2
        _say(f"bench: {n} frames of {pack.width}x{pack.height} per scenario; building frame pools ...")
        src = getattr(args, "data_root", None)
        strip = getattr(args, "strip", None) or "plain"
        truth: tuple[list, list] = ([], [])
        try:
            clean = _pool(False, pack.width, pack.height, 1, src, pack.profile, truth[0], strip)
            bad = _pool(True, pack.width, pack.height, 2, src, pack.profile, truth[1], strip)
        except ValueError as exc:  # a frame size or profile the generators cannot draw
            print(f"coilsight bench: cannot make {pack.width}x{pack.height} frames for profile {pack.profile}: {exc}",
                  file=sys.stderr)
            return 2
        k = len(pack.classes)
        results["frames_source"] = (f"composed from real {pack.profile} val crops under {src}" if src
                                    else "synthetic" if strip == "plain"
                                    else "synthetic textured strip (training.strip: texture, roll lines, drift, stains)")
        # every frame of both pools: the same frames the scenarios send, not a cache-resident few
        passes = 1 if args.fast else 3
        bare_before = bare_throughput(cfg, clean + bad, passes=passes)
        raw = {}
        for name in scenarios:
            fraction = SCENARIOS[name]
            _say(f"bench: scenario {name} ({fraction:.0%} defective) ...")
            pipeline = pipeline_throughput(cfg, n, fraction, clean, bad)
            raw[name] = run_scenario(cfg_path, cfg, n, fraction, clean, bad, log_path=work / f"{name}.log",
                                     truth=truth, n_classes=k)
            raw[name]["pipeline"] = pipeline
        if "heavy" in raw:
            def layer_run(i: int, mode: str) -> dict:
                _say(f"bench: the heavy coil with the coil layer {mode} ({i + 1} of 4) ...")
                d = work / f"layer-{i}-{mode}"
                d.mkdir()
                layer = {} if mode == "on" else {"coil": {"stitch": {"enabled": False}}}
                path = isolated_config(args.config, d, **overrides, **layer)
                return run_scenario(path, load_config(path), n, SCENARIOS["heavy"], clean, bad,
                                    log_path=d / "agent.log", truth=truth, n_classes=k)

            order, runs, walls = ab_rounds(layer_run)
            results["coil_layer"] = coil_layer_cost(min(runs["on"], key=lambda r: r["wall_s"]),
                                                    min(runs["off"], key=lambda r: r["wall_s"]))
            results["coil_layer"].update(ab_summary(order, runs, walls))
        if getattr(args, "bridge", False):
            from agent.tools.bench_bridge import measure_bridge

            results["bridge"] = measure_bridge(args.config, work, overrides, n, clean, bad, truth=truth, n_classes=k,
                                               say=_say, rounds=getattr(args, "bridge_rounds", 1))
        _say("bench: bare model throughput again, after the scenarios ...")
        bare = best_bare(bare_before, bare_throughput(cfg, clean + bad, passes=passes))
        results["bare"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in bare.items()}
        for name, r in raw.items():
            results["scenarios"][name] = derive_reference_figures(r, bare, n)
        if args.rate:
            _say(f"bench: latency at {args.rate} frames/s ...")
            m = min(n, int(args.rate * 30))
            r = run_scenario(cfg_path, cfg, m, SCENARIOS["typical"], clean, bad, rate=args.rate,
                             log_path=work / "latency.log", truth=truth, n_classes=k)
            results["latency"] = r
    out = getattr(args, "out", None)
    as_json = getattr(args, "json", None)
    if as_json not in (None, "-"):  # `--json FILE`, the spelling before --out: one more release
        print("coilsight: warning: --json FILE is deprecated and will be removed in the next release; "
              "use --out FILE (--json alone prints JSON on stdout)", file=sys.stderr)
        out = Path(as_json)
    if as_json == "-":
        print(json.dumps(results, indent=2, default=str))
    else:
        print(format_table(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=2, default=str))
        _say(f"bench: results written to {out}")
    ok = all(r["accounted"] for r in results["scenarios"].values())
    if results.get("bridge", {}).get("all_forwarded") is False:
        _say("bench: the bridge did not forward every message the agent journaled; see its log")
        ok = False
    return 0 if ok else 1


AB_ROUND = ("on", "off", "off", "on")


def ab_rounds(run_one, rounds: int = 1) -> tuple[list[str], dict[str, list[dict]], list[float]]:
    """An A/B measurement on a shared machine: ``rounds`` rounds of on, off, off, on, each run by
    ``run_one(index, mode)`` (a fresh agent with its own state). Returns the order, the runs by mode
    and every run's wall time in order."""
    order = list(AB_ROUND) * max(1, rounds)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    walls: list[float] = []
    for i, mode in enumerate(order):
        r = run_one(i, mode)
        runs[mode].append(r)
        walls.append(r["wall_s"])
    return order, runs, walls


def pair_ratios(order: list[str], walls: list[float]) -> list[float]:
    """on/off wall ratios of the adjacent pairs of the run order (on, off), (off, on), ..."""
    out = []
    for i in range(0, len(order) - 1, 2):
        pair = dict(zip(order[i:i + 2], walls[i:i + 2]))
        if set(pair) != {"on", "off"}:
            raise ValueError(f"runs {i} and {i + 1} are not one on and one off: {order[i:i + 2]}")
        out.append(round(pair["on"] / pair["off"], 4))
    return out


def ab_summary(order: list[str], runs: dict[str, list[dict]], walls: list[float]) -> dict:
    """Every run's wall time by mode, the order, each adjacent pair's on/off ratio and their median
    (the figure least moved by one disturbed run; the fastest-of-each ratio is beside it)."""
    ratios = pair_ratios(order, walls)
    return {"wall_s_runs": {m: [r["wall_s"] for r in rs] for m, rs in runs.items()}, "order": order,
            "pair_ratios": ratios, "median_pair_ratio": round(float(np.median(ratios)), 4)}


def coil_layer_cost(on: dict, off: dict) -> dict:
    """The heavy coil with the coil layer on against off: wall time and agent CPU ratios (on / off),
    and the CPU of the threads the layer adds work to (publisher: stitching and the rest; crops)."""
    def ratio(a, b):
        return round(a / b, 4) if a and b else None

    threads = ("publisher", "crops")
    on_cpu, off_cpu = on.get("agent_thread_cpu_s", {}), off.get("agent_thread_cpu_s", {})
    return {"scenario": "heavy", "on_wall_s": on["wall_s"], "off_wall_s": off["wall_s"],
            "wall_ratio": ratio(on["wall_s"], off["wall_s"]), "on_fps": on["fps"], "off_fps": off["fps"],
            "on_agent_cpu_s": on.get("agent_cpu_s"), "off_agent_cpu_s": off.get("agent_cpu_s"),
            "cpu_ratio": ratio(on.get("agent_cpu_s"), off.get("agent_cpu_s")),
            "on_thread_cpu_s": {t: on_cpu.get(t, 0.0) for t in threads},
            "off_thread_cpu_s": {t: off_cpu.get(t, 0.0) for t in threads},
            # every thread's CPU, on - off: where the layer's cost lands (its own threads, or others slowed)
            "thread_cpu_delta_s": {t: round(on_cpu.get(t, 0.0) - off_cpu.get(t, 0.0), 3)
                                   for t in sorted({*on_cpu, *off_cpu})},
            "events": on["events"], "within_5_percent": bool(on["wall_s"] <= 1.05 * off["wall_s"])}


def format_table(res: dict) -> str:
    b = res["bare"]
    m = res.get("models")
    lines = ([f"models: {m['dir']} (profile {m['profile']}; " + ", ".join(
        f"{k[:-7]} {v[:12]}" for k, v in m.items() if k.endswith("_sha256")) + ")"] if m else [])
    lines += [f"bare model throughput (fastest pass, before and after the scenarios): gate {b['gate_fps']} frames/s, "
             f"seg {b['seg_fps']} frames/s ({b['backend']}); passes gate {b.get('gate_fps_passes', '-')}, "
             f"seg {b.get('seg_fps_passes', '-')}", ""]
    head = ("scenario", "frames", "wall s", "fps", "bare fps", "effic.", "in-proc", "pass", "events", "p50 s", "p99 s",
            "RSS MB", "ungated s", "x gate", "x limit")
    rows = [head]
    items = list(res["scenarios"].items()) + ([("latency@%g" % res["latency"]["rate_hz"], res["latency"])]
                                              if "latency" in res else [])
    for name, r in items:
        rows.append((name, r["frames"], r["wall_s"], r["fps"], r.get("bare_fps", "-"), r.get("efficiency", "-"),
                     r.get("pipeline", {}).get("efficiency", "-"),
                     r["pass_rate"], r["events"], _or_dash(r["latency_p50_s"]), _or_dash(r["latency_p99_s"]),
                     round(r["peak_rss_mb"] or 0), r.get("ungated_baseline_s", "-"), r.get("speedup_vs_ungated", "-"),
                     r.get("models_limit_speedup", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    lines.append("effic.: end-to-end frames/s over bare; in-proc: the same for the agent's inference stage alone, "
                 "in process (no sockets, no ingest, no simulator)")
    lines.append("x gate: ungated baseline (segmentation on every frame, bare) over wall time; x limit: the same "
                 "ratio for the bare models at this pass rate, with no agent around them")
    lines.append("")
    lines.append("events against the painted defects (camera-sim truth; matched: one-to-one at IoU >= 0.5): " + "; ".join(
        f"{name}: {i['true_defects']} defects, {_or_dash(i['events_per_defect'])} events per defect, median best "
        f"IoU {_or_dash(i['median_best_iou'])}, median matched IoU {_or_dash(i['median_matched_iou'])}, "
        f"matched {i['matched']}, split {i['split']}, merged {i['merged']}, false {i['false_events']}, recall by "
        f"sqrt(area) px " + ", ".join(f"{k} {_or_dash(v['recall'])} ({v['matched']}/{v['true']})"
                                      for k, v in i.get("recall_by_size", {}).items())
        for name, r in items if (i := r.get("instances"))))
    lines.append("")
    lines.append("CPU seconds, agent / simulator+subscriber (agent CPU over the models' own at bare speed): " + "; ".join(
        f"{name}: {r.get('agent_cpu_s')} / {r.get('simulator_cpu_s')}"
        + (f" (+{r['agent_cpu_overhead']:.1%})" if r.get("agent_cpu_overhead") is not None else "") for name, r in items))
    lines.append("agent CPU seconds by thread: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in r.get("agent_thread_cpu_s", {}).items()) for name, r in items))
    lines.append("agent CPU seconds by thread since the agent started: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in r["agent_thread_cpu_total_s"].items())
        for name, r in items if r.get("agent_thread_cpu_total_s")))
    if "coil_layer" in res:
        c = res["coil_layer"]
        lines.append(f"coil layer (tracks, periodic, grade, crops) on the heavy coil: on {c['on_wall_s']} s / off "
                     f"{c['off_wall_s']} s = x{c['wall_ratio']} wall ({c['on_fps']} vs {c['off_fps']} frames/s), "
                     f"x{c['cpu_ratio']} agent CPU; publisher CPU {c['on_thread_cpu_s']['publisher']} vs "
                     f"{c['off_thread_cpu_s']['publisher']} s, crops {c['on_thread_cpu_s']['crops']} s; on/off pair "
                     f"ratios {c.get('pair_ratios')} (median x{c.get('median_pair_ratio')}); "
                     + ("within 5 %" if c["within_5_percent"] else "MORE THAN 5 % slower")
                     + "; agent CPU s by thread, on - off: "
                     + ", ".join(f"{t} {v:+.2f}" for t, v in c.get("thread_cpu_delta_s", {}).items()))
    if "bridge" in res:
        from agent.tools.bench_bridge import format_line

        lines.append(format_line(res["bridge"]))
    lines.append("per-stage seconds (agent metrics): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in r["stage_s"].items()) for name, r in items))
    return "\n".join(lines)
