"""Readers for the labelled data our users bring, each into one in-memory `Sample`.

Formats (one reader each; every reader returns a lazy `Dataset`, a sequence of `Sample`):

| reader                | format                                       | example in /work/shared/data |
|-----------------------|----------------------------------------------|------------------------------|
| `read_voc`            | Pascal VOC XML boxes, one XML per image      | neu_det                      |
| `read_mask_folders`   | mask PNG beside each image, class = folder   | magnetic_tile                |
| `read_yolo_seg`       | YOLO segmentation polygons (normalised)      | kolektorsdd                  |
| `read_coco`           | COCO detection JSON boxes                    | karpovaknn_scratches         |
| `read_labelme`        | labelme JSON polygons / rectangles           | bsdata_pitting               |
| `read_severstal`      | Severstal train.csv run-length masks         | (Severstal steel, not here)  |

Conventions every reader keeps:
- `Box` coordinates are pixels, `x0, y0` inclusive and `x1, y1` exclusive (VOC's 1-based
  inclusive corners become `x0 = xmin - 1`, `x1 = xmax`), clipped to the image.
- Images are uint8; content that is grey (one channel, or three equal channels as NEU's JPEGs
  decode) stays 2-D `HxW` unless `grey=False`; colour images are `HxWx3` RGB.
- `labels` is the image-level multi-hot truth. For mask folders it comes from the folder (the
  annotator's class), even where the mask is empty (four MT_Uneven masks are).
- `boxes` are the annotated boxes for box formats, one box per polygon for polygon formats
  (the tight box of its rasterised pixels), and one box per 8-connected component of each class
  mask for mask and run-length formats (which carry no instances).
- Annotations that are cheap to parse (XML, txt, JSON, CSV) are parsed and validated when the
  reader runs; image decoding, mask reading and rasterising happen on access, so a 1,800-image
  dataset costs a file listing until a sample is used.
- A malformed annotation raises `DatasetError` naming the file and the problem.
"""
from __future__ import annotations

from training.datasets.coco import (  # noqa: F401
    read_coco,
)
from training.datasets.core import (  # noqa: F401
    IMAGE_SUFFIXES,
    KOLEKTORSDD_CLASSES,
    MAGNETIC_TILE_CLASSES,
    MAGNETIC_TILE_FOLDERS,
    PROFILE_CLASSES,
    PROFILE_FOLDERS,
    SEVERSTAL_CLASSES,
    SPLITS,
    STEEL_CLASSES,
    TEST_BELOW,
    VAL_BELOW,
    Box,
    Dataset,
    DatasetError,
    Item,
    Sample,
    assign_split,
    boxes_to_masks,
    mask_boxes,
    read_image,
    split_of,
)
from training.datasets.crops import (  # noqa: F401
    CLEAN_CROPS_DEFAULT,
    clean_crop_settings,
    clean_crops,
    defect_crops,
)
from training.datasets.labelme import (  # noqa: F401
    read_labelme,
)
from training.datasets.masks import (  # noqa: F401
    read_mask_folders,
)
from training.datasets.profiles import (  # noqa: F401
    default_data_root,
    load_profile_dataset,
)
from training.datasets.severstal import (  # noqa: F401
    read_severstal,
    rle_decode,
    rle_encode,
    write_severstal_csv,
)
from training.datasets.voc import (  # noqa: F401
    read_voc,
)
from training.datasets.yolo import (  # noqa: F401
    read_yolo_seg,
)
