"""Run folders and late errors (issue 12): no run mixed with another, no folder left by a failed start,
no wrong result reported as a success."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, make_folders, run_script, start_script, tiny_state, train_tiny
from geektime import checkpoint, runs


def _claim(args):
    name, queue = args
    queue.put(runs.claim_fresh_dir(name))


def test_two_processes_claiming_one_name_get_two_folders(tmp_path):
    """The root of 12.1: a folder is created exclusively, so the second claimant gets a suffix."""
    name = str(tmp_path / "checkpoints" / "2026-01-01_00-00-00_resnet18")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=((name, queue),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    claimed = sorted(queue.get(timeout=5) for _ in procs)
    assert claimed == sorted([name, f"{name}_1", f"{name}_2", f"{name}_3"])
    assert all(Path(c).is_dir() for c in claimed)


def test_a_process_resolving_its_folder_twice_gets_the_same_one(tmp_path):
    """Hydra resolves the run folder's name more than once; ${now} may read another second the second time."""
    first = runs.claim_fresh_dir(str(tmp_path / "a"), kind="test")
    assert runs.claim_fresh_dir(str(tmp_path / "b"), kind="test") == first


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_folder(tmp_path, folders):
    """12.1 end to end: two train.py started at once in one working folder each keep their own run folder."""
    args = [*TINY, f"data.train_dir={folders[0]}", f"data.val_dir={folders[1]}", "trainer.epochs=1"]
    (tmp_path / "work").mkdir()
    procs = [start_script("train.py", *args, log=tmp_path / f"log{i}.txt") for i in range(2)]
    for p in procs:
        assert p.wait(600) == 0
    # Both wrote into checkpoints/ under the repo's own checkpoints folder (the working directory is REPO).
    logs = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
    folders_used = [
        line.split("(run folder: ")[1].rstrip(")")
        for log in logs
        for line in log.splitlines()
        if "(run folder: " in line
    ]
    try:
        assert len(folders_used) == 2 and folders_used[0] != folders_used[1]
        for folder in folders_used:
            assert json.loads((Path(folder) / "result.json").read_text())["status"] == "ok"
            assert checkpoint.load(Path(folder) / "last.pth")["epoch"] == 1
    finally:
        import shutil

        for folder in folders_used:
            if Path(folder).resolve().parent == (REPO / "checkpoints").resolve():
                shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_fresh_run_refuses_a_folder_holding_a_run_unless_told_to_overwrite(tmp_path, folders):
    """12.2: the old run is never mixed with the new one; overwrite moves it aside, deleting nothing."""
    run = tmp_path / "run"
    train_tiny(run, *folders, "trainer.epochs=1")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    proc = train_tiny(run, *folders, "trainer.epochs=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{run} already holds a run" in proc.stderr and f"trainer.resume={run}" in proc.stderr
    assert "trainer.overwrite=true" in proc.stderr
    # Every file of the old run is as it was (its log only gained the refusal; Hydra's record of this
    # invocation went to a .hydra-<time>/ folder of its own).
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name in before and p.name != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }
    assert len(list(run.glob(".hydra-*"))) == 1
    train_tiny(run, *folders, "trainer.epochs=1", "trainer.overwrite=true")
    aside = list(run.glob("replaced_*"))
    assert len(aside) == 1 and (aside[0] / "epoch_001.pth").is_file() and (aside[0] / "metrics.csv").is_file()
    assert checkpoint.load(run / "last.pth")["epoch"] == 1


@pytest.mark.slow
def test_a_failed_start_leaves_no_folder(tmp_path):
    """12.4: a missing data folder stops the run before any work, and its fresh run folder goes with it."""
    proc = run_script(
        "train.py",
        f"data.train_dir={tmp_path / 'nope'}",
        f"data.val_dir={tmp_path / 'nope'}",
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_discard_only_takes_a_folder_this_process_created_and_that_holds_nothing_else(tmp_path):
    mine = Path(runs.claim_fresh_dir(str(tmp_path / "mine"), kind="discard-test"))
    (mine / ".hydra").mkdir()
    (mine / "train.log").write_text("error: ...")
    kept = tmp_path / "given"
    kept.mkdir()
    (kept / "train.log").write_text("x")
    assert not runs.discard_if_unused(kept) and kept.exists()
    (mine / "notes.txt").write_text("the user's")
    assert not runs.discard_if_unused(mine) and mine.exists()
    (mine / "notes.txt").unlink()
    assert runs.discard_if_unused(mine) and not mine.exists()


@pytest.mark.slow
def test_a_single_class_is_a_configuration_error(tmp_path):
    """12.6: one class would train to a meaningless accuracy 1.0."""
    train_dir, val_dir = make_folders(
        tmp_path / "data", classes=("only",), colours=((200, 50, 40),), train_per_class=4, val_per_class=2
    )
    proc = train_tiny(tmp_path / "run", train_dir, val_dir, "trainer.epochs=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has 1 class folder" in proc.stderr and "at least 2" in proc.stderr


@pytest.mark.slow
def test_a_diverged_validation_loss_stops_the_run_and_names_no_best_epoch(tmp_path, folders):
    """12.7: one training step per epoch (finite), then the weights are gone: val loss is not finite."""
    run = tmp_path / "run"
    proc = train_tiny(run, *folders, "trainer.epochs=2", "data.batch_size=64", "optimizer.lr=1e6", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "validation loss became non-finite at epoch 1" in proc.stderr and "Lower optimizer.lr" in proc.stderr
    assert not (run / "result.json").exists() and not list(run.glob("epoch_*.pth"))


@pytest.mark.slow
def test_one_training_image_is_a_clear_error(tmp_path):
    """12.12: a batch of one through BatchNorm would fail deep in torch."""
    train_dir, val_dir = make_folders(tmp_path / "data", train_per_class=1, val_per_class=1)
    (next((train_dir / "red").iterdir())).unlink()
    proc = train_tiny(tmp_path / "run", train_dir, val_dir, "trainer.epochs=1", "data.on_bad_image=skip", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "class folder(s) with no images: red" in proc.stderr
    train_dir, val_dir = make_folders(tmp_path / "data2", train_per_class=1, val_per_class=1)
    (train_dir / "red" / "000.jpg").write_bytes(b"not an image")
    proc = train_tiny(tmp_path / "run2", train_dir, val_dir, "trainer.epochs=1", "data.on_bad_image=skip", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.train_dir: 1 usable image(s); training needs at least 2" in proc.stderr


def test_a_checkpoint_holding_only_weights_is_named(tmp_path):
    """12.12: a dict with just `model` is not a geektime checkpoint; the message says where it belongs."""
    path = tmp_path / "weights.pth"
    torch.save({"model": tiny_state()["model"]}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a geektime checkpoint.*model.pretrained"):
        checkpoint.load(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,key",
    [(["data.batch_size=0"], "data.batch_size=0 must be >= 1"), (["select.min_recall=abc"], "select.min_recall")],
)
def test_evaluate_refuses_bad_values_naming_the_key(tmp_path, args, key):
    path = tmp_path / "run" / "epoch_001.pth"
    path.parent.mkdir()
    checkpoint.save_atomic(tiny_state(), path)
    proc = run_script("evaluate.py", f"checkpoint={path}", *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and key in proc.stderr + proc.stdout


def test_threads_default_to_the_cores_shared_out():
    from geektime.machine import cpu_count, default_threads

    assert default_threads(1) == cpu_count() and default_threads(cpu_count() * 2) == 1
    assert os.cpu_count() >= 1


@pytest.mark.slow
def test_valid_pct_holds_out_a_share_and_the_evaluator_finds_the_same_images(tmp_path, folders):
    """Issue 17.4: one folder in; the held-out images are recorded in the run and evaluated again by default."""
    import csv

    from geektime.predictions import read_predictions

    run = tmp_path / "run"
    run_script(
        "train.py",
        *TINY,
        f"data.train_dir={folders[0]}",
        "data.valid_pct=0.25",
        "trainer.epochs=1",
        f"hydra.run.dir={run}",
    )
    rows = list(csv.DictReader((run / "split.csv").open()))
    held = sorted(r["path"] for r in rows if r["split"] == "val")
    assert len(held) == 6 and {p.split("/")[-2] for p in held} == {"blue", "red"}  # 3 of 12 per class
    assert len(rows) == 24
    run_script("evaluate.py", f"checkpoint={run}")
    assert sorted(read_predictions(run / "eval" / "epoch_001.txt").paths) == held
    proc = run_script(
        "train.py",
        *TINY,
        f"data.train_dir={folders[0]}",
        f"data.val_dir={folders[1]}",
        "data.valid_pct=0.2",
        f"hydra.run.dir={tmp_path / 'both'}",
        check=False,
    )
    assert proc.returncode == 2 and "leave data.val_dir unset" in proc.stderr
