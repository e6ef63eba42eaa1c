"""geektime.optim: discriminative parameter groups, SGD/AdamW, one-cycle golden values."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from efficientnet_pytorch import EfficientNet
from geektime.config import ConfigError
from geektime.models import freeze_body, layer_groups
from geektime.optim import (
    build_optimizer,
    group_lrs,
    onecycle,
    optimizer_from_config,
    param_groups,
    set_schedule,
)


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return EfficientNet.from_name("efficientnet-lite0", image_size=32, num_classes=3)


# ---------------------------------------------------------------- groups


def test_group_lrs_are_fastai_slice():
    # slice(1e-5, 1e-3) over 3 groups: 1e-5, 1e-4, 1e-3 (geometric)
    for got, want in zip(group_lrs(1e-3, 100.0, 3), [1e-5, 1e-4, 1e-3]):
        assert got == pytest.approx(want, rel=1e-12)
    assert group_lrs(0.01, 1.0, 3) == [0.01] * 3
    assert group_lrs(0.01, 100.0, 1) == [0.01]


def test_param_groups_spread_lr_and_skip_decay_on_biases_and_norms(lite0):
    groups = param_groups(lite0, "efficientnet", lr=2e-3, lr_mult=100.0, weight_decay=0.01)
    names = {id(p): n for n, p in lite0.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["_conv_stem.weight"]["lr"] == pytest.approx(2e-5)
    assert by_name["_conv_head.weight"]["lr"] == pytest.approx(2e-4)
    assert by_name["_fc.weight"]["lr"] == pytest.approx(2e-3) and by_name["_fc.weight"]["base_lr"] == 2e-3
    assert (
        by_name["_fc.weight"]["weight_decay"] == 0.01
        and by_name["_blocks.0._depthwise_conv.weight"]["weight_decay"] == 0.01
    )
    for name in ("_fc.bias", "_bn0.weight", "_bn0.bias", "_blocks.9._bn1.weight"):
        assert by_name[name]["weight_decay"] == 0.0, name


def test_param_groups_of_a_frozen_body_hold_only_the_head(lite0):
    model = EfficientNet.from_name("efficientnet-lite0", image_size=32, num_classes=3)
    freeze_body(model, "efficientnet", freeze_bn=True)
    groups = param_groups(model, "efficientnet", lr=0.01, lr_mult=100.0, weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [1, 1] and all(g["lr"] == 0.01 for g in groups)
    for p in layer_groups(model, "efficientnet")[0]:
        p.requires_grad_(False)
    for p in layer_groups(model, "efficientnet")[2]:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to optimize"):
        param_groups(model, "efficientnet", lr=0.01)


def test_build_optimizer_sgd_and_adamw(lite0):
    sgd = build_optimizer("sgd", param_groups(lite0, "efficientnet", 0.01, 10.0, 1e-4), momentum=0.9, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert [g["lr"] for g in sgd.param_groups][::2] == pytest.approx([0.001, 0.01 / math.sqrt(10), 0.01])
    ocfg = OmegaConf.load("conf/optimizer/adamw.yaml")
    adamw = optimizer_from_config(ocfg, lite0, "efficientnet", lr_mult=100.0)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.99) and adamw.defaults["eps"] == 1e-5
    assert max(g["weight_decay"] for g in adamw.param_groups) == 0.01
    with pytest.raises(ConfigError, match="optimizer.name='lamb'"):
        build_optimizer("lamb", param_groups(lite0, "efficientnet", 0.01))


def test_set_schedule_moves_lr_and_momentum_per_group(lite0):
    for name in ("sgd", "adamw"):
        optimizer = build_optimizer(name, param_groups(lite0, "efficientnet", 0.01, 100.0, 0.0))
        set_schedule(optimizer, 0.5, 0.85)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["base_lr"] * 0.5)
            assert (group["betas"][0] if name == "adamw" else group["momentum"]) == 0.85
        assert len({g["lr"] for g in optimizer.param_groups}) == 3
        saved = optimizer.state_dict()["param_groups"]  # base_lr travels with a checkpoint
        assert all("base_lr" in g for g in saved)


def test_adamw_step_trains():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    optimizer = build_optimizer(
        "adamw", [{"params": list(model.parameters()), "lr": 0.05, "base_lr": 0.05, "weight_decay": 0.01}]
    )
    first = None
    for _ in range(50):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


# ---------------------------------------------------------------- one cycle (hand-computed golden values)


@pytest.mark.parametrize(
    "step,total,factor,momentum",
    [
        (0, 100, 0.04, 0.95),  # starts at lr/div = 1/25
        (25, 100, 1.0, 0.85),  # the peak: pct_start 0.25 of the steps
        (100, 100, 1e-5, 0.95),  # the end: lr/div_final
        # warm-up, 40% of it: 0.04 + 0.96 * (1 + cos(0.6 pi)) / 2 = 0.04 + 0.48 * 0.690983 = 0.371672;
        # momentum 0.95 - 0.1 * 0.690983 / 2 = 0.915451
        (10, 100, 0.3716718427, 0.9154508497),
        # annealing, half of it (625 of 1000): 1 - (1 - 1e-5) / 2 = 0.500005; momentum halfway back: 0.90
        (625, 1000, 0.500005, 0.90),
    ],
)
def test_onecycle_golden_values(step, total, factor, momentum):
    got_factor, got_momentum = onecycle(step, total)
    assert got_factor == pytest.approx(factor, rel=1e-9, abs=1e-12)
    assert got_momentum == pytest.approx(momentum, rel=1e-9)


def test_onecycle_fastai_fine_tune_phases():
    # frozen phase: pct_start 0.99 -> still warming up at 0.9 of the steps; unfrozen: div 5 starts at lr/5
    assert onecycle(90, 100, pct_start=0.99)[0] < 1.0 and onecycle(99, 100, pct_start=0.99)[0] == pytest.approx(1.0)
    assert onecycle(0, 10, pct_start=0.3, div=5.0) == pytest.approx((0.2, 0.95))
    assert onecycle(3, 10, pct_start=0.3, div=5.0) == pytest.approx((1.0, 0.85))
    assert onecycle(0, 10, pct_start=0.0)[0] == pytest.approx(1.0)  # no warm-up
    with pytest.raises(ValueError, match="total_steps"):
        onecycle(0, 0)


def test_onecycle_follows_the_global_step_under_any_process_count():
    """One process: 40 steps per epoch; two processes: 20. Epoch boundaries land at the same point of the cycle."""
    epochs = 5
    for epoch in range(epochs + 1):
        assert onecycle(epoch * 40, epochs * 40) == pytest.approx(onecycle(epoch * 20, epochs * 20))
    factors = [onecycle(s, 200)[0] for s in range(201)]
    peak = factors.index(max(factors))
    rising, falling = factors[: peak + 1], factors[peak:]
    assert peak == 50 and all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:]))
