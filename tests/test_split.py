"""geektime.split: the pure assign_splits rule, and the command on real files."""

from __future__ import annotations

import csv
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geektime.split import assign_splits, main


def by_class(counts: dict[str, int]) -> dict[str, list[str]]:
    return {name: [f"{name}/{i:03d}.jpg" for i in range(n)] for name, n in counts.items()}


def tally(splits: dict[str, str]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for path, split in splits.items():
        key = (path.split("/")[0], split)
        out[key] = out.get(key, 0) + 1
    return out


def test_stratified_counts():
    paths = by_class({"cat": 50, "dog": 10, "owl": 3})
    splits = assign_splits(paths, 0.2, 0.1, seed=0)
    assert set(splits) == {p for ps in paths.values() for p in ps}
    assert tally(splits) == {
        ("cat", "train"): 35,
        ("cat", "val"): 10,
        ("cat", "test"): 5,
        ("dog", "train"): 7,
        ("dog", "val"): 2,
        ("dog", "test"): 1,
        ("owl", "train"): 2,
        ("owl", "val"): 1,
    }  # round(0.3) = 0 test


def test_deterministic_whatever_the_order_and_seed_dependent():
    paths = by_class({"cat": 40, "dog": 30})
    first = assign_splits(paths, 0.25, seed=3)
    shuffled = {name: random.Random(1).sample(ps, len(ps)) for name, ps in reversed(list(paths.items()))}
    assert assign_splits(shuffled, 0.25, seed=3) == first
    assert assign_splits(paths, 0.25, seed=4) != first
    # Another class does not move this one's images.
    assert {
        p: s for p, s in assign_splits({**paths, "owl": ["owl/1.jpg"]}, 0.25, seed=3).items() if not p.startswith("owl")
    } == first


def test_groups_stay_on_one_side_for_every_seed():
    paths = by_class({"cat": 20, "dog": 12})
    groups = [
        ["cat/000.jpg", "cat/001.jpg", "cat/002.jpg"],
        ["dog/005.jpg", "dog/006.jpg"],
        ["cat/010.jpg", "dog/010.jpg", "dog/011.jpg"],  # across classes: counted with dog (2 of 3)
        ["cat/019.jpg", "elsewhere.jpg"],
    ]  # only one known member: no group
    for seed in range(40):
        splits = assign_splits(paths, 0.3, 0.1, seed=seed, groups=groups)
        for group in groups[:3]:
            assert len({splits[p] for p in group}) == 1, (seed, group)
        counts = tally(splits)
        assert abs(counts.get(("cat", "val"), 0) - 6) <= 2 and abs(counts.get(("dog", "val"), 0) - 4) <= 2
    assert "elsewhere.jpg" not in splits


@pytest.mark.parametrize(
    "valid, test, message",
    [(1.0, 0, "valid_pct must be"), (-0.1, 0, "valid_pct must be"), (0.6, 0.4, "must be below 1")],
)
def test_bad_percentages(valid, test, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(by_class({"cat": 3}), valid, test)


def picture(path: Path, seed: int, size=(64, 48)) -> None:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=92)


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "all"
    for i in range(10):
        picture(src / "cat" / f"c{i}.jpg", i)
        picture(src / "dog" / ("sub" if i % 2 else "") / f"d{i}.jpg", 100 + i)
    with Image.open(src / "cat/c0.jpg") as im:  # a bigger, recompressed copy of c0: must stay with it
        im.resize((128, 96), Image.BICUBIC).save(src / "cat/c0_big.jpg", quality=70)
    picture(src / "_failed" / "x.jpg", 999)  # download's failures: not a class
    (src / ".cache").mkdir()
    return src


def read_split_csv(out: Path) -> list[dict]:
    with open(out / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_links_records_and_keeps_groups(source, tmp_path, capsys):
    out = tmp_path / "split"
    assert main([str(source), str(out), "--valid-pct", "0.2", "--test-pct", "0.1", "--seed", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 near-duplicate group(s) kept together; 21 hard-linked, 0 copied" in printed
    rows = read_split_csv(out)
    assert len(rows) == 21 and {r["class"] for r in rows} == {"cat", "dog"}
    for row in rows:
        placed = out / row["file"]
        assert placed.samefile(source / row["path"])  # a hard link, not a copy
        assert Path(row["file"]).parts[:2] == (row["split"], row["class"])
    assert Path(next(r["file"] for r in rows if r["path"] == "dog/sub/d1.jpg")).parts[2:] == ("sub", "d1.jpg")
    group = [r for r in rows if r["group"]]
    assert sorted(r["path"] for r in group) == ["cat/c0.jpg", "cat/c0_big.jpg"]
    assert group[0]["split"] == group[1]["split"]
    assert sorted(p.name for p in out.iterdir()) == ["split.csv", "test", "train", "val"]
    assert sum(1 for r in rows if r["class"] == "dog" and r["split"] == "val") == 2

    again = tmp_path / "again"
    assert main([str(source), str(again), "--valid-pct", "0.2", "--test-pct", "0.1", "--seed", "1", "--quiet"]) == 0
    assert (again / "split.csv").read_text() == (out / "split.csv").read_text()


def test_copies_when_links_are_impossible(source, tmp_path, monkeypatch, capsys):
    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "split"
    assert main([str(source), str(out), "--no-groups", "--quiet"]) == 0
    assert "0 hard-linked, 21 copied" in capsys.readouterr().out
    for row in read_split_csv(out):
        assert not (out / row["file"]).samefile(source / row["path"])
        assert (out / row["file"]).read_bytes() == (source / row["path"]).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["split.csv", "train", "val"]


def test_refuses_to_overwrite_or_nest(source, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for out, message in ((taken, "exists and is not an empty folder"), (source / "split", "must be outside")):
        with pytest.raises(SystemExit) as exc:
            main([str(source), str(out), "--quiet"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    shutil.rmtree(source / "cat")
    shutil.rmtree(source / "dog")
    assert main([str(source), str(tmp_path / "o"), "--quiet"]) == 2
    assert "no class folders with images" in capsys.readouterr().err
