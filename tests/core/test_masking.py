import math

import numpy as np
import pytest
import torch

from gfm_core.data.pretrain.masking import MaskGenerator
from gfm_core.errors import ConfigError


def _cells(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Token mask [h, w] -> cell mask, checking every cell is uniform."""
    h, w = mask.shape
    blocks = (
        mask.view(h // scale, scale, w // scale, scale)
        .permute(0, 2, 1, 3)
        .reshape(h // scale, w // scale, -1)
    )
    assert bool((blocks.all(-1) | ~blocks.any(-1)).all()), "a mask cell is not uniform"
    return blocks[..., 0]


def test_paper_geometry_masks_22_of_36_cells_at_token_resolution():
    gen = MaskGenerator(192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = gen(torch.Generator().manual_seed(0))
    assert gen.num_cells == 36 and gen.num_masked == 22
    assert mask.shape == (48, 48) and gen.token_shape == (48, 48)
    assert mask.dtype == torch.bool
    assert int(_cells(mask, 8).sum()) == 22
    assert int(mask.sum()) == 22 * 8 * 8


@pytest.mark.parametrize(("ratio", "expected"), [(0.5, 18), (0.6, 22), (0.75, 27), (0.01, 1), (1.0, 36)])
def test_exact_ceil_count(ratio, expected):
    gen = MaskGenerator(192, 32, 4, ratio)
    assert expected == math.ceil(36 * ratio)
    for seed in range(5):
        assert int(_cells(gen(torch.Generator().manual_seed(seed)), 8).sum()) == expected


def test_rectangular_input_and_other_patch_sizes():
    gen = MaskGenerator((192, 128), mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    mask = gen()
    assert mask.shape == (48, 32)
    assert int(_cells(mask, 4).sum()) == math.ceil(12 * 8 * 0.6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_size=200, mask_patch_size=32, model_patch_size=4), "not divisible by mask_patch_size"),
        (
            dict(input_size=(192, 100), mask_patch_size=32, model_patch_size=4),
            "not divisible by mask_patch_size",
        ),
        (dict(input_size=192, mask_patch_size=32, model_patch_size=5), "not divisible by the model patch"),
        (dict(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.0), "mask_ratio"),
        (dict(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=1.5), "mask_ratio"),
        (dict(input_size=0, mask_patch_size=32, model_patch_size=4), "input_size"),
    ],
)
def test_bad_geometry_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MaskGenerator(**kwargs)


def test_seeded_generators_are_reproducible():
    gen = MaskGenerator(192, 32, 4, 0.6)
    a = gen(torch.Generator().manual_seed(123))
    b = gen(torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    na = gen(np.random.default_rng(7))
    nb = gen(np.random.default_rng(7))
    assert torch.equal(na, nb)
    assert int(_cells(na, 8).sum()) == 22
    draws = {tuple(gen(torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(10)}
    assert len(draws) == 10


def test_global_rng_follows_torch_manual_seed():
    gen = MaskGenerator(64, 16, 4, 0.5)
    torch.manual_seed(3)
    a = gen()
    torch.manual_seed(3)
    assert torch.equal(a, gen())


def test_every_cell_is_masked_about_ratio_of_the_time():
    gen = MaskGenerator(192, 32, 4, 0.6)
    rng = torch.Generator().manual_seed(0)
    freq = torch.stack([_cells(gen(rng), 8).float() for _ in range(600)]).mean(0)
    assert freq.shape == (6, 6)
    assert float(freq.min()) > 0.5 and float(freq.max()) < 0.7
