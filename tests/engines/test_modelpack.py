"""engines/modelpack.py: input_pool in model.json (format 2) and the uint8 pooling the agent does for it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tinypack import make_pack

from engines.modelpack import ModelPackError, load_model_pack, pool_frames


def test_pool_frames_is_the_block_mean_rounded_to_a_grey_level():
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 16, 24), dtype=np.uint8)
    for k in (2, 4, 8):
        got = pool_frames(x, k)
        mean = x.reshape(3, 2, 16 // k, k, 24 // k, k).astype(np.float64).mean(axis=(3, 5))
        assert got.dtype == np.uint8 and got.shape == (3, 2, 16 // k, 24 // k)
        assert np.abs(got - mean).max() <= 0.5  # the nearest grey level (OpenCV breaks ties its own way)
    assert pool_frames(x, 1) is x  # nothing to do: the frames themselves, no copy


def test_pool_frames_refuses_what_it_cannot_pool():
    x = np.zeros((1, 1, 10, 16), np.uint8)
    with pytest.raises(ValueError, match=r"10x16 \(HxW\) frames do not divide into 4x4 blocks"):
        pool_frames(x, 4)
    with pytest.raises(ValueError, match=r"expected uint8 \[N, C, H, W\], got float32"):
        pool_frames(x.astype(np.float32), 2)


def test_a_pooled_gate_pack_loads_and_prepares_its_input(tmp_path):
    pack = load_model_pack(make_pack(tmp_path / "p", height=64, width=256, gate_input_pool=4))
    assert pack.meta["format"] == 2
    assert (pack.gate.input_pool, pack.seg.input_pool) == (4, 1)
    assert pack.gate.input_hw(pack.height, pack.width) == (16, 64)
    x = np.full((2, 1, 64, 256), 7, np.uint8)
    assert pack.gate.prepare(x).shape == (2, 1, 16, 64) and pack.seg.prepare(x) is x
    assert pack.pad_multiple == 8
    assert load_model_pack(make_pack(tmp_path / "q")).gate.input_pool == 1  # format 1: nothing pooled


def _edit(directory, change) -> None:
    path = directory / "model.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("change", "message"), [
    # a format-1 reader would ignore input_pool and feed whole frames: the key needs format 2
    (lambda d: d.update(format=1), r"input_pool needs model.json format 2, this file says format 1"),
    (lambda d: d["models"]["gate"].update(input_pool=3), r"input_pool 3 must be >= 1 and divide the 64x256"),
    (lambda d: d["models"]["gate"].update(input_pool=0), r"input_pool 0 must be >= 1"),
    (lambda d: d["models"]["gate"].update(input_pool="4"), r"key 'input_pool' must be <class 'int'>"),
    (lambda d: d.update(format=3), r"format 3 is not one this agent reads \(1, 2\)"),
])
def test_bad_input_pool_is_refused_with_the_reason(tmp_path, change, message):
    d = make_pack(tmp_path / "p", gate_input_pool=4)
    _edit(d, change)
    with pytest.raises(ModelPackError, match=message):
        load_model_pack(d)


def test_a_model_file_that_is_not_the_one_model_json_names_is_refused(tmp_path):
    """model.json's sha256 is what calibration and every event name: another ONNX file under the
    same name (a copy gone wrong, a half-finished deploy) must not load."""
    import hashlib

    d = make_pack(tmp_path / "p")
    named = json.loads((d / "model.json").read_text())["models"]["seg"]["sha256"]
    (d / "seg.onnx").write_bytes((d / "gate.onnx").read_bytes())  # a valid model, the wrong one
    actual = hashlib.sha256((d / "seg.onnx").read_bytes()).hexdigest()
    with pytest.raises(ModelPackError, match=rf"models\.seg: sha256 of seg\.onnx is {actual[:12]}, "
                                             rf"model\.json says {named[:12]}"):
        load_model_pack(d)
    assert load_model_pack(d, verify_hashes=False).seg.sha256 == named  # only when asked not to check
