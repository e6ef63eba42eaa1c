"""`python -m geektime.verify`: exit codes, what it prints, and quarantine that moves but never deletes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geektime.data import open_folder
from geektime.verify import main

REPO = Path(__file__).resolve().parents[1]
REAL_DATASET = Path(__file__).resolve().parents[2] / "shared/datasets/doraemon_walle"


def good_jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")
    return path


@pytest.fixture
def dirty(tmp_path):
    """root/<class>/<image> with good and bad files; returns (root, {relative path: expected reason words})."""
    root = tmp_path / "data"
    good_jpeg(root / "cat" / "good.jpg")
    good_jpeg(root / "dog" / "sub" / "good.jpg")
    Image.new("RGBA", (8, 8)).save(root / "dog" / "png_named.jpg", "PNG")
    (root / "cat" / "empty.jpg").touch()
    data = (root / "cat" / "good.jpg").read_bytes()
    (root / "dog" / "sub" / "half.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / "page.jpeg").write_text("<html>404</html>")
    (root / "cat" / "notes.txt").write_text("not a picture")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "broken.jpg").touch()  # hidden: training never sees it
    (root / "dog" / "loop").symlink_to(root)
    bad = {"cat/empty.jpg": "empty file", "dog/page.jpeg": "HTML", "dog/sub/half.jpg": "truncated"}
    return root, bad


def test_reports_each_bad_file_with_reason(dirty, capsys):
    root, bad = dirty
    assert main([str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    for rel, words in bad.items():
        line = next(line for line in lines if line.strip().startswith(f"{root / rel}:"))
        assert words in line
    assert f"{root / 'cat' / 'notes.txt'}" in out and "ignored by training" in out
    assert ".DS_Store" not in out and ".thumbs" not in out  # hidden: only with --verbose
    assert "png_named" not in out and "good.jpg" not in out
    assert lines[-1].startswith(
        "6 files checked, 3 bad, 1 non-image file(s) ignored, 1 folder link(s) not followed, 2 hidden entries skipped."
    )
    assert f"  {root / 'dog' / 'loop'}: symlink up the tree" in out  # links are listed without --verbose
    assert "--quarantine" in lines[-1]
    assert all(p.exists() for p in root.rglob("*") if "loop" not in p.parts)  # nothing moved without --quarantine


def test_verbose_lists_hidden_and_loops(dirty, capsys):
    root, _ = dirty
    assert main([str(root), "--verbose", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'cat' / '.DS_Store'}: hidden, skipped" in out
    assert f"{root / '.thumbs'}: hidden, skipped" in out
    assert f"{root / 'dog' / 'loop'}: symlink up the tree (a loop, or other folders read as this one), skipped" in out


def test_quarantine_moves_keeping_relative_paths(dirty, tmp_path, capsys):
    root, bad = dirty
    contents = {rel: (root / rel).read_bytes() for rel in bad}
    quarantine = tmp_path / "quarantine"
    assert main([str(root), "--quarantine", str(quarantine)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"3 moved to {quarantine}")
    for rel, data in contents.items():
        assert not (root / rel).exists()
        assert (quarantine / rel).read_bytes() == data  # moved intact, not deleted
    assert sorted(p.relative_to(quarantine).as_posix() for p in quarantine.rglob("*") if p.is_file()) == sorted(bad)
    assert (root / "cat" / "good.jpg").exists() and (root / "cat" / "notes.txt").exists()
    assert main([str(root)]) == 0  # what is left trains fine; notes.txt is only listed


def test_quarantine_never_overwrites(dirty, tmp_path, capsys):
    root, _ = dirty
    quarantine = tmp_path / "quarantine"
    (quarantine / "cat").mkdir(parents=True)
    (quarantine / "cat" / "empty.jpg").write_bytes(b"earlier")
    assert main([str(root), "--quarantine", str(quarantine)]) == 1
    out = capsys.readouterr().out
    assert "not moved" in out and "already exists" in out
    assert (root / "cat" / "empty.jpg").exists()
    assert (quarantine / "cat" / "empty.jpg").read_bytes() == b"earlier"
    assert (quarantine / "dog" / "page.jpeg").exists()


def test_clean_folder_exits_zero(tmp_path, capsys):
    good_jpeg(tmp_path / "a" / "1.jpg")
    good_jpeg(tmp_path / "b" / "2.JPEG")
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "2 files checked, 0 bad"


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing"], "no such directory"),
        (["{tmp}/file.txt"], "not a directory"),
        (["{tmp}", "--quarantine", "{tmp}/bad"], "inside"),
        (["{tmp}", "--quarantine", "{tmp}/../file2.txt"], "not a directory"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path.parent / "file2.txt").write_text("x")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "bad").exists()


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main([str(tmp_path), "--workers", "0"]) == 2
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_as_a_module(dirty):
    root, _ = dirty
    result = subprocess.run(
        [sys.executable, "-m", "geektime.verify", str(root), "--workers", "1"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "3 bad" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.skipif(not REAL_DATASET.is_dir(), reason=f"real photos not present at {REAL_DATASET}")
def test_real_dataset_is_clean(capsys):
    assert main([str(REAL_DATASET)]) == 0
    assert capsys.readouterr().out.strip().endswith(" bad")


@pytest.mark.slow
def test_up_links_are_reported_and_training_reads_the_same_files(tmp_path, capsys):
    """train/ants/up -> .. made training read bees as ants while verify called it a loop: now both skip it."""
    root = tmp_path / "train"
    good_jpeg(root / "ants" / "a.jpg")
    good_jpeg(root / "bees" / "b.jpg")
    (root / "ants" / "up").symlink_to("..")
    (root / "bees" / "home").symlink_to(tmp_path)
    assert main([str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "Folder links not followed (training skips them too) (2):" in out
    assert f"  {root / 'ants' / 'up'}: symlink up the tree" in out and f"  {root / 'bees' / 'home'}: symlink up" in out
    assert out.splitlines()[-1] == "2 files checked, 0 bad, 2 folder link(s) not followed"
    folder = open_folder("data.train_dir", root)
    assert sorted(folder.samples) == [(str(root / "ants" / "a.jpg"), 0), (str(root / "bees" / "b.jpg"), 1)]


def test_extreme_aspect_ratio_is_flagged(tmp_path, capsys):
    good_jpeg(tmp_path / "cat" / "good.jpg")
    Image.new("RGB", (20000, 1)).save(tmp_path / "cat" / "strip.png")
    assert main([str(tmp_path), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"  {tmp_path / 'cat' / 'strip.png'}: extreme aspect ratio 20000x1 (more than 20:1)" in out


def test_odd_file_names_are_shown_on_one_line_and_quarantined(tmp_path):
    """A line break or bytes that are not UTF-8 in a name: shown escaped, one line each, and moved intact."""
    root, quarantine = tmp_path / "data", tmp_path / "quarantine"
    (root / "cat").mkdir(parents=True)
    broken = [os.path.join(os.fsencode(root / "cat"), name) for name in (b"two\nlines.jpg", b"caf\xe9.jpg")]
    for path in broken:
        with open(path, "wb") as f:
            f.write(b"<html>404</html>")
    good_jpeg(root / "cat" / "good.jpg")
    result = subprocess.run(
        [sys.executable, "-m", "geektime.verify", str(root), "--quarantine", str(quarantine)],
        check=False,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out = result.stdout.decode("utf-8")  # valid UTF-8 even for a Latin-1 name
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    for shown in ("two%0Alines.jpg", "caf%E9.jpg"):
        assert any(
            line.startswith(f"  {root / 'cat'}/{shown}: not an image: an HTML/XML page") for line in out.splitlines()
        ), out
    assert sorted(os.listdir(os.fsencode(quarantine / "cat"))) == [b"caf\xe9.jpg", b"two\nlines.jpg"]
