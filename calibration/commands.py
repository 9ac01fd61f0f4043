"""`coilsight calibrate thresholds` and `coilsight calibrate spatial`.

Heavy work (ONNX Runtime sessions, OpenCV, matplotlib) is imported inside the handlers so
`coilsight --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
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
    src = th.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder in Severstal layout (train.csv + train_images/, or "
                     "ground_truth.csv + frames/ as the camera simulator writes)")
    src.add_argument("--dataset-root", type=Path, help="root of the profile datasets (e.g. /work/shared/data)")
    th.add_argument("--split", default="val", choices=("val", "train"),
                    help="split of --dataset-root to use (the test split is never used for calibration)")
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
    th.add_argument("--batch", type=int, default=8, help="images per ONNX Runtime batch (equal sizes)")
    th.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    th.add_argument("--output", type=Path, help="where to write (default: <models>/calibration.json)")
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
    from calibration.thresholds import CalibrationError, run_threshold_calibration
    from engines.backends import BackendError
    from engines.datasets import DatasetError
    from engines.evaluate import EvaluationError
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


def main(argv: list[str] | None = None) -> int:
    """Run only the calibrate commands (what `coilsight calibrate ...` does)."""
    parser = argparse.ArgumentParser(prog="coilsight")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
