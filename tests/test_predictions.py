from __future__ import annotations

import numpy as np
import pytest

from geektime.predictions import PredictionFormatError, class_index, read_predictions, write_predictions


def test_writes_the_course_format(tmp_path):
    txt = tmp_path / "epoch_001.txt"
    probs = np.array([[0.6446, 0.3554], [0.58476, 0.41524], [0.2, 0.8]])
    write_predictions(
        txt, ["logo", "others"], probs, np.array([0, 0, -1]),
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
        ({"classes": ["big cat", "dog"]}, "'big cat' is empty or contains whitespace"),
        ({"classes": ["cat", "cat"]}, "duplicate class names: cat"),
        ({"probs": np.array([[0.5, 0.5, 0.0]])}, "shape (N, 2)"),
        ({"probs": np.array([[2.0, -1.0]])}, "softmax"),
        ({"targets": np.array([2])}, "class indices"),
        ({"targets": np.array([0.0])}, "integers"),
        ({"paths": ["a.jpg", "b.jpg"]}, "2 paths for 1 rows"),
        ({"paths": ["two\nlines.jpg"]}, "line break"),
        ({"paths": [" leading.jpg"]}, "whitespace"),
        ({"header": {"classes": "x y"}}, "bad header item 'classes'"),
        ({"header": {"my key": "v"}}, "bad header item 'my key'"),
        ({"header": {"note": "a\nb"}}, "values are one line"),
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
