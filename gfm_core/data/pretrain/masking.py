"""SimMIM random masking: square mask patches on a coarse grid, returned at the student's token resolution.

Paper geometry (GFM / SimMIM): a 192 px image, 32 px mask patches (a 6 x 6 grid), ratio 0.6 -> exactly
``ceil(36 * 0.6) = 22`` masked cells, each broadcast to 8 x 8 tokens of the 48 x 48 token grid (patch 4).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gfm_core.errors import ConfigError

Seed = torch.Generator | np.random.Generator | None


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v <= 0 for v in pair):
        raise ConfigError(f"{name}: expected a positive int or (height, width), got {value!r}")
    return pair[0], pair[1]


class MaskGenerator:
    """Draw SimMIM masks: ``ceil(mask_ratio * cells)`` random cells of ``mask_patch_size`` pixels, 1 = masked.

    Args:
        input_size: image size in pixels, ``int`` or ``(H, W)``.
        mask_patch_size: edge of one mask cell in pixels; must divide the input size.
        model_patch_size: the student's patch (token) size in pixels; must divide ``mask_patch_size``.
        mask_ratio: fraction of cells to mask, in (0, 1].

    Raises:
        ConfigError: sizes that do not divide, or a ratio outside (0, 1].
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = _pair(input_size, "input_size")
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ConfigError(
                f"mask_patch_size {mask_patch_size} and model_patch_size {model_patch_size} must be positive"
            )
        if height % mask_patch_size or width % mask_patch_size:
            raise ConfigError(
                f"input size {height}x{width} is not divisible by mask_patch_size {mask_patch_size} "
                f"(pick an image size that is a multiple of the mask patch)"
            )
        if mask_patch_size % model_patch_size:
            raise ConfigError(
                f"mask_patch_size {mask_patch_size} is not divisible by the model patch size "
                f"{model_patch_size}"
            )
        if not 0 < mask_ratio <= 1:
            raise ConfigError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.input_size = (height, width)
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid = (height // mask_patch_size, width // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.num_cells = self.grid[0] * self.grid[1]
        self.num_masked = math.ceil(self.num_cells * mask_ratio)

    @property
    def token_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the returned mask: the student's token grid."""
        return self.grid[0] * self.scale, self.grid[1] * self.scale

    def __call__(self, generator: Seed = None) -> torch.Tensor:
        """Draw one mask.

        Args:
            generator: a ``torch.Generator`` or ``numpy.random.Generator`` for reproducible masks;
                ``None`` uses torch's global RNG (which DataLoader seeds per worker, unlike numpy's).

        Returns:
            ``[h, w]`` bool tensor at token resolution, True (= 1) where masked.
        """
        if isinstance(generator, np.random.Generator):
            order = torch.from_numpy(generator.permutation(self.num_cells))
        else:
            order = torch.randperm(self.num_cells, generator=generator)
        cells = torch.zeros(self.num_cells, dtype=torch.bool)
        cells[order[: self.num_masked]] = True
        cells = cells.view(self.grid)
        return cells.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}: "
            f"{self.num_masked}/{self.num_cells} cells)"
        )
