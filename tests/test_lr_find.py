"""The lr finder: its schedule, smoothing and early stop, fastai's suggestions, the restore, and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from geektime.errors import ConfigError
from geektime.lr_find import (
    SmoothedLoss,
    find_lr,
    minimum,
    read_csv,
    slide,
    steep,
    suggest,
    sweep_lrs,
    trimmed,
    validate_lr_find_config,
    valley,
)
from tests.conftest import REPO, TINY, train_tiny

FIXTURES = Path(__file__).parent / "data" / "lr_find"
FASTAI = json.loads((FIXTURES / "fastai.json").read_text())


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 6 * 6, 2)
    )


def tiny_loader(count: int = 24, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=gen)
    targets = (images.float().mean((1, 2, 3)) > 127.5).long()
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=True, generator=gen)


def two_group_sgd(model: nn.Module, head_lr: float = 0.1, body_lr: float = 0.001) -> torch.optim.SGD:
    *body, head = list(model.children())
    return torch.optim.SGD(
        [{"params": nn.Sequential(*body).parameters(), "lr": body_lr}, {"params": head.parameters(), "lr": head_lr}],
        lr=head_lr,
        momentum=0.9,
    )


# ---------------------------------------------------------------- schedule and smoothing


def test_sweep_lrs_follow_the_exponential_formula():
    lrs = sweep_lrs(1e-7, 10.0, 100)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-7)
    for i in (1, 37, 99):
        assert lrs[i] == pytest.approx(1e-7 * (10 / 1e-7) ** (i / 100), rel=1e-12)
    assert lrs[-1] < 10 and np.allclose(lrs[1:] / lrs[:-1], (1e8) ** 0.01)


def test_each_group_gets_the_step_lr_times_its_own_factor():
    """The lrs the optimizer really steps with: head at the schedule, body at its 1/100 of it."""
    torch.manual_seed(0)
    model = tiny_net()
    optimizer = two_group_sgd(model, head_lr=0.1, body_lr=0.001)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    sweep = find_lr(
        model,
        tiny_loader(),
        optimizer,
        nn.CrossEntropyLoss(),
        to_float,
        torch.device("cpu"),
        start_lr=1e-4,
        end_lr=1e-1,
        num_it=7,
        show_progress=False,
    )
    assert len(sweep.lrs) == 7, "7 steps from a loader of 3 batches: more than two passes"
    np.testing.assert_allclose(sweep.lrs, sweep_lrs(1e-4, 1e-1, 7), rtol=1e-12)
    np.testing.assert_allclose([head for _, head in seen], sweep.lrs, rtol=1e-12)
    np.testing.assert_allclose([body for body, _ in seen], np.array(sweep.lrs) / 100, rtol=1e-12)


def test_smoothing_is_the_debiased_moving_average():
    losses = [2.0, 1.5, 1.7, 0.9, 1.1, 0.4]
    smoother, avg = SmoothedLoss(), 0.0
    for i, loss in enumerate(losses):
        avg = 0.98 * avg + 0.02 * loss
        assert smoother.update(loss) == pytest.approx(avg / (1 - 0.98 ** (i + 1)), rel=1e-12)
    constant = SmoothedLoss()
    assert [constant.update(0.7) for _ in range(5)] == pytest.approx([0.7] * 5, rel=1e-12), "debiased from step 1"


def test_recorded_smoothed_losses_follow_the_recorded_losses():
    torch.manual_seed(0)
    model = tiny_net()
    sweep = find_lr(
        model,
        tiny_loader(),
        two_group_sgd(model),
        nn.CrossEntropyLoss(),
        to_float,
        torch.device("cpu"),
        start_lr=1e-5,
        end_lr=1e-2,
        num_it=10,
        show_progress=False,
    )
    smoother = SmoothedLoss()
    assert sweep.smoothed == pytest.approx([smoother.update(v) for v in sweep.losses], rel=1e-12)
    assert not sweep.stopped_early and len(sweep.losses) == 10


# ---------------------------------------------------------------- early stop


def test_stops_when_the_smoothed_loss_passes_four_times_its_minimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sweep = find_lr(
        model,
        tiny_loader(count=64),
        optimizer,
        nn.CrossEntropyLoss(),
        lambda x: x.float(),
        torch.device("cpu"),
        start_lr=1e-4,
        end_lr=1e4,
        num_it=100,
        show_progress=False,
    )
    assert sweep.stopped_early and len(sweep.lrs) < 100
    smoothed = np.array(sweep.smoothed)
    if math.isfinite(sweep.losses[-1]):
        assert smoothed[-1] > 4 * smoothed[:-1].min()
    assert all(smoothed[i] <= 4 * smoothed[: i + 1].min() for i in range(len(smoothed) - 1)), "not earlier"


def test_stops_at_the_first_non_finite_loss():
    calls = []

    def criterion(logits, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * math.inf if len(calls) == 4 else loss

    model = tiny_net()
    sweep = find_lr(
        model,
        tiny_loader(),
        two_group_sgd(model),
        criterion,
        to_float,
        torch.device("cpu"),
        start_lr=1e-5,
        end_lr=1e-3,
        num_it=20,
        show_progress=False,
    )
    assert len(sweep.losses) == 4 and sweep.stopped_early
    assert math.isinf(sweep.losses[-1]) and all(math.isfinite(v) for v in sweep.losses[:-1])


# ---------------------------------------------------------------- restore


def test_model_optimizer_grads_modes_and_rng_restored_bit_for_bit():
    torch.manual_seed(0)
    model, loader = tiny_net(), tiny_loader()
    optimizer = two_group_sgd(model)
    images, targets = next(iter(loader))
    nn.functional.cross_entropy(model(to_float(images)), targets).backward()
    optimizer.step()  # momentum buffers exist now: the state to restore is not empty
    model.eval()
    model[1].train()  # a mix of modes
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = optimizer.state_dict()
    opt_before = {
        "state": {k: {n: t.clone() for n, t in s.items()} for k, s in opt_before["state"].items()},
        "param_groups": [dict(g) for g in opt_before["param_groups"]],
    }
    grads_before = [p.grad.clone() for p in model.parameters()]
    modes_before = [m.training for m in model.modules()]
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)

    sweep = find_lr(
        model,
        loader,
        optimizer,
        nn.CrossEntropyLoss(),
        to_float,
        torch.device("cpu"),
        start_lr=1e-3,
        end_lr=1.0,
        num_it=8,
        show_progress=False,
    )

    assert len(sweep.lrs) >= 2, "the sweep took steps (it changed the weights before restoring them)"
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(3), expected_draws[2])
    after = model.state_dict()
    assert after.keys() == model_before.keys()
    assert all(torch.equal(after[k], model_before[k]) for k in after)
    opt_after = optimizer.state_dict()
    assert opt_after["param_groups"] == opt_before["param_groups"]
    assert opt_after["state"].keys() == opt_before["state"].keys()
    for k, state in opt_after["state"].items():
        assert all(torch.equal(state[n], opt_before["state"][k][n]) for n in state)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    assert [m.training for m in model.modules()] == modes_before


# ---------------------------------------------------------------- the suggestions


@pytest.mark.parametrize("name", sorted(FASTAI["curves"]))
def test_suggestions_read_the_same_steps_as_fastai(name):
    """Fixtures from bench/lr_find_vs_fastai.py: fastai 2.8's own valley/slide/minimum/steep on the same arrays."""
    curve = np.load(FIXTURES / f"{name}.npz")
    lrs, smoothed, num_it = curve["lrs"], curve["smoothed"], int(curve["num_it"])
    suggestions, steps = suggest(lrs, smoothed, num_it)
    assert steps == FASTAI["curves"][name]
    for rule, step in steps.items():
        expected = None if step is None else lrs[step] / (10 if rule == "minimum" else 1)
        assert suggestions[rule] == expected


def test_fixtures_cover_real_and_synthetic_curves():
    names = set(FASTAI["curves"])
    assert {"monotone", "u_shaped", "plateau", "nan_tail"} <= names
    assert any(n.startswith("doraemon_walle") for n in names) and any(n.startswith("digits") for n in names)
    assert FASTAI["fastai_version"].startswith("2.8")


def test_trim_keeps_steps_tenth_to_fifth_from_last_and_cuts_at_non_finite():
    lrs, losses = np.arange(1.0, 41.0), np.arange(40.0)
    cut_lrs, cut_losses = trimmed(lrs, losses, 40)
    assert cut_losses.tolist() == list(range(4, 35)) and cut_lrs.tolist() == list(range(5, 36))
    losses[20] = np.inf
    assert trimmed(lrs, losses, 40)[1].tolist() == list(range(4, 20))


def test_rules_by_hand():
    losses = np.array([2.8, 2.0, 2.5, 1.5, 1.0, 0.8, 0.9, 0.5, 2.0])
    # longest decreasing chain 2.8, 2, 1.5, 1, 0.8, 0.5 (L=6, ends at 7): 7 - 6 + int(2) + int(1) = 4
    assert valley(losses) == 4
    assert minimum(losses) == 7
    lrs = 10.0 ** np.arange(9)
    assert steep(lrs, losses) == 2  # 2.5 -> 1.5: the largest drop per decade
    assert slide(losses) is None  # shorter than fastai's 15-step window
    assert valley(np.array([])) is None and steep(lrs[:1], losses[:1]) is None


def test_lr_find_config_errors_name_the_key():
    good = {"start_lr": 1e-7, "end_lr": 10, "num_it": 100, "stop_factor": 4, "suggestion": "valley", "phase": "frozen"}
    validate_lr_find_config(OmegaConf.create(good))
    for key, value, said in (
        ("end_lr", 1e-8, "lr_find.start_lr"),
        ("num_it", 3, "lr_find.num_it"),
        ("suggestion", "best", "lr_find.suggestion"),
        ("stop_factor", 1, "lr_find.stop_factor"),
        ("phase", "half", "lr_find.phase"),
        ("start_lr", -1, "lr_find.start_lr"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            validate_lr_find_config(OmegaConf.create({**good, key: value}))


# ---------------------------------------------------------------- the CLI


def run_lr_find(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geektime.lr_find", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@pytest.mark.slow
def test_cli_writes_curve_files_and_an_override_train_accepts(folders, tmp_path):
    train_dir, val_dir = folders
    run_dir = tmp_path / "lr_find"
    proc = run_lr_find(
        *TINY, f"data.train_dir={train_dir}", f"data.val_dir={val_dir}", "lr_find.num_it=20", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    lrs, losses, smoothed = read_csv(run_dir / "lr_find.csv")
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert len(lrs) == result["steps_taken"] >= 6 and result["stopped_early"] == (len(lrs) < 20)
    np.testing.assert_allclose(lrs, sweep_lrs(1e-7, 10.0, 20)[: len(lrs)], rtol=1e-12)
    smoother = SmoothedLoss()
    np.testing.assert_allclose(smoothed, [smoother.update(v) for v in losses], rtol=1e-12)
    assert result["suggested"] == "valley" and result["num_it"] == 20
    assert result["suggestions"] == suggest(lrs, smoothed, 20)[0]
    with Image.open(run_dir / "lr_find.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200

    valley_lr = result["suggestions"]["valley"]
    override = re.search(r"^override: (optimizer\.lr=\S+)$", proc.stdout, re.MULTILINE).group(1)
    assert float(override.split("=")[1]) == pytest.approx(valley_lr, rel=5e-3)
    assert f"data.train_dir={train_dir}" in proc.stdout and "lr_find.num_it" not in proc.stdout

    train_tiny(tmp_path / "run", train_dir, val_dir, override, "trainer.epochs=1")
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").optimizer.lr == float(override.split("=")[1])
    with (tmp_path / "run" / "metrics.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]


@pytest.mark.slow
def test_cli_refuses_torchrun(folders, tmp_path):
    train_dir, val_dir = folders
    proc = run_lr_find(
        *TINY,
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.run.dir={tmp_path / 'r'}",
        env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    )
    assert proc.returncode == 2
    assert "error: lr_find runs in one process" in proc.stderr and "Traceback" not in proc.stderr


def finetune_cfg(name: str, epochs: int = 5) -> OmegaConf:
    return OmegaConf.create(
        {
            "model": {"family": "resnet"},
            "trainer": {"epochs": epochs},
            "scheduler": {"pct_start": 0.25},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False},
            "finetune": {
                "name": name,
                "freeze_epochs": 1,
                "freeze_bn": True,
                "lr_mult": 100.0,
                "unfrozen_lr_factor": 0.5,
                "frozen_pct_start": 0.99,
            },
        }
    )


@pytest.mark.parametrize("phase_name", ["frozen", "unfrozen"])
def test_staged_finetune_phase_sweeps_what_train_would_train(phase_name):
    import torchvision

    from geektime.lr_find import build_phase_optimizer, phase_to_sweep

    model = torchvision.models.resnet18(num_classes=2)
    phase = phase_to_sweep(finetune_cfg("staged"), phase_name)
    optimizer, lr_per_swept = build_phase_optimizer(finetune_cfg("staged"), model, phase)
    swept = {id(p) for group in optimizer.param_groups for p in group["params"]}
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    if phase_name == "frozen":
        assert swept == {id(p) for p in model.fc.parameters()} and lrs == [0.01] and lr_per_swept == 1.0
    else:
        assert swept == {id(p) for p in model.parameters()}
        assert lrs == pytest.approx([0.005 / 100, 0.005 / 10, 0.005]) and lr_per_swept == 2.0


def test_without_a_staged_finetune_every_layer_is_swept_at_one_lr():
    import torchvision

    from geektime.lr_find import build_phase_optimizer, phase_to_sweep

    cfg = finetune_cfg("none")
    model = torchvision.models.resnet18(num_classes=2)
    phase = phase_to_sweep(cfg, "frozen")  # the setting means nothing without a staged fine-tune
    optimizer, lr_per_swept = build_phase_optimizer(cfg, model, phase)
    assert phase.name == "all" and lr_per_swept == 1.0
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert {g["lr"] for g in optimizer.param_groups} == {0.01}


def test_unfrozen_phase_that_the_run_does_not_have_is_refused():
    from geektime.lr_find import phase_to_sweep

    with pytest.raises(ConfigError, match="lr_find.phase=unfrozen"):
        phase_to_sweep(finetune_cfg("staged", epochs=1), "unfrozen")
