from __future__ import annotations

import csv
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from geektime.metrics import (
    SelectionError,
    classification_report,
    confusion_matrix_text,
    epoch_table,
    format_report,
    format_selection,
    format_table,
    select_best,
    threshold_for,
    threshold_table,
    write_report,
    write_table_csv,
    write_threshold_outputs,
)
from geektime.predictions import Predictions, read_predictions

# Truth -> predicted: cat: cat cat dog | dog: dog dog dog bird | bird: bird dog | one unlabeled.
HAND_TXT = """\
# classes: cat dog bird
# checkpoint: epoch_003.pth
0.80000 0.15000 0.05000 1 0 0 1 0 0 val/cat/1.jpg
0.60000 0.30000 0.10000 1 0 0 1 0 0 val/cat/2.jpg
0.30000 0.50000 0.20000 1 0 0 0 1 0 val/cat/3.jpg
0.10000 0.80000 0.10000 0 1 0 0 1 0 val/dog/1.jpg
0.20000 0.70000 0.10000 0 1 0 0 1 0 val/dog/2.jpg
0.05000 0.90000 0.05000 0 1 0 0 1 0 val/dog/3.jpg
0.10000 0.30000 0.60000 0 1 0 0 0 1 val/dog/4.jpg
0.10000 0.20000 0.70000 0 0 1 0 0 1 val/bird/1.jpg
0.20000 0.40000 0.40000 0 0 1 0 1 0 val/bird/2.jpg
0.90000 0.05000 0.05000 0 0 0 1 0 0 test/unknown.jpg
"""


@pytest.fixture
def hand_txt(tmp_path):
    path = tmp_path / "eval" / "epoch_003.txt"
    path.parent.mkdir()
    path.write_text(HAND_TXT, encoding="utf-8")
    return path


def test_report_matches_hand_computed_values(hand_txt):
    report = classification_report(read_predictions(hand_txt))
    # Confusion matrix (rows true, columns predicted) counted from the lines above.
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 3, 1], [0, 1, 1]]
    assert report["num_images"] == 10 and report["num_unlabeled"] == 1
    assert report["accuracy"] == pytest.approx(6 / 9)
    expected = {  # precision = diagonal / column sum, recall = diagonal / row sum
        "cat": (2 / 2, 2 / 3, 4 / 5, 3),
        "dog": (3 / 5, 3 / 4, 2 / 3, 4),
        "bird": (1 / 2, 1 / 2, 1 / 2, 2),
    }
    for name, (p, r, f1, support) in expected.items():
        assert report["per_class"][name] == pytest.approx({"precision": p, "recall": r, "f1": f1, "support": support})
    assert report["macro"] == pytest.approx(
        {"precision": (1 + 3 / 5 + 1 / 2) / 3, "recall": 23 / 36, "f1": 59 / 90, "support": 9}
    )
    assert report["weighted"] == pytest.approx({"precision": 32 / 45, "recall": 6 / 9, "f1": 91 / 135, "support": 9})


def test_class_never_predicted_scores_zero_without_warning():
    pred = Predictions(
        classes=["a", "b"],
        probs=np.array([[0.9, 0.1], [0.8, 0.2]]),
        targets=np.array([0, 1]),
        predicted=np.array([0, 0]),
        paths=["1.jpg", "2.jpg"],
        header={},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(pred)
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_class"]["a"]["precision"] == 0.5


def test_report_needs_labels():
    pred = Predictions(["a", "b"], np.array([[0.9, 0.1]]), np.array([-1]), np.array([0]), ["1.jpg"], {})
    with pytest.raises(ValueError, match="no labeled images"):
        classification_report(pred)


def test_confusion_text_and_formatted_report(hand_txt):
    report = classification_report(read_predictions(hand_txt))
    lines = confusion_matrix_text(report).splitlines()
    assert lines[0].split() == ["true", "\\", "predicted", "cat", "dog", "bird"]
    assert [line.split() for line in lines[1:]] == [
        ["cat", "2", "1", "0"],
        ["dog", "0", "3", "1"],
        ["bird", "0", "1", "1"],
    ]
    text = format_report(report)
    assert text.startswith("accuracy 0.66667 on 9 labeled images (1 unlabeled left out)")
    rows = [line.split() for line in text.splitlines()]
    assert ["dog", "0.60000", "0.75000", "0.66667", "4"] in rows
    assert ["macro", "avg", "0.70000", "0.63889", "0.65556", "9"] in rows  # 23/36, 59/90


def test_write_report_writes_json_and_png_beside_txt(hand_txt):
    pred = read_predictions(hand_txt)
    report = write_report(pred, hand_txt)
    assert json.loads((hand_txt.parent / "epoch_003.json").read_text(encoding="utf-8")) == report
    with Image.open(hand_txt.parent / "epoch_003_confusion.png") as png:
        assert png.format == "PNG"
        lo, hi = png.convert("L").getextrema()
        assert hi - lo > 100  # drawn, not blank


def binary_report(tp: int, fn: int, fp: int, tn: int) -> dict:
    """Report for classes (logo, others) from the four counts of the logo class."""
    targets = np.array([0] * (tp + fn) + [1] * (fp + tn))
    predicted = np.array([0] * tp + [1] * fn + [0] * fp + [1] * tn)
    probs = np.eye(2)[predicted] * 0.8 + 0.1
    pred = Predictions(["logo", "others"], probs, targets, predicted, [f"{i}.jpg" for i in range(len(targets))], {})
    return classification_report(pred)


@pytest.fixture
def epoch_rows():
    # logo precision / recall: epoch 1: 6/6, 6/10 | 2: 8/10, 8/10 | 3: 9/14, 9/10 | 4: same as 2.
    # Listed out of order, so that ties must be settled by epoch number, not by position.
    return [
        ("run/epoch_004.pth", binary_report(tp=8, fn=2, fp=2, tn=8)),
        ("run/epoch_003.pth", binary_report(tp=9, fn=1, fp=5, tn=5)),
        ("run/epoch_002.pth", binary_report(tp=8, fn=2, fp=2, tn=8)),
        ("run/epoch_001.pth", binary_report(tp=6, fn=4, fp=0, tn=10)),
    ]


@pytest.mark.parametrize(
    "kwargs, checkpoint, value",
    [
        ({"metric": "precision", "positive": "logo"}, "run/epoch_001.pth", 1.0),
        ({"metric": "recall", "positive": "logo"}, "run/epoch_003.pth", 0.9),
        ({"metric": "precision", "positive": "logo", "min_recall": 0.8}, "run/epoch_002.pth", 0.8),  # tie with 4
        ({"metric": "recall", "positive": "logo", "min_precision": 0.7}, "run/epoch_002.pth", 0.8),
        ({"metric": "recall", "positive": "logo", "min_precision": 0.6, "min_recall": 0.6}, "run/epoch_003.pth", 0.9),
        # Macro F1: epoch 1 (0.75 + 5/6) / 2, epoch 2 and 4: 0.8, epoch 3 (0.75 + 0.625) / 2.
        ({"metric": "f1"}, "run/epoch_002.pth", 0.8),
        ({"metric": "accuracy"}, "run/epoch_001.pth", 0.8),  # 16/20 at epochs 1, 2 and 4
    ],
)
def test_select_best(epoch_rows, kwargs, checkpoint, value):
    best = select_best(epoch_rows, **kwargs)
    assert best["checkpoint"] == checkpoint
    assert best["value"] == pytest.approx(value)
    assert best["epoch"] == int(checkpoint[-7:-4])
    assert best[kwargs["metric"]] == best["value"]
    json.dumps(best)  # goes to best.json as is
    assert format_selection(best).startswith(f"best checkpoint: {checkpoint} (highest {kwargs['metric']}")


def test_select_best_without_epoch_numbers_ties_to_earlier_row():
    rows = [("last.pth", binary_report(8, 2, 2, 8)), ("best.pth", binary_report(8, 2, 2, 8))]
    assert select_best(rows, "f1")["checkpoint"] == "last.pth"


def test_floor_nobody_meets_is_a_clear_error(epoch_rows):
    with pytest.raises(SelectionError) as info:
        select_best(epoch_rows, "precision", positive="logo", min_recall=0.95)
    assert str(info.value) == (
        "no checkpoint has recall >= 0.95 (class 'logo'); the best recall reached is 0.90000 by run/epoch_003.pth"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "auc"}, "unknown metric 'auc'; choose one of: precision, recall, f1, accuracy"),
        ({"metric": "f1", "positive": "cat"}, "unknown class 'cat'; choose one of: logo, others"),
        ({"metric": "f1", "min_recall": 1.5}, "min_recall must lie in [0, 1]"),
    ],
)
def test_select_best_validates_arguments(epoch_rows, kwargs, message):
    with pytest.raises(ValueError) as info:
        select_best(epoch_rows, **kwargs)
    assert str(info.value).startswith(message)


def test_epoch_table_csv_and_text(epoch_rows, tmp_path):
    table = epoch_table(epoch_rows)
    assert list(table[0]) == [
        "checkpoint",
        "epoch",
        "accuracy",
        "logo_precision",
        "logo_recall",
        "others_precision",
        "others_recall",
    ]
    assert [row["epoch"] for row in table] == [4, 3, 2, 1]
    # Epoch 3: logo 9/14, 9/10; others: 5 right of the 6 predicted, of 10.
    assert table[1] == pytest.approx(
        {
            "checkpoint": "run/epoch_003.pth",
            "epoch": 3,
            "accuracy": 14 / 20,
            "logo_precision": 9 / 14,
            "logo_recall": 0.9,
            "others_precision": 5 / 6,
            "others_recall": 0.5,
        }
    )
    csv_path = tmp_path / "epochs.csv"
    write_table_csv(table, csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[1] == {
        "checkpoint": "run/epoch_003.pth",
        "epoch": "3",
        "accuracy": "0.70000",
        "logo_precision": "0.64286",
        "logo_recall": "0.90000",
        "others_precision": "0.83333",
        "others_recall": "0.50000",
    }
    text = format_table(table).splitlines()
    assert text[0].split() == list(table[0])
    assert text[2].split() == list(rows[1].values())


def test_epoch_table_rejects_mixed_classes(epoch_rows, hand_txt):
    other = classification_report(read_predictions(hand_txt))
    with pytest.raises(ValueError, match="has classes"):
        epoch_table([*epoch_rows, ("epoch_009.pth", other)])


# Scores of the positive class (logo), by truth: P = logo, N = others; the unlabeled line has the
# top score and must be left out. Two lines share 0.6, so there are 7 distinct thresholds.
THRESHOLD_TXT = "# classes: logo others\n" + "".join(
    f"{s:.5f} {1 - s:.5f} {truth} {'1 0' if s >= 0.5 else '0 1'} img{i}.jpg\n"
    for i, (s, truth) in enumerate(
        [
            (0.9, "1 0"),
            (0.8, "0 1"),
            (0.7, "1 0"),
            (0.6, "1 0"),
            (0.6, "0 1"),
            (0.4, "0 1"),
            (0.3, "1 0"),
            (0.2, "0 1"),
            (0.95, "0 0"),
        ]
    )
)


@pytest.fixture
def threshold_pred(tmp_path):
    path = tmp_path / "thr.txt"
    path.write_text(THRESHOLD_TXT, encoding="utf-8")
    return read_predictions(path)


def _rows_approx(rows):
    """pytest.approx for a list of tuples (approx itself refuses nested sequences since pytest 9.2)."""
    return [pytest.approx(row) for row in rows]


def test_threshold_table_by_hand(threshold_pred):
    # At threshold t the images with score >= t are positive; there are 4 positives in all.
    expected = [
        (0.2, 4 / 8, 4 / 4),
        (0.3, 4 / 7, 4 / 4),
        (0.4, 3 / 6, 3 / 4),
        (0.6, 3 / 5, 3 / 4),
        (0.7, 2 / 3, 2 / 4),
        (0.8, 1 / 2, 1 / 4),
        (0.9, 1 / 1, 1 / 4),
    ]
    assert threshold_table(threshold_pred, "logo") == _rows_approx(expected)


@pytest.mark.parametrize(
    "target, threshold",
    [
        ({"target_recall": 0.75}, 0.6),  # the highest threshold that keeps recall >= 0.75
        ({"target_recall": 0.5}, 0.7),
        ({"target_recall": 1.0}, 0.3),
        ({"target_precision": 0.6}, 0.6),  # the lowest threshold with precision >= 0.6
        ({"target_precision": 0.65}, 0.7),
        ({"target_precision": 0.5}, 0.2),
        ({"target_precision": 1.0}, 0.9),
    ],
)
def test_threshold_for_target(threshold_pred, target, threshold):
    found = threshold_for(threshold_pred, "logo", **target)
    assert found["threshold"] == pytest.approx(threshold)
    row = [r for r in threshold_table(threshold_pred, "logo") if r[0] == found["threshold"]][0]
    assert (found["precision"], found["recall"]) == row[1:]
    ((name, value),) = target.items()
    assert found[name] == value and found["positive"] == "logo"


def test_threshold_uses_the_positive_class_column(tmp_path):
    path = tmp_path / "three.txt"
    path.write_text(
        "# classes: cat dog bird\n"
        "0.50000 0.30000 0.20000 0 1 0 1 0 0 a.jpg\n"
        "0.10000 0.60000 0.30000 0 0 1 0 1 0 b.jpg\n"
        "0.20000 0.10000 0.70000 0 1 0 0 0 1 c.jpg\n",
        encoding="utf-8",
    )
    # dog scores: 0.3 (dog), 0.6 (bird), 0.1 (dog).
    assert threshold_table(read_predictions(path), "dog") == _rows_approx(
        [(0.1, 2 / 3, 1.0), (0.3, 1 / 2, 1 / 2), (0.6, 0.0, 0.0)]
    )


def test_unreachable_precision_is_a_clear_error(tmp_path):
    path = tmp_path / "low.txt"
    path.write_text(
        "# classes: logo others\n"
        "0.90000 0.10000 0 1 1 0 a.jpg\n"
        "0.80000 0.20000 1 0 1 0 b.jpg\n"
        "0.30000 0.70000 0 1 0 1 c.jpg\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError) as info:
        threshold_for(read_predictions(path), "logo", target_precision=0.6)
    assert str(info.value) == (
        "no threshold reaches precision 0.6 for class 'logo'; the highest precision is 0.50000 at threshold 0.80000"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"target_recall": 0.5, "target_precision": 0.5}, "exactly one of"),
        ({"target_recall": 0.0}, "(0, 1]"),
        ({"target_precision": 1.2}, "(0, 1]"),
    ],
)
def test_threshold_for_validates_targets(threshold_pred, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        threshold_for(threshold_pred, "logo", **kwargs)


def test_threshold_needs_a_labeled_positive(threshold_pred):
    no_logo = Predictions(
        threshold_pred.classes,
        threshold_pred.probs,
        np.where(threshold_pred.targets == 0, 1, threshold_pred.targets),
        threshold_pred.predicted,
        threshold_pred.paths,
        {},
    )
    with pytest.raises(ValueError, match="no labeled image of class 'logo'"):
        threshold_table(no_logo, "logo")
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        threshold_table(threshold_pred, "cat")


def test_write_threshold_outputs(threshold_pred, tmp_path):
    csv_path, png_path = write_threshold_outputs(threshold_pred, "logo", tmp_path / "epoch_002.txt")
    assert csv_path == tmp_path / "epoch_002_logo_thresholds.csv"
    assert png_path == tmp_path / "epoch_002_logo_pr.png"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["threshold", "precision", "recall"]
    assert rows[1:3] == [["0.20000", "0.50000", "1.00000"], ["0.30000", "0.57143", "1.00000"]]
    assert len(rows) == 1 + 7
    with Image.open(png_path) as png:
        lo, hi = png.convert("L").getextrema()
        assert hi - lo > 100


def test_scores_equal_scikit_learn_on_random_confusions():
    """The one implementation of precision/recall/F1 agrees with scikit-learn's (zero_division=0)."""
    from sklearn.metrics import precision_recall_fscore_support

    from geektime.metrics import confusion_matrix, scores

    rng = np.random.default_rng(0)
    for trial in range(20):
        classes = [f"c{i}" for i in range(int(rng.integers(2, 6)))]
        targets = rng.integers(0, len(classes), 40)
        predicted = np.where(rng.random(40) < 0.6, targets, rng.integers(0, len(classes), 40))
        if trial % 5 == 0:
            predicted[predicted == 0] = 1  # a class never predicted
        got = scores(confusion_matrix(targets, predicted, len(classes)), classes)
        p, r, f, s = precision_recall_fscore_support(targets, predicted, labels=range(len(classes)), zero_division=0)
        for i, name in enumerate(classes):
            assert (got[f"{name}_precision"], got[f"{name}_recall"], got[f"{name}_f1"]) == pytest.approx(
                (p[i], r[i], f[i])
            )
            assert got[f"{name}_support"] == s[i]
        assert got["macro_recall"] == pytest.approx(r.mean()) and got["accuracy"] == pytest.approx(
            (targets == predicted).mean()
        )


def test_pick_best_is_the_one_rule_for_best():
    from geektime.metrics import pick_best

    rows = [
        {"epoch": 1, "val_acc": 0.8, "val_loss": 0.5},
        {"epoch": 2, "val_acc": float("nan"), "val_loss": 0.4},
        {"epoch": 3, "val_acc": 0.8, "val_loss": 0.3},
        {"epoch": 4, "val_loss": 0.3},
    ]
    assert pick_best(rows, "val_acc")["epoch"] == 1  # NaN never wins; ties go to the earlier epoch
    assert pick_best(rows, "val_loss")["epoch"] == 3  # a loss is best lowest
    assert pick_best(rows, "val_acc", {"val_loss": 0.0}) is not None
    assert pick_best(rows, "val_acc", {"val_loss": 0.6}) is None
    assert pick_best([], "val_acc") is None
