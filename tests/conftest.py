"""Shared fixtures: tiny real image folders, and running the real entry points as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DORAEMON_WALLE = REPO.parent / "shared" / "datasets" / "doraemon_walle"


def make_image(path: Path, colour: tuple[int, int, int], size=(40, 30), seed: int = 0) -> None:
    """A JPEG dominated by `colour`, with noise and a random bar so no two images are alike."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    x = int(rng.integers(0, w - 6))
    pixels[:, x : x + 5] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_folders(
    root: Path, classes=("blue", "red"), train_per_class=12, val_per_class=6, colours=((40, 60, 200), (200, 50, 40))
) -> tuple[Path, Path]:
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, (name, colour) in enumerate(zip(classes, colours)):
            for i in range(count):
                make_image(
                    root / split / name / f"{i:03d}.jpg", colour, seed=c * 1000 + i + (500 if split == "val" else 0)
                )
    return root / "train", root / "val"


@pytest.fixture(autouse=True, scope="session")
def _view_cache(tmp_path_factory):
    """Decoded-view caches of the tests' runs go to a temporary folder, not the user's ~/.cache."""
    os.environ["GEEKTIME_CACHE"] = str(tmp_path_factory.mktemp("views"))  # children of run_script inherit it


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    return make_folders(tmp_path / "data")


def run_script(
    script: str, *args: str, cwd: Path | None = None, check: bool = True, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo like a user; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def tiny_state(epoch: int = 1) -> dict:
    """A real checkpoint dict (checkpoint.CheckpointSaver.state) of a tiny linear model, for format-level tests."""
    import torch

    from geektime.checkpoint import CheckpointSaver

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"model": {"name": "linear", "normalization": "imagenet"}, "transforms": {"name": "resize"}, "data": {}}
    return CheckpointSaver.state(
        model,
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        epoch,
        "all",
        ["a", "b"],
        (8, 8),
        config,
        {"val_acc": 0.5},
    )


TINY = [
    "model=resnet18",
    "data.image_size=[32,32]",
    "data.batch_size=4",
    "trainer.threads=1",
    "optimizer.lr=0.01",
    "trainer.log_interval=2",
]


def train_tiny(run_dir: Path, train_dir: Path, val_dir: Path, *extra: str, check: bool = True, env: dict | None = None):
    return run_script(
        "train.py",
        *TINY,
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
        check=check,
        env=env,
    )


def _default_sigint() -> None:
    # A shell that runs the suite in the background ignores SIGINT for it, and an ignored SIGINT is inherited:
    # the child must get Python's own Ctrl-C handling, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(script: str, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python <script> args...` from the repo in the background, stdout and stderr into `log`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / script), *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            preexec_fn=_default_sigint,
        )
