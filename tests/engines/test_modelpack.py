"""engines/modelpack.py: input_pool in model.json (format 2) and the uint8 pooling the agent does for it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tinyinstances import make_instance_pack
from tinypack import make_pack

from engines import runner
from engines.instances import InstanceSpec
from engines.modelpack import ModelPackError, load_calibration, load_model_pack, pool_frames


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


def _refused(directory, change, message) -> None:
    """The pack at ``directory``, its model.json changed, is refused with ``message``."""
    _edit(directory, change)
    with pytest.raises(ModelPackError, match=message):
        load_model_pack(directory)


@pytest.mark.parametrize(("change", "message"), [
    # a format-1 reader would ignore input_pool and feed whole frames: the key needs format 2
    (lambda d: d.update(format=1), r"input_pool needs model.json format 2, this file says format 1"),
    (lambda d: d["models"]["gate"].update(input_pool=3), r"input_pool 3 must be >= 1 and divide the 64x256"),
    (lambda d: d["models"]["gate"].update(input_pool=0), r"input_pool 0 must be >= 1"),
    (lambda d: d["models"]["gate"].update(input_pool="4"), r"key 'input_pool' must be <class 'int'>"),
    (lambda d: d.update(format=4), r"format 4 is not one this agent reads \(1, 2, 3\)"),
])
def test_bad_input_pool_is_refused_with_the_reason(tmp_path, change, message):
    _refused(make_pack(tmp_path / "p", gate_input_pool=4), change, message)


# -- format 3: the instance head's block --------------------------------------------------------

def test_an_instance_pack_loads_its_block_and_thresholds(tmp_path):
    pack = load_model_pack(make_instance_pack(tmp_path / "p", instance_threshold=0.4))
    assert pack.meta["format"] == 3
    assert pack.seg.instances == InstanceSpec("heatmap", "size", "offset", 4) and pack.gate.instances is None
    cal = load_calibration(pack)
    assert {c.instance_threshold for c in cal.classes.values()} == {0.4}
    # absent from calibration.json: the contract's default 0.3
    cal = load_calibration(load_model_pack(make_instance_pack(tmp_path / "q")))
    assert {c.instance_threshold for c in cal.classes.values()} == {0.3}
    # old packs: no instances, as before
    assert load_model_pack(make_pack(tmp_path / "old")).seg.instances is None


def test_an_instance_stride_joins_the_padding_multiple(tmp_path):
    d = make_instance_pack(tmp_path / "p", stride=16)
    assert load_model_pack(d).pad_multiple == 16


def _inst(d, **change):
    d["models"]["seg"]["instances"].update(change)


@pytest.mark.parametrize(("change", "message"), [
    # a format-2 reader would ignore the block and publish components of an instance model
    (lambda d: d.update(format=2), r"models.seg: instances needs model.json format 3, this file says format 2"),
    (lambda d: d["models"]["seg"]["instances"].pop("size"), r"models.seg.instances: missing key 'size'"),
    (lambda d: _inst(d, offset=7), r"models.seg.instances: key 'offset' must be <class 'str'>, got int"),
    (lambda d: _inst(d, heatmap=""), r"models.seg.instances: output names must not be empty"),
    (lambda d: _inst(d, heatmap="probs"), r"must be four different outputs"),
    (lambda d: _inst(d, stride=3), r"models.seg.instances: stride must be a power of two >= 1, got 3"),
    (lambda d: _inst(d, stride=0), r"stride must be a power of two >= 1, got 0"),
    (lambda d: _inst(d, stride=4.0), r"key 'stride' must be <class 'int'>, got float"),
    (lambda d: _inst(d, centre="c"), r"unknown key\(s\) \['centre'\]"),
    (lambda d: d["models"]["seg"].update(instances=["heatmap"]), r"instances must be an object, got list"),
    (lambda d: d["models"]["gate"].update(instances={}), r"only the seg model may carry instances, not the gate"),
])
def test_a_bad_instances_block_is_refused_with_the_reason(tmp_path, change, message):
    _refused(make_instance_pack(tmp_path / "p"), change, message)


def test_instance_outputs_the_graph_lacks_are_refused_when_opened(tmp_path):
    d = make_instance_pack(tmp_path / "p")
    _edit(d, lambda doc: _inst(doc, heatmap="centres"))
    pack = load_model_pack(d)  # the names are well formed; only the graph can say they are missing
    with pytest.raises(ModelPackError, match=r"names output\(s\) \['centres'\] that seg.onnx does not have"):
        runner.PackRunner(pack)


def test_a_bad_instance_threshold_is_refused(tmp_path):
    d = make_instance_pack(tmp_path / "p", instance_threshold=1.5)
    with pytest.raises(ModelPackError, match=r"classes.bright: instance_threshold must be in \(0,1\), got 1.5"):
        load_calibration(load_model_pack(d))


def test_the_runner_returns_and_checks_the_instance_outputs(tmp_path):
    from tinyinstances import frame_with_squares

    pack = load_model_pack(make_instance_pack(tmp_path / "p"))
    with runner.PackRunner(pack) as models:
        x = runner.stack_images(pack, [frame_with_squares([("bright", 40, 20)])])
        out = models.seg_outputs(x)
        assert set(out) == {"probs", "heatmap", "size", "offset"}
        assert out["heatmap"].shape == (1, 2, 16, 64) and out["size"].shape == (1, 2, 16, 64)
        assert out["heatmap"][0, 0].argmax() == np.ravel_multi_index((7, 12), (16, 64))  # the square's centre cell
        assert out["size"][0, :, 7, 12] == pytest.approx((20.0, 20.0))
        assert models.seg(x).shape == (1, 2, 16, 64)  # probs alone, as before


def test_the_documented_model_json_loads(tmp_path):
    """docs/architecture.md's model.json example is a format-3 pack this reader loads, instances and all."""
    import re
    from pathlib import Path

    from tinyinstances import instance_graph

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    body = re.search(r"```json example:model_json\n(.*?)```", doc, re.S).group(1)
    meta = json.loads(body)
    meta["classes"] = ["crazing", "scratches"]
    import onnx

    from engines.modelpack import sha256_file

    for role in ("gate", "seg"):
        onnx.save(instance_graph(role), tmp_path / f"{role}.onnx")
        meta["models"][role]["sha256"] = sha256_file(tmp_path / f"{role}.onnx")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    pack = load_model_pack(tmp_path)
    assert pack.meta["format"] == 3 and pack.gate.input_pool == 2
    assert pack.seg.instances == InstanceSpec("heatmap", "size", "offset", 4)


def test_pack_format_is_the_lowest_that_holds_the_models():
    from engines.modelpack import pack_format

    plain = {"gate": {"file": "gate.onnx"}, "seg": {"file": "seg.onnx", "output": "probs"}}
    assert pack_format(plain) == 2  # readable by every agent since input_pool
    assert pack_format({**plain, "seg": {**plain["seg"], "instances": {"stride": 4}}}) == 3
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


# -- scores_from: a gate that is the segmenter's frame scores ----------------------------------

@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["models"]["seg"].update(scores_from="seg"), r"models.seg: scores_from 'seg': only a gate"),
    (lambda d: d["models"]["gate"].update(scores_from="gate"), r"models.gate: scores_from 'gate': only a gate"),
    (lambda d: d["models"].pop("seg") and d["models"]["gate"].update(scores_from="seg"),
     r"scores_from \"seg\" but the pack has no 'seg' model"),
])
def test_a_bad_scores_from_is_refused_with_the_reason(tmp_path, change, message):
    _refused(make_pack(tmp_path / "p"), change, message)


def test_scores_from_seg_loads_and_is_off_by_default(tmp_path):
    d = make_pack(tmp_path / "p")
    assert load_model_pack(d).gate.scores_from is None
    _edit(d, lambda doc: doc["models"]["gate"].update(scores_from="seg"))
    assert load_model_pack(d).gate.scores_from == "seg"


def test_frame_scores_are_the_max_of_each_maps_3x3_mean_inside_the_map():
    """engines.postprocess.frame_scores is what a whole-image inspector's gate graph computes
    (training/wholeseg.py: avg_pool2d 3x3, stride 1, padding 1, count_include_pad False; max)."""
    from engines.postprocess import frame_scores

    p = np.zeros((3, 6, 9), np.float32)
    p[0, 0, 0] = 1.0  # a corner: its 3x3 window holds 4 cells of the map, not 9
    p[1, 3, 4] = 0.9  # inside: 9 cells
    p[2, 0, 4] = 0.6  # an edge: 6 cells
    p[2, 2:5, 6:9] = 0.3  # a 3x3 block of 0.3: its centre's mean is 0.3, above the edge peak's 0.1
    np.testing.assert_allclose(frame_scores(p), [0.25, 0.1, 0.3], rtol=1e-6)


@pytest.mark.parametrize(("link", "ok"), [(0, True), (24, True), (1024, True), (-1, False), (1025, False),
                                          (8.0, False), (True, False), ("8", False)])
def test_a_class_link_distance_loads_or_is_refused(tmp_path, link, ok):
    d = make_pack(tmp_path / "p")
    path = d / "calibration.json"
    doc = json.loads(path.read_text())
    name = next(iter(doc["classes"]))
    doc["classes"][name]["link_px"] = link
    path.write_text(json.dumps(doc))
    pack = load_model_pack(d)
    if ok:
        cal = load_calibration(pack)
        assert cal.classes[name].link_px == link
        assert {c.link_px for n, c in cal.classes.items() if n != name} == {0}, "absent: no linking"
    else:
        with pytest.raises(ModelPackError, match=rf"classes.{name}: (link_px must be an integer|key 'link_px')"):
            load_calibration(pack)
