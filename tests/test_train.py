"""End to end: real runs of train.py on tiny real JPEG folders."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import run_script, train_tiny

pytestmark = pytest.mark.slow  # real runs of train.py / evaluate.py in subprocesses


def test_two_epochs_write_checkpoints_metrics_and_tensorboard(tmp_path, folders):
    run = tmp_path / "run"
    proc = train_tiny(run, *folders, "trainer.epochs=2")
    assert "epoch 2/2" in proc.stdout + proc.stderr
    assert (run / "epoch_001.pth").is_file() and (run / "epoch_002.pth").is_file()
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["classes"] == ["blue", "red"]
    assert last["config"]["model"]["name"] == "resnet18" and last["image_size"] == [32, 32]
    assert set(last) >= {"model", "optimizer", "scaler", "phase", "metrics", "format_version"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"val_acc", "blue_precision", "red_recall", "lr", "train_loss"} <= set(rows[0])
    assert float(rows[1]["val_acc"]) == pytest.approx(last["metrics"]["val_acc"])
    assert list((run / "tb").glob("events.out.tfevents.*"))
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["best_epoch"] in (1, 2)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "augment, cache",
    [(False, True), (True, True), (True, False)],
    ids=["decoded-once", "augmented-from-the-cache", "augmented-decoded-in-workers"],
)
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, folders, augment, cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = (
        "scheduler=step",
        "scheduler.step_size=1",
        "scheduler.gamma=0.5",
        "data.num_workers=2",
        f"transforms.augment.enabled={str(augment).lower()}",
        f"data.cache={str(cache).lower()}",
    )
    train_tiny(straight, *folders, "trainer.epochs=4", *common)
    train_tiny(resumed, *folders, "trainer.epochs=2", *common)
    proc = run_script("train.py", f"trainer.resume={resumed}", "trainer.epochs=4")
    assert "resuming from" in proc.stdout + proc.stderr
    assert (resumed / "epoch_004.pth").is_file()
    _assert_same_weights(_weights(straight / "last.pth"), _weights(resumed / "last.pth"))
    rows = list(csv.DictReader((resumed / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]


def test_interrupted_cosine_run_resumes_from_its_last_epoch_file(tmp_path, folders):
    """A run killed after epoch 2 of 3 (epoch 3's files gone) resumes to the same weights."""
    straight = tmp_path / "straight"
    train_tiny(straight, *folders, "trainer.epochs=3", "scheduler=cosine")
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("epoch_001.pth", "epoch_002.pth", "metrics.csv"):
        (killed / name).write_bytes((straight / name).read_bytes())
    run_script("train.py", f"trainer.resume={killed}")
    _assert_same_weights(_weights(straight / "epoch_003.pth"), _weights(killed / "epoch_003.pth"))
    assert len(list(csv.DictReader((killed / "metrics.csv").open()))) == 3


def test_val_classes_that_differ_from_train_are_a_clear_error(tmp_path, folders):
    train_dir, val_dir = folders
    (val_dir / "red").rename(val_dir / "green")
    proc = train_tiny(tmp_path / "run", train_dir, val_dir, check=False)
    assert proc.returncode == 2
    assert "classes ['blue', 'green']" in proc.stderr and "['blue', 'red']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_lists_the_choices(tmp_path, folders):
    proc = train_tiny(tmp_path / "run", *folders, "model=resnet19", check=False)
    assert proc.returncode != 0
    assert "resnet19" in proc.stderr and "efficientnet_b0" in proc.stderr and "resnet18" in proc.stderr


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("data.image_size=[0,32]", "data.image_size"),
        ("data.train_dir=/no/such/folder", "data.train_dir"),
    ],
)
def test_bad_values_name_the_key(tmp_path, folders, override, key):
    proc = train_tiny(tmp_path / "run", *folders, override, check=False)
    assert proc.returncode == 2
    assert key in proc.stderr and "Traceback" not in proc.stderr


def test_two_job_sweep_writes_both_runs_and_a_summary(tmp_path, folders):
    train_dir, val_dir = folders
    sweep = tmp_path / "sweep"
    proc = run_script(
        "train.py",
        "-m",
        "model=resnet18",
        "data.image_size=[32,32]",
        "data.batch_size=4",
        "trainer.threads=1",
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        "optimizer.lr=0.01,-1",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert proc.returncode == 1 and "error: 1 of 2 sweep jobs failed" in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    assert "optimizer.lr:0.01" in jobs[0].name and "optimizer.lr:-1" in jobs[1].name
    assert (jobs[0] / "epoch_001.pth").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert "optimizer.lr" in rows[1]["error"] and rows[0]["best_epoch"] == "1"
    assert "| 1 | 0 | 0.01 | ok |" in proc.stdout and "| - | 1 | -1 | failed |" in proc.stdout
    assert (sweep / "summary.md").read_text().count("\n") == 8
