"""AdamW parameter groups: decay split, frozen parameters, layer-wise lr scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfm_core.training.optim import build_optimizer, param_groups, set_lr


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))  # 3-D, excluded by name
        self.block = nn.Linear(8, 8)
        self.block.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))  # 2-D, excluded by name
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)
        self.teacher = nn.Linear(8, 8)
        self.teacher.requires_grad_(False)


def _names(module: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def test_decay_split_and_frozen_excluded():
    m = Toy()
    groups = param_groups(m, weight_decay=0.05)
    by_name = {g["group_name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert _names(m, by_name["decay"]) == {"block.weight", "head.weight"}
    assert _names(m, by_name["no_decay"]) == {
        "mask_token",
        "block.bias",
        "block.relative_position_bias_table",
        "norm.weight",
        "norm.bias",
        "head.bias",
    }
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(p) for p in m.teacher.parameters()}


def test_extra_no_decay_is_configurable():
    m = Toy()
    groups = param_groups(m, weight_decay=0.1, extra_no_decay=("head",))
    decay = next(g for g in groups if g["weight_decay"] > 0)
    # mask_token and the bias table are decayed now that the default keywords are replaced
    assert _names(m, decay) == {"block.weight", "mask_token", "block.relative_position_bias_table"}


def test_lr_scale_groups_and_optimizer_lrs():
    m = Toy()
    groups = param_groups(m, 0.05, lr_scale_fn=lambda n: 0.5 if n.startswith("block") else 1.0)
    keys = {(g["weight_decay"] > 0, g["lr_scale"]) for g in groups}
    assert keys == {(True, 0.5), (False, 0.5), (True, 1.0), (False, 1.0)}
    opt = build_optimizer(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([5e-4, 5e-4, 1e-3, 1e-3])
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    set_lr(opt, 2e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 1e-3, 2e-3, 2e-3])


def test_no_decay_group_is_not_decayed_by_a_step():
    m = Toy()
    opt = build_optimizer(param_groups(m, weight_decay=0.5), lr=0.1)
    with torch.no_grad():
        m.mask_token.fill_(1.0)
        m.block.weight.fill_(1.0)
    m.mask_token.grad = torch.zeros_like(m.mask_token)
    m.block.weight.grad = torch.zeros_like(m.block.weight)
    opt.step()
    assert torch.all(m.mask_token == 1.0)  # zero grad, no decay: unchanged
    assert torch.all(m.block.weight < 1.0)  # zero grad, decayed


def test_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 0.05)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -1.0)
    with pytest.raises(ValueError, match="lr scales must be > 0"):
        param_groups(nn.Linear(2, 2), 0.05, lr_scale_fn=lambda n: 0.0)
