"""geektime.predict: the same probabilities as `evaluate.py data.test_dir=`, from a checkpoint or an export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_folders, make_image, run_script, train_tiny
from geektime import predict
from geektime.export import export
from geektime.predictions import read_predictions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 1-epoch ResNet-18 run, its ONNX and TorchScript exports, and evaluate.py's txt on an unlabeled folder."""
    root = tmp_path_factory.mktemp("predict")
    train_dir, val_dir = make_folders(root / "data")
    unlabeled = root / "unlabeled"
    for i in range(12):  # a flat folder of photos of varied sizes; a name with a space must survive the txt
        make_image(
            unlabeled / f"photo {i:02d}.jpg",
            (120, 60, 200) if i % 2 else (200, 90, 40),
            size=(50 + 7 * i, 41),
            seed=700 + i,
        )
    run = root / "run"
    train_tiny(run, train_dir, val_dir, "trainer.epochs=1")
    ckpt = run / "last.pth"
    export(ckpt, "onnx", root / "onnx")
    export(ckpt, "torchscript", root / "ts")
    run_script("evaluate.py", f"checkpoint={ckpt}", f"data.test_dir={unlabeled}")
    return {
        "ckpt": ckpt,
        "onnx": root / "onnx" / "model.onnx",
        "torchscript": root / "ts" / "model.pt",
        "unlabeled": unlabeled,
        "expected": read_predictions(run / "eval" / "last_test.txt"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("model,tolerance", [("ckpt", 1e-5), ("onnx", 1e-4), ("torchscript", 1e-4)])
def test_predict_txt_equals_evaluate(setup, tmp_path, model, tolerance):
    out = tmp_path / "pred.txt"
    args = [str(setup[model]), str(setup["unlabeled"]), "--out", str(out)]
    if model == "ckpt":  # the real command line once
        proc = subprocess.run(
            [sys.executable, "-m", "geektime.predict", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    else:
        assert predict.main(args) == 0
    got, expected = read_predictions(out), setup["expected"]
    assert len(got.paths) == 12 and got.paths == expected.paths and got.classes == expected.classes
    assert (got.targets == -1).all()  # the all-zero truth block of unlabeled images
    np.testing.assert_allclose(got.probs, expected.probs, atol=tolerance + 1e-9, rtol=0)
    assert (got.predicted == got.probs.argmax(1)).all()


@pytest.mark.slow
def test_json_top_k_and_default_txt_location(setup, capsys):
    assert predict.main([str(setup["onnx"]), str(setup["unlabeled"]), "--json", "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["backend"] == "onnxruntime" and doc["classes"] == ["blue", "red"]
    expected = setup["expected"]
    assert [image["path"] for image in doc["images"]] == expected.paths
    for image, probs in zip(doc["images"], expected.probs):
        assert len(image["top_k"]) == 1 and image["top_k"][0][0] == image["result"]
        assert image["result"] == expected.classes[int(np.argmax(probs))]
        np.testing.assert_allclose([image["probabilities"][c] for c in doc["classes"]], probs, atol=1e-4)
    default_txt = setup["onnx"].parent / "predict" / "unlabeled.txt"
    assert str(default_txt) in captured.err
    assert read_predictions(default_txt).paths == expected.paths


@pytest.mark.slow
def test_single_files_text_output_and_bad_images(setup, tmp_path, capsys):
    good = min(setup["unlabeled"].iterdir())
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text, not a JPEG")
    assert predict.main([str(setup["ckpt"]), str(good), str(bad), "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[0]
    expected = setup["expected"]
    index = expected.paths.index(str(good))
    top = expected.classes[int(expected.probs[index].argmax())]
    assert line.startswith(f"{good}: {top} ")
    assert f"skipped {bad}: not an image: a text file" in captured.err
    assert predict.main([str(setup["ckpt"]), str(bad)]) == 2


def test_usage_errors(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    image = tmp_path / "a.jpg"
    make_image(image, (10, 20, 30))
    assert predict.main([str(model), str(image)]) == 2
    assert "model.json: missing" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "none.pth"), str(image)]) == 2
    assert "no such model file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main([str(model), str(empty)]) == 2
    assert "no images" in capsys.readouterr().err
