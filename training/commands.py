"""`coilsight train` and `coilsight export`; torch is imported inside the handlers only."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

PROFILES = ("steel", "magnetic_tile", "kolektorsdd")


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a profile's gate and segmenter on CPU (torch)",
                              description="Trains on the train split, keeps the best checkpoint by validation "
                              "loss on the val split; never reads the test split. Resumes from <out>/last.pt.")
    t.add_argument("--profile", required=True, choices=PROFILES)
    t.add_argument("--data-root", type=Path, default=Path("/work/shared/data"), help="shared data root")
    t.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, meta.json)")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--steps-per-epoch", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, default=9.0, help="stop after the epoch that crosses this")
    t.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of synthetic strip windows per batch (default 0.25 for steel, 0 elsewhere)")
    t.add_argument("--model-size", default="small", help="engines.models.CONFIGS key (tiny, small, medium, large, sepgate, ...)")
    t.add_argument("--steps-only-schedule", action="store_true",
                   help="learning rate by steps only (bit-reproducible); default also anneals by --max-minutes")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--seg-from", type=Path, metavar="RUN",
                   help="train the gate only; take the segmenter from this earlier run (same profile, data and "
                        "segmenter layers)")
    t.set_defaults(func=_run_train)

    e = subparsers.add_parser("export", help="export a training run to ONNX + model.json (a model pack)")
    e.add_argument("--checkpoint", type=Path, required=True, help="run folder written by `coilsight train`")
    e.add_argument("--profile", required=True, choices=PROFILES)
    e.add_argument("--out", type=Path, required=True, help="model pack folder, e.g. engines/models/steel")
    e.add_argument("--gate-pool-in-graph", action="store_true",
                   help="keep the gate's average pool inside gate.onnx (the graph takes whole frames); by default the "
                        "agent pools uint8 frames before the gate (model.json input_pool)")
    e.set_defaults(func=_run_export)


def _run_train(args: argparse.Namespace) -> int:
    from engines.datasets import DatasetError
    from engines.train import TrainConfig, TrainError, train

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


def _run_export(args: argparse.Namespace) -> int:
    from engines.export import ExportError, export_pack
    from engines.modelpack import ModelPackError

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
