"""The camera simulator composes line frames from real crops with exact ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from training.datasets import default_data_root

DATA = default_data_root()  # the one rule the other suites use: /work/shared/data or ../shared/data


@pytest.mark.skipif(DATA is None or not (DATA / "neu_det").is_dir(),
                    reason="shared NEU-DET data (/work/shared/data or ../shared/data) not present")
def test_composed_frames_from_real_neu_crops():
    from agent.tools.camera_sim import composed_frames

    frames = list(composed_frames(8, 0.5, data_root=DATA, split="val", seed=3))
    assert len(frames) == 8
    defective = 0
    for frame, masks in frames:
        assert frame.shape == (256, 1600) and frame.dtype == np.uint8
        assert masks.shape == (6, 256, 1600) and masks.dtype == bool
        if masks.any():
            defective += 1
            ys, xs = np.nonzero(masks.any(axis=0))
            assert ys.max() - ys.min() < 200 and xs.max() - xs.min() < 200  # one pasted 200x200 image
    assert 1 <= defective <= 7
    again = list(composed_frames(8, 0.5, data_root=DATA, split="val", seed=3))
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(frames, again))  # deterministic


def test_composed_frames_refuses_an_empty_dataset(tmp_path):
    from agent.tools.camera_sim import composed_frames

    (tmp_path / "neu_det" / "IMAGES").mkdir(parents=True)
    (tmp_path / "neu_det" / "ANNOTATIONS").mkdir(parents=True)
    with pytest.raises(ValueError, match="no steel images in the val split under"):
        next(composed_frames(1, 0.5, data_root=tmp_path, split="val"))
