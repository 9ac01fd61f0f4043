"""Small torch nets of the wafer, chip and parts lines, sized for training on two CPU cores.

- ``DeformConv2d``: a 3x3 deformable convolution (Dai et al. 2017, v1: learned offsets, no
  modulation) written in plain torch (bilinear sampling by ``grid_sample``), exported to ONNX as
  the standard ``DeformConv`` operator (opset 19), which ONNX Runtime runs on the CPU. torchvision's
  ``deform_conv2d`` is the usual source of this op, but the only torchvision wheel for torch 2.13
  here is a CUDA build that cannot load beside the pinned CPU torch (it links libtorch_cuda), so the
  op is implemented here and tested against ONNX Runtime's kernel
  (tests/training/test_lines_nets.py). ``deformable=False`` swaps it for a standard 3x3 convolution:
  the documented fallback for a runtime without ``DeformConv`` (TensorRT has no built-in layer
  for it).
- ``WaferNet``: multi-label wafer-map classifier (one sigmoid per basic pattern) whose last layer
  is a 1x1 convolution before global average pooling, so its class activation maps (CAM, Zhou et al.
  2016) come out of the same graph: output ``scores`` [N, 8] and ``cam`` [N, 8, 13, 13] (each
  class's map scaled to [0, 1]).
- ``DefectSegNet``: a two-scale encoder-decoder with per-class sigmoid maps at output stride 2
  (chip dies, 6 channels) or 2 after the agent's input pool (painted parts, RGB); the gate of those
  packs is the same graph with a global max over the map (``GateFromSeg``).

The first op of every graph is the pack's normalisation, ``(x/255 - mean)/std`` on uint8 input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ONNX_OPSET = 19  # DeformConv is an ONNX operator from opset 19


@torch.library.custom_op("coilsight_lines::deform_conv2d", mutates_args=())
def _deform_conv2d_op(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op the ONNX exporter sees (one node, exported as DeformConv); training calls the reference."""
    return deform_conv2d_reference(x, weight, offset, bias)


@_deform_conv2d_op.register_fake
def _(x, weight, offset, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _deform_conv_symbolic(g, x, weight, offset, bias):
    return g.op("DeformConv", x, weight, offset, bias, kernel_shape_i=[3, 3], pads_i=[1, 1, 1, 1],
                strides_i=[1, 1], dilations_i=[1, 1], group_i=1, offset_group_i=1)


torch.onnx.register_custom_op_symbolic("coilsight_lines::deform_conv2d", _deform_conv_symbolic, ONNX_OPSET)


def deform_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """ONNX ``DeformConv`` semantics for a 3x3 kernel, stride 1, padding 1: output pixel (y, x) sums
    ``weight[:, :, i, j] * x`` sampled bilinearly at ``(y + i - 1 + dy, x + j - 1 + dx)``, where
    ``offset[:, 2k]`` is dy and ``offset[:, 2k + 1]`` dx of kernel tap ``k = 3i + j``; samples outside
    the image read zeros (each bilinear corner outside counts as zero)."""
    n, c, h, w = x.shape
    taps = torch.arange(9, device=x.device)
    ky = (taps // 3 - 1).to(x.dtype).view(1, 9, 1, 1)
    kx = (taps % 3 - 1).to(x.dtype).view(1, 9, 1, 1)
    off = offset.view(n, 9, 2, h, w)
    py = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1) + ky + off[:, :, 0]
    px = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w) + kx + off[:, :, 1]
    grid = torch.stack((2.0 * px / max(w - 1, 1) - 1.0, 2.0 * py / max(h - 1, 1) - 1.0), dim=-1)
    # all 9 taps in one sampling call: [N, 9*H, W, 2] -> [N, C, 9*H, W]
    col = F.grid_sample(x, grid.view(n, 9 * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    col = col.view(n, c, 9, h, w)
    out = torch.einsum("nckhw,ock->nohw", col, weight.reshape(weight.shape[0], c, 9))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class DeformConv2d(nn.Module):
    """3x3 deformable convolution with its offsets predicted by a 3x3 convolution (zero-initialised,
    so training starts from a plain convolution)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.offset = nn.Conv2d(cin, 18, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        if torch.onnx.is_in_onnx_export():
            return torch.ops.coilsight_lines.deform_conv2d(x, self.weight, offset, self.bias)
        return deform_conv2d_reference(x, self.weight, offset, self.bias)


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Normalise(nn.Module):
    """``(x/255 - mean)/std``; mean and std are one number or one per channel."""

    def __init__(self, mean, std):
        super().__init__()
        m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", m.view(1, -1, 1, 1) if m.ndim else m)
        self.register_buffer("std", s.view(1, -1, 1, 1) if s.ndim else s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class WaferNet(nn.Module):
    """52x52 wafer map -> 8 pattern logits and their CAMs (13x13)."""

    def __init__(self, classes: int = 8, width: int = 32, deformable: bool = True, mean: float = 1 / 255,
                 std: float = 1 / 255):
        super().__init__()
        self.norm = Normalise(mean, std)
        self.deformable = deformable
        self.stem = nn.Sequential(_cbr(1, width // 2), _cbr(width // 2, width, stride=2))  # 26x26
        self.deform = DeformConv2d(width, width) if deformable else nn.Conv2d(width, width, 3, padding=1)
        self.deform_post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.body = nn.Sequential(_cbr(width, 2 * width, stride=2), _cbr(2 * width, 2 * width, dilation=2),
                                  _cbr(2 * width, 2 * width))  # 13x13
        self.classifier = nn.Conv2d(2 * width, classes, 1)

    def class_maps(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.norm(image))
        x = self.deform_post(self.deform(x))
        return self.classifier(self.body(x))  # [N, K, 13, 13] logits per cell

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.class_maps(image).mean(dim=(2, 3))  # logits [N, K]


def dihedral_views(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square on the last two axes (identity first): transpose or not, times a
    flip of either axis or not. Works on any H x W (a transposed view is W x H)."""
    views = []
    for t in (False, True):
        x = image.transpose(2, 3) if t else image
        for fh in (False, True):
            for fw in (False, True):
                dims = [d for d, on in ((2, fh), (3, fw)) if on]
                views.append(torch.flip(x, dims) if dims else x)
    return views


class WaferExport(nn.Module):
    """The exported graph: uint8 map -> (scores = sigmoid(logits), cam = each class's map in [0, 1]).

    ``symmetries=8``: the scores are the mean of the 8 symmetries' sigmoid scores (every pattern's label
    is invariant to them; test-time augmentation inside the graph, 8 passes of the net); the CAM is the
    identity view's."""

    def __init__(self, net: WaferNet, symmetries: int = 1):
        super().__init__()
        if symmetries not in (1, 8):
            raise ValueError(f"symmetries must be 1 or 8, got {symmetries}")
        self.net = net
        self.symmetries = symmetries

    def forward(self, image: torch.Tensor):
        maps = self.net.class_maps(image)
        scores = torch.sigmoid(maps.mean(dim=(2, 3)))
        if self.symmetries == 8:
            for view in dihedral_views(image)[1:]:
                scores = scores + torch.sigmoid(self.net(view))
            scores = scores / 8.0
        pos = torch.relu(maps)
        peak = pos.amax(dim=(2, 3), keepdim=True)
        cam = pos / (peak + 1e-6)
        return scores, cam


class DefectSegNet(nn.Module):
    """Per-class defect maps at output stride 2: [N, C, H, W] uint8 -> logits [N, K, H/2, W/2]."""

    def __init__(self, channels: int, classes: int, width: int = 24, mean=0.5, std=0.25):
        super().__init__()
        self.norm = Normalise(mean, std)
        w = width
        self.enc1 = nn.Sequential(_cbr(channels, w, stride=2), _cbr(w, w))  # /2
        self.enc2 = nn.Sequential(_cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w, dilation=2),
                                  _cbr(2 * w, 2 * w, dilation=4))  # /4
        self.fuse = nn.Sequential(nn.Conv2d(3 * w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), _cbr(w, w))
        self.head = nn.Conv2d(w, classes, 1)
        nn.init.constant_(self.head.bias, -3.0)  # defects are rare pixels: start near p = 0.05

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        a = self.enc1(self.norm(image))
        b = self.enc2(a)
        up = F.interpolate(b, size=a.shape[2:], mode="nearest")
        return self.head(self.fuse(torch.cat([a, up], dim=1)))


class SegProbs(nn.Module):
    def __init__(self, net: DefectSegNet):
        super().__init__()
        self.net = net

    def forward(self, image):
        return torch.sigmoid(self.net(image))


class GateFromSeg(nn.Module):
    """The gate of a chip or parts pack: the segmenter's highest probability per class anywhere in the frame."""

    def __init__(self, net: DefectSegNet):
        super().__init__()
        self.net = net

    def forward(self, image):
        return torch.sigmoid(self.net(image)).amax(dim=(2, 3))
