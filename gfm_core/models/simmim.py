"""SimMIM pieces around timm's Swin: the mask-token encoder wrapper, the pixel-shuffle decoder, the projector.

timm's Swin runs channels-last inside: ``patch_embed`` returns NHWC ``[B, h, w, C]`` tokens and every stage
takes and returns NHWC. The mask token is blended there; :class:`MaskedSwin` returns a pooled vector and an
NCHW map for the convolutional decoder.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from torch import Tensor, nn

from gfm_core.errors import ConfigError
from gfm_core.models.backbones import is_swin, swin_stages
from gfm_core.models.weights import pretrained_cfg


def _patch_embed(encoder: SwinTransformer) -> PatchEmbed:
    """``encoder.patch_embed``, typed (timm types it as a plain ``nn.Module``)."""
    return cast(PatchEmbed, encoder.patch_embed)


def _first_block(stage: SwinTransformerStage) -> SwinTransformerBlock:
    return cast(SwinTransformerBlock, stage.blocks[0])


def swin_timm_kwargs(encoder: SwinTransformer) -> dict[str, Any]:
    """Geometry kwargs that rebuild ``encoder`` with ``timm.create_model(arch, **kwargs)`` (headless)."""
    pe = _patch_embed(encoder)
    stages = swin_stages(encoder)
    img = tuple(int(v) for v in pe.img_size)
    patch = tuple(int(v) for v in pe.patch_size)
    window = _first_block(stages[0]).window_size
    return dict(
        img_size=img[0] if img[0] == img[1] else img,
        patch_size=patch[0] if patch[0] == patch[1] else patch,
        in_chans=int(pe.proj.in_channels),
        embed_dim=int(pe.proj.out_channels),
        depths=tuple(len(layer.blocks) for layer in stages),
        num_heads=tuple(int(_first_block(layer).attn.num_heads) for layer in stages),
        window_size=int(window[0]) if window[0] == window[1] else tuple(window),
        num_classes=0,
    )


def _run_blocks(stage: SwinTransformerStage, x: Tensor) -> Tensor:
    """Run a timm ``SwinTransformerStage``'s blocks without its leading downsample (honours checkpointing)."""
    if getattr(stage, "grad_checkpointing", False) and not torch.jit.is_scripting():
        return checkpoint_seq(stage.blocks, x)
    return stage.blocks(x)


class MaskedSwin(nn.Module):
    """A timm ``SwinTransformer`` with a learnable SimMIM mask token blended in after ``patch_embed``.

    Args:
        encoder: a timm ``SwinTransformer`` (headless: ``num_classes=0``).
        feature_stage: 1-based stage whose output (including the following patch merging) is distilled.
        arch: timm model name the encoder was built with (recorded for export; default: its pretrained_cfg).
        timm_kwargs: kwargs it was built with (recorded for export; default: read back from the modules).

    State dict keys: ``encoder.*`` (exactly timm's names) and ``mask_token``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        feature_stage: int = 3,
        arch: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not is_swin(encoder):
            raise ConfigError(
                f"MaskedSwin needs a timm SwinTransformer (student.arch swin_*), got {type(encoder).__name__}"
            )
        num_stages = len(swin_stages(encoder))
        if not 1 <= feature_stage <= num_stages:
            raise ConfigError(f"feature_stage {feature_stage} is out of range for a {num_stages}-stage Swin")
        self.encoder: SwinTransformer = encoder
        self.feature_stage = feature_stage
        self.embed_dim = int(_patch_embed(encoder).proj.out_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.arch: str = arch or pretrained_cfg(encoder)["architecture"]
        self.timm_kwargs = dict(timm_kwargs) if timm_kwargs is not None else swin_timm_kwargs(encoder)

    @property
    def patch_size(self) -> int:
        """Pixels per token edge (the mask's token -> pixel factor)."""
        return int(_patch_embed(self.encoder).patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` that masks must have."""
        return cast(tuple[int, int], tuple(int(v) for v in _patch_embed(self.encoder).grid_size))

    @property
    def img_size(self) -> tuple[int, int]:
        """Input ``(H, W)`` in pixels."""
        return cast(tuple[int, int], tuple(int(v) for v in _patch_embed(self.encoder).img_size))

    @property
    def in_chans(self) -> int:
        """Input channels."""
        return int(_patch_embed(self.encoder).proj.in_channels)

    @property
    def out_stride(self) -> int:
        """Pixels per cell of the final map (32 for Swin with patch 4 and 4 stages)."""
        return self.patch_size * 2 ** (len(swin_stages(self.encoder)) - 1)

    @property
    def stage_dim(self) -> int:
        """Channels of the distilled stage feature (1024 for Swin-B stage 3 incl. merge)."""
        layers = swin_stages(self.encoder)
        if self.feature_stage < len(layers):
            return int(layers[self.feature_stage].downsample.out_dim)
        return int(self.encoder.num_features)

    @property
    def num_features(self) -> int:
        """Channels of the final map."""
        return int(self.encoder.num_features)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode a (masked) batch.

        Args:
            x: ``[B, C, H, W]`` normalised image.
            mask: ``[B, h, w]`` token-resolution mask, 1 = masked (``None``: nothing masked).

        Returns:
            ``(stage_feature [B, C_s], final_map [B, C_4, H/32, W/32])``: the pooled output of
            ``feature_stage`` including its patch merging (no norm), and the last stage's output after the
            final norm.
        """
        t = _patch_embed(self.encoder)(x)  # [B, h, w, C] NHWC
        if mask is not None:
            if tuple(mask.shape[-2:]) != tuple(t.shape[1:3]) or mask.shape[0] != t.shape[0]:
                raise ValueError(
                    f"mask {tuple(mask.shape)} does not match the token grid [B={t.shape[0]}, {t.shape[1]}, "
                    f"{t.shape[2]}] (mask at token resolution: image / patch {self.patch_size})"
                )
            w = mask.unsqueeze(-1).type_as(t)
            t = t * (1.0 - w) + self.mask_token.type_as(t) * w
        layers = swin_stages(self.encoder)
        for i in range(self.feature_stage):
            t = layers[i](t)
        if self.feature_stage < len(layers):
            t = layers[self.feature_stage].downsample(t)
        feature = t.mean(dim=(1, 2))
        if self.feature_stage < len(layers):
            t = _run_blocks(layers[self.feature_stage], t)
            for layer in layers[self.feature_stage + 1 :]:
                t = layer(t)
        t = self.encoder.norm(t)
        return feature, t.permute(0, 3, 1, 2)


class PixelShuffleDecoder(nn.Module):
    """SimMIM's decoder: ``Conv2d(in_ch, stride**2 * out_chans, 1)`` then ``PixelShuffle(stride)``.

    ``[B, in_ch, h, w] -> [B, out_chans, h * stride, w * stride]``.
    """

    def __init__(self, in_ch: int, stride: int, out_chans: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, in_ch, h, w]`` -> ``[B, out_chans, h*stride, w*stride]``."""
        return self.shuffle(self.conv(x))


def make_projector(student_dim: int, teacher_dim: int) -> nn.Linear:
    """The paper's projector P: ``nn.Linear(student stage dim, teacher dim)``, discarded after pretraining."""
    return nn.Linear(student_dim, teacher_dim)
