"""`coilsight evaluate`: score a shipped model pack on a labelled split, write JSON + markdown."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROFILES = ("steel", "magnetic_tile", "kolektorsdd")


def default_models_dir(profile: str) -> Path:
    import engines

    return Path(engines.__file__).resolve().parent / "models" / profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model pack on a labelled data split (gate AUC, Dice, mAP, defect type)",
        description="Run the profile's model pack (ONNX Runtime by default) over a split of its labelled data "
                    "and report gate ROC AUC/recall/precision/pass rate at the calibrated threshold, Severstal "
                    "Dice and IoU per class, detection mAP@0.5 and mAP@0.5:0.95, and defect-type accuracy. "
                    "Writes evaluation_<split>.json and .md to --out and prints the markdown.",
    )
    p.add_argument("--profile", required=True, choices=PROFILES, help="data profile and model pack to evaluate")
    p.add_argument("--models", type=Path, default=None,
                   help="model pack folder (model.json, calibration.json); default engines/models/<profile>")
    p.add_argument("--data", type=Path, default=None,
                   help="data root holding neu_det/, magnetic_tile/, kolektorsdd/ (or the dataset folder itself); "
                        "default /work/shared/data or ../shared/data next to the repository")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "trainval", "all"),
                   help="split by engines.datasets.assign_split (default: test)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for evaluation_<split>.json/.md (default: ./evaluation/<profile>)")
    p.add_argument("--calibration", type=Path, default=None, help="calibration.json (default: beside the models)")
    p.add_argument("--backend", default="onnxruntime", help="inference backend (engines.backends.BACKENDS)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per model (default: 2)")
    p.add_argument("--batch", type=int, default=8, help="largest batch of equal-size images (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.set_defaults(func=run)

    c = sub.add_parser(
        "card",
        help="write a model pack's MODEL_CARD.md from its files, an evaluation folder and a speed measurement",
        description="Regenerates MODEL_CARD.md (engines/card.py) from model.json, calibration.json, the "
                    "evaluation_<split>.md/json that `coilsight evaluate` wrote for this very pack (refused if it "
                    "evaluated other models), a fresh ONNX Runtime speed measurement, and CARD_NOTES.md.",
    )
    c.add_argument("--profile", required=True, choices=PROFILES)
    c.add_argument("--models", type=Path, default=None, help="model pack folder; default engines/models/<profile>")
    c.add_argument("--evaluation", type=Path, required=True, help="folder holding evaluation_<split>.md/.json")
    c.add_argument("--split", default="test", choices=("val", "test"))
    c.add_argument("--no-speed", action="store_true", help="leave the speed section out (no measurement)")
    c.set_defaults(func=run_card)


def run(args: argparse.Namespace) -> int:
    from engines.backends import BackendError
    from engines.datasets import DatasetError, default_data_root
    from engines.evaluate import EvaluationError, evaluate_profile, render_markdown, write_report
    from engines.modelpack import ModelPackError

    import structlog

    if not structlog.is_configured():  # progress events go to stderr; stdout carries the markdown
        from agent.logs import configure_logging

        configure_logging(stream=sys.stderr)
    models = args.models or default_models_dir(args.profile)
    data = args.data or default_data_root()
    if data is None:
        print("evaluate: no data root found (/work/shared/data or ../shared/data); pass --data ROOT", file=sys.stderr)
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


def run_card(args: argparse.Namespace) -> int:
    from engines.card import CardError, write_card

    try:
        out = write_card(args.models or default_models_dir(args.profile), args.evaluation,
                         measure=not args.no_speed, split=args.split)
    except (CardError, FileNotFoundError) as exc:
        print(f"coilsight card: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
