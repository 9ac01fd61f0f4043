"""`coilsight engines build|list|check|reload`: TensorRT engines on the line box (engines/build.py).

Exit codes: 0 done; 1 a model failed (parity, parse, build) or `check` found an engine that
must not be used; 2 usage or configuration error (also `--int8`, not supported yet); 3 this
machine has no TensorRT/CUDA: the FP16 ONNX and its ONNX Runtime parity gate were done, the
engines were not built.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_NO_TENSORRT = 1, 2, 3


def register(sub) -> None:
    engines = sub.add_parser("engines", help="build and check TensorRT engines")
    esub = engines.add_subparsers(dest="engines_command", required=True, metavar="ACTION")

    build = esub.add_parser("build", help="FP16 ONNX + parity gate, then strongly typed TensorRT engines")
    _target_args(build)
    build.add_argument("--force", action="store_true", help="rebuild even when the engine is up to date")
    build.add_argument("--dry-run", action="store_true", help="say what would be built, write nothing")
    build.add_argument("--int8", action="store_true", help="INT8 engines (not supported yet)")
    build.add_argument("--frames", type=Path, help="parity frames: .npy uint8 [N,C,H,W] or a folder of images "
                                                   "(default: synthetic frames)")
    build.add_argument("--keep-fp32", action="append", default=[], metavar="OP_OR_NODE",
                       help="also keep this op type or node name in FP32 (repeatable)")
    build.add_argument("--workspace-mib", type=int, default=4096, help="TensorRT workspace limit (default 4096)")
    build.add_argument("--min-batch", type=int, help="profile min batch (default 1)")
    build.add_argument("--opt-batch", type=int, help="profile opt batch (default models.opt_batch)")
    build.add_argument("--max-batch", type=int, help="profile max batch (default models.max_batch)")
    build.add_argument("--max-abs-diff", type=float, help="parity bar: max abs diff of probabilities (default 0.05)")
    build.set_defaults(func=cmd_build)

    lst = esub.add_parser("list", help="list built engines and their manifests")
    lst.add_argument("--config", type=Path, help="agent config: list the engines under its state dir")
    lst.add_argument("--state-dir", type=Path, help="default: from --config, else $STATE_DIRECTORY or "
                                                    "~/.local/state/coilsight")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list)

    check = esub.add_parser("check", help="exit non-zero with reasons when an engine is stale, missing or corrupt")
    _target_args(check)
    check.set_defaults(func=cmd_check)

    reload = esub.add_parser("reload", help="ask a running agent to load new engines beside the old ones and "
                                            "switch between batches (same as SIGHUP)")
    where = reload.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="read the agent's control endpoint from this config")
    where.add_argument("--endpoint", default="tcp://127.0.0.1:5558", help="the agent's control endpoint")
    reload.add_argument("--key", type=Path, help="operator CURVE secret key file (NAME.key_secret) for a CURVE "
                        "control socket on tcp:// (default: none)")
    reload.add_argument("--server-key", type=Path, help="the agent's CURVE public key file (server.key) (default: "
                        "with --config, found next to the agent's secret key on this box)")
    reload.set_defaults(func=cmd_reload)


def cmd_reload(args: argparse.Namespace) -> int:
    from agent.service import status_request
    from agent.tools.curve_client import CurveSetupError, client_keys

    endpoint, cfg = args.endpoint, None
    if args.config:
        from agent.config import load_config

        cfg = load_config(args.config)
        endpoint = cfg.control.endpoint
    curve = None
    # CURVE guards a tcp:// control socket only (an ipc:// one is guarded by its file mode)
    if args.key or (cfg is not None and cfg.auth.enabled and endpoint.startswith("tcp://")):
        try:
            keys = client_keys(cfg, args.config, "operator", key=args.key, server_key=args.server_key)
        except CurveSetupError as exc:
            return _fail("reload", str(exc), EXIT_USAGE)
        curve = (keys.key, keys.server_key)
    try:  # is anyone there? The same 3 s `coilsight status` waits; only a live agent gets the long wait
        status_request(endpoint, "status", timeout_ms=3000, curve=curve)
    except TimeoutError:
        hint = "; with CURVE, no answer also means the agent refused the key: is it on auth.operators_dir?" \
            if curve else ""
        return _fail("reload", f"no agent at {endpoint} (no answer within 3 s){hint}", EXIT_FAILED)
    try:  # loading and warming up new engines takes a while on a busy box
        reply = status_request(endpoint, "reload", timeout_ms=120_000, curve=curve)
    except TimeoutError as exc:
        return _fail("reload", str(exc), EXIT_FAILED)
    print(reply.get("detail", reply))
    return 0 if reply.get("ok") else EXIT_FAILED


def _target_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="agent config (TOML): profile, models dir, batch sizes, state dir")
    which.add_argument("--profile", help="profile name; its model pack is engines/models/<profile>")
    p.add_argument("--model", choices=("gate", "seg"), action="append", help="only this model (repeatable)")
    p.add_argument("--state-dir", type=Path, help="default: from the config, else $STATE_DIRECTORY or "
                                                  "~/.local/state/coilsight")


def _fail(action: str, message: str, code: int) -> int:
    print(f"coilsight engines {action}: {message}", file=sys.stderr)
    return code


def _spec(args: argparse.Namespace):
    """BuildSpec from --config or --profile plus overrides; raises BuildError/ConfigError/ModelPackError."""
    from agent.config import config_from_dict, load_config
    from engines import build
    from engines.fp16 import FP16Recipe
    from engines.modelpack import load_model_pack
    from engines.parity import ParityBar

    # --profile P is the default config for that profile: shipped pack, default batch sizes.
    cfg = load_config(args.config) if args.config else config_from_dict({"agent": {"profile": args.profile}},
                                                                        "--profile")
    pack, models = load_model_pack(cfg.models_dir()), cfg.models
    opts = vars(args)
    bar = ParityBar() if opts.get("max_abs_diff") is None else ParityBar(max_abs_diff=opts["max_abs_diff"])
    return build.BuildSpec(
        pack=pack, state=args.state_dir or cfg.state_path(), roles=tuple(args.model or ()),
        min_batch=opts.get("min_batch") or 1,
        opt_batch=opts.get("opt_batch") or models.opt_batch,
        max_batch=opts.get("max_batch") or models.max_batch,
        workspace_bytes=opts.get("workspace_mib", 4096) << 20,
        recipe=FP16Recipe(keep_fp32=tuple(opts.get("keep_fp32") or ())), bar=bar,
        frames_path=opts.get("frames"), force=bool(opts.get("force")),
    )


def _load_spec(args: argparse.Namespace, action: str):
    from agent.config import ConfigError
    from engines.build import BuildError
    from engines.modelpack import ModelPackError

    try:
        return _spec(args), None
    except (ConfigError, ModelPackError, BuildError, ValueError) as exc:
        return None, _fail(action, str(exc), EXIT_USAGE)


def cmd_build(args: argparse.Namespace) -> int:
    if args.int8:
        return _fail("build", "--int8 is not supported yet: INT8 needs explicit Q/DQ quantization in the ONNX "
                     "(TensorRT 11 has no implicit INT8 calibration); build FP16 engines instead", EXIT_USAGE)
    spec, code = _load_spec(args, "build")
    if spec is None:
        return code
    from engines import build, manifest
    from engines.parity import ParityError

    if args.dry_run:
        facts, why_not, needed = build.plan(spec)
        where = manifest.engine_dir(spec.pack.profile, facts, spec.state) if facts else f"none here ({why_not})"
        print(f"profile {spec.pack.profile}: pack {spec.pack.directory}")
        print(f"  engine dir: {where}")
        print(f"  fp16 dir:   {manifest.fp16_dir(spec.pack.profile, spec.state)}")
        print(f"  workspace {spec.workspace_bytes >> 20} MiB")
        for role, reasons in needed.items():
            print(f"  {role}: profile shapes {json.dumps(spec.profile_shapes(role))}")
            print(f"  {role}: " + ("up to date" if not reasons else "would build: " + "; ".join(reasons)))
        return 0
    facts, why_not, _ = build.plan(spec)
    missing = [m for m in ("onnx", "onnxconverter_common") if not _importable(m)]
    if missing:  # stop at the first reason, before any work: say what this box lacks and where to get it
        reason = f"{why_not}; " if facts is None else ""
        return _fail("build", f"{reason}the FP16 step needs {', '.join(missing)}: install the 'gpu' extra "
                     "(pip install 'coilsight[gpu]') on the line box", EXIT_NO_TENSORRT if facts is None else EXIT_USAGE)
    try:
        outcomes = build.build(spec)
    except build.TensorRTMissing as exc:
        return _fail("build", str(exc), EXIT_NO_TENSORRT)
    except ParityError as exc:
        print(exc.report.text(), file=sys.stderr)
        return _fail("build", str(exc), EXIT_FAILED)
    except build.BuildError as exc:
        return _fail("build", str(exc), EXIT_FAILED)
    for o in outcomes:
        print(f"{spec.pack.profile}/{o.role}: {o.status}" + (f" -> {o.engine}" if o.engine else "")
              + (f" ({o.detail})" if o.detail else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from engines import manifest

    state = args.state_dir
    if state is None and args.config:
        from agent.config import ConfigError, load_config

        try:
            state = load_config(args.config).state_path()
        except ConfigError as exc:
            return _fail("list", "; ".join(exc.errors), EXIT_USAGE)
    root = (state or manifest.state_dir()) / "engines"
    rows = []
    for path in sorted(root.glob("*/*/manifest.json")):
        try:
            data = manifest.read_manifest(path.parent)
        except manifest.ManifestError as exc:
            rows.append({"dir": str(path.parent), "error": str(exc)})
            continue
        for role, e in sorted(data["engines"].items()):
            m = e.get("machine", {})
            rows.append({"dir": str(path.parent), "profile": path.parent.parent.name, "model": role,
                         "tensorrt": m.get("tensorrt"), "gpu": m.get("gpu_name"), "built_at": e.get("built_at"),
                         "bytes": e.get("engine", {}).get("size"), "max_shape": _max_shape(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no engines under {root}")
    for r in rows:
        if "error" in r:
            print(f"{r['dir']}: {r['error']}")
        else:
            print(f"{r['profile']}/{r['model']}: TensorRT {r['tensorrt']} on {r['gpu']}, built {r['built_at']}, "
                  f"{r['bytes']} bytes, max {r['max_shape']} ({r['dir']})")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _max_shape(entry: dict) -> list | None:
    shapes = entry.get("profile_shapes") or {}
    return next((s.get("max") for s in shapes.values()), None)


def cmd_check(args: argparse.Namespace) -> int:
    spec, code = _load_spec(args, "check")
    if spec is None:
        return code
    from engines import build

    facts, why_not, needed = build.plan(spec)
    bad = False
    for role, reasons in needed.items():
        if reasons:
            bad = True
            for reason in reasons:
                print(f"{spec.pack.profile}/{role}: {reason}")
        else:
            print(f"{spec.pack.profile}/{role}: ok")
    return EXIT_FAILED if bad else 0
