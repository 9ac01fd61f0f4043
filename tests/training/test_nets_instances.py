"""training/nets.py's instance model: the format-3 outputs, the trunk's reach, its size and cost."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.nets import (  # noqa: E402
    INSTANCE_CONFIGS, SIZE_LOG_CLAMP, SIZE_SCALE, InstanceConfig, Normalise, build_instance_model, build_models, count_macs,
    count_params, receptive_field,
)


@pytest.mark.parametrize("size", sorted(INSTANCE_CONFIGS))
def test_outputs_follow_the_contract(size):
    torch.manual_seed(0)
    model = build_instance_model(3, 1, 0.5, 0.25, size).eval()
    for h, w in ((64, 96), (200, 200), (48, 200)):  # 200: a multiple of 4 but not of 16 (NEU images)
        x = torch.randint(0, 256, (2, 1, h, w), dtype=torch.uint8)
        with torch.no_grad():
            probs, heat, box, off = model(x)
        assert probs.shape == heat.shape == (2, 3, h // 4, w // 4)
        assert box.shape == off.shape == (2, 2, h // 4, w // 4)
        for t in (probs, heat, off):
            assert t.dtype == torch.float32 and float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        lo, hi = (SIZE_SCALE * torch.exp(torch.tensor(v)) for v in SIZE_LOG_CLAMP)
        assert float(box.min()) >= float(lo) * 0.999 and float(box.max()) <= float(hi) * 1.001


def test_heatmap_starts_at_the_prior_and_size_is_exp_of_the_raw_output():
    torch.manual_seed(1)
    model = build_instance_model(2, config="test").eval()
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.raw(x)
        _, heat, size, off = model(x)
    assert torch.allclose(size, SIZE_SCALE * torch.exp(raw["size"].clamp(*SIZE_LOG_CLAMP)))
    assert torch.allclose(off, torch.sigmoid(raw["offset"]))
    assert 0.02 < float(heat.mean()) < 0.4, "the heatmap bias starts near the focal-loss prior"


def test_sizes_reach_cost_and_parameters():
    """The figures the issue asks to state (per 1600x256 frame, one image channel)."""
    _, shipped = build_models(6, 1, 0.5, 0.25, "sepgate")  # the segmenter the steel pack ships
    edge = build_instance_model(6, config="edge")
    line = build_instance_model(6, config="line")
    shipped_macs, edge_macs, line_macs = count_macs(shipped), count_macs(edge), count_macs(line)
    assert count_params(edge) == 217_136 and count_params(line) == 1_557_272
    assert round(edge_macs / 1e9, 3) == 0.662 and round(line_macs / 1e9, 2) == 4.49
    assert round(shipped_macs / 1e9, 3) == 0.539
    assert edge_macs < 1.3 * shipped_macs, "edge stays near the shipped segmenter's cost"
    assert receptive_field(edge) >= 250 and receptive_field(line) >= 250, "a receptive field over ~250 px"


def test_count_macs_counts_a_known_conv():
    model = torch.nn.Sequential(Normalise(0.5, 0.25), torch.nn.Conv2d(1, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4))
    assert count_macs(model, 8, 10) == 8 * 10 * 4 * 9 + 4 * 5 * 4 * 9


def test_config_round_trip_and_bad_names():
    cfg = INSTANCE_CONFIGS["edge"]
    assert InstanceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        InstanceConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="unknown instance model size 'huge'"):
        build_instance_model(2, config="huge")
