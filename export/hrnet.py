"""HRNet for tip heatmaps (Sun et al. 2019, "Deep High-Resolution Representation Learning").

The network keeps a high-resolution branch through the whole depth and adds lower-
resolution branches stage by stage; every HR module runs its branches in parallel (basic
residual blocks) and then *fuses* them all-to-all: each output branch sums every input
branch, upsampled (1x1 conv + bilinear) or downsampled (strided 3x3 convs).  That repeated
multi-scale exchange is what separates HRNet from an encoder-decoder (U-Net).

Geometry: the stem brings the input to stride 4 (two stride-2 convs).  The head fuses the
last stage's high-resolution branch, upsamples it x2 and adds the stride-2 stem features
(HigherHRNet-style), so the heatmaps come out at stride 2: tips of one class are >= 16 px
apart in the crop, i.e. >= 8 heatmap px.  Output ``(B, K, H/2, W/2)``, linear (no sigmoid):
the targets are unit-peak Gaussians (see ``daemon.codec``).

Input ``(B, 1, H, W)`` float32 from ``daemon.codec.normalise``; H, W multiples of 32 for
``len(widths) == 4`` (16 for three branches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class HRNetConfig:
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the branches, stride 4, 8, 16 (, 32)
    blocks: int = 2  # residual blocks per branch in each HR module
    modules: tuple[int, ...] = (1, 2)  # HR modules per stage after the first (one per extra branch)
    stem: int = 16  # channels of the stem (stride 2)
    stage1_blocks: int = 2  # residual blocks of the single-branch first stage
    head: int = 16  # channels of the stride-2 head
    classes: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of this (the lowest branch's stride), so that every
        branch's upsampled features line up with the next higher one."""
        return 4 * 2 ** (len(self.widths) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "HRNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c, relu=False)

    def forward(self, x):
        return F.relu(x + self.b(self.a(x)))


class Upsample(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)


class HRModule(nn.Module):
    """Parallel branches of residual blocks, then all-to-all fusion."""

    def __init__(self, widths: tuple[int, ...], blocks: int):
        super().__init__()
        n = len(widths)
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(w) for _ in range(blocks)]) for w in widths)
        self.fuse = nn.ModuleList()
        for i in range(n):  # output branch
            row = nn.ModuleList()
            for j in range(n):  # input branch
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> up
                    row.append(nn.Sequential(conv_bn(widths[j], widths[i], 1, relu=False), Upsample(2 ** (j - i))))
                else:  # higher resolution -> down by strided 3x3 convs
                    steps = []
                    for s in range(i - j):
                        last = s == i - j - 1
                        steps.append(conv_bn(widths[j], widths[i] if last else widths[j], 3, 2, relu=not last))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out = []
        for row in self.fuse:
            acc = row[0](xs[0])
            for j in range(1, len(xs)):
                acc = acc + row[j](xs[j])
            out.append(F.relu(acc))
        return out


class HRNet(nn.Module):
    def __init__(self, cfg: HRNetConfig = HRNetConfig()):
        super().__init__()
        if len(cfg.modules) != len(cfg.widths) - 1:
            raise ValueError("modules needs one entry per branch after the first")
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem2 = conv_bn(1, cfg.stem, 3, 2)  # stride 2
        self.stem4 = conv_bn(cfg.stem, w0, 3, 2)  # stride 4
        self.stage1 = nn.Sequential(*[BasicBlock(w0) for _ in range(cfg.stage1_blocks)])
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in range(1, len(cfg.widths)):
            # a new, lower-resolution branch from the current lowest one
            self.transitions.append(conv_bn(cfg.widths[s - 1], cfg.widths[s], 3, 2))
            self.stages.append(nn.Sequential(*[HRModule(cfg.widths[: s + 1], cfg.blocks)
                                               for _ in range(cfg.modules[s - 1])]))
        self.head4 = conv_bn(w0, cfg.head, 3)
        self.skip2 = conv_bn(cfg.stem, cfg.head, 1, relu=False)
        self.head2 = nn.Sequential(conv_bn(cfg.head, cfg.head, 3), nn.Conv2d(cfg.head, cfg.classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.stem2(x)
        xs = [self.stage1(self.stem4(s2))]
        for trans, stage in zip(self.transitions, self.stages):
            xs = xs + [trans(xs[-1])]
            xs = stage(xs)
        h = F.interpolate(self.head4(xs[0]), scale_factor=2, mode="bilinear", align_corners=False)
        return self.head2(F.relu(h + self.skip2(s2)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["HRNet", "HRNetConfig", "HRModule", "count_parameters"]
