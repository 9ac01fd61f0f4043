"""Agent sub-commands: run, demo, camera-sim, subscribe, check-config, status, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the inspection agent")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--state-dir", help="override agent.state_dir")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file offline; prints every error with its key path")
    p.add_argument("config", type=Path)
    p.add_argument("--models", action="store_true", help="also load the model pack and its calibration")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("camera-sim", help="publish a simulated coil to an agent")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    p.add_argument("--camera", default="cam0")
    p.add_argument("--coil", default="coil-0001")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--defect-fraction", type=float, default=0.2)
    p.add_argument("--rate", type=float, default=0.0, help="frames per second; 0 = as fast as the agent takes them")
    p.add_argument("--folder", type=Path, help="send the images of this folder instead of synthetic strips")
    p.add_argument("--compose-from", metavar="DATA_ROOT", type=Path,
                   help="compose line frames from real crops of the profile's dataset under DATA_ROOT")
    p.add_argument("--profile", default="steel",
                   help="dataset profile for --compose-from (default steel); wafer, chip or parts: that line's "
                        "generated frames (agent/tools/line_sim.py)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="split for --compose-from")
    p.add_argument("--encoding", choices=("raw", "png", "jpeg"), default="raw")
    p.add_argument("--gt-dir", type=Path, help="write frames and Severstal-style ground truth here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_camera_sim)

    p = sub.add_parser("subscribe", help="print the event stream as JSON lines, with gap repair")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5556")
    p.add_argument("--replay", default="tcp://127.0.0.1:5557")
    p.add_argument("--topic", action="append", choices=("defect", "summary", "health"),
                   help="topics to print (repeatable); default defect and summary")
    p.add_argument("--from-seq", type=int, help="replay from this sequence number first (late join)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("status", help="ask a running agent for its health and metrics")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5558")
    p.add_argument("--config", type=Path, help="read the control endpoint from this config")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="camera-sim + agent + subscriber on loopback; prints the coil summary")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "steel.toml")
    p.add_argument("--frames", type=int, default=None,
                   help="frames to stream (default 300; --profile wafer 100, chip 40, parts 3: a 4608x3072 part "
                        "takes seconds to draw)")
    p.add_argument("--defect-fraction", type=float, default=0.2)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--profile", choices=("steel", "wafer", "chip", "parts"),
                   help="run this profile's config (configs/<profile>.toml) with its generated frames and print "
                        "found vs truth (wafer, chip, parts); default: --config with synthetic steel strips")
    p.add_argument("--seed", type=int, default=0, help="generator seed (wafer, chip, parts)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time the real agent on simulated coils (see docs/performance.md)")
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "steel.toml")
    p.add_argument("--frames", type=int, default=4000)
    p.add_argument("--scenario", action="append", choices=("clean", "typical", "heavy"))
    p.add_argument("--backend", action="append", help="backend chain override (repeatable)")
    p.add_argument("--batch", type=int, help="frames per model call and per queue batch: sets models.max_batch, "
                   "opt_batch and cpu_max_batch (default: the config's)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--fast", action="store_true", help="a few frames: checks the bench runs, not its speed")
    p.add_argument("--rate", type=float, default=0.0, help="line rate for the latency scenario (0 = off)")
    p.add_argument("--compose-from", metavar="DATA_ROOT", type=Path,
                   help="frames composed from the profile's real validation crops instead of synthetic strips")
    p.set_defaults(func=cmd_bench)


def _setup_logging(cfg=None) -> None:
    from agent.logs import configure_logging

    configure_logging(cfg.agent.log_format if cfg else "auto", cfg.agent.log_level if cfg else "info")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config, with_overrides
    from agent.service import Agent

    try:
        cfg = load_config(args.config)
        if args.state_dir:
            cfg = with_overrides(cfg, agent={"state_dir": args.state_dir})
    except ConfigError as exc:
        for e in exc.errors:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg)
    import structlog

    import faulthandler

    faulthandler.enable()  # WatchdogSignal=SIGABRT then prints every thread's stack to the journal
    log = structlog.get_logger("agent")
    agent = Agent(cfg)
    try:
        return agent.run()
    except Exception as exc:  # start-up failure: one clear line, non-zero; systemd restarts
        log.error("agent_start_failed", error=str(exc), kind=type(exc).__name__)
        print(f"coilsight: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(e)
        print(f"{len(exc.errors)} error(s)")
        return 1
    if args.models:
        from engines.modelpack import ModelPackError, load_calibration, load_model_pack

        try:
            pack = load_model_pack(cfg.models_dir())
            load_calibration(pack, cfg.models.calibration or None)
        except ModelPackError as exc:
            print(f"{args.config}: models: {exc}")
            return 1
    print(f"{args.config}: ok")
    return 0


def cmd_camera_sim(args: argparse.Namespace) -> int:
    from agent.tools.camera_sim import CameraSim, composed_frames, folder_frames, synthetic_frames
    from agent.tools.line_sim import LINE_PROFILES, line_classes, line_frames
    from training.synth import STEEL_CLASSES

    _setup_logging()
    classes = STEEL_CLASSES
    if args.folder:
        frames = folder_frames(args.folder)
    elif args.profile in LINE_PROFILES:
        frames, classes = line_frames(args.profile, args.frames, args.defect_fraction, seed=args.seed), \
            line_classes(args.profile)
    elif args.compose_from:
        frames = composed_frames(args.frames, args.defect_fraction, profile=args.profile, data_root=args.compose_from,
                                 split=args.split, seed=args.seed)
    else:
        frames = synthetic_frames(args.frames, args.defect_fraction, seed=args.seed)
    cam = CameraSim(args.endpoint, camera=args.camera)
    sent = cam.send_coil(args.coil, frames, rate_hz=args.rate, encoding=args.encoding, gt_dir=args.gt_dir,
                         classes=classes)
    cam.close()
    print(json.dumps({"coil": sent.coil, "camera": sent.camera, "sent": sent.sent,
                      "defective": len(sent.defective), "not_sent": len(sent.dropped)}))
    return 0 if not sent.dropped else 1


def cmd_subscribe(args: argparse.Namespace) -> int:
    from agent.subscriber import Subscriber

    topics = tuple(args.topic or ("defect", "summary"))
    sub = Subscriber(args.endpoint, args.replay, topics=topics, from_seq=args.from_seq,
                     include_health="health" in topics)
    n = 0
    try:
        for topic, msg in sub.messages(timeout_s=args.timeout):
            sys.stdout.write(json.dumps({"topic": topic, **msg}, default=str) + "\n")
            sys.stdout.flush()
            n += 1
            if args.count and n >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.service import status_request

    endpoint = args.endpoint
    if args.config:
        from agent.config import load_config

        endpoint = load_config(args.config).control.endpoint
    try:
        reply = status_request(endpoint)
    except TimeoutError as exc:
        print(f"coilsight status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.tools.demo import run_demo

    if args.profile and args.profile != "steel":
        from agent.tools.line_sim import run_line_demo

        frames = args.frames or {"wafer": 100, "chip": 40, "parts": 3}[args.profile]
        return run_line_demo(args.profile, frames=frames, defect_fraction=args.defect_fraction, rate=args.rate,
                             as_json=args.json, seed=args.seed)
    return run_demo(args.config, frames=args.frames or 300, defect_fraction=args.defect_fraction, rate=args.rate,
                    as_json=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.tools.bench import run_bench

    return run_bench(args)
