"""Every config composes and builds; transforms do what their names say."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image

from geektime.config import ConfigError, find_conf_dir, model_names, register_resolvers, validate_train_config
from geektime.data import (
    DecodedImages,
    FileImages,
    InputNormalizer,
    Letterbox,
    build_augmentation,
    build_data,
    build_transform,
)
from geektime.models import build_model, channels_last_pays

register_resolvers()
NATIVE = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_model_group_lists_every_architecture():
    assert model_names() == sorted(
        [f"efficientnet_b{i}" for i in range(8)]
        + [f"efficientnet_lite{i}" for i in range(5)]
        + [f"resnet{n}" for n in (18, 34, 50, 101, 152)]
    )


FAST_MODELS = {"efficientnet_b0", "efficientnet_lite0", "resnet18"}


@pytest.mark.parametrize(
    "name", [n if n in FAST_MODELS else pytest.param(n, marks=pytest.mark.slow) for n in model_names()]
)
def test_every_model_config_composes_builds_and_runs(name):
    cfg = compose_train(f"model={name}")
    validate_train_config(cfg)
    if name.startswith("efficientnet_b"):
        assert cfg.model.image_size == [NATIVE[name[-2:]]] * 2
    model = build_model(cfg.model, num_classes=3, image_size=(64, 64)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_every_experiment_composes():
    for path in sorted((find_conf_dir() / "experiment").glob("*.yaml")):
        cfg = compose_train(f"experiment={path.stem}")
        assert cfg.trainer.epochs >= 1


@pytest.mark.parametrize(
    "override,key",
    [
        ("transforms.name=stretch", "transforms.name"),
        ("trainer.epochs=1.5", "trainer.epochs"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("trainer.seed=abc", "trainer.seed"),
        ("data.on_bad_image=maybe", "data.on_bad_image"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.normalization=bgr", "model.normalization"),
        ("trainer.typo_key=1", "typo_key"),
    ],
)
def test_schema_refuses_wrong_types_and_choices_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as raised:
        compose_train(override)
    assert key in f"{raised.value} {raised.value.__cause__}"


def test_ranges_and_cross_key_rules_name_the_key():
    for override, message in [
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
        ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
        ("optimizer.lr=0", "optimizer.lr=0.0 must be > 0"),
        ("data.num_workers=-1", "data.num_workers=-1"),
        ("trainer.channels_last=sometimes", "trainer.channels_last='sometimes' is not one of: auto, true, false"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_train_config(compose_train(override))


@pytest.mark.parametrize("setting", [True, False, "auto"])
def test_channels_last_setting_from_the_command_line(setting):
    cfg = compose_train(f"trainer.channels_last={str(setting).lower()}")
    validate_train_config(cfg)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    if setting == "auto":
        assert channels_last_pays(cfg.trainer.channels_last, "efficientnet", (32, 32), cpu)
        assert not channels_last_pays(cfg.trainer.channels_last, "resnet", (64, 64), cpu)
        assert channels_last_pays(cfg.trainer.channels_last, "resnet", (224, 224), cpu)
        assert channels_last_pays(cfg.trainer.channels_last, "resnet", (64, 64), cuda)
    else:
        for family, size in (("efficientnet", (32, 32)), ("resnet", (64, 64)), ("resnet", (224, 224))):
            assert channels_last_pays(cfg.trainer.channels_last, family, size, cpu) is setting


def _content_box(img: Image.Image, fill) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the pixels that are not the padding colour."""
    a = np.asarray(img).astype(int)
    mask = np.abs(a - np.array(fill)).sum(2) > 30
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_letterbox_keeps_proportions_of_a_wide_image():
    wide = Image.new("RGB", (400, 200), (250, 250, 250))  # 2:1, all content
    out = Letterbox((100, 100), fill=(0, 0, 0))(wide)
    assert out.size == (100, 100)
    left, top, right, bottom = _content_box(out, (0, 0, 0))
    assert (right - left, bottom - top) == (100, 50)  # still 2:1, centred
    assert top == 25


def test_resize_keeps_everything_and_center_crop_cuts_the_sides():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :20] = 255  # a white stripe at the left edge
    img = Image.fromarray(wide)
    base = compose_train().transforms
    resized = build_transform(base, (64, 64), train=False)(img)
    assert resized.shape == (3, 64, 64) and resized.dtype == torch.uint8
    assert resized[:, :, :2].float().mean() > 200  # the stripe survives a straight resize
    base.name = "center_crop"
    cropped = build_transform(base, (64, 64), train=False)(img)
    assert cropped.shape == (3, 64, 64) and cropped[:, :, :2].float().mean() < 10  # and is cut by a centre crop


def test_augmentation_only_when_training_and_enabled():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    tcfg = compose_train("transforms.augment.enabled=true").transforms
    view = build_transform(tcfg, (32, 32), train=True)(img)
    assert view.shape == (3, 64, 64)  # random resized crops come from a view with detail in reserve
    augmentation = build_augmentation(tcfg, (32, 32), train=True)
    torch.manual_seed(0)
    outs = [augmentation(view) for _ in range(5)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1
    assert build_augmentation(tcfg, (32, 32), train=False) is None
    assert build_augmentation(compose_train().transforms, (32, 32), train=True) is None
    evals = {tuple(build_transform(tcfg, (32, 32), train=False)(img).flatten().tolist()) for _ in range(3)}
    assert len(evals) == 1 and len(next(iter(evals))) == 3 * 32 * 32


def _epoch_batches(data, epochs=(1, 2)) -> dict[int, list[torch.Tensor]]:
    out = {}
    for epoch in epochs:
        data.train_sampler.set_epoch(epoch)
        out[epoch] = [images for images, _ in data.train_loader]
    return out


@pytest.mark.parametrize("cache, split_type", [(True, DecodedImages), (False, FileImages)])
def test_augmented_images_depend_on_seed_epoch_and_index_only(folders, cache, split_type):
    """Per-image seeds: the same crops with 0 workers, with 2 persistent workers, and when an epoch is replayed."""
    train_dir, val_dir = folders
    common = (
        "transforms.augment.enabled=true",
        "data.image_size=[24,24]",
        "data.batch_size=5",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"data.cache={str(cache).lower()}",
        "trainer.seed=20240601",
    )  # a date as seed: the per-image seeds must stay within 64 bits
    inline = build_data(compose_train(*common, "data.num_workers=0"))
    pooled = build_data(compose_train(*common, "data.num_workers=2"))
    assert isinstance(pooled.train, split_type) and pooled.train_loader.persistent_workers
    torch.manual_seed(123)  # the caller's generator plays no part
    first = _epoch_batches(inline)
    torch.manual_seed(456)
    again = _epoch_batches(pooled, epochs=(1, 2, 1))  # epoch 1 replayed by the same live workers, as after a resume
    for epoch in (1, 2):
        assert len(first[epoch]) == len(again[epoch]) > 1
        for a, b in zip(first[epoch], again[epoch]):
            assert torch.equal(a, b)
    # A different epoch shows each image with another crop: the sampler's order alone would not change the set.
    by_epoch = [sorted(tuple(img.flatten()[:64].tolist()) for batch in first[e] for img in batch) for e in (1, 2)]
    assert by_epoch[0] != by_epoch[1]


def test_normalization_follows_the_model():
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    advprop = InputNormalizer("advprop", torch.device("cpu"), False)(batch)
    torch.testing.assert_close(advprop[0, :, 0], torch.tensor([[-1.0, 1.0]] * 3))
    imagenet = InputNormalizer("imagenet", torch.device("cpu"), False)(batch)
    torch.testing.assert_close(imagenet[0, 0, 0, 0], torch.tensor((0 - 0.485) / 0.229))
