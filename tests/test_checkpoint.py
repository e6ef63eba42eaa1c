"""The checkpoint format's one owner: saves, the last.pth link, restore, compatibility, metrics.csv."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import tiny_state
from geektime import checkpoint


def test_saver_writes_epoch_files_on_the_interval_and_links_last(tmp_path):
    saver = checkpoint.CheckpointSaver(tmp_path, epochs=5, save_interval=2)
    for epoch in range(1, 6):
        saver.save(tiny_state(epoch))
        assert checkpoint.load(tmp_path / "last.pth")["epoch"] == epoch
    assert [p.name for p in checkpoint.epoch_checkpoints(tmp_path)] == [
        "epoch_002.pth",
        "epoch_004.pth",
        "epoch_005.pth",
    ]
    assert (tmp_path / "last.pth").samefile(tmp_path / "epoch_005.pth")  # a hard link, not a second copy
    assert saver.saved_epoch == 5 and not list(tmp_path.glob(".*"))


def test_restore_puts_model_optimizer_and_scaler_back(tmp_path):
    state = tiny_state(3)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = checkpoint.CheckpointSaver(tmp_path, epochs=5, save_interval=1)
    assert saver.restore(state, model, optimizer, torch.amp.GradScaler("cpu", enabled=False)) == 3
    for key, value in state["model"].items():
        assert torch.equal(model.state_dict()[key], value)


def test_load_names_what_a_file_lacks(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"format_version": 2, "model": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="no 'epoch', 'classes', 'image_size', 'config' entries"):
        checkpoint.load(path)
    torch.save({**tiny_state(), "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(checkpoint.CheckpointError, match="newer than this geektime"):
        checkpoint.load(path)


def test_one_compatibility_check_names_the_key_and_both_sides():
    state = tiny_state()
    checkpoint.check_compatible(
        state, "a.pth", {"model": "linear", "classes": ["a", "b"], "image_size": (8, 8)}, "the data"
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"a.pth holds linear .*not resnet18 \(the data\)"):
        checkpoint.check_compatible(state, "a.pth", {"model": "resnet18"}, "the data")
    with pytest.raises(checkpoint.CheckpointError, match=r"the data has classes \['x', 'y'\]"):
        checkpoint.check_compatible(state, "a.pth", {"classes": ["x", "y"]}, "the data")
    with pytest.raises(checkpoint.CheckpointError, match=r"its image_size \[8, 8\] differs from \[16, 16\]"):
        checkpoint.check_compatible(state, "a.pth", {"image_size": [16, 16]}, "b.pth", "Evaluate them separately.")


def test_write_metrics_row_appends_and_drops_rows_a_killed_run_left(tmp_path):
    path = tmp_path / "metrics.csv"
    columns = ["epoch", "lr", "val_acc"]
    for epoch in (1, 2, 3):
        checkpoint.write_metrics_row(path, columns, {"epoch": epoch, "lr": 0.1, "val_acc": epoch / 10}, epoch - 1)
    # A resume from epoch 1's checkpoint rewrites epoch 2 and forgets the old 2 and 3.
    checkpoint.write_metrics_row(path, columns, {"epoch": 2, "lr": 0.05, "val_acc": 0.9, "extra": 1}, keep_up_to=1)
    rows = list(csv.DictReader(path.open()))
    assert [(r["epoch"], r["lr"]) for r in rows] == [("1", "0.1"), ("2", "0.05")]
    assert checkpoint.read_metrics(path) == [
        {"epoch": 1, "lr": 0.1, "val_acc": 0.1},
        {"epoch": 2, "lr": 0.05, "val_acc": 0.9},
    ]
    assert not path.with_suffix(".csv.tmp").exists()
