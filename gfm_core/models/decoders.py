"""Decoders of the dense heads: a backbone's levels ``[B, C_i, h_i, w_i]`` -> one ``[B, dim, h_0, w_0]`` map.

Registered by name in :data:`DECODERS` (``finetune.decoder``, ``tasks[].decoder``):

- ``fpn``: lateral 1x1, top-down sum, 3x3 smoothing, every level fused at the finest stride by a 1x1 conv.
- ``upernet``: UPerNet (Xiao et al. 2018, "Unified Perceptual Parsing"; the decoder of MMSegmentation's Swin
  segmentation configs): a Pyramid Pooling Module (PSPNet, pool scales 1, 2, 3, 6) replaces the last level's
  lateral; lateral 1x1 convs and a bilinear top-down pathway over the other levels, 3x3 convs on them, every
  level upsampled to the finest and concatenated, then a 3x3 fusion conv.

Every conv is conv -> BatchNorm -> ReLU. Both decoders end with ``dim`` channels, so the heads' classifiers
do not depend on the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfm_core.errors import ConfigError

#: The pool scales of UPerNet's Pyramid Pooling Module (PSPNet's; MMSegmentation's UPerHead default).
POOL_SCALES = (1, 2, 3, 6)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
        )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` (unchanged when it already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Feature pyramid: lateral 1x1, top-down sum, 3x3 smoothing, then every level fused at the finest stride.

    ``[B, C_i, h_i, w_i]`` per level -> ``[B, dim, h_0, w_0]``.
    """

    def __init__(self, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvNormAct(c, dim, 1) for c in channels)
        self.smooth = nn.ModuleList(ConvNormAct(dim, dim, 3) for _ in channels)
        self.fuse = ConvNormAct(dim * len(channels), dim, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuse the levels into one ``[B, dim, h_0, w_0]`` map."""
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        outs = [
            F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) if i else s(x)
            for i, (s, x) in enumerate(zip(self.smooth, lat, strict=True))
        ]
        return self.fuse(torch.cat(outs, dim=1))


class PyramidPooling(nn.Module):
    """PSPNet's Pyramid Pooling Module: ``x`` and, per scale ``s``, its ``s x s`` average pool -> 1x1 conv,
    upsampled back to ``x``'s size, concatenated and fused by a 3x3 conv: ``[B, C, h, w]`` -> ``[B, dim, h, w]``.

    Adaptive pooling works on maps smaller than a scale (a 1x1 map pools to ``s x s`` copies of itself).
    """

    def __init__(self, cin: int, dim: int, scales: Sequence[int] = POOL_SCALES) -> None:
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(cin, dim, 1)) for s in scales)
        self.bottleneck = ConvNormAct(cin + len(self.scales) * dim, dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        """The context-enriched last level, ``[B, dim, h, w]``."""
        pooled = [_resize(branch(x), x.shape[-2:]) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerNetDecoder(nn.Module):
    """UPerNet: PPM on the last level, FPN over the others, all levels fused at the finest stride (3x3 conv).

    ``[B, C_i, h_i, w_i]`` per level -> ``[B, dim, h_0, w_0]`` (see the module docstring).
    """

    def __init__(self, channels: Sequence[int], dim: int, scales: Sequence[int] = POOL_SCALES) -> None:
        super().__init__()
        *finer, last = channels
        self.ppm = PyramidPooling(last, dim, scales)
        self.lateral = nn.ModuleList(ConvNormAct(c, dim, 1) for c in finer)
        self.fpn = nn.ModuleList(ConvNormAct(dim, dim, 3) for _ in finer)
        self.fuse = ConvNormAct(dim * len(channels), dim, 3)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuse the levels into one ``[B, dim, h_0, w_0]`` map.

        Raises:
            ConfigError: a training batch of one sample (BatchNorm after the 1x1 pool has one value).
        """
        if self.training and feats[-1].shape[0] < 2:
            raise ConfigError(
                "upernet decoder: training needs >= 2 samples per batch (the pyramid pooling's 1x1 branch "
                "normalises one value per channel); raise batch_size or use decoder: fpn"
            )
        *finer, last = feats
        lat = [conv(f) for conv, f in zip(self.lateral, finer, strict=True)] + [self.ppm(last)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1], strict=True)] + [lat[-1]]
        size = outs[0].shape[-2:]
        return self.fuse(torch.cat([_resize(x, size) for x in outs], dim=1))


#: Decoder name -> class taking ``(channels, dim)``.
DECODERS: dict[str, type[nn.Module]] = {"fpn": FPNDecoder, "upernet": UPerNetDecoder}


def build_decoder(name: str, channels: Sequence[int], dim: int) -> nn.Module:
    """The decoder ``name`` over levels of ``channels``, ending in ``dim`` channels.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    return DECODERS[name](channels, dim)
