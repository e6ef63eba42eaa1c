"""The deterministic views on images of every shape: the same pixels as before for ordinary photos, bounded
memory and time for a strip no photo has (geektime.images refuses those too, but a raised limit must not cost
gigabytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2

from conftest import REPO
from geektime.data import CoverCrop


@pytest.mark.parametrize(
    "image_size",
    [(40, 30), (30, 40), (500, 375), (375, 500), (224, 224), (257, 255), (1600, 500), (101, 999), (33, 17)],
)
@pytest.mark.parametrize("size", [(32, 32), (224, 224), (240, 320), (320, 240), (64, 48)])
def test_center_crop_matches_resize_then_crop(image_size, size):
    """CoverCrop resamples only the kept box, so the filter's rounding can move a pixel by 1 (of 255); the
    geometry (scale, offsets, size) is torchvision's Resize(max(size)) + CenterCrop(size) exactly."""
    img = Image.fromarray(np.random.default_rng(sum(image_size)).integers(0, 256, (*image_size[::-1], 3), np.uint8))
    old = np.asarray(v2.Compose([v2.Resize(max(size)), v2.CenterCrop(size)])(img)).astype(int)
    new = np.asarray(CoverCrop(size)(img)).astype(int)
    assert new.shape == old.shape == (*size, 3)
    assert np.abs(new - old).max() <= 1


def test_center_crop_keeps_the_centre_of_a_wide_image():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the centre square is white, the sides black
    out = np.asarray(CoverCrop((64, 64))(Image.fromarray(wide)))
    assert out[:, 1:-1].min() > 250 and out.mean() > 240  # (the outer columns blend with the black)


MEASURE = textwrap.dedent("""
    import json, resource, time
    import torch
    from omegaconf import OmegaConf
    from PIL import Image
    from geektime.data import build_augmentation, build_transform
    torch.set_num_threads(1)
    strip = Image.new("RGB", (20000, 1), (200, 10, 10))
    # A broken transform must fail here, not take the machine's memory: allow 512 MiB more address space.
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + 512 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {}
    for name in ("center_crop", "resize", "letterbox"):
        for train in (False, True):
            augment = {"enabled": True, "random_resized_crop": True, "hflip": True, "scale": [0.08, 1],
                       "ratio": [0.75, 1.33]}
            tcfg = OmegaConf.create({"name": name, "fill": [0, 0, 0], "augment": augment})
            transform = build_transform(tcfg, (224, 224), train)
            augmentation = build_augmentation(tcfg, (224, 224), train)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            for image in (strip, strip.transpose(Image.Transpose.ROTATE_90)):
                view = transform(image)
                out = augmentation(view) if augmentation is not None else view
            results[f"{name} {'train' if train else 'eval'}"] = {
                "shape": list(out.shape), "seconds": time.perf_counter() - start,
                "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc and RLIMIT_AS")
def test_a_20000x1_strip_costs_megabytes_and_milliseconds():
    """Every view (eval and training's 2x view with its random crop) of a 20000x1 strip and its 1x20000 twin.
    Measured on 2 shared cores: before, center_crop made the strip 4,480,000x224 first (+3,983 MiB peak RSS,
    12.5 s; +15.6 GB, 72 s for training's 2x view); now +2 MiB (eval) / +8 MiB (train), 10-40 ms each."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert len(results) == 6
    for view, result in results.items():
        assert result["shape"] == [3, 224, 224], view
        assert result["peak_mib"] < 64 and result["seconds"] < 2, (view, result)
