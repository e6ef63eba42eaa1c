"""The worst data folder we could think of, through every tool: train -> evaluate -> badcases -> verify.

Every split holds odd but usable images (names with a line break, bytes that are not UTF-8, surrounding spaces,
a "%"; class folders with spaces and a "%"; a 20:1 strip; a file symlink; a linked folder from outside) and
unusable ones (a 20000x1 strip, a 1x3000 strip, a decompression bomb, a truncated JPEG, an HTML page, an empty
file, a dangling link), beside folder links up the tree, back into the split and to itself, hidden files and
notes. Every tool must use exactly the usable images, none may print a traceback, and memory stays bounded.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, TINY, make_image
from geektime.predictions import printable, read_predictions

pytestmark = pytest.mark.slow

CLASSES = ["100% dog", "big cat"]
ODD_NAMES = [b"two\nlines.jpg", b"caf\xe9 latin-1.jpg", b" edge .jpg", b"50%25 off.jpg", "猫 照片.jpg".encode()]
# Peak RSS of the largest process: train.py here (torch, ResNet-18 at 32x32 on the CPU) measured 0.92 GiB,
# evaluate.py 0.85, verify and badcases 35 MiB. One 20000x1 strip through the old center_crop added 3.9 GiB
# (15.6 GiB for training's 2x view), and a decoded 14000x13000 bomb would add 0.7 GiB (gray + its RGB copy):
# 1.5 GiB leaves room for other torch builds and catches either.
MAX_RSS_GIB = 1.5


def png_bomb(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (gray, 8 bit); its pixels are never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
        + chunk(b"IEND", b"")
    )


def named(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def dirty_folder(folder: Path, outside: Path, colour, seed: int) -> tuple[list[Path], list[Path]]:
    """Fill `folder` with every kind of entry; returns (usable images, unusable images) as training lists them."""
    usable, bad = [], []
    for i in range(3):
        make_image(folder / f"{i:03d}.jpg", colour, seed=seed + i)
        usable.append(folder / f"{i:03d}.jpg")
    for i, name in enumerate(ODD_NAMES):
        make_image(named(folder, name), colour, seed=seed + 10 + i)
        usable.append(named(folder, name))
    Image.new("RGB", (200, 10), colour).save(folder / "strip_20_to_1.png")  # at the limit: usable
    usable.append(folder / "strip_20_to_1.png")
    (folder / "alias.jpg").symlink_to(folder / "000.jpg")  # a file link is an ordinary file
    usable.append(folder / "alias.jpg")
    outside.mkdir(parents=True)
    make_image(outside / "shared.jpg", colour, seed=seed + 20)
    (folder / "linked").symlink_to(outside)  # a folder from outside the data: followed
    usable.append(folder / "linked" / "shared.jpg")

    Image.new("RGB", (20000, 1), colour).save(folder / "strip_20000x1.png")
    Image.new("RGB", (1, 3000), colour).save(named(folder, b"tall\nstrip.png"))
    png_bomb(folder / "bomb.png", 14_000, 13_000)
    whole = (folder / "000.jpg").read_bytes()
    named(folder, b"half\xff.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "page.jpg").write_text("<html><body>404</body></html>")
    (folder / "empty.jpeg").touch()
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    bad += [
        folder / "strip_20000x1.png",
        named(folder, b"tall\nstrip.png"),
        folder / "bomb.png",
        named(folder, b"half\xff.jpg"),
        folder / "page.jpg",
        folder / "empty.jpeg",
        folder / "dangling.jpg",
    ]

    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "up").symlink_to("..")  # would read the other classes as this one
    (folder / "self").symlink_to(".")
    (folder / "sub").mkdir()
    (folder / "sub" / "top").symlink_to(folder.parent.parent)  # the data root
    return usable, bad


@pytest.fixture(scope="module")
def worst(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("worst")
    data = root / "data"
    truth: dict = {}
    for s, split in enumerate(("train", "val")):
        for c, (name, colour) in enumerate(zip(CLASSES, ((200, 50, 40), (40, 60, 200)))):
            usable, bad = dirty_folder(data / split / name, root / "outside" / split / name, colour, 100 * (2 * s + c))
            truth.setdefault(split, {"usable": {}, "bad": []})
            truth[split]["usable"].update({p: c for p in usable})
            truth[split]["bad"] += bad
        (data / split / "alias").symlink_to(CLASSES[0])  # a class folder that is another class: not a class
        (data / split / ".ipynb_checkpoints").mkdir()
        make_image(data / split / ".ipynb_checkpoints" / "x.jpg", (0, 200, 0))
    usable, bad = dirty_folder(data / "test", root / "outside" / "test", (120, 120, 120), 900)  # unlabeled, flat
    truth["test"] = {"usable": dict.fromkeys(usable, -1), "bad": bad}
    return {"root": root, "data": data, "truth": truth}


def measured(*command: str, out: Path) -> subprocess.CompletedProcess:
    """Run a tool like a user, in a wrapper that records the peak RSS of the tool and everything it started."""
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
        "sys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, str(out), sys.executable, *command],
        check=False,
        cwd=REPO,
        capture_output=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.stdout, proc.stderr = (
        proc.stdout.decode("utf-8", "surrogateescape"),
        proc.stderr.decode("utf-8", "surrogateescape"),
    )
    return proc


@pytest.fixture(scope="module")
def pipeline(worst) -> dict:
    root, data = worst["root"], worst["data"]
    run = root / "run"
    cpu = ["trainer.device=cpu", "data.on_bad_image=skip"]
    steps = {
        "train": [
            "train.py",
            *TINY,
            *cpu,
            "trainer.epochs=1",
            "transforms=center_crop",
            f"data.train_dir={data / 'train'}",
            f"data.val_dir={data / 'val'}",
            f"hydra.run.dir={run}",
        ],
        "evaluate": ["evaluate.py", f"checkpoint={run}", "trainer.threads=1", *cpu],
        "evaluate test": [
            "evaluate.py",
            f"checkpoint={run}",
            f"data.test_dir={data / 'test'}",
            "trainer.threads=1",
            *cpu,
        ],
        "badcases": ["-m", "geektime.badcases", str(run / "eval" / "epoch_001.txt"), "--out", str(root / "bad.html")],
        **{
            f"verify {split}": ["-m", "geektime.verify", str(data / split), "--workers", "2"]
            for split in ("train", "val", "test")
        },
    }
    results = {}
    for name, command in steps.items():
        rss = root / f"{name}.rss"
        results[name] = measured(*command, out=rss)
        results[name].max_rss_kib = int(rss.read_text())
    return {"run": run, **results}


def test_no_tool_prints_a_traceback(pipeline):
    expected_codes = {"verify train": 1, "verify val": 1, "verify test": 1}  # 1: bad images found
    for name, proc in pipeline.items():
        if name == "run":
            continue
        text = proc.stdout + proc.stderr
        assert proc.returncode == expected_codes.get(name, 0), f"{name}:\n{text[-4000:]}"
        assert "Traceback" not in text and "Logging error" not in text, f"{name}:\n{text[-4000:]}"


def test_training_uses_exactly_the_usable_images(pipeline, worst):
    truth = worst["truth"]
    text = pipeline["train"].stdout + pipeline["train"].stderr
    assert (
        f"2 classes {CLASSES!r}, {len(truth['train']['usable'])} train / {len(truth['val']['usable'])} val images"
    ) in text
    for split in ("train", "val"):
        assert f"data.{split}_dir: skipping {len(truth[split]['bad'])} unreadable image(s)" in text


@pytest.mark.parametrize("split, txt", [("val", "epoch_001.txt"), ("test", "epoch_001_test.txt")])
def test_evaluation_scores_exactly_the_usable_images(pipeline, worst, split, txt):
    pred = read_predictions(pipeline["run"] / "eval" / txt)
    assert pred.classes == CLASSES
    expected = {str(path): target for path, target in worst["truth"][split]["usable"].items()}
    assert dict(zip(pred.paths, pred.targets.tolist())) == expected


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_verify_flags_exactly_the_unusable_images(pipeline, worst, split):
    out = pipeline[f"verify {split}"].stdout.splitlines()
    truth = worst["truth"][split]
    listed = out[out.index(f"Unusable images ({len(truth['bad'])}):") + 1 :][: len(truth["bad"])]
    assert sorted(line.split(": ", 1)[0].strip() for line in listed) == sorted(printable(str(p)) for p in truth["bad"])
    assert out[-1].startswith(f"{len(truth['usable']) + len(truth['bad'])} files checked, {len(truth['bad'])} bad")
    assert "folder link(s) not followed" in out[-1]


def test_badcases_shows_every_wrong_image(pipeline):
    pred = read_predictions(pipeline["run"] / "eval" / "epoch_001.txt")
    lines = pipeline["badcases"].stdout.splitlines()
    for path in [p for p, t, k in zip(pred.paths, pred.targets, pred.predicted) if t != k]:
        assert any(line.endswith(printable(path)) for line in lines), path


def test_memory_stays_bounded(pipeline):
    peaks = {name: proc.max_rss_kib / 2**20 for name, proc in pipeline.items() if name != "run"}
    assert max(peaks.values()) < MAX_RSS_GIB, json.dumps(peaks)
