"""Fault injection (issue 5): dirty image folders, bad folders and configs, kill -9, a non-finite loss, Ctrl-C,
a full or read-only disk and malicious pickles, each driven through the real entry points as a user would
(`train.py`, `evaluate.py`, `python -m geektime.verify`) on tiny folders built in tmp_path.

The per-image verdicts of load_rgb / verify are covered in depth by test_images.py and test_verify.py; here
the same dirt goes through training and evaluation. `pytest tests/test_faults.py -s` prints the counts
(bad inputs tried, kills survived, checkpoints verified).

Time: a train.py process spends ~6-8 s importing and exiting, whatever it does. The runs that only
start, meet their fault and exit do not depend on timing, so the `outcomes` fixture runs them side by side
(JOBS at a time) and each test checks its own; the kill and Ctrl-C trials run alone.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, TINY, make_folders, make_image, run_script, start_script, tiny_state, train_tiny
from geektime import checkpoint
from geektime.predictions import read_predictions

pytestmark = pytest.mark.slow  # real runs of train.py / evaluate.py in subprocesses

JOBS = max(3, min(4, os.cpu_count() or 1))  # the runs wait on imports and disk much of the time
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    bad = {k: v for k, v in COUNTS.items() if k.startswith("bad:")}
    print(
        f"\nfault injection: {sum(bad.values())} bad inputs tried "
        f"({', '.join(f'{k[4:]} {v}' for k, v in sorted(bad.items()))}); "
        f"{COUNTS['kills survived']} kills survived ({COUNTS['SIGKILL']} SIGKILL, "
        f"{COUNTS['SIGKILL during a checkpoint write']} of them during a checkpoint write, "
        f"{COUNTS['SIGINT']} SIGINT); "
        f"{COUNTS['checkpoints verified']} checkpoints verified"
    )


def out(proc) -> str:
    return proc.stdout + proc.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shas(run: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in run.glob("*.pth")}


def verify_checkpoints(run: Path) -> dict[str, int]:
    """Every *.pth in `run` loads and holds the epoch its name says; temp files are never taken for checkpoints.

    Returns {file name: epoch}."""
    epochs = {}
    for path in sorted(run.glob("*.pth")):
        ckpt = checkpoint.load(path)  # a torn file raises CheckpointError
        epochs[path.name] = ckpt["epoch"]
        if match := checkpoint.EPOCH_FILE.match(path.name):
            assert ckpt["epoch"] == int(match.group(1)), path
        COUNTS["checkpoints verified"] += 1
    leftovers = [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".link"))]
    assert all(name.startswith(".") and not name.endswith(".pth") for name in leftovers), leftovers
    if epochs:
        assert checkpoint.resume_file(run).name in epochs
        assert epochs.get("last.pth", 0) >= max(epochs.values()) - 1, epochs  # at most the newest epoch behind
    return epochs


# ---------------------------------------------------------------- tiny data and a shared run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def clean(root) -> tuple[Path, Path]:
    """blue/red, 4 train and 2 val images each: 2 steps of batch 4 per epoch."""
    return make_folders(root / "clean", train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def base_run(root, clean) -> Path:
    """One finished epoch of resnet18 on `clean`; tests copy it (a resume writes into its run folder)."""
    run = root / "base"
    train_tiny(run, *clean, "trainer.epochs=1")
    return run


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


@pytest.fixture(scope="module")
def three_classes(root) -> tuple[Path, Path]:
    return make_folders(
        root / "three",
        classes=("blue", "green", "red"),
        train_per_class=2,
        val_per_class=1,
        colours=((40, 60, 200), (40, 200, 60), (200, 50, 40)),
    )


# ---------------------------------------------------------------- dirty image folders


def png_bomb(path: Path, width: int, height: int) -> None:
    """A valid black 1-bit PNG of width x height pixels: a few KB on disk, far more pixels than it looks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.compress(row * (height % 1000))
    data += packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


def add_dirt(folder: Path) -> tuple[list[str], list[str]]:
    """Put every kind of dirty file into a class folder; returns (unusable file names, odd-but-usable image names)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(np.clip(np.array([200, 50, 40]) + rng.normal(0, 30, (30, 40, 3)), 0, 255).astype(np.uint8))

    (folder / "zero_bytes.jpg").touch()
    make_image(folder / "whole.jpg", (200, 50, 40))
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (folder / "saved_page.jpg").write_text("<html><body>404 Not Found</body></html>")
    # Pillow's default limit is ~89.5 Mpx: above it Pillow only warns (we refuse), above twice that it refuses
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 9_000 < 2 * Image.MAX_IMAGE_PIXELS < 14_000 * 13_000
    png_bomb(folder / "bomb_warning.png", 10_000, 9_000)
    png_bomb(folder / "bomb_error.png", 14_000, 13_000)
    bad = ["zero_bytes.jpg", "truncated.jpg", "corrupt.jpg", "saved_page.jpg", "bomb_warning.png", "bomb_error.png"]

    rgb.save(folder / "png_named.jpg", "PNG")
    rgb.convert("P").save(folder / "gif_named.jpg", "GIF")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo: rotate 90 degrees to show it upright
    rgb.save(folder / "exif_rotated.jpg", quality=90, exif=exif)
    odd = [
        "png_named.jpg",
        "gif_named.jpg",
        "palette.png",
        "gray.png",
        "cmyk.jpg",
        "sixteen_bit.png",
        "rgba.png",
        "exif_rotated.jpg",
    ]
    assert Image.open(folder / "sixteen_bit.png").mode == "I;16" and Image.open(folder / "cmyk.jpg").mode == "CMYK"

    (folder / "notes.txt").write_text("labels from the scraper\n")  # no image extension: ignored
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))  # hidden: ignored
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "broken.jpg").touch()
    (folder / "sub").mkdir()
    (folder / "sub" / "back_to_class").symlink_to("..")  # symlink loops: must not hang or repeat images
    (folder / "self").symlink_to(".")
    return bad, odd


OTHER_DIRT = 6  # notes.txt, .DS_Store, .ipynb_checkpoints/ in the class and at the top, two symlink loops


@pytest.fixture(scope="module")
def dirty(root) -> dict:
    """Train: 4 blue + 4 red clean images, the dirt in red; val: 2 + 2 clean, the same dirt in blue."""
    train_dir, val_dir = make_folders(root / "dirty", train_per_class=4, val_per_class=2)
    bad, odd = add_dirt(train_dir / "red")
    add_dirt(val_dir / "blue")
    (train_dir / ".ipynb_checkpoints").mkdir()  # a hidden folder at the top must not become a class
    make_image(train_dir / ".ipynb_checkpoints" / "x.jpg", (0, 200, 0))
    return {"train": train_dir, "val": val_dir, "bad": bad, "odd": odd}


def count_dirt(dirty: dict, folders: int = 1) -> None:
    COUNTS["bad:unusable image files"] += len(dirty["bad"]) * folders
    COUNTS["bad:odd but usable images"] += len(dirty["odd"]) * folders
    COUNTS["bad:non-image, hidden and looping entries"] += OTHER_DIRT * folders


def unlisted(text: str, folder: Path, names: list[str]) -> list[str]:
    """The names whose path does not start a line of `text` followed by a reason."""
    return [n for n in names if not re.search(rf"^\s*{re.escape(str(folder / n))}: \S", text, re.M)]


# ---------------------------------------------------------------- bad folders


def empty_class(folder: Path) -> tuple[Path, Path, list[str]]:
    train, val = make_folders(folder, train_per_class=2, val_per_class=1)
    for split in (train, val):
        (split / "green").mkdir()
        (split / "green" / "notes.txt").write_text("todo: download")
        (split / "green" / ".DS_Store").touch()
    return train, val, [f"{train}: class folder(s) with no images: green", "Add images", "remove the folder"]


def no_images(folder: Path) -> tuple[Path, Path, list[str]]:
    train, val = make_folders(folder, train_per_class=2, val_per_class=1)
    flat = folder / "flat"
    flat.mkdir()
    (flat / "README.txt").write_text("images go in class folders")
    make_image(flat / "stray.jpg", (1, 2, 3))
    return flat, val, [f"{flat}: no class folders", f"Expected {flat}/<class name>/<image files>"]


def val_classes_differ(folder: Path) -> tuple[Path, Path, list[str]]:
    train, val = make_folders(folder, train_per_class=2, val_per_class=1)
    (val / "red").rename(val / "green")
    return (
        train,
        val,
        [f"data.val_dir={val} has classes ['blue', 'green']", "['blue', 'red']", "same class sub-folders"],
    )


BAD_FOLDERS = {f.__name__: f for f in (empty_class, no_images, val_classes_differ)}

BAD_CONFIGS = {
    "model=resnet19": ["Could not find 'model/resnet19'", "Available options", "efficientnet_b0", "resnet18"],
    "data.image_size=0": ["data.image_size=0", "positive int"],
    "trainer.device=cuda": ["trainer.device=cuda: no CUDA GPU", "trainer.device=cpu"],
}


# ---------------------------------------------------------------- malicious pickles


class CreatesAFile:
    """Unpickling this opens `path` for writing, i.e. creates the file: code run by merely loading."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def malicious_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a plain (legacy, non-zip) pickle and in torch's zip format, named like checkpoints."""
    payload = {"format_version": 1, "epoch": 1, "model": CreatesAFile(marker)}
    legacy, zipped = folder / "legacy" / "epoch_001.pth", folder / "zip" / "epoch_001.pth"
    legacy.parent.mkdir(parents=True)
    zipped.parent.mkdir(parents=True)
    with legacy.open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    torch.save(payload, zipped)
    for unsafe_load in (lambda: pickle.loads(legacy.read_bytes()), lambda: torch.load(zipped, weights_only=False)):
        unsafe_load()  # the payloads are real: an unsafe load does create the file
        assert marker.exists()
        marker.unlink()
    return {"legacy": legacy, "zip": zipped}


def mixed_architectures(folder: Path, base_run: Path) -> Path:
    """A folder with base_run's resnet18 epoch 1 and an efficientnet_b0 epoch 2 of the same classes."""
    from geektime.models import build_model

    folder.mkdir()
    shutil.copy(base_run / "epoch_001.pth", folder / "epoch_001.pth")
    ckpt = checkpoint.load(base_run / "epoch_001.pth")
    from hydra import compose, initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers, to_plain

    register_resolvers()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        effnet = to_plain(compose(config_name="train", overrides=["model=efficientnet_b0"]).model)
    model = build_model(OmegaConf.create(effnet), 2, (32, 32))
    torch.save(
        {
            **ckpt,
            "epoch": 2,
            "model": model.state_dict(),
            "optimizer": {},
            "config": {**ckpt["config"], "model": effnet},
        },
        folder / "epoch_002.pth",
    )
    return folder


# ---------------------------------------------------------------- the runs that only meet their fault and exit


def run_dir(root: Path, case: str) -> Path:
    return root / "runs" / re.sub(r"[^\w.-]+", "_", case)  # no "=" or spaces in a Hydra override's value


@pytest.fixture(scope="module")
def outcomes(root, clean, dirty, base_run, three_classes) -> dict:
    """case -> (CompletedProcess, what the case's setup returned); all run side by side, JOBS at a time."""
    commands: dict[str, list[str]] = {}
    info: dict = {}

    def train(case: str, train_dir: Path, val_dir: Path, *extra: str) -> None:
        commands[case] = [
            "train.py",
            *TINY,
            f"data.train_dir={train_dir}",
            f"data.val_dir={val_dir}",
            f"hydra.run.dir={run_dir(root, case)}",
            *extra,
        ]

    train("dirty error", dirty["train"], dirty["val"], "data.on_bad_image=error")
    train("dirty skip", dirty["train"], dirty["val"], "data.on_bad_image=skip", "trainer.epochs=1")
    for policy in ("error", "skip"):
        commands[f"evaluate dirty {policy}"] = [
            "evaluate.py",
            f"checkpoint={base_run / 'epoch_001.pth'}",
            f"data.val_dir={dirty['val']}",
            f"data.on_bad_image={policy}",
            f"out_dir={root / f'eval_{policy}'}",
            "trainer.threads=1",
        ]
    for case, make in BAD_FOLDERS.items():
        train_dir, val_dir, info[case] = make(root / "folders" / case)
        train(case, train_dir, val_dir)
    for override in BAD_CONFIGS:
        train(override, *clean, override)

    for case, extra in (
        ("resume another architecture", ["model=efficientnet_b0"]),
        ("resume another class count", [f"data.train_dir={three_classes[0]}", f"data.val_dir={three_classes[1]}"]),
        ("non-finite loss", ["optimizer.lr=1e30", "trainer.epochs=3"]),
    ):
        info[case] = copy_run(base_run, root / "resumed" / case)
        commands[case] = ["train.py", f"trainer.resume={info[case]}", "trainer.epochs=2", *extra]
    commands["evaluate another class count"] = [
        "evaluate.py",
        f"checkpoint={base_run / 'epoch_001.pth'}",
        f"data.val_dir={three_classes[1]}",
        f"out_dir={root / 'eval_three'}",
    ]
    info["evaluate mixed architectures"] = mixed_architectures(root / "mixed", base_run)
    commands["evaluate mixed architectures"] = [
        "evaluate.py",
        f"checkpoint={info['evaluate mixed architectures']}",
        "trainer.threads=1",
    ]

    marker = root / "malicious" / "PWNED"
    files = {**malicious_checkpoints(root / "malicious", marker), "marker": marker}
    info["evaluate malicious"] = info["resume malicious"] = files
    commands["evaluate malicious"] = ["evaluate.py", f"checkpoint={files['zip']}"]
    commands["resume malicious"] = ["train.py", f"trainer.resume={files['legacy']}"]

    with ThreadPoolExecutor(JOBS) as pool:
        futures = {case: pool.submit(run_script, *cmd, check=False) for case, cmd in commands.items()}
    return {case: (future.result(), info.get(case)) for case, future in futures.items()}


# ---------------------------------------------------------------- bad images through verify, training, evaluation


def test_verify_lists_exactly_the_unusable_images(dirty):
    proc = subprocess.run(
        [sys.executable, "-m", "geektime.verify", str(dirty["train"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    count_dirt(dirty)
    assert proc.returncode == 1, out(proc)
    red = dirty["train"] / "red"
    assert unlisted(proc.stdout, red, dirty["bad"]) == []
    assert not [n for n in dirty["odd"] if str(red / n) in proc.stdout], "odd but usable images were called bad"
    assert f"{len(dirty['bad'])} bad" in proc.stdout and "--quarantine" in proc.stdout
    assert "decompression bomb" in proc.stdout and "Traceback" not in out(proc)


def test_train_on_bad_image_error_stops_before_the_first_epoch_listing_every_bad_file(root, dirty, outcomes):
    proc, _ = outcomes["dirty error"]
    count_dirt(dirty)
    assert proc.returncode == 2, out(proc)
    assert unlisted(proc.stderr, dirty["train"] / "red", dirty["bad"]) == [], proc.stderr
    assert f"data.train_dir: {len(dirty['bad'])} unreadable image(s)" in proc.stderr
    assert "python -m geektime.verify" in proc.stderr and "data.on_bad_image=skip" in proc.stderr
    assert not [n for n in dirty["odd"] if n in proc.stderr]
    assert "possible decompression bomb" in proc.stderr and "MAX_IMAGE_PIXELS" in proc.stderr
    assert "Traceback" not in proc.stderr and "epoch 1/" not in out(proc)
    assert not list(run_dir(root, "dirty error").glob("*.pth"))


def test_train_on_bad_image_skip_reports_them_and_trains_on_the_rest(root, dirty, outcomes):
    proc, _ = outcomes["dirty skip"]
    count_dirt(dirty, folders=2)
    text = out(proc)
    assert proc.returncode == 0, text
    n = len(dirty["bad"])
    assert f"data.train_dir: skipping {n} unreadable image(s)" in text
    assert f"data.val_dir: skipping {n} unreadable image(s)" in text
    assert unlisted(text, dirty["train"] / "red", dirty["bad"]) == []
    assert unlisted(text, dirty["val"] / "blue", dirty["bad"]) == []
    # every misnamed/palette/gray/CMYK/16-bit/RGBA/rotated image is used; nothing hidden, looping or non-image is
    odd = len(dirty["odd"])
    assert f"2 classes ['blue', 'red'], {8 + odd} train / {4 + odd} val images" in text
    assert checkpoint.load(run_dir(root, "dirty skip") / "last.pth")["classes"] == ["blue", "red"]
    assert "Traceback" not in text


def test_evaluate_on_bad_image_error_lists_the_bad_val_files(root, dirty, outcomes):
    proc, _ = outcomes["evaluate dirty error"]
    count_dirt(dirty)
    assert proc.returncode == 2, out(proc)
    assert unlisted(proc.stderr, dirty["val"] / "blue", dirty["bad"]) == [], proc.stderr
    assert f"data.val_dir: {len(dirty['bad'])} unreadable image(s)" in proc.stderr
    assert "data.on_bad_image=skip" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((root / "eval_error").glob("*.txt"))


def test_evaluate_on_bad_image_skip_reports_them_and_scores_the_rest(root, dirty, outcomes):
    proc, _ = outcomes["evaluate dirty skip"]
    count_dirt(dirty)
    text = out(proc)
    assert proc.returncode == 0, text
    assert f"data.val_dir: skipping {len(dirty['bad'])} unreadable image(s)" in text
    assert unlisted(text, dirty["val"] / "blue", dirty["bad"]) == []
    assert f"{4 + len(dirty['odd'])} val images" in text
    scored = read_predictions(root / "eval_skip" / "epoch_001.txt").paths
    assert sorted(Path(p).relative_to(dirty["val"]).as_posix() for p in scored) == sorted(
        [f"blue/{n}" for n in ("000.jpg", "001.jpg", *dirty["odd"])] + ["red/000.jpg", "red/001.jpg"]
    )


# ---------------------------------------------------------------- bad folders and configs


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_is_a_clear_error(root, outcomes, case):
    proc, words = outcomes[case]
    COUNTS["bad:folders and configs"] += 1
    assert proc.returncode == 2, out(proc)
    assert all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr and not list(run_dir(root, case).glob("*.pth"))


@pytest.mark.parametrize("override", BAD_CONFIGS)
def test_bad_config_is_a_clear_error(root, outcomes, override):
    if override.startswith("trainer.device") and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc, _ = outcomes[override]
    COUNTS["bad:folders and configs"] += 1
    # ours exit 2; a config group that does not exist is Hydra's own error (exit 1, also without a traceback)
    assert proc.returncode == (1 if override.startswith("model=") else 2), out(proc)
    assert all(w in proc.stderr for w in BAD_CONFIGS[override]), proc.stderr
    assert "Traceback" not in proc.stderr and not list(run_dir(root, override).glob("*.pth"))


HOLDS = "resnet18 with 2 classes ['blue', 'red']"


def test_resume_with_another_architecture_says_what_the_checkpoint_holds(base_run, outcomes):
    proc, run = outcomes["resume another architecture"]
    COUNTS["bad:checkpoints"] += 1
    assert proc.returncode == 2, out(proc)
    assert f"{run / 'last.pth'} holds {HOLDS}" in proc.stderr and "not efficientnet_b0" in proc.stderr
    assert "Use model=resnet18" in proc.stderr and "Traceback" not in proc.stderr
    assert shas(run) == shas(base_run)


def test_resume_from_a_path_that_does_not_exist_creates_nothing_there(tmp_path):
    missing = tmp_path / "typo" / "epoch_003.pth"
    proc = run_script("train.py", f"trainer.resume={missing}", check=False, cwd=tmp_path)
    COUNTS["bad:checkpoints"] += 1
    assert proc.returncode == 2 and f"trainer.resume={missing}: no such file or run folder" in proc.stderr, out(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "typo").exists()
    # The failed start's log went to a fresh folder under checkpoints/, which it then took away (issue 12.4).
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "README.md"]


def test_resume_with_another_class_count_says_what_the_checkpoint_holds(base_run, outcomes):
    proc, run = outcomes["resume another class count"]
    COUNTS["bad:checkpoints"] += 1
    assert proc.returncode == 2, out(proc)
    assert f"holds {HOLDS}" in proc.stderr and "the data has classes ['blue', 'green', 'red']" in proc.stderr
    assert "Traceback" not in proc.stderr and shas(run) == shas(base_run)


def test_evaluate_on_val_data_of_another_class_count_says_what_the_checkpoint_holds(outcomes):
    proc, _ = outcomes["evaluate another class count"]
    COUNTS["bad:checkpoints"] += 1
    assert proc.returncode == 2, out(proc)
    assert "has classes ['blue', 'green', 'red'] but the model's classes are ['blue', 'red']" in proc.stderr
    assert f"the checkpoint holds {HOLDS}" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_on_a_folder_mixing_architectures_names_both(outcomes):
    proc, mixed = outcomes["evaluate mixed architectures"]
    COUNTS["bad:checkpoints"] += 1
    assert proc.returncode == 2, out(proc)
    assert (
        f"{mixed / 'epoch_002.pth'} holds efficientnet_b0 with 2 classes ['blue', 'red']" in proc.stderr
        and f"{mixed / 'epoch_001.pth'} holds {HOLDS}" in proc.stderr
    ), proc.stderr
    assert "evaluate them separately" in proc.stderr and "Traceback" not in proc.stderr


def test_malicious_checkpoint_is_refused_by_evaluate_and_resume(outcomes):
    for case in ("evaluate malicious", "resume malicious"):
        proc, files = outcomes[case]
        COUNTS["bad:checkpoints"] += 1
        assert proc.returncode == 2, out(proc)
        assert "refused to load" in proc.stderr and "may run code" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not files["marker"].exists(), f"{case}: code from the checkpoint ran"


def test_malicious_pickle_is_refused_by_checkpoint_and_pretrained_loading(tmp_path):
    from geektime.config import ConfigError
    from geektime.models import build_model

    marker = tmp_path / "PWNED"
    files = malicious_checkpoints(tmp_path, marker)
    for path in files.values():
        with pytest.raises(checkpoint.CheckpointError, match="refused to load.*weights_only=True"):
            checkpoint.load(path)
        assert not marker.exists()
        COUNTS["bad:checkpoints"] += 1
    from hydra import compose, initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    for name in ("resnet18", "efficientnet_b0"):
        with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
            mcfg = compose(config_name="train", overrides=[f"model={name}"]).model
        mcfg.pretrained = str(files["zip"])
        with pytest.raises(ConfigError, match="model.pretrained=.*refused to load"):
            build_model(mcfg, 2, (32, 32))
        assert not marker.exists()
        COUNTS["bad:checkpoints"] += 1


# ---------------------------------------------------------------- kill -9, NaN, Ctrl-C

TMP_CHECKPOINT = re.compile(r"^\.epoch_(\d+)\.pth\..*\.tmp$")


def test_kill_9_at_random_moments_never_breaks_a_checkpoint_and_resume_finishes(root, clean):
    """SIGKILL a run of 12 short epochs three times (once while a checkpoint is being written, twice after a
    random training step), checking after each kill that every checkpoint on disk loads; then resume to the end.

    The kills come from the run itself at named points (geektime.testpoints), so no timing can miss them."""
    rng = random.Random(20240501)
    run = root / "killed"
    epochs = 12  # 2 steps an epoch (8 images, batch 4)
    trials = ["checkpoint_write:3", f"train_step:{rng.randint(1, 6)}", f"train_step:{rng.randint(1, 6)}"]
    kills, resumes_from = 0, None
    for trial, when in enumerate(trials):
        log = root / f"killed_{trial}.log"
        if trial == 0:
            args = [
                *TINY,
                f"data.train_dir={clean[0]}",
                f"data.val_dir={clean[1]}",
                f"hydra.run.dir={run}",
                f"trainer.epochs={epochs}",
                "trainer.save_interval=1",
            ]
        else:
            args = [f"trainer.resume={run}"]
        proc = start_script("train.py", *args, log=log, env={"GEEKTIME_SIGNAL_AT": when})
        try:
            assert proc.wait(300) == -signal.SIGKILL, (
                f"trial {trial} was not killed at {when}:\n{log.read_text()[-3000:]}"
            )
        finally:
            if proc.poll() is None:
                proc.kill()
        if resumes_from is not None:  # this trial continued from the newest checkpoint the last kill left
            assert f"resuming from {run / 'last.pth'} (epoch {resumes_from} done" in log.read_text()
        kills += 1
        COUNTS["SIGKILL"] += 1
        torn = [n for n in os.listdir(run) if TMP_CHECKPOINT.match(n)]  # (a resume removes older ones first)
        if when.startswith("checkpoint_write"):
            assert torn, "the kill should have landed during a checkpoint write"
        COUNTS["SIGKILL during a checkpoint write"] += bool(torn)
        found = verify_checkpoints(run)
        print(f"kill {trial + 1} (at {when}): checkpoints {sorted(found.items())}, torn temp files {torn}")
        assert found, "the first epoch should have been saved before the kill"
        resumes_from = found["last.pth"]
        COUNTS["kills survived"] += 1

    torn = [n for n in os.listdir(run) if TMP_CHECKPOINT.match(n)]
    proc = run_script("train.py", f"trainer.resume={run}", check=False)
    assert proc.returncode == 0, out(proc)[-4000:]
    assert f"resuming from {run / 'last.pth'} (epoch {resumes_from} done" in out(proc)
    if torn:  # (each resume above already removed those of the kill before it)
        assert f"removed {len(torn)} temp file(s) of interrupted checkpoint saves" in out(proc)
    assert not [n for n in os.listdir(run) if TMP_CHECKPOINT.match(n)], "torn temp files are removed on resume"
    found = verify_checkpoints(run)
    assert found["last.pth"] == epochs and sorted(found) == [
        *(checkpoint.epoch_name(e) for e in range(1, epochs + 1)),
        "last.pth",
    ]
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, epochs + 1))
    print(f"{kills} kills survived, {COUNTS['checkpoints verified']} checkpoints verified so far")


def test_non_finite_loss_names_epoch_and_step_and_keeps_the_checkpoints(base_run, outcomes):
    """Epoch 1 is fine (base_run); its resume at lr 1e30 diverges in epoch 2, deterministically."""
    proc, run = outcomes["non-finite loss"]
    COUNTS["bad:faults (NaN loss, full or read-only disk)"] += 1
    assert proc.returncode == 2, out(proc)
    assert re.search(r"^error: loss became non-finite at epoch 2, step \d+ of 2", proc.stderr, re.M), proc.stderr
    assert "Lower optimizer.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert shas(run) == shas(base_run)  # epoch_001.pth and last.pth byte for byte
    assert verify_checkpoints(run) == {"epoch_001.pth": 1, "last.pth": 1}


def test_ctrl_c_says_which_epoch_a_resume_starts_at_and_resume_finishes(tmp_path, base_run):
    run = copy_run(base_run, tmp_path / "run")
    log = tmp_path / "interrupted.log"
    # 2 steps an epoch: the resumed run's 3rd step is the first of epoch 3, after epoch 2 was saved.
    proc = start_script(
        "train.py",
        f"trainer.resume={run}",
        "trainer.epochs=4",
        log=log,
        env={"GEEKTIME_SIGNAL_AT": "train_step:3:SIGINT"},
    )
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    COUNTS["SIGINT"] += 1
    text = log.read_text()
    assert code == 130, text[-3000:]
    found = verify_checkpoints(run)
    next_epoch = found["last.pth"] + 1
    assert next_epoch == 3 and "interrupted during epoch 3: its progress is not saved" in text, text[-3000:]
    assert f"`python train.py trainer.resume={run}` starts again at epoch {next_epoch}" in text, text[-3000:]
    assert "error: interrupted (Ctrl-C)" in text and "Traceback" not in text
    COUNTS["kills survived"] += 1

    proc = run_script("train.py", f"trainer.resume={run}", check=False)
    assert proc.returncode == 0, out(proc)[-3000:]
    assert f"(epoch {next_epoch - 1} done" in out(proc)
    assert verify_checkpoints(run)["last.pth"] == 4


# ---------------------------------------------------------------- a full or read-only disk


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, base_run):
    """A real failed write(): train.py runs under RLIMIT_FSIZE, so writing the ~90 MB checkpoint fails with EFBIG,
    the same path as ENOSPC on a full disk. (A small tmpfs would need mount privileges; chmod does not stop root.)
    Logs, metrics.csv and TensorBoard events stay far below the limit."""
    run = copy_run(base_run, tmp_path / "run")
    limit = 8 * 2**20

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"trainer.resume={run}", "trainer.epochs=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files_only,
    )
    COUNTS["bad:faults (NaN loss, full or read-only disk)"] += 1
    assert proc.returncode == 2, out(proc)
    assert (
        f"error: [Errno {errno.EFBIG}] could not write checkpoint {run / 'epoch_002.pth'}: File too large"
        in proc.stderr
    ), proc.stderr
    assert "Free disk space or make the run folder writable; the previous checkpoints are intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert shas(run) == shas(base_run)
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    assert verify_checkpoints(run) == {"epoch_001.pth": 1, "last.pth": 1}


class FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes, as on a disk that fills up mid-save."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("fault", ["disk full", "read-only folder"])
def test_save_atomic_on_a_full_or_read_only_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    """In-process, for the exact errno: ENOSPC from a write, and a folder that became read-only (a real chmod when
    not root; as root, which chmod does not stop, EROFS from creating the temp file)."""
    state = tiny_state(epoch=1)
    checkpoint.save_atomic(state, tmp_path / "epoch_001.pth")
    before = sha(tmp_path / "epoch_001.pth")
    target = tmp_path / "epoch_002.pth"
    if fault == "disk full":
        real_fdopen = os.fdopen
        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room=4096))
        expected = os.strerror(errno.ENOSPC)
    elif os.geteuid() != 0:
        tmp_path.chmod(0o555)
        expected = os.strerror(errno.EACCES)
    else:

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

        monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
        expected = os.strerror(errno.EROFS)
    try:
        with pytest.raises(OSError) as raised:
            checkpoint.save_atomic({**state, "epoch": 2}, target)
    finally:
        tmp_path.chmod(0o755)
    COUNTS["bad:faults (NaN loss, full or read-only disk)"] += 1
    message = str(raised.value)
    assert f"could not write checkpoint {target}: {expected}" in message and "Free disk space" in message
    assert sha(tmp_path / "epoch_001.pth") == before and checkpoint.load(tmp_path / "epoch_001.pth")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["epoch_001.pth"]  # no temp file left, no half-written epoch_002
    COUNTS["checkpoints verified"] += 1


def test_ctrl_c_during_a_checkpoint_write_lets_the_write_finish(tmp_path):
    """The interrupt is held until the file is whole, then raised: no torn checkpoint, no lost epoch."""
    from geektime.checkpoint import interrupts_deferred, load, save_atomic

    target = tmp_path / "epoch_001.pth"
    state = tiny_state(epoch=1)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            save_atomic(state, target)
    assert load(target)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
