"""evaluate.py end to end on a tiny real run: txt per checkpoint, table, selection, thresholds, unlabeled images."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_folders, make_image, run_script, train_tiny
from geektime.data import InputNormalizer, build_transform, decode_all
from geektime.images import list_images
from geektime.metrics import classification_report
from geektime.models import build_model
from geektime.predictions import read_predictions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run on logo (red) vs others (blue); two logo val images are blue, so no threshold is perfect."""
    root = tmp_path_factory.mktemp("eval")
    train_dir, val_dir = make_folders(root / "data", classes=("logo", "others"),
                                      colours=((200, 50, 40), (40, 60, 200)), train_per_class=16, val_per_class=6)
    for i in range(2):
        make_image(val_dir / "logo" / f"hard_{i}.jpg", (40, 60, 200), seed=900 + i)
    run = root / "run"
    # Batch 8, not the tiny default of 4: with 4 the eval-mode BatchNorm of a 2-epoch ResNet gives logits
    # in the thousands whose order is chance, and the thresholds below need a model that ranks the classes.
    train_tiny(run, train_dir, val_dir, "trainer.epochs=2", "data.batch_size=8")
    return run, val_dir


def _logit_gap(run, val_dir):
    """logit(logo) - logit(others) per val image, from the trained epoch 2 weights."""
    ckpt = torch.load(run / "epoch_002.pth", weights_only=True)
    model = build_model(OmegaConf.create({**ckpt["config"]["model"], "pretrained": False}), 2, (32, 32))
    model.load_state_dict(ckpt["model"])
    model.eval()
    paths = [str(p) for c in ("logo", "others") for p in list_images(val_dir / c)]
    images, _ = decode_all(paths, build_transform(OmegaConf.create(ckpt["transforms"]), (32, 32), False),
                           (32, 32), (32, 32), workers=1)
    with torch.no_grad():
        logits = model(InputNormalizer("imagenet", torch.device("cpu"), True)(images))
    gap = (logits[:, 0] - logits[:, 1]).numpy()
    is_logo = np.array(["/logo/" in p for p in paths])
    return ckpt, gap, is_logo


def test_run_dir_selection_follows_the_business_metric(trained, tmp_path):
    """Epoch 1 is tuned for recall of logo, epoch 2 for its precision: the choice must follow select.metric."""
    run, val_dir = trained
    ckpt, gap, is_logo = _logit_gap(run, val_dir)
    assert gap[is_logo].min() < gap[~is_logo].max(), "the hard logo images should score like others"
    designed = tmp_path / "designed"
    designed.mkdir()
    for epoch, shift in ((1, -gap[is_logo].min() + 0.05), (2, -gap[~is_logo].max() - 0.05)):
        state = {**ckpt, "epoch": epoch, "model": dict(ckpt["model"])}
        state["model"]["fc.bias"] = ckpt["model"]["fc.bias"] + torch.tensor([shift, 0.0])
        torch.save(state, designed / f"epoch_{epoch:03d}.pth")

    run_script("evaluate.py", f"checkpoint={designed}", f"data.val_dir={val_dir}", "select.metric=recall",
               "select.positive=logo")
    assert json.loads((designed / "eval/best.json").read_text())["checkpoint"] == "epoch_001.pth"
    assert (designed / "eval/epoch_001_confusion.png").is_file()
    run_script("evaluate.py", f"checkpoint={designed}", f"data.val_dir={val_dir}", "select.metric=precision",
               "select.positive=logo")
    best = json.loads((designed / "eval/best.json").read_text())
    assert best["checkpoint"] == "epoch_002.pth" and best["precision"] == pytest.approx(1.0)

    # The txt, its JSON and the epoch table agree.
    table = {r["checkpoint"]: r for r in csv.DictReader((designed / "eval/epochs.csv").open())}
    for name in ("epoch_001", "epoch_002"):
        pred = read_predictions(designed / f"eval/{name}.txt")
        assert len(pred.paths) == len(is_logo) and pred.classes == ["logo", "others"]
        report = json.loads((designed / f"eval/{name}.json").read_text())
        again = classification_report(pred)
        assert report["per_class"]["logo"]["recall"] == pytest.approx(again["per_class"]["logo"]["recall"])
        assert float(table[f"{name}.pth"]["logo_recall"]) == pytest.approx(report["per_class"]["logo"]["recall"],
                                                                            abs=1e-5)
    # Every checkpoint gets its JSON; the confusion PNG is drawn for the chosen one (epoch_002 by precision).
    assert (designed / "eval/epoch_001.json").is_file() and (designed / "eval/epoch_002_confusion.png").is_file()
    assert not (designed / "eval/epoch_001_confusion.png").exists()  # the recall run's choice is gone
    assert best["confusion_png"] == str(designed / "eval/epoch_002_confusion.png")

    # A floor nobody meets is a message, not a traceback.
    proc = run_script("evaluate.py", f"checkpoint={designed}", f"data.val_dir={val_dir}", "select.metric=recall",
                      "select.positive=logo", "select.min_precision=1.01", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_single_checkpoint_on_its_own_val_data_and_txt_round_trip(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "out"
    proc = run_script("evaluate.py", f"checkpoint={run / 'epoch_002.pth'}", f"out_dir={out}")
    assert "accuracy" in proc.stdout
    pred = read_predictions(out / "epoch_002.txt")
    assert pred.header["checkpoint"].endswith("epoch_002.pth")
    # Edit a label by hand and recompute, with a threshold target: no model involved.
    txt = out / "epoch_002.txt"
    proc = run_script("evaluate.py", f"predictions={txt}", "select.positive=logo", "threshold.target_recall=0.5")
    assert "threshold" in proc.stdout
    assert (out / "epoch_002_logo_thresholds.csv").is_file() and (out / "epoch_002_logo_pr.png").is_file()
    found = json.loads((out / "epoch_002_logo_threshold.json").read_text())
    assert found["recall"] >= 0.5


def test_unlabeled_test_folder_gets_predictions(trained, tmp_path):
    run, _ = trained
    test_dir = tmp_path / "unlabeled"
    for i in range(3):
        make_image(test_dir / f"img {i}.jpg", (200, 50, 40), seed=700 + i)
    run_script("evaluate.py", f"checkpoint={run / 'last.pth'}", f"data.test_dir={test_dir}", f"out_dir={tmp_path}")
    pred = read_predictions(tmp_path / "last_test.txt")
    assert len(pred.paths) == 3 and (pred.targets == -1).all()
    assert all(" " in p for p in pred.paths)


def test_checkpoint_of_other_classes_is_named(trained, tmp_path):
    run, _ = trained
    other_train, other_val = make_folders(tmp_path / "other", classes=("cat", "dog"), train_per_class=2,
                                          val_per_class=2)
    proc = run_script("evaluate.py", f"checkpoint={run / 'last.pth'}", f"data.val_dir={other_val}", check=False)
    assert proc.returncode == 2
    assert "['logo', 'others']" in proc.stderr and "cat" in proc.stderr and "Traceback" not in proc.stderr
