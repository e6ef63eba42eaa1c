from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_folders, make_image, run_script, train_tiny
from geektime.predictions import (
    PredictionFormatError,
    class_index,
    printable,
    read_predictions,
    write_predictions,
)

NOT_UTF8 = os.fsdecode(b"caf\xe9 latin-1.jpg")  # a Latin-1 name: not UTF-8, held as a lone surrogate


def test_writes_the_course_format(tmp_path):
    txt = tmp_path / "epoch_001.txt"
    probs = np.array([[0.6446, 0.3554], [0.58476, 0.41524], [0.2, 0.8]])
    write_predictions(
        txt,
        ["logo", "others"],
        probs,
        np.array([0, 0, -1]),
        ["./data/val/logo/13.jpeg", "./data/val/logo/14.jpeg", "./data/test/1.jpeg"],
        header={"checkpoint": "epoch_001.pth"},
    )
    assert txt.read_text(encoding="utf-8") == (
        "# classes: logo others\n"
        "# checkpoint: epoch_001.pth\n"
        "0.64460 0.35540 1 0 1 0 ./data/val/logo/13.jpeg\n"
        "0.58476 0.41524 1 0 1 0 ./data/val/logo/14.jpeg\n"
        "0.20000 0.80000 0 0 0 1 ./data/test/1.jpeg\n"
    )


def test_written_file_has_the_usual_permissions(tmp_path):
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    txt = tmp_path / "p.txt"
    write_predictions(txt, ["a", "b"], np.array([[0.5, 0.5]]), np.array([0]), ["a.jpg"])
    assert txt.stat().st_mode == reference.stat().st_mode  # not a temporary file's private 0600
    write_predictions(txt, ["a", "b"], np.array([[0.2, 0.8]]), np.array([1]), ["b.jpg"])  # overwrite
    assert txt.read_text(encoding="utf-8").splitlines()[1] == "0.20000 0.80000 0 1 0 1 b.jpg"


def test_round_trip_keeps_odd_paths_labels_and_header(tmp_path):
    txt = tmp_path / "eval" / "epoch_002.txt"  # the writer creates eval/
    classes = ["cat", "dog", "bird"]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.123456, 0.654321, 0.222223]])
    targets = np.array([0, 2, -1, 1])
    paths = ["./val/my cat/猫 照片 1.jpg", "/abs/bird#2.png", "plain.jpg", "./val/dog/  two  spaces.jpeg"]
    header = {"checkpoint": "checkpoints/run 1/epoch_002.pth", "date": "2024-05-01 12:00:00"}
    write_predictions(txt, classes, probs, targets, paths, header)

    pred = read_predictions(txt)
    assert pred.classes == classes
    assert pred.paths == paths
    assert pred.header == header
    np.testing.assert_array_equal(pred.targets, targets)
    np.testing.assert_array_equal(pred.predicted, [0, 2, 1, 1])
    np.testing.assert_allclose(pred.probs, probs, atol=5e-6)  # 5 decimals
    assert pred.probs[3, 0] == 0.12346
    assert list(tmp_path.joinpath("eval").iterdir()) == [txt]  # no temporary file left behind


def test_reads_hand_edited_file(tmp_path):
    txt = tmp_path / "edited.txt"
    # Free-form comments, blank lines, CRLF, a BOM, tabs, and a label fixed by hand so that
    # the truth (others) now differs from the written prediction (logo).
    txt.write_bytes(
        "\ufeff# evaluated on the new val set\r\n"
        "# classes:\tlogo others\r\n"
        "\r\n"
        "0.9 0.1\t0 1 1 0 ./a b.jpg\r\n"
        "# a comment between lines\r\n"
        "0.40000 0.60000 0 0 0 1 c.jpg\r\n".encode("utf-8")
    )
    pred = read_predictions(txt)
    assert pred.classes == ["logo", "others"]
    assert pred.header == {}
    assert pred.paths == ["./a b.jpg", "c.jpg"]
    np.testing.assert_array_equal(pred.targets, [1, -1])
    np.testing.assert_array_equal(pred.predicted, [0, 1])


def test_reads_header_only_file_as_empty(tmp_path):
    txt = tmp_path / "empty.txt"
    write_predictions(txt, ["a", "b"], np.zeros((0, 2)), [], [])
    pred = read_predictions(txt)
    assert pred.probs.shape == (0, 2) and pred.targets.shape == (0,) and pred.paths == []


@pytest.mark.parametrize(
    "body, lineno, message",
    [
        ("0.5 0.5 1 0 1 0 a.jpg\n", 1, "header"),
        ("# classes: a b\n0.5 0.5 1 0 1 0\n", 2, "got 6 fields"),
        ("# classes: a b\n0.5 x 1 0 1 0 a.jpg\n", 2, "could not convert"),
        ("# classes: a b\n0.5 1.5 1 0 1 0 a.jpg\n", 2, "[0, 1]"),
        ("# classes: a b\nnan 0.5 1 0 1 0 a.jpg\n", 2, "[0, 1]"),
        ("# classes: a b\n\n0.5 0.5 1 1 1 0 a.jpg\n", 3, "exactly one 1 (or all zeros"),
        ("# classes: a b\n0.5 0.5 2 0 1 0 a.jpg\n", 2, "only 0 and 1"),
        ("# classes: a b\n0.5 0.5 1 0 0 0 a.jpg\n", 2, "must contain exactly one 1"),
        ("# classes: a a\n", 1, "duplicate class names: a"),
        ("# classes: a b\n# classes: a b\n", 2, "appears twice"),
        ("# classes: a b\n0.50000 0.40000 1 0 1 0 a.jpg\n", 2, "'0.50000 0.40000' sum to 0.90000, not 1"),
        ("# classes: a b c\n0.33334 0.33334 0.33334 1 0 0 1 0 0 a.jpg\n", 2, "sum to 1.00002, not 1"),
        (
            "# classes: a b\n0.9 0.1 1 0 1 0 a.jpg\n# note\n0.2 0.8 0 1 0 1 a.jpg\n",
            4,
            "image 'a.jpg' appears twice, on lines 2 and 4",
        ),
        ("# classes: a b\n# escaping: base64\n", 2, "unknown escaping 'base64'"),
        ("# classes: a%20b a%20%62\n# escaping: percent\n", 1, "duplicate class names: a b"),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path, body, lineno, message):
    txt = tmp_path / "bad.txt"
    txt.write_text(body, encoding="utf-8")
    with pytest.raises(PredictionFormatError) as info:
        read_predictions(txt)
    assert str(info.value).startswith(f"{txt}:{lineno}: ")
    assert message in str(info.value)


def test_file_without_classes_header(tmp_path):
    txt = tmp_path / "no_header.txt"
    txt.write_text("# checkpoint: x.pth\n", encoding="utf-8")
    with pytest.raises(PredictionFormatError, match="no '# classes:"):
        read_predictions(txt)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ["", "dog"]}, "class name '' must be a non-empty string"),
        ({"classes": ["cat", "cat"]}, "duplicate class names: cat"),
        ({"classes": ["cat", "\ud800"]}, "'%ED%A0%80' holds a lone surrogate"),
        ({"probs": np.array([[0.5, 0.5, 0.0]])}, "shape (N, 2)"),
        ({"probs": np.array([[2.0, -1.0]])}, "softmax"),
        ({"targets": np.array([2])}, "class indices"),
        ({"targets": np.array([0.0])}, "integers"),
        ({"paths": ["a.jpg", "b.jpg"]}, "2 paths for 1 rows"),
        ({"paths": [""]}, "image path is empty"),
        (
            {"probs": np.array([[0.5, 0.5]] * 2), "targets": np.array([0, 1]), "paths": ["a.jpg", "a.jpg"]},
            "image paths appear more than once: a.jpg",
        ),
        ({"probs": np.array([[0.6, 0.6]])}, "probs row 0 (a.jpg) sums to 1.20000, not 1"),
        ({"header": {"classes": "x y"}}, "bad header item 'classes'"),
        ({"header": {"escaping": "none"}}, "bad header item 'escaping'"),
        ({"header": {"my key": "v"}}, "bad header item 'my key'"),
    ],
)
def test_writer_rejects_bad_input_and_keeps_old_file(tmp_path, kwargs, message):
    txt = tmp_path / "p.txt"
    txt.write_text("previous content", encoding="utf-8")
    args = {"classes": ["cat", "dog"], "probs": np.array([[0.5, 0.5]]), "targets": np.array([0]), "paths": ["a.jpg"]}
    with pytest.raises(ValueError) as info:
        write_predictions(txt, **{**args, **kwargs})
    assert message in str(info.value)
    assert txt.read_text(encoding="utf-8") == "previous content"
    assert list(tmp_path.iterdir()) == [txt]


def test_class_index_lists_choices():
    assert class_index(["a", "b"], "b") == 1
    with pytest.raises(ValueError, match="unknown class 'c'; choose one of: a, b"):
        class_index(["a", "b"], "c")


# ---------------------------------------------------------------- names a plain line cannot hold

ODD_CLASSES = ["big cat", "tab\there", " edge ", "100%", "dog"]
ODD_PATHS = [
    "./val/big cat/two\nlines.jpg",  # a line break in a file name
    "./val/dog/cr\rreturn.png",
    "./val/dog/" + NOT_UTF8,
    " leading and trailing space.jpg ",
    "./val/dog/%41 is not A.jpg",  # a literal "%" must not be read as an escape
    "./val/dog/line\u2028separator.jpg",
    "./val/dog/ideographic\u3000space and 猫.jpg",
]


def test_any_class_name_and_path_round_trips(tmp_path):
    txt = tmp_path / "odd.txt"
    probs = np.full((len(ODD_PATHS), len(ODD_CLASSES)), 0.2)
    targets = np.array([0, 1, 2, 3, 4, -1, 0])
    header = {"data": "./val\nnew", "checkpoint": " run/epoch_001.pth"}
    write_predictions(txt, ODD_CLASSES, probs, targets, ODD_PATHS, header)
    pred = read_predictions(txt)
    assert pred.classes == ODD_CLASSES
    assert pred.paths == ODD_PATHS
    assert pred.header == header
    np.testing.assert_array_equal(pred.targets, targets)
    for path in pred.paths:  # the same file names the file system holds
        assert os.fsdecode(os.fsencode(path)) == path


def test_escaped_file_stays_readable_and_hand_editable(tmp_path):
    txt = tmp_path / "odd.txt"
    write_predictions(
        txt,
        ["big cat", "dog"],
        np.array([[0.25, 0.75], [1.0, 0.0]]),
        np.array([0, 1]),
        ["./val/big cat/two\nlines 100%.jpg", "./val/dog/" + NOT_UTF8],
    )
    text = txt.read_text(encoding="utf-8")  # valid UTF-8 whatever the names held
    assert text == (
        "# classes: big%20cat dog\n"
        "# escaping: percent\n"
        "0.25000 0.75000 1 0 0 1 ./val/big cat/two%0Alines 100%25.jpg\n"
        "1.00000 0.00000 0 1 1 0 ./val/dog/caf%E9 latin-1.jpg\n"
    )
    # a person relabels the first image and adds one by hand, typing a path with a space and a bare "%"
    txt.write_text(
        text.replace("1 0 0 1 ./val/big", "0 1 0 1 ./val/big")
        + "0.50000 0.50000 1 0 1 0 ./val/big cat/new 5% off.jpg\n",
        encoding="utf-8",
    )
    pred = read_predictions(txt)
    assert pred.paths[0] == "./val/big cat/two\nlines 100%.jpg"
    assert pred.paths[2] == "./val/big cat/new 5% off.jpg"
    np.testing.assert_array_equal(pred.targets, [1, 1, 0])


def test_files_without_the_escaping_header_read_as_written(tmp_path):
    """Files written before escaping existed (or by hand) keep every "%" as it is."""
    txt = tmp_path / "old.txt"
    txt.write_text("# classes: 100% dog\n0.50000 0.50000 1 0 1 0 ./val/100%/a%20b.jpg\n", encoding="utf-8")
    pred = read_predictions(txt)
    assert pred.classes == ["100%", "dog"] and pred.paths == ["./val/100%/a%20b.jpg"]
    write_predictions(txt, pred.classes, pred.probs, pred.targets, pred.paths)  # nothing to escape: unchanged
    assert txt.read_text(encoding="utf-8").startswith("# classes: 100% dog\n0.50000 0.50000 1 0 1 0 ./val/100%/a%20b")


def test_file_that_is_not_utf8_names_file_and_line(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"# classes: a b\n0.5 0.5 1 0 1 0 ok.jpg\n0.5 0.5 1 0 1 0 caf\xe9.jpg\n")
    with pytest.raises(PredictionFormatError, match=rf"^{txt}:3: not UTF-8 text \(byte 0xE9\)"):
        read_predictions(txt)


@pytest.mark.parametrize("num_classes", [2, 3, 7, 1000])
def test_rounded_softmax_rows_are_accepted(tmp_path, num_classes):
    """Rows of a real softmax (float32, any class count) written with 5 decimals read back: the sum check only
    catches rows that are not probabilities."""
    logits = np.random.default_rng(num_classes).normal(0, 3, (200, num_classes)).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = probs / probs.sum(1, keepdims=True)
    txt = tmp_path / "softmax.txt"
    write_predictions(
        txt, [f"c{i}" for i in range(num_classes)], probs, np.zeros(200, dtype=int), [f"{i}.jpg" for i in range(200)]
    )
    np.testing.assert_allclose(read_predictions(txt).probs, probs, atol=5.1e-6)


def test_printable_shows_odd_names_on_one_line():
    assert printable("./val/big cat/100% two\nlines.jpg") == "./val/big cat/100% two%0Alines.jpg"
    assert printable("./val/" + NOT_UTF8) == "./val/caf%E9 latin-1.jpg"
    assert printable("猫 photo.jpg") == "猫 photo.jpg"


# ---------------------------------------------------------------- end to end: odd folder and file names

ODD_FILES = [b"two\nlines.jpg", b"caf\xe9 latin-1.jpg", b" edge .jpg", b"100%25.jpg"]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """A run trained on class folders with whitespace in their names, evaluated on files with a line break,
    bytes that are not UTF-8 and surrounding spaces in theirs."""
    root = tmp_path_factory.mktemp("odd")
    train_dir, val_dir = make_folders(
        root / "data", classes=("big cat", "hot\u00a0dog"), train_per_class=4, val_per_class=2
    )
    for i, name in enumerate(ODD_FILES):
        make_image(Path(os.fsdecode(os.path.join(os.fsencode(val_dir / "big cat"), name))), (40, 60, 200), seed=90 + i)
    run = root / "run"
    train_tiny(run, train_dir, val_dir, "trainer.epochs=1")
    evaluation = run_script("evaluate.py", f"checkpoint={run}", check=False)
    return val_dir, run, evaluation


@pytest.mark.slow
def test_odd_class_and_file_names_train_and_evaluate(odd_run):
    val_dir, run, evaluation = odd_run
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    pred = read_predictions(run / "eval" / "epoch_001.txt")
    assert pred.classes == ["big cat", "hot\u00a0dog"]
    on_disk = {
        os.fsdecode(os.path.join(os.fsencode(val_dir / c), name)): i
        for i, c in enumerate(pred.classes)
        for name in os.listdir(os.fsencode(val_dir / c))
    }
    assert dict(zip(pred.paths, pred.targets.tolist())) == on_disk  # every file, exactly, with its class
    assert all(Path(p).is_file() for p in pred.paths)


@pytest.mark.slow
def test_odd_names_verify_like_training(odd_run):
    val_dir, _, _ = odd_run
    proc = subprocess.run(
        [sys.executable, "-m", "geektime.verify", str(val_dir)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{4 + len(ODD_FILES)} files checked, 0 bad"


@pytest.mark.slow
def test_odd_names_show_in_badcases(odd_run, tmp_path):
    _, run, _ = odd_run
    pred = read_predictions(run / "eval" / "epoch_001.txt")
    txt = tmp_path / "relabelled.txt"  # every label flipped, as by a hand edit: every image is a bad case
    write_predictions(txt, pred.classes, pred.probs, 1 - pred.predicted, pred.paths, pred.header)
    out = tmp_path / "gallery.html"
    proc = subprocess.run(
        [sys.executable, "-m", "geektime.badcases", str(txt), "--out", str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")[-3000:]
    page = out.read_text(encoding="utf-8")  # a valid UTF-8 page whatever the file names hold
    lines = proc.stdout.decode("utf-8").splitlines()
    for path in pred.paths:  # each on one line of the table and in the page, escaped where it must be
        assert any(line.endswith(printable(path)) for line in lines), (path, lines)
        assert html.escape(printable(path)) in page
