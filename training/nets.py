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

import math
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
    # dilations of residual separable context blocks after the tail (GateContext): each widens the
    # gate's view by 2 * d * 8 pooled px at ~a tail block's cost; () is the shipped gates' net
    gate_context: tuple[int, ...] = ()
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
# the shipped sepgate with two context blocks (dilation 2 and 4 at stride 8): its view grows from
# ~62 to ~250 input px, so that a faint local defect is judged against the strip's texture around it
CONFIGS["ctxgate"] = ModelConfig(gate_widths=(16, 48, 64), gate_block="separable", gate_context=(2, 4),
                                 seg_widths=(16, 32, 48), seg_decoder=24, seg_context=(2, 4))


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


class GateContext(nn.Module):
    """x + BN(1x1(ReLU(BN(3x3 depthwise, dilation d)(x)))): a residual context block. The last
    BatchNorm starts at scale 0, so a gate grown by these blocks computes exactly what it computed
    before them (a warm start from a shipped gate starts where that gate is), and no ReLU after the
    sum keeps that scale's gradient alive."""

    def __init__(self, c: int, dilation: int):
        super().__init__()
        if dilation < 1:
            raise ValueError(f"gate_context dilation {dilation}: expected >= 1")
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )
        nn.init.zeros_(self.body[4].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


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
        self.config = config
        self.norm = Normalise(mean, std)
        self.pool = nn.AvgPool2d(config.gate_pool) if config.gate_pool > 1 else nn.Identity()
        if config.gate_block not in GATE_BLOCKS:
            raise ValueError(f"gate_block {config.gate_block!r}: expected one of {GATE_BLOCKS}")
        stem = _patch(in_channels, w1, config.gate_stem) if config.gate_stem > 1 else _cbr(in_channels, w1, 2)
        block = _separable if config.gate_block == "separable" else _cbr
        if config.gate_tail < 0:
            raise ValueError(f"gate_tail {config.gate_tail}: expected >= 0")
        tail = [block(w3, w3, 1) for _ in range(config.gate_tail)]
        context = [GateContext(w3, d) for d in config.gate_context]
        self.features = nn.Sequential(stem, block(w1, w2, 2), block(w2, w3, 2), *tail, *context)
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


# -- the instance model (issue 17): a trunk worth the head, an anchor-free head beside `probs` ----

INSTANCE_OUTPUTS = ("probs", "heatmap", "size", "offset")
SIZE_SCALE = 16.0  # size = SIZE_SCALE * exp(t) input px: t = 0 is a 16 px box
SIZE_LOG_CLAMP = (-3.0, 5.0)  # 0.8 .. 2,375 px; keeps exp finite in FP16 (max 65,504)
HEATMAP_PRIOR = 0.1  # initial heatmap probability (CenterNet's bias -2.19)


@dataclass(frozen=True)
class InstanceConfig:
    """Widths of the instance model. Encoder stages at stride 2, 4, 8, 16 (`widths`); dilated 3x3
    context convs at stride 16 (`context`: their dilations); 1x1 lateral convs fuse top-down to
    stride 4 (`decoder` channels); a 3x3 depthwise + 1x1 head trunk at stride 4 (`head`) feeds four
    1x1 outputs. `separable`: stages at stride >= 4 are depthwise 3x3 + 1x1 (cheap) instead of full
    3x3 convs (the stride-4 downsampling conv is always a full 3x3); `blocks`: extra stride-1 blocks per stage from stride 4 on."""

    widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    context: tuple[int, ...] = (2, 4, 8)
    decoder: int = 48
    head: int = 48
    separable: bool = True
    blocks: tuple[int, int, int] = (1, 2, 2)
    # "own": the stages above; "lite0": training/lite0.py's EfficientNet-Lite0 (ImageNet weights) in their
    # place, tapped at stride 4, 8, 16 and 32 (widths, context, separable and blocks then unused)
    trunk: str = "own"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"instance config: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


INSTANCE_CONFIGS: dict[str, InstanceConfig] = {
    # the CPU default: GMACs per 1600x256 frame near the shipped segmenter's (test_nets states both)
    # full 3x3 convs: torch's depthwise convs train ~2x slower per step on the CPU for fewer MACs
    "edge": InstanceConfig(widths=(16, 24, 48, 64), context=(2, 4, 8), decoder=32, head=32, separable=False,
                           blocks=(0, 1, 1)),
    # the same trunk in depthwise-separable blocks, wider: 0.55 GMAC, measured and not shipped
    "edge_sep": InstanceConfig(),
    # accuracy first, for GPU line boxes: full 3x3 convs, wider, deeper context
    "line": InstanceConfig(widths=(24, 48, 96, 160), context=(2, 4, 8), decoder=64, head=64,
                           separable=False, blocks=(1, 2, 2)),
    # the line tier on an ImageNet trunk (training/lite0.py): EfficientNet-Lite0 to stride 32, 1x1 fusion
    "line_lite0": InstanceConfig(decoder=64, head=64, trunk="lite0"),
    # tests only: the same graph, a few thousand parameters
    "test": InstanceConfig(widths=(8, 8, 16, 16), context=(2,), decoder=8, head=8, blocks=(0, 0, 0)),
}


def _stage(cin: int, cout: int, stride: int, separable: bool, dilation: int = 1) -> nn.Sequential:
    if separable:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return _cbr(cin, cout, stride, dilation)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class InstanceSegmenter(nn.Module):
    """Image -> (probs, heatmap, size, offset) at output stride 4 (the contract in
    READ-ME of engines/instances.py and docs/architecture.md, model.json format 3):

    - probs   [N, K, H/4, W/4] per-class pixel probability (sigmoid), as the old Segmenter;
    - heatmap [N, K, H/4, W/4] per-class centre heatmap (sigmoid);
    - size    [N, 2, H/4, W/4] box (w, h) in input px, SIZE_SCALE * exp(clamped t) >= 0;
    - offset  [N, 2, H/4, W/4] centre offset (dx, dy) in cells, sigmoid (0..1).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, mean: float = 0.5, std: float = 0.25,
                 config: InstanceConfig = InstanceConfig()):
        super().__init__()
        if config.trunk not in ("own", "lite0"):
            raise ValueError(f"instance config: trunk {config.trunk!r}; known: own, lite0")
        w1, w2, w3, w4 = config.widths
        sep = config.separable
        self.config = config
        self.norm = Normalise(mean, std)
        d = config.decoder
        if config.trunk == "lite0":
            from training.lite0 import TAP_CHANNELS, Lite0Encoder

            self.encoder = Lite0Encoder(in_channels)
            w2, w3, w4, w5 = TAP_CHANNELS
            self.lat32 = nn.Conv2d(w5, d, 1)
        else:
            self.s2 = _cbr(in_channels, w1, 2)
            # the stride-4 stage is a full 3x3 conv in every size: few input channels, and the head's detail
            self.s4 = nn.Sequential(_cbr(w1, w2, 2), *[_Residual(_stage(w2, w2, 1, sep)) for _ in range(config.blocks[0])])
            self.s8 = nn.Sequential(_stage(w2, w3, 2, sep), *[_Residual(_stage(w3, w3, 1, sep)) for _ in range(config.blocks[1])])
            self.s16 = nn.Sequential(_stage(w3, w4, 2, sep), *[_Residual(_stage(w4, w4, 1, sep)) for _ in range(config.blocks[2])])
            self.context = nn.Sequential(*[_Residual(_stage(w4, w4, 1, sep, dilation=d)) for d in config.context])
        self.lat16 = nn.Conv2d(w4, d, 1)
        self.lat8 = nn.Conv2d(w3, d, 1)
        self.lat4 = nn.Conv2d(w2, d, 1)
        self.head_trunk = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            nn.Conv2d(d, config.head, 1, bias=False), nn.BatchNorm2d(config.head), nn.ReLU(inplace=True))
        h = config.head
        self.probs = nn.Conv2d(h, num_classes, 1)
        self.heatmap = nn.Conv2d(h, num_classes, 1)
        self.size = nn.Conv2d(h, 2, 1)
        self.offset = nn.Conv2d(h, 2, 1)
        nn.init.constant_(self.heatmap.bias, math.log(HEATMAP_PRIOR / (1.0 - HEATMAP_PRIOR)))
        nn.init.constant_(self.probs.bias, math.log(HEATMAP_PRIOR / (1.0 - HEATMAP_PRIOR)))
        self.num_classes = num_classes

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-activation outputs: probs/heatmap/offset logits, size log-scale t (unclamped)."""
        if self.config.trunk == "lite0":
            f4, f8, f16, f32 = self.encoder(self.norm(x))
            t32 = self.lat32(f32)
            top = self.lat16(f16) + F.interpolate(t32, size=f16.shape[-2:], mode="nearest")
        else:
            f4 = self.s4(self.s2(self.norm(x)))
            f8 = self.s8(f4)
            f16 = self.context(self.s16(f8))
            top = self.lat16(f16)
        # upsample to the finer map's own size: any H, W that is a multiple of 4 works (NEU's 200 px
        # is not a multiple of 16); for multiples of 16 it is exactly a 2x nearest upsampling
        p8 = self.lat8(f8) + F.interpolate(top, size=f8.shape[-2:], mode="nearest")
        p4 = self.lat4(f4) + F.interpolate(p8, size=f4.shape[-2:], mode="nearest")
        t = self.head_trunk(F.relu(p4))
        return {"probs": self.probs(t), "heatmap": self.heatmap(t), "size": self.size(t), "offset": self.offset(t)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.raw(x)
        size = SIZE_SCALE * torch.exp(torch.clamp(r["size"], *SIZE_LOG_CLAMP))
        return torch.sigmoid(r["probs"]), torch.sigmoid(r["heatmap"]), size, torch.sigmoid(r["offset"])


TTA_FLIPS = {"none": (), "flip": ((3,),), "flip4": ((3,), (2,), (2, 3))}  # flipped dims of each extra pass


class FlipTTA(nn.Module):
    """Test-time augmentation inside the exported graph: the net runs on the frame and its flips (one
    batch of (1 + flips) x N; ``flips`` from TTA_FLIPS), each pass's probs, heatmap and size are flipped
    back and averaged; the offset is the plain pass's (a flipped offset points the other way within its
    cell). Same outputs and contract as the net; (1 + flips) x its arithmetic. The runtime does not know:
    it is the pack's seg graph."""

    def __init__(self, net: nn.Module, flips: str = "flip4"):
        super().__init__()
        if flips not in TTA_FLIPS or not TTA_FLIPS[flips]:
            raise ValueError(f"FlipTTA: flips {flips!r}; known: {', '.join(k for k, v in TTA_FLIPS.items() if v)}")
        self.net = net
        self.flips = flips
        self.dims = TTA_FLIPS[flips]

    @property
    def passes(self) -> int:
        return 1 + len(self.dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        probs, heat, size, offset = self.net(torch.cat([x, *[torch.flip(x, dims=d) for d in self.dims]]))

        def mean(t: torch.Tensor) -> torch.Tensor:
            total = t[:n]
            for i, d in enumerate(self.dims, start=1):
                total = total + torch.flip(t[i * n:(i + 1) * n], dims=d)
            return total * (1.0 / self.passes)

        return mean(probs), mean(heat), mean(size), offset[:n]


def build_instance_model(num_classes: int, in_channels: int = 1, mean: float = 0.5, std: float = 0.25,
                         config: InstanceConfig | str = "edge") -> InstanceSegmenter:
    if isinstance(config, str):
        if config not in INSTANCE_CONFIGS:
            raise ValueError(f"unknown instance model size {config!r}; known: {', '.join(INSTANCE_CONFIGS)}")
        config = INSTANCE_CONFIGS[config]
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"build_instance_model: num_classes {num_classes} and in_channels {in_channels} must be >= 1")
    return InstanceSegmenter(num_classes, in_channels, mean, std, config)


def count_macs(model: nn.Module, height: int = 256, width: int = 1600, channels: int = 1) -> int:
    """Multiply-accumulates of one forward pass on one [channels, height, width] frame: every Conv2d
    (kernel x in/groups x out x output positions); pools, adds and activations are left out."""
    total = 0

    def hook(mod: nn.Conv2d, _inp, out) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += int(out.numel() // out.shape[0]) * kh * kw * (mod.in_channels // mod.groups)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, height, width, dtype=torch.uint8))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total


def receptive_field(model: InstanceSegmenter) -> int:
    """Theoretical receptive field (input px) of one output cell through the deepest path
    (stem, stages, context), summed over the convolutions in forward order."""
    rf, jump = 1, 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m not in (model.lat16, model.lat8, model.lat4, getattr(model, "lat32", None),
                                                  model.probs, model.heatmap, model.size, model.offset):
            k = m.kernel_size[0]
            rf += (k - 1) * m.dilation[0] * jump
            jump *= m.stride[0]
    return rf
