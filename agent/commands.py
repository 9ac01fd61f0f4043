"""Agent sub-commands: run, demo, camera-sim, subscribe, check-config, status, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engines.backends import BACKENDS

BACKEND_CHOICES = tuple(sorted(BACKENDS))


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "steel.toml"
INGEST, EVENTS, REPLAY, CONTROL = ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557",
                                   "tcp://127.0.0.1:5558")



def _rounds(text: str) -> int:
    """argparse type of --bridge-rounds: 1..10 rounds of four coils each."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= 10:
        raise argparse.ArgumentTypeError(f"{n} rounds: use 1 to 10 (each round is four heavy coils)")
    return n

def register(sub: argparse._SubParsersAction) -> None:
    from engines.cliargs import deprecated_alias

    p = sub.add_parser("run", help="run the inspection agent")
    p.add_argument("--config", required=True, type=Path, help="agent config (TOML), e.g. configs/steel.toml")
    p.add_argument("--state-dir", help="override agent.state_dir (journal, engines)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file offline; prints every error with its key path")
    p.add_argument("config", type=Path, help="agent config (TOML)")
    p.add_argument("--load-models", dest="load_models", action="store_true",
                   help="also load the model pack and its calibration")
    deprecated_alias(p, "--models", "--load-models", "load_models", flag=True)
    p.add_argument("--print", dest="print_config", action="store_true",
                   help="print the effective config (every key, defaults filled in) as TOML")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("camera-sim", help="stream a simulated coil to an agent and report what the agent made of it",
                       description="Streams one coil to a running agent, then listens to the agent's event stream "
                       "for its verdict: exit 0 when the coil was summarised complete with nothing rejected, 1 when "
                       "frames were rejected, missing or not summarised, 2 when no agent answers, 3 when the agent "
                       "refuses the connection (CURVE keys).")
    p.add_argument("--config", type=Path, help="the agent's config: ingest and event endpoints are read from it, "
                   "and with auth.enabled that CURVE is needed and where the agent's public key is")
    p.add_argument("--endpoint", help=f"the agent's ingest endpoint (default: from --config, else {INGEST})")
    p.add_argument("--events", help=f"the agent's event (PUB) endpoint (default: from --config, else {EVENTS})")
    p.add_argument("--camera", default="cam0", help="camera id")
    p.add_argument("--coil", help="coil id (default: a new time-based id, sim-YYYYMMDD-HHMMSS-micros)")
    p.add_argument("--frames", type=int, default=300, help="frames to send")
    p.add_argument("--defect-fraction", type=float, default=0.2, help="share of frames with painted defects")
    p.add_argument("--rate", type=float, default=0.0, help="frames per second; 0 = as fast as the agent takes them")
    p.add_argument("--folder", type=Path, help="send the images of this folder instead of synthetic strips")
    p.add_argument("--data-root", dest="data_root", type=Path,
                   help="compose line frames from real crops of the profile's dataset under this data root")
    deprecated_alias(p, "--compose-from", "--data-root", "data_root", type=Path)
    p.add_argument("--profile", default="steel",
                   help="dataset profile for --data-root; wafer, chip or parts: that line's generated frames "
                        "(agent/tools/line_sim.py)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="split for --data-root")
    p.add_argument("--encoding", choices=("raw", "png", "jpeg"), default="raw", help="pixel encoding on the wire")
    p.add_argument("--gt-dir", type=Path, help="write frames and Severstal-style ground truth here")
    p.add_argument("--seed", type=int, default=0, help="random seed of the frame source")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the agent's ingest connection and first heartbeat")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the coil's summary after its end")
    p.add_argument("--no-verdict", action="store_true",
                   help="send without listening to the agent (no event endpoint needed; rejections go unseen)")
    p.add_argument("--key", type=Path, help="this camera's CURVE secret key file (NAME.key_secret; its public half "
                   "on the agent's camera allow-list) for an agent with auth on (default: none, plain ZeroMQ)")
    p.add_argument("--server-key", type=Path, help="the agent's CURVE public key file (server.key) (default: with "
                   "--config, found next to the agent's secret key on this box)")
    p.add_argument("--events-key", type=Path, help="CURVE secret key for the verdict on the event stream, a "
                   "subscriber key (default: --key, for a key on both allow-lists)")
    p.set_defaults(func=cmd_camera_sim)

    p = sub.add_parser("subscribe", help="print the event stream (JSON lines or a table), with gap repair")
    p.add_argument("--config", type=Path, help="the agent's config: event and replay endpoints are read from it")
    p.add_argument("--endpoint", help=f"the agent's event (PUB) endpoint (default: from --config, else {EVENTS})")
    p.add_argument("--replay", help=f"the agent's replay endpoint (default: from --config, else {REPLAY})")
    p.add_argument("--topic", action="append", choices=("defect", "summary", "health", "track", "periodic"),
                   help="topics to print (repeatable; default: defect and summary; track and periodic: the "
                        "coil layer, docs/protocol.md 2.6)")
    p.add_argument("--format", choices=("json", "table"), default="json",
                   help="json: one JSON object per line; table: one readable line per event")
    p.add_argument("--from-seq", type=int, help="replay from this sequence number first (late join)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds without a heartbeat before saying the agent is silent")
    p.add_argument("--key", type=Path, help="this subscriber's CURVE secret key file (NAME.key_secret; its public "
                   "half on the agent's subscriber allow-list) for an agent with auth on (default: none, plain ZeroMQ)")
    p.add_argument("--server-key", type=Path, help="the agent's CURVE public key file (server.key) (default: with "
                   "--config, found next to the agent's secret key on this box)")
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("status", help="ask a running agent for its state, models, queue and coils")
    p.add_argument("--config", type=Path, help="the agent's config: the control endpoint is read from it")
    p.add_argument("--endpoint", help=f"the agent's control endpoint (default: from --config, else {CONTROL})")
    p.add_argument("--json", action="store_true", help="the full status reply as JSON (health, metrics, coils)")
    p.add_argument("--key", type=Path, help="operator secret key file (NAME.key_secret) for a CURVE control socket")
    p.add_argument("--server-key", type=Path, help="the agent's public key file (server.key) for a CURVE control socket "
                   "(default: with --config, found next to the agent's secret key on this box)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="camera-sim + agent + subscriber on loopback; prints the coil summary")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="profile config (default: configs/steel.toml); steel, magnetic_tile and kolektorsdd ship "
                        "a model pack")
    p.add_argument("--profile", help="shorthand for --config configs/PROFILE.toml; wafer, chip and parts stream "
                   "their line's generated frames and print found vs truth")
    p.add_argument("--frames", type=int, default=None,
                   help="frames in the simulated coil (default 300; --profile wafer 100, chip 40, parts 3: a "
                        "4608x3072 part takes seconds to draw)")
    p.add_argument("--defect-fraction", type=float, default=0.2, help="share of frames with painted defects")
    p.add_argument("--rate", type=float, default=0.0, help="frames per second; 0 = as fast as the agent takes them")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--seed", type=int, default=0, help="generator seed (wafer, chip, parts)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time the real agent on simulated coils (see docs/performance.md)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="profile config (default: configs/steel.toml)")
    p.add_argument("--frames", type=int, default=4000, help="frames per scenario")
    p.add_argument("--models", type=Path, metavar="DIR",
                   help="bench this model pack (a candidate) instead of the config's models.dir, with the config's "
                        "other settings")
    p.add_argument("--scenario", action="append", choices=("clean", "typical", "heavy"),
                   help="scenarios to run (repeatable; default: all three)")
    p.add_argument("--backend", action="append", choices=BACKEND_CHOICES,
                   help="backend chain override (repeatable; default: the config's models.backends)")
    p.add_argument("--batch", type=int, help="frames per model call and per queue batch: sets models.max_batch, "
                   "opt_batch and cpu_max_batch (default: the config's)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the results as JSON on stdout instead of the table (FILE: deprecated, use --out)")
    p.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--fast", action="store_true", help="a few frames: checks the bench runs, not its speed")
    p.add_argument("--rate", type=float, default=0.0, help="line rate for the latency scenario (0 = off)")
    p.add_argument("--bridge", action="store_true",
                   help="also run the heavy coil with a real mosquitto and `coilsight bridge` attached, against "
                        "without (skipped when mosquitto is not installed)")
    p.add_argument("--bridge-rounds", dest="bridge_rounds", type=_rounds, default=1, metavar="N",
                   help="with --bridge: rounds of on, off, off, on (more rounds: a figure less moved by one "
                        "disturbed run) (default: 1)")
    p.add_argument("--data-root", dest="data_root", type=Path,
                   help="frames composed from the profile's real validation crops under this data root instead of "
                        "synthetic strips")
    deprecated_alias(p, "--compose-from", "--data-root", "data_root", type=Path)
    p.add_argument("--strip", choices=("plain", "textured"), default="plain",
                   help="synthetic strip to paint on: plain (smooth, the default) or textured (texture, roll lines, "
                        "illumination drift and stains that are not defects: what a gate must still gate)")
    p.set_defaults(func=cmd_bench)


def _setup_logging(cfg=None) -> None:
    from agent.logs import configure_logging

    configure_logging(cfg.agent.log_format if cfg else "auto", cfg.agent.log_level if cfg else "info")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config, models_problem, models_warnings, with_overrides
    from agent.service import Agent

    try:
        cfg = load_config(args.config)
        if args.state_dir:
            cfg = with_overrides(cfg, agent={"state_dir": args.state_dir})
    except ConfigError as exc:
        exc.tell()
        return 2
    if (problem := models_problem(cfg)) is not None:
        print(f"config error: {args.config}: {problem}", file=sys.stderr)
        return 2
    _setup_logging(cfg)
    import structlog

    import faulthandler

    from agent.native_stderr import capture_native_stderr

    capture_native_stderr()  # libpng/libjpeg lines through the log's rate limit
    faulthandler.enable(file=sys.stderr)  # WatchdogSignal=SIGABRT then prints every thread's stack to the journal
    log = structlog.get_logger("agent")
    for warning in models_warnings(cfg):
        log.warning("models_tier_mismatch", warning=warning)
    agent = Agent(cfg)
    try:
        return agent.run()
    except Exception as exc:  # start-up failure: one clear line, non-zero; systemd restarts
        log.error("agent_start_failed", error=str(exc), kind=type(exc).__name__)
        print(f"coilsight: cannot start: {exc}", file=sys.stderr)
        # Everything is closed (sockets, journal, state lock). Skip the interpreter's teardown of
        # numpy, OpenCV and ONNX Runtime (0.3-0.6 s here): a bind failure exits within a second.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import (ConfigError, config_dict, config_warnings, dump_toml, load_config, models_problem,
                              models_warnings)

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(e)
        print(f"{len(exc.errors)} error(s)")
        return 1
    if (problem := models_problem(cfg)) is not None:
        print(f"{args.config}: {problem}")
        print("1 error(s)")
        return 1
    for w in config_warnings(cfg) + models_warnings(cfg):
        print(f"{args.config}: warning: {w}", file=sys.stderr)
    if args.load_models:
        from engines.modelpack import ModelPackError, load_calibration, load_model_pack

        try:
            pack = load_model_pack(cfg.models_dir())
            load_calibration(pack, cfg.models.calibration or None)
        except ModelPackError as exc:
            print(f"{args.config}: models: {exc}")
            return 1
    if args.print_config:
        print(f"# effective config of {args.config} (every key, defaults filled in)")
        print(dump_toml(config_dict(cfg)), end="")
        return 0
    print(f"{args.config}: ok")
    return 0


def _agent_config(args: argparse.Namespace):
    """The agent config named by --config, or None; a bad one is a usage error (exit 2)."""
    if not getattr(args, "config", None):
        return None
    from agent.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        exc.tell()
        raise SystemExit(2) from None


def cmd_camera_sim(args: argparse.Namespace) -> int:
    from agent.tools.camera_run import frames_from_args, run_camera_sim

    from agent.tools.curve_client import CurveSetupError, resolve_keys

    cfg = _agent_config(args)
    args.endpoint = args.endpoint or (cfg.ingest.endpoint if cfg else INGEST)
    args.events = args.events or (cfg.publish.endpoint if cfg else EVENTS)
    try:
        args.camera_keys, args.events_keys = resolve_keys(cfg, args.config, key=args.key, server_key=args.server_key,
                                                          events_key=args.events_key)
    except CurveSetupError as exc:
        print(f"coilsight camera-sim: {exc}", file=sys.stderr)
        return 2
    try:
        frames, classes = frames_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"coilsight camera-sim: {exc}", file=sys.stderr)
        return 2
    return run_camera_sim(args, frames, classes)


def cmd_subscribe(args: argparse.Namespace) -> int:
    from agent.tools.views import run_subscribe

    from agent.tools.curve_client import CurveSetupError, client_keys

    cfg = _agent_config(args)
    args.endpoint = args.endpoint or (cfg.publish.endpoint if cfg else EVENTS)
    args.replay = args.replay or (cfg.publish.replay_endpoint if cfg else REPLAY)
    try:
        args.client_keys = client_keys(cfg, args.config, "subscriber", key=args.key, server_key=args.server_key)
    except CurveSetupError as exc:
        print(f"coilsight subscribe: {exc}", file=sys.stderr)
        return 2
    return run_subscribe(args)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.service import status_request
    from agent.tools.views import format_status

    cfg = _agent_config(args)
    endpoint = args.endpoint or (cfg.control.endpoint if cfg else CONTROL)
    if cfg is not None and cfg.auth.enabled and endpoint.startswith("tcp://") and not args.key:
        print(f"coilsight status: the control socket {endpoint} uses CURVE (auth.enabled): pass --key "
              f"OPERATOR.key_secret and --server-key server.key, or put control.endpoint on ipc://",
              file=sys.stderr)
        return 2
    if args.key and not args.server_key and cfg is not None and cfg.auth.enabled:
        from agent.tools.curve_client import server_public_key

        args.server_key = server_public_key(cfg)
    if bool(args.key) != bool(args.server_key):
        print("coilsight status: --key and --server-key go together", file=sys.stderr)
        return 2
    from agent.auth import AuthError

    try:
        reply = status_request(endpoint, curve=(args.key, args.server_key) if args.key else None)
    except AuthError as exc:
        print(f"coilsight status: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        hint = ("; with CURVE, no answer also means the agent refused the key: is it on auth.operators_dir?"
                if args.key else "")
        print(f"coilsight status: no agent at {endpoint} (no answer within 3 s){hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
    else:
        print(format_status(reply, endpoint))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.tools.demo import run_demo
    from agent.tools.line_sim import LINE_PROFILES

    if args.profile in LINE_PROFILES:
        from agent.tools.line_sim import run_line_demo

        frames = args.frames or {"wafer": 100, "chip": 40, "parts": 3}[args.profile]
        return run_line_demo(args.profile, frames=frames, defect_fraction=args.defect_fraction, rate=args.rate,
                             as_json=args.json, seed=args.seed)
    config = args.config
    if args.profile:
        config = DEFAULT_CONFIG.parent / f"{args.profile}.toml"
        if not config.is_file():
            known = ", ".join(sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.toml")))
            print(f"coilsight demo: no profile {args.profile!r} (configs/ has {known})", file=sys.stderr)
            return 2
    return run_demo(config, frames=args.frames or 300, defect_fraction=args.defect_fraction, rate=args.rate,
                    as_json=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.tools.bench import run_bench

    return run_bench(args)
