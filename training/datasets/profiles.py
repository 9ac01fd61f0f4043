"""A profile's dataset under the shared data root, by its documented split."""
from __future__ import annotations

from pathlib import Path

from training.datasets.core import (
    MAGNETIC_TILE_FOLDERS,
    PROFILE_CLASSES,
    SPLITS,
    Dataset,
    DatasetError,
)
from training.datasets.masks import read_mask_folders
from training.datasets.voc import read_voc
from training.datasets.yolo import read_yolo_seg

# -- profiles ----------------------------------------------------------------------------------


def _dataset_dir(root: Path, folder: str, marker: str) -> Path:
    """`root` may be the shared data root (holding `folder`) or the dataset folder itself."""
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    raise DatasetError(f"{root}: neither it nor {root / folder} holds {marker!r}; is this the {folder} data?")


def load_profile_dataset(profile: str, root: str | Path, split: str, *, grey: bool = True) -> Dataset:
    """The labelled data of a profile, one split of it, as a lazy Dataset.

    profile: "steel" (neu_det, Pascal VOC boxes, classes STEEL_CLASSES in NEU order),
    "magnetic_tile" (mask folders, MAGNETIC_TILE_CLASSES, MT_Free is defect-free) or
    "kolektorsdd" (YOLO polygons, class "defect"). root: the shared data root (/work/shared/data)
    or the dataset folder itself.

    split, by the first byte b of sha1(file stem as UTF-8):
      "test"  b < 51          (the shared data's documented rule, ~19.9 % of images)
      "val"   51 <= b < 82    (~15.1 % of the rest; used for early stopping and calibration)
      "train" b >= 82
    ("trainval" = b >= 51 and "all" are accepted too.) The split shipped with NEU (30
    `Validation_*` images) and KolektorSDD (train/val folders, 10 defective val images) is pooled
    and replaced by this rule: both are too small to report on, and one rule keeps every
    profile's figures comparable between changes. grey=True: images are 2-D uint8.
    """
    if profile not in PROFILE_CLASSES:
        raise DatasetError(f"unknown profile {profile!r}; known: {', '.join(PROFILE_CLASSES)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    classes = PROFILE_CLASSES[profile]
    if profile == "steel":
        base = _dataset_dir(root, "neu_det", "ANNOTATIONS")
        ds = read_voc(base / "IMAGES", base / "ANNOTATIONS", classes, grey=grey, name="neu_det")
        if (base / "Validation_Images").is_dir():
            ds = ds + read_voc(base / "Validation_Images", base / "Validation_Annotations", classes, grey=grey, name="neu_det")
    elif profile == "magnetic_tile":
        base = _dataset_dir(root, "magnetic_tile", "MT_Free")
        ds = read_mask_folders(base, MAGNETIC_TILE_FOLDERS, classes, grey=grey, name="magnetic_tile")
    else:
        base = _dataset_dir(root, "kolektorsdd", "Datasets")
        ds = read_yolo_seg(base / "Datasets" / "images", base / "Datasets" / "labels", classes, grey=grey, name="kolektorsdd")
    return ds.split(split)


def default_data_root(start: str | Path | None = None) -> Path | None:
    """$COILSIGHT_DATA_ROOT, else the shared data folder of this workplace (/work/shared/data), else
    shared/data beside the repository; None when none exists."""
    import os

    repo = Path(start) if start is not None else Path(__file__).resolve().parents[1]
    env = os.environ.get("COILSIGHT_DATA_ROOT")
    for candidate in ([Path(env)] if env else []) + [Path("/work/shared/data"), repo.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None
