"""The two small fully convolutional models of every profile: a gate and a segmenter (torch).

Only training and export import this module; the agent runs the exported ONNX graphs.

Both models keep the model contract (docs/architecture.md) inside the graph: the input is the
raw uint8 image `[N, C, H, W]`, normalisation `(x / 255 - mean) / std` is the first op and the
sigmoid the last, so every backend sees the same numbers. Only ops that export to ONNX opset 17
and that TensorRT builds well are used: Conv (+ folded BatchNorm), Relu, AveragePool, ReduceMax,
Resize, Concat, Sigmoid. H and W must be multiples of 8.

Speed decides the shape (measured with ONNX Runtime, 2 threads, 1600x256, batch 8; figures in
docs/models.md): the gate looks at a 2x average-pooled image and ends in a global max over
space, so it answers "is there a defect anywhere" at any frame size; the segmenter works at
stride 2/4/8 and returns per-class probabilities at output stride 4.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

OUTPUT_STRIDE = 4
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class ModelConfig:
    """Layer widths and block kinds; CONFIGS names the measured sizes (docs/models.md says which
    profile ships which)."""

    gate_widths: tuple[int, int, int] = (16, 32, 48)
    gate_pool: int = 2  # average pool before the first conv
    gate_stem: int = 0  # 0: 3x3 stride-2 conv; k > 1: a k x k stride-k patch conv (no overlap)
    gate_block: str = "conv"  # after the stem: "conv" (3x3 conv) or "separable" (3x3 depthwise + 1x1)
    gate_tail: int = 1  # stride-1 blocks after the two stride-2 ones
    seg_widths: tuple[int, int, int] = (8, 16, 32)
    seg_decoder: int = 16
    seg_fuse_kernel: int = 1  # 1x1 fuse at stride 4: a 3x3 there costs more than the whole encoder
    seg_context: tuple[int, ...] = (2,)  # dilations of the 3x3 context convs at stride 8

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(gate_widths=(8, 16, 32), gate_pool=4, seg_widths=(8, 16, 24), seg_decoder=8),
    "small": ModelConfig(),
    # the layer widths first proposed in the brief: 3x3 fuse, 16/32/48 encoder
    "wide": ModelConfig(seg_widths=(16, 32, 48), seg_decoder=32, seg_fuse_kernel=3),
    # the small gate with a segmenter ~4x larger (16/32/48 encoder, context at dilation 2 and 4)
    "medium": ModelConfig(seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4)),
    # the small gate with a segmenter ~2x the medium one (24/48/64 encoder, 32-wide decoder)
    "large": ModelConfig(seg_widths=(24, 48, 64), seg_decoder=32, seg_context=(2, 4)),
    # measured and rejected: a 4x4 patch stem makes the gate ~1.7x faster but far less selective
    "patchgate": ModelConfig(gate_stem=4, seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4)),
    # the medium segmenter behind a gate of depthwise-separable blocks (16/48/64): ~2x faster gate
    "sepgate": ModelConfig(gate_widths=(16, 48, 64), gate_block="separable",
                           seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4)),
    # the separable gate without its stride-1 tail block: ~0.8 of its time
    "sepgate3": ModelConfig(gate_widths=(16, 48, 64), gate_block="separable", gate_tail=0,
                            seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4)),
    # the same gate on a 4x average-pooled image: ~1/4 of its convolutions
    "sepgate4": ModelConfig(gate_widths=(16, 48, 64), gate_pool=4, gate_block="separable",
                            seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4)),
}
GATE_BLOCKS = ("conv", "separable")


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 depthwise conv (+BN, ReLU), then 1x1 conv (+BN, ReLU): ~1/8 of a 3x3 conv's arithmetic."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _patch(cin: int, cout: int, k: int) -> nn.Sequential:
    """k x k stride-k conv (+BN, ReLU): a learned, information-keeping downsample by k."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=k, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Normalise(nn.Module):
    """uint8 (or float 0..255) -> (x / 255 - mean) / std as one Cast, Mul and Add in the graph."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        if std <= 0:
            raise ValueError(f"Normalise: std must be > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.is_floating_point() else x.float()  # no float->float Cast in the exported graph
        return x * (1.0 / (255.0 * self.std)) + (-self.mean / self.std)


class Gate(nn.Module):
    """Image -> per-class probability that the image holds that class, `[N, K]`."""

    def __init__(self, num_classes: int, in_channels: int = 1, mean: float = 0.5, std: float = 0.25,
                 config: ModelConfig = ModelConfig()):
        super().__init__()
        w1, w2, w3 = config.gate_widths
        self.norm = Normalise(mean, std)
        self.pool = nn.AvgPool2d(config.gate_pool) if config.gate_pool > 1 else nn.Identity()
        if config.gate_block not in GATE_BLOCKS:
            raise ValueError(f"gate_block {config.gate_block!r}: expected one of {GATE_BLOCKS}")
        stem = _patch(in_channels, w1, config.gate_stem) if config.gate_stem > 1 else _cbr(in_channels, w1, 2)
        block = _separable if config.gate_block == "separable" else _cbr
        if config.gate_tail < 0:
            raise ValueError(f"gate_tail {config.gate_tail}: expected >= 0")
        tail = [block(w3, w3, 1) for _ in range(config.gate_tail)]
        self.features = nn.Sequential(stem, block(w1, w2, 2), block(w2, w3, 2), *tail)
        self.head = nn.Conv2d(w3, num_classes, 1)

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        # pool, then normalise: the same numbers (both are linear) for 1/pool^2 of the arithmetic
        return self.pooled_logit_map(self.pool(x.float()))

    def pooled_logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """The logit map of an image already pooled (uint8 or float): everything after the pool."""
        return self.head(self.features(self.norm(x)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.logit_map(x), dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    @property
    def pool_size(self) -> int:
        return self.pool.kernel_size if isinstance(self.pool, nn.AvgPool2d) else 1


class PrePooledGate(nn.Module):
    """A Gate whose input is already pooled (engines.modelpack.pool_frames, uint8): the graph the
    pack ships when the average pool moves out of it. Same weights, same numbers up to the uint8
    rounding of the pooled pixels."""

    def __init__(self, gate: Gate):
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.amax(self.gate.pooled_logit_map(x), dim=(2, 3)))


class Segmenter(nn.Module):
    """Image -> per-class probabilities at output stride 4, `[N, K, H/4, W/4]`."""

    def __init__(self, num_classes: int, in_channels: int = 1, mean: float = 0.5, std: float = 0.25,
                 config: ModelConfig = ModelConfig()):
        super().__init__()
        w1, w2, w3 = config.seg_widths
        self.norm = Normalise(mean, std)
        self.down1 = _cbr(in_channels, w1, 2)  # stride 2
        self.down2 = _cbr(w1, w2, 2)  # stride 4: the skip
        self.down3 = _cbr(w2, w3, 2)  # stride 8
        # one conv keeps the name `context` (checkpoints of the shipped packs load unchanged)
        ctx = [_cbr(w3, w3, 1, dilation=d) for d in config.seg_context]
        self.context = ctx[0] if len(ctx) == 1 else nn.Sequential(*ctx)
        self.fuse = _cbr(w3 + w2, config.seg_decoder, 1, kernel=config.seg_fuse_kernel)
        self.head = nn.Conv2d(config.seg_decoder, num_classes, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down2(self.down1(self.norm(x)))
        deep = self.context(self.down3(skip))
        up = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([up, skip], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def build_models(num_classes: int, in_channels: int = 1, mean: float = 0.5, std: float = 0.25,
                 config: ModelConfig | str = "small") -> tuple[Gate, Segmenter]:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model size {config!r}; known: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"build_models: num_classes {num_classes} and in_channels {in_channels} must be >= 1")
    return (Gate(num_classes, in_channels, mean, std, config),
            Segmenter(num_classes, in_channels, mean, std, config))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
