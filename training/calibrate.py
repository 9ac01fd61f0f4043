"""What `coilsight calibrate thresholds` does: read the samples, calibrate, write, report.

calibration/ chooses thresholds from samples it is given and never reads a dataset; this module
reads them (training.datasets), including the gate-only clean crops for data without defect-free
images, then calls calibration.run.calibrate and, if asked, writes the HTML report.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration import CalibrationError
from calibration.classes import DEFAULT_MIN_AREAS, DEFAULT_MIN_POSITIVE_IMAGES, DEFAULT_PIXEL_THRESHOLDS
from calibration.run import CalibrationResult, calibrate
from engines.modelpack import ModelPack
from engines.packs import shipped_pack_dir

def severstal_folder(data: Path) -> tuple[Path, Path]:
    """(csv, image folder) of a folder in Severstal layout."""
    for csv_name, images in (("ground_truth.csv", "frames"), ("train.csv", "train_images"), ("train.csv", "images")):
        if (data / csv_name).is_file() and (data / images).is_dir():
            return data / csv_name, data / images
    raise CalibrationError(
        f"{data}: not a Severstal-layout folder; expected ground_truth.csv + frames/ (camera simulator) "
        "or train.csv + train_images/"
    )


def load_calibration_samples(
    pack: ModelPack,
    *,
    data: Path | None = None,
    dataset_root: Path | None = None,
    split: str = "val",
) -> tuple[list[Any], list[Any], list[Any], dict[str, Any]]:
    """(samples, gate-only negatives, size-matched gate positives, the `data` block).

    Data without defect-free images (NEU) gets gate negatives from training.datasets.clean_crops
    of the same split, with the settings training used (model.json "training.clean_crops",
    else training.datasets.CLEAN_CROPS_DEFAULT), and defect crops of that size for the size-matched
    gate view, exactly as training/evaluate.py does."""
    from training import datasets

    grey = pack.channels == 1
    if (data is None) == (dataset_root is None):
        raise CalibrationError("give exactly one of --gt-dir DIR or --data-root ROOT")
    if data is not None:
        csv_path, images = severstal_folder(Path(data))
        ds = datasets.read_severstal(csv_path, images, pack.classes, grey=grey, name=Path(data).name)
        return list(ds), [], [], {"what": f"Severstal-layout folder {data}", "split": "all", "source": str(csv_path)}
    if split == "test":
        raise CalibrationError("the test split is kept for evaluation; calibrate on --split val")
    ds = datasets.load_profile_dataset(pack.profile, dataset_root, split, grey=grey)
    if tuple(ds.classes) != tuple(pack.classes):
        raise CalibrationError(
            f"dataset {ds.name} classes {list(ds.classes)} differ from the model pack's {list(pack.classes)}"
        )
    if len(ds) == 0:
        raise CalibrationError(f"split {split!r} of {ds.name} under {dataset_root} holds no images")
    samples = list(ds)
    info: dict[str, Any] = {"what": f"{ds.name} under {dataset_root}", "split": split,
                            "split_rule": "training.datasets.assign_split: first byte of sha1(file stem) "
                                          "< 51 test, < 82 val, else train"}
    negatives: list[Any] = []
    size_matched: list[Any] = []
    if ds.labels.any(axis=1).all():
        settings = datasets.clean_crop_settings(pack.meta.get("training"))
        negatives = datasets.clean_crops(
            samples, settings["size"], stride=settings["stride"], margin=settings["margin"],
            max_per_image=settings["max_per_image"],
        )
        size_matched = datasets.defect_crops(samples, settings["size"], max_per_image=1)
        info["gate_negatives"] = {"from": "training.datasets.clean_crops of the same split (it has no "
                                          "defect-free image); gate only", **settings, "n": len(negatives)}
    return samples, negatives, size_matched, info


def run_threshold_calibration(
    *,
    profile: str,
    models: Path | None = None,
    data: Path | None = None,
    dataset_root: Path | None = None,
    split: str = "val",
    recall_target: float = 0.99,
    min_gate_positives: int | None = None,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    min_image_recall: float | None = None,
    pixel_thresholds: Sequence[float] | None = None,
    min_areas: Sequence[int] | None = None,
    gate_view: str = "images",
    batch: int = 8,
    threads: int = 0,
    output: Path | None = None,
    report: Path | None = None,
    recalibrate_gate: bool = False,
) -> CalibrationResult:
    """What `coilsight calibrate thresholds` does: load, calibrate, write, report."""
    from engines.modelpack import load_model_pack

    pack = load_model_pack(models or shipped_pack_dir(profile))
    if pack.profile != profile:
        raise CalibrationError(f"{pack.directory}/model.json is for profile {pack.profile!r}, not {profile!r}")
    samples, negatives, size_matched, info = load_calibration_samples(
        pack, data=data, dataset_root=dataset_root, split=split
    )
    result = calibrate(
        pack, samples,
        negatives=negatives,
        size_matched_positives=size_matched,
        gate_view=gate_view,
        recall_target=recall_target,
        min_gate_positives=min_gate_positives,
        pixel_thresholds=pixel_thresholds or DEFAULT_PIXEL_THRESHOLDS,
        min_areas=min_areas or DEFAULT_MIN_AREAS,
        min_positive_images=min_positive_images,
        allow_missing_class=allow_missing_class,
        min_image_recall=min_image_recall,
        data_info=info,
        batch=batch,
        threads=threads,
        output=output,
        keep_line_gate=not recalibrate_gate,
    )
    if report is not None:
        from calibration.reports import write_report

        result.report_path = write_report(result, report)
    return result
