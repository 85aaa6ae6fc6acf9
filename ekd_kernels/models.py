"""Face-recognition backbones: MobileFaceNet (the student) and the IR ResNets (the teachers).

Plain PyTorch, one definition shared by the end-to-end example and the training-step
benchmark.  Both follow the architectures the EKD authors train (Tencent/TFace,
``torchkit/backbone``): aligned 112 x 112 RGB crops in, a 512-d embedding out (raw, not
normalised: the losses normalise).  The IR units are TFace's; the IR embedding head is not
(BN, dropout 0 by default, a Linear without bias, a trainable BatchNorm1d, where TFace's has
dropout 0.4, a biased Linear and a BatchNorm1d without affine parameters), and the module names
differ (``stem``/``body``/``embedding``): a TFace checkpoint does not load as it is.

    student = mobilefacenet()                  # 1.20 M parameters, ~0.22 GMAC at 112 x 112
    teacher = ir(50)                           # IR-50, ~43.6 M parameters, ~6.3 GMAC
    small_teacher = ir(18, width=32)           # a narrower IR-18, for CPU-sized experiments

``input_size`` (a multiple of 16, default 112) only changes the spatial size of the last
feature map, so the same architectures run on smaller crops for quick CPU experiments.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: Units per stage of the IR ResNets (He et al. blocks with the "improved residual" order).
IR_STAGES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}


def _check_input_size(input_size: int) -> int:
    if input_size < 16 or input_size % 16 != 0:
        raise ValueError(f"input_size must be a positive multiple of 16 (112 for face crops), got {input_size}")
    return input_size // 16  # four stride-2 stages


# --------------------------------------------------------------------------- MobileFaceNet
class ConvBlock(nn.Sequential):
    """conv -> BN -> PReLU (``linear=True`` leaves the PReLU out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, linear: bool = False):
        layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_channels)]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """MobileNetV2's inverted bottleneck: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(
            ConvBlock(in_channels, expanded),
            ConvBlock(expanded, expanded, kernel=3, stride=stride, padding=1, groups=expanded),
            ConvBlock(expanded, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al., 2018): ends in a global depthwise conv (GDC) instead of pooling."""

    def __init__(self, embedding_size: int = 512, input_size: int = 112):
        super().__init__()
        final = _check_input_size(input_size)

        def stage(channels: int, expanded: int, units: int) -> nn.Sequential:
            return nn.Sequential(*[DepthWise(channels, channels, expanded, residual=True) for _ in range(units)])

        self.features = nn.Sequential(
            ConvBlock(3, 64, kernel=3, stride=2, padding=1),                  # 1/2
            ConvBlock(64, 64, kernel=3, padding=1, groups=64),
            DepthWise(64, 64, 128, stride=2),                                 # 1/4
            stage(64, 128, 4),
            DepthWise(64, 128, 256, stride=2),                                # 1/8
            stage(128, 256, 6),
            DepthWise(128, 128, 512, stride=2),                               # 1/16
            stage(128, 256, 2),
            ConvBlock(128, 512),
            ConvBlock(512, 512, kernel=final, groups=512, linear=True),      # GDC: 512 x 1 x 1
        )
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(512, embedding_size, bias=False),
                                       nn.BatchNorm1d(embedding_size))
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images))


# --------------------------------------------------------------------------- IR ResNets
class BottleneckIR(nn.Module):
    """The IR unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if in_channels == out_channels:
            self.shortcut = nn.MaxPool2d(1, stride) if stride > 1 else nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class IResNet(nn.Module):
    """IR ResNet (ArcFace's "IR-SE" family without SE): four stride-2 stages of IR units.

    ``units`` per stage (IR_STAGES[50] for IR-50); ``width`` the channels of the first stage
    (64 in the published models; stages double it).
    """

    def __init__(self, units: Sequence[int], width: int = 64, embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.0):
        super().__init__()
        final = _check_input_size(input_size)
        channels = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        blocks = []
        in_channels = width
        for stage_channels, count in zip(channels, units):
            for u in range(count):
                blocks.append(BottleneckIR(in_channels, stage_channels, stride=2 if u == 0 else 1))
                in_channels = stage_channels
        self.body = nn.Sequential(*blocks)
        self.embedding = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(in_channels * final * final, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.body(self.stem(images)))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mobilefacenet(embedding_size: int = 512, input_size: int = 112) -> MobileFaceNet:
    """The student backbone."""
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size)


def ir(depth: int = 50, width: int = 64, embedding_size: int = 512, input_size: int = 112,
       dropout: float = 0.0) -> IResNet:
    """IR-18/34/50/100 (``depth``); ``width`` < 64 gives the narrower variants used on a CPU."""
    if depth not in IR_STAGES:
        raise ValueError(f"depth must be one of {sorted(IR_STAGES)}, got {depth!r}")
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width!r}")
    return IResNet(IR_STAGES[depth], width=width, embedding_size=embedding_size, input_size=input_size,
                   dropout=dropout)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """By name: "mobilefacenet", "ir18", "ir34", "ir50", "ir100" (used by the example and the bench)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "mobilefacenet":
        return mobilefacenet(**kwargs)
    if key.startswith("ir") and key[2:].isascii() and key[2:].isdigit():
        return ir(int(key[2:]), **kwargs)
    raise ValueError(f"unknown backbone {name!r}: expected mobilefacenet, ir18, ir34, ir50 or ir100")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
