"""evaluate.py end to end on a tiny real run: txt per checkpoint, table, selection, thresholds, unlabeled images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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

pytestmark = pytest.mark.slow  # real runs of train.py / evaluate.py in subprocesses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run on logo (red) vs others (blue); two logo val images are blue, so no threshold is perfect."""
    root = tmp_path_factory.mktemp("eval")
    train_dir, val_dir = make_folders(
        root / "data",
        classes=("logo", "others"),
        colours=((200, 50, 40), (40, 60, 200)),
        train_per_class=16,
        val_per_class=6,
    )
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
    images, _ = decode_all(
        paths, build_transform(OmegaConf.create(ckpt["transforms"]), (32, 32), False), (32, 32), (32, 32), workers=1
    )
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

    run_script(
        "evaluate.py",
        f"checkpoint={designed}",
        f"data.val_dir={val_dir}",
        "select.metric=recall",
        "select.positive=logo",
    )
    assert json.loads((designed / "eval/best.json").read_text())["checkpoint"] == "epoch_001.pth"
    assert (designed / "eval/epoch_001_confusion.png").is_file()
    run_script(
        "evaluate.py",
        f"checkpoint={designed}",
        f"data.val_dir={val_dir}",
        "select.metric=precision",
        "select.positive=logo",
    )
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
        assert float(table[f"{name}.pth"]["logo_recall"]) == pytest.approx(
            report["per_class"]["logo"]["recall"], abs=1e-5
        )
    # Every checkpoint gets its JSON; the confusion PNG is drawn for the chosen one (epoch_002 by precision).
    assert (designed / "eval/epoch_001.json").is_file() and (designed / "eval/epoch_002_confusion.png").is_file()
    assert not (designed / "eval/epoch_001_confusion.png").exists()  # the recall run's choice is gone
    assert best["confusion_png"] == str(designed / "eval/epoch_002_confusion.png")

    # A floor nobody meets is a message, not a traceback.
    proc = run_script(
        "evaluate.py",
        f"checkpoint={designed}",
        f"data.val_dir={val_dir}",
        "select.metric=recall",
        "select.positive=logo",
        "select.min_precision=1.01",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "select.min_precision=1.01" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["select.positive=cat"],
            "select.positive='cat' is not a class of the checkpoint; choose one of: logo, others",
        ),
        (["threshold.target_recall=0.9"], "threshold.target_recall needs select.positive=<class>"),
        (["select.positive=logo", "threshold.target_recall=0.9", "threshold.target_precision=0.9"], "not both"),
        (["select.min_recall=abc"], "select.min_recall"),
    ],
)
def test_selection_and_threshold_requests_are_checked_before_any_work(trained, tmp_path, args, message):
    """Issue 12.13: checked before decoding or inference, so a wrong request changes nothing in eval/."""
    run, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.json").write_text('{"checkpoint": "an old choice"}')
    proc = run_script("evaluate.py", f"checkpoint={run}", f"out_dir={out}", *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr + proc.stdout
    assert not list(out.glob("*.txt")), "no checkpoint may be run before the request is checked"
    assert (out / "best.json").read_text() == '{"checkpoint": "an old choice"}'


def test_a_floor_nobody_meets_leaves_no_old_choice_behind(trained, tmp_path):
    """Issue 12.13: once the checkpoints are evaluated anew, an earlier best.json would read as this one's."""
    run, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.json").write_text('{"checkpoint": "an old choice"}')
    proc = run_script(
        "evaluate.py",
        f"checkpoint={run}",
        f"out_dir={out}",
        "select.positive=logo",
        "select.metric=recall",
        "select.min_precision=1.0",
        "select.min_recall=1.0",
        check=False,
    )
    if proc.returncode == 0:
        pytest.skip("this tiny run happens to be perfect on its val images")
    assert proc.returncode == 2 and "no checkpoint has precision >= 1.0 and recall >= 1.0" in proc.stderr
    assert not (out / "best.json").exists()


def test_a_hand_edited_txt_is_never_overwritten(trained, tmp_path):
    """Issue 12.3: re-evaluating keeps an edited prediction txt (moved aside, named) and writes the new one."""
    run, _ = trained
    out = tmp_path / "out"
    run_script("evaluate.py", f"checkpoint={run / 'epoch_002.pth'}", f"out_dir={out}")
    txt = out / "epoch_002.txt"
    untouched = txt.read_text()
    # An untouched txt is simply rewritten.
    run_script("evaluate.py", f"checkpoint={run / 'epoch_002.pth'}", f"out_dir={out}")
    assert not list(out.glob("*.edited-*.txt"))
    # Fix a label by hand, recompute its metrics, then evaluate the checkpoint again.
    lines = untouched.split("\n")
    i = next(n for n, line in enumerate(lines) if line and not line.startswith("#"))
    fields = lines[i].split(" ")
    fields[2], fields[3] = fields[3], fields[2]
    lines[i] = " ".join(fields)
    edited = "\n".join(lines)
    txt.write_text(edited)
    run_script("evaluate.py", f"predictions={txt}")
    proc = run_script("evaluate.py", f"checkpoint={run / 'epoch_002.pth'}", f"out_dir={out}")
    kept = list(out.glob("epoch_002.edited-*.txt"))
    assert len(kept) == 1 and kept[0].read_text() == edited and str(kept[0]) in proc.stdout
    assert txt.read_text().split("# date")[0] == untouched.split("# date")[0]


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
    other_train, other_val = make_folders(
        tmp_path / "other", classes=("cat", "dog"), train_per_class=2, val_per_class=2
    )
    proc = run_script("evaluate.py", f"checkpoint={run / 'last.pth'}", f"data.val_dir={other_val}", check=False)
    assert proc.returncode == 2
    assert "['logo', 'others']" in proc.stderr and "cat" in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_is_evaluated_as_its_jobs_are_and_the_choice_spans_every_job(trained, tmp_path):
    """Issue 19.2: job 0 is tuned for recall of logo, job 1 for its precision (each with two epochs); the sweep's
    choice flips between them with select.metric, each job's eval/ equals evaluating that job on its own, and the
    val images are decoded once per group of jobs sharing data, size and transform."""
    run, val_dir = trained
    ckpt, gap, is_logo = _logit_gap(run, val_dir)
    sweep = tmp_path / "sweep"
    shifts = {0: -gap[is_logo].min() + 0.05, 1: -gap[~is_logo].max() - 0.05}
    for job, shift in shifts.items():
        folder = sweep / f"{job}_optimizer.lr:{0.01 * (job + 1)}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(
            json.dumps({"overrides": [f"optimizer.lr={0.01 * (job + 1)}", "trainer.epochs=2"], "status": "ok"})
        )
        for epoch in (1, 2):
            state = {**ckpt, "epoch": epoch, "model": dict(ckpt["model"])}
            further = 0.01 * (epoch - 1) * (1 if job == 0 else -1)  # epoch 2: further in the same direction
            state["model"]["fc.bias"] = ckpt["model"]["fc.bias"] + torch.tensor([shift + further, 0.0])
            torch.save(state, folder / f"epoch_{epoch:03d}.pth")
    (sweep / "2_broken").mkdir()  # a folder without checkpoints (a job that failed at start) is passed over
    jobs = sorted(p for p in sweep.iterdir() if p.name[0] in "01")

    proc = run_script(
        "evaluate.py", f"checkpoint={sweep}", f"data.val_dir={val_dir}", "select.metric=recall", "select.positive=logo"
    )
    assert proc.stdout.count("decoded ") == 1 and "job(s): 0_optimizer.lr:0.01, 1_optimizer.lr:0.02" in proc.stdout
    best = json.loads((sweep / "eval/best.json").read_text())
    assert best["job"] == jobs[0].name and best["overrides"] == {"optimizer.lr": "0.01", "trainer.epochs": "2"}
    assert best["checkpoint_path"] == str(jobs[0] / "epoch_001.pth") and best["recall"] == pytest.approx(1.0)
    rows = list(csv.DictReader((sweep / "eval/checkpoints.csv").open()))
    assert [(r["job"], r["optimizer.lr"], r["epoch"]) for r in rows] == [
        (jobs[0].name, "0.01", "1"),
        (jobs[0].name, "0.01", "2"),
        (jobs[1].name, "0.02", "1"),
        (jobs[1].name, "0.02", "2"),
    ]
    assert {"accuracy", "logo_precision", "logo_recall", "others_precision", "others_recall"} <= set(rows[0])
    assert (sweep / "eval/epoch_002_logo_pr.png").exists() is False and Path(best["predictions"]).is_file()

    run_script(
        "evaluate.py",
        f"checkpoint={sweep}",
        f"data.val_dir={val_dir}",
        "select.metric=precision",
        "select.positive=logo",
    )
    best = json.loads((sweep / "eval/best.json").read_text())
    assert best["job"] == jobs[1].name and best["precision"] == pytest.approx(1.0) and best["epoch"] == 1

    # Each job's eval/ is what evaluating that job alone writes.
    for job in jobs:
        alone = tmp_path / f"alone_{job.name}"
        run_script("evaluate.py", f"checkpoint={job}", f"data.val_dir={val_dir}", f"out_dir={alone}")
        for name in ("epoch_001", "epoch_002"):
            ours, theirs = read_predictions(job / f"eval/{name}.txt"), read_predictions(alone / f"{name}.txt")
            assert ours.paths == theirs.paths and np.array_equal(ours.probs, theirs.probs)
            assert (
                json.loads((job / f"eval/{name}.json").read_text())["per_class"]
                == json.loads((alone / f"{name}.json").read_text())["per_class"]
            )


def test_sweep_jobs_of_different_transforms_are_decoded_once_per_group(trained, tmp_path):
    run, val_dir = trained
    ckpt = torch.load(run / "epoch_002.pth", weights_only=True)
    sweep = tmp_path / "sweep"
    for job, transform in enumerate(("resize", "letterbox", "resize")):
        folder = sweep / f"{job}_transforms:{transform}"
        folder.mkdir(parents=True)
        transforms = {**ckpt["transforms"], "name": transform}
        torch.save(
            {**ckpt, "transforms": transforms, "config": {**ckpt["config"], "transforms": transforms}},
            folder / "epoch_001.pth",
        )
        (folder / "result.json").write_text(json.dumps({"overrides": [f"transforms={transform}"]}))
    proc = run_script("evaluate.py", f"checkpoint={sweep}", f"data.val_dir={val_dir}")
    assert proc.stdout.count("decoded ") == 2
    assert "job(s): 0_transforms:resize, 2_transforms:resize" in proc.stdout
    rows = list(csv.DictReader((sweep / "eval/checkpoints.csv").open()))
    assert [r["transforms"] for r in rows] == ["resize", "letterbox", "resize"]
