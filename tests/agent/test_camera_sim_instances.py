"""camera-sim's ground-truth instances: one per painted defect, exact, in SentCoil and in instances.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import free_port

from agent.tools.camera_sim import CameraSim, TrueInstance, composed_frames, read_instances, synthetic_frames
from training.synth import STEEL_CLASSES, StripGenerator

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_each_painted_defect_is_one_instance_whose_box_is_the_pixels_it_owns():
    gen = StripGenerator(width=400, height=128, seed=5)
    seen = 0
    for i in range(12):
        img, masks, instances = gen.frame_with_instances(i, True)
        same_img, same_masks = gen.frame(i, True)
        assert (img == same_img).all() and (masks == same_masks).all()  # the same frame as before
        assert instances, "a defective frame paints at least one defect"
        covered = np.zeros(masks.shape[1:], bool)
        for c, x0, y0, x1, y1 in instances:
            assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 128
            box_mask = masks[c, y0:y1, x0:x1]
            # tight: the class's mask touches all four edges of the box
            assert box_mask[0].any() and box_mask[-1].any() and box_mask[:, 0].any() and box_mask[:, -1].any()
            covered[y0:y1, x0:x1] |= masks[c, y0:y1, x0:x1]
        assert (covered == masks.any(axis=0)).all()  # every defect pixel lies in its defect's box
        if len(instances) == 1:  # one defect: its box is its mask's extent, however fragmented the mask
            c = instances[0][0]
            ys, xs = np.nonzero(masks[c])
            assert instances[0][1:] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            seen += 1
    assert seen > 0
    _, masks, instances = gen.frame_with_instances(0, False)
    assert instances == [] and not masks.any()


def test_send_coil_keeps_and_writes_the_instances(tmp_path):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pull.bind(endpoint)
    cam = CameraSim(endpoint, camera="cam0", ctx=ctx)
    frames = list(synthetic_frames(6, 0.5, seed=2, width=320, height=96, with_instances=True))
    sent = cam.send_coil("C1", frames, gt_dir=tmp_path, classes=STEEL_CLASSES)
    cam.close()
    received = 0
    while pull.poll(2000):
        pull.recv_multipart()
        received += 1
        if received == 8:  # coil_start, 6 frames, coil_end
            break
    pull.close()
    assert received == 8
    want = {i: [TrueInstance(i, c, STEEL_CLASSES[c], (x0, y0, x1, y1)) for c, x0, y0, x1, y1 in f[2]]
            for i, f in enumerate(frames) if f[2]}
    assert want and {i: v for i, v in sent.instances.items() if v} == want
    assert set(want) == sent.defective
    on_disk = read_instances(tmp_path / "instances.csv")
    assert on_disk == {f"C1_{i:06d}.png": v for i, v in want.items()}
    assert all((tmp_path / "frames" / name).is_file() for name in on_disk)


def test_read_instances_refuses_another_file(tmp_path):
    p = tmp_path / "instances.csv"
    p.write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(ValueError, match=r"header \['ImageId', 'ClassId', 'EncodedPixels'\] is not"):
        read_instances(p)


@pytest.mark.skipif(not (DATA / "neu_det").is_dir(), reason="shared NEU-DET data not present")
def test_composed_frames_give_the_pasted_images_boxes():
    frames = list(composed_frames(6, 0.5, data_root=DATA, split="val", seed=3, with_instances=True))
    n = 0
    for frame, masks, instances in frames:
        if not masks.any():
            assert instances == []
            continue
        ys, xs = np.nonzero(masks.any(axis=0))
        for c, x0, y0, x1, y1 in instances:
            n += 1
            assert masks[c, y0:y1, x0:x1].all()  # NEU truth is boxes rasterised: the box is all mask
            assert xs.min() <= x0 and x1 <= xs.max() + 1 and ys.min() <= y0 and y1 <= ys.max() + 1
    assert n > 0


def test_score_events_counts_the_coils_events_against_its_painted_defects():
    from agent.tools.camera_sim import SentCoil, score_events

    sent = SentCoil("C", "cam0")
    sent.instances = {0: [TrueInstance(0, 5, "scratches", (100, 0, 110, 200))],
                      1: [TrueInstance(1, 1, "inclusion", (10, 10, 50, 50))],
                      2: []}
    events = [  # frame 0: the scratch in four fragments; frame 1: one good box; frame 2: a false event
        *({"index": 0, "class_id": 5, "bbox_px": [100, y, 110, y + 40]} for y in (0, 50, 100, 150)),
        {"index": 1, "class_id": 1, "bbox_px": [12, 10, 50, 50]},
        {"index": 2, "class_id": 0, "bbox_px": [0, 0, 5, 5]},
        {"index": 9, "class_id": 0, "bbox_px": [0, 0, 5, 5]},  # a frame whose truth the camera did not send
    ]
    s = score_events(sent, events, 6)
    assert (s["true_defects"], s["events"], s["matched"], s["split"], s["false_events"]) == (2, 6, 1, 1, 5)
    assert s["events_per_defect"] == 3.0 and s["unscored_events"] == 1
    assert s["median_best_iou"] == pytest.approx((0.2 + 0.95) / 2)
    # the scratch (10 x 200: sqrt 44.7 px) is 40-70 and missed, the inclusion (40 x 40) 40-70 and matched
    assert s["recall_by_size"]["40-70"] == {"true": 2, "matched": 1, "recall": 0.5}
    assert s["recall_by_size"]["0-40"] == {"true": 0, "matched": 0, "recall": None}
