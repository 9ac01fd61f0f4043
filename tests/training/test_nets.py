"""training/nets.py: the model contract inside the graph (uint8 in, sigmoid out, stride 4)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.nets import CONFIGS, OUTPUT_STRIDE, ModelConfig, Normalise, build_models, count_params  # noqa: E402


@pytest.mark.parametrize("size", sorted(CONFIGS))
def test_shapes_at_any_multiple_of_eight(size):
    torch.manual_seed(0)
    gate, seg = build_models(3, 1, 0.5, 0.25, size)
    gate.eval(), seg.eval()
    for h, w in ((64, 64), (48, 200)):
        x = torch.randint(0, 256, (2, 1, h, w), dtype=torch.uint8)
        with torch.no_grad():
            scores, probs = gate(x), seg(x)
        assert scores.shape == (2, 3)
        assert probs.shape == (2, 3, h // OUTPUT_STRIDE, w // OUTPUT_STRIDE)
        for out in (scores, probs):
            assert out.dtype == torch.float32 and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_normalisation_is_inside_the_model():
    norm = Normalise(0.4, 0.2)
    x = torch.tensor([0, 102, 255], dtype=torch.uint8)
    assert torch.allclose(norm(x), (x.float() / 255 - 0.4) / 0.2, atol=1e-6)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalise(0.5, 0.0)


def test_gate_score_is_the_max_over_space_of_its_map():
    torch.manual_seed(1)
    gate, _ = build_models(2)
    gate.eval()
    x = torch.randint(0, 256, (1, 1, 64, 128), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(gate(x), torch.sigmoid(gate.logit_map(x).amax(dim=(2, 3))))


def test_sizes_are_ordered_and_small():
    params = {name: sum(count_params(m) for m in build_models(6, config=name)) for name in CONFIGS}
    assert params["tiny"] < params["small"] < params["wide"]
    assert params["small"] < params["medium"] < 150_000
    seg_params = {name: count_params(build_models(6, config=name)[1]) for name in ("small", "medium")}
    assert seg_params["medium"] > 3 * seg_params["small"]


def test_gate_pools_before_normalising_with_the_same_numbers():
    """The gate averages the raw image and then normalises: linear maps commute with the mean, so
    this is the normalise-then-pool model of the shipped packs at a quarter of the arithmetic."""
    torch.manual_seed(2)
    gate, _ = build_models(3)
    gate.eval()
    x = torch.randint(0, 256, (2, 1, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        old_order = gate.head(gate.features(gate.pool(gate.norm(x))))
        assert torch.allclose(gate.logit_map(x), old_order, atol=1e-5)


def test_configs_without_the_newer_keys_load_as_before():
    """model.json of packs exported before gate_stem/seg_context existed still rebuild the same
    modules, so their checkpoints load."""
    # the kolektorsdd pack's training.model_config as shipped until 2026-12-02 (size `small`)
    old = {"gate_widths": [16, 32, 48], "gate_pool": 2, "seg_widths": [8, 16, 32], "seg_decoder": 16,
           "seg_fuse_kernel": 1}
    cfg = ModelConfig.from_dict(old)
    assert cfg.gate_stem == 0 and cfg.seg_context == (2,)
    gate, seg = build_models(2, config=cfg)
    ref_gate, ref_seg = build_models(2, config="small")
    assert gate.state_dict().keys() == ref_gate.state_dict().keys()
    assert seg.state_dict().keys() == ref_seg.state_dict().keys()
    _, medium = build_models(2, config="medium")
    assert len(medium.context) == 2  # two dilated context convs
    patch_gate, _ = build_models(2, config="patchgate")
    assert patch_gate.features[0][0].kernel_size == (4, 4) and patch_gate.features[0][0].stride == (4, 4)


def test_separable_gate_is_depthwise_and_smaller():
    """`sepgate`: after the stem every gate block is a 3x3 depthwise conv then a 1x1 conv; the
    segmenter is the medium one, so a medium run's best_seg.pt loads into it."""
    gate, seg = build_models(6, config="sepgate")
    ref_gate, ref_seg = build_models(6, config="medium")
    for block in gate.features[1:]:
        depthwise, pointwise = block[0], block[3]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert pointwise.kernel_size == (1, 1)
    assert count_params(gate) < count_params(ref_gate) / 2
    seg.load_state_dict(ref_seg.state_dict())  # same layers, same names
    with pytest.raises(ValueError, match="gate_block 'dense'"):
        build_models(2, config=ModelConfig(gate_block="dense"))


def test_gate_tail_counts_the_stride_one_blocks():
    """gate_tail=0 (`sepgate3`) drops the stride-1 block after the two stride-2 ones; the layers
    before it keep their names, and a shipped sepgate config (no gate_tail key) keeps its tail."""
    three, _ = build_models(6, config="sepgate3")
    four, _ = build_models(6, config="sepgate")
    assert len(four.features) == len(three.features) + 1 == 4
    assert ModelConfig.from_dict({k: v for k, v in CONFIGS["sepgate"].to_dict().items() if k != "gate_tail"}) \
        == CONFIGS["sepgate"]
    shared = {k: v for k, v in four.state_dict().items() if not k.startswith("features.3.")}
    three.load_state_dict(shared)  # the same names for every layer both have
    with pytest.raises(ValueError, match="gate_tail -1"):
        build_models(2, config=ModelConfig(gate_tail=-1))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_models(2, config="huge")
    with pytest.raises(ValueError, match="num_classes 0"):
        build_models(0)
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        ModelConfig.from_dict({"depth": 3})
    assert ModelConfig.from_dict(CONFIGS["wide"].to_dict()) == CONFIGS["wide"]
