"""geektime.clean: apply a cleaning.csv (quarantine and relabel), undo it, never delete or overwrite."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image
from geektime.clean import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name, colour in (("cat", (200, 50, 40)), ("dog", (40, 60, 200))):
            for i in range(3):
                make_image(root / split / name / f"{i}.jpg", colour, seed=i + 10 * len(name) + len(split))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_cleaning(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "action", "label", "to_class"])
        writer.writerows(rows)
    return path


def test_apply_then_undo_restores_everything(data, tmp_path, capsys):
    before = snapshot(data)
    cleaning = write_cleaning(
        tmp_path / "cleaning.csv",
        [
            (str(data / "train/cat/0.jpg"), "delete", "cat", ""),
            (str(data / "val/dog/1.jpg"), "delete", "dog", ""),
            (str(data / "train/cat/2.jpg"), "move", "cat", "dog"),
            (str(data / "val/dog/2.jpg"), "move", "dog", "bird"),  # a new class folder is fine
            (str(data / "val/cat/1.jpg"), "keep", "cat", ""),
        ],
    )
    quarantine = tmp_path / "q"
    assert main(["apply", str(cleaning), "--quarantine", str(quarantine)]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 applied (2 to quarantine" in out and "2 relabeled" in out
    after = snapshot(data)
    assert sorted(set(before) - set(after)) == ["train/cat/0.jpg", "train/cat/2.jpg", "val/dog/1.jpg", "val/dog/2.jpg"]
    # train/dog/2.jpg was taken: the relabeled cat gets the next free name; the dog there is untouched.
    assert sorted(set(after) - set(before)) == ["train/dog/2_1.jpg", "val/bird/2.jpg"]
    assert (
        after["train/dog/2_1.jpg"] == before["train/cat/2.jpg"]
        and after["train/dog/2.jpg"] == before["train/dog/2.jpg"]
    )
    quarantined = snapshot(quarantine)
    assert quarantined.pop("train/cat/0.jpg") == before["train/cat/0.jpg"]  # relative to data/, both splits kept
    assert quarantined.pop("val/dog/1.jpg") == before["val/dog/1.jpg"]
    (log_name,) = quarantined  # and the undo log
    assert log_name.startswith("cleaning_undo_") and f"undo {quarantine / log_name}" in out

    assert main(["undo", str(quarantine / log_name)]) == 0
    assert "4 of 4 moved back" in capsys.readouterr().out
    assert snapshot(data) == before
    assert main(["undo", str(quarantine / log_name)]) == 1  # again: nothing left to move back, nothing harmed
    assert snapshot(data) == before


def test_refusals_are_reported_and_undo_never_overwrites(data, tmp_path, capsys):
    cleaning = write_cleaning(
        tmp_path / "cleaning.csv",
        [
            (str(data / "train/cat/9.jpg"), "delete", "cat", ""),  # no such file
            (str(data / "train/cat/1.jpg"), "move", "dog", "cat"),  # label says dog, folder says cat
            (str(data / "train/cat/2.jpg"), "delete", "cat", ""),
        ],
    )
    log = tmp_path / "undo.csv"
    assert main(["apply", str(cleaning), "--quarantine", str(tmp_path / "q"), "--log", str(log)]) == 1
    out = capsys.readouterr().out
    assert "9.jpg: not there" in out and "not in a folder named 'dog'" in out and "1 of 3 applied" in out
    assert (data / "train/cat/1.jpg").exists()
    with open(log, newline="") as f:
        assert [(r["action"], Path(r["src"]).name) for r in csv.DictReader(f)] == [("delete", "2.jpg")]
    assert (tmp_path / "q/cat/2.jpg").exists()  # relative to the folder above the class folder
    # Undo does not overwrite either: a new file where the image was stays, the image stays in quarantine.
    (data / "train/cat/2.jpg").write_bytes(b"new")
    assert main(["undo", str(log)]) == 1
    assert "2.jpg already exists" in capsys.readouterr().out
    assert (data / "train/cat/2.jpg").read_bytes() == b"new" and (tmp_path / "q/cat/2.jpg").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,what\nx,delete\n", "no action, path column"),
        ("path,action,label,to_class\nx.jpg,burn,cat,\n", "line 2: action 'burn' is not keep, delete or move"),
        ("path,action,label,to_class\nx.jpg,move,cat,\n", "line 2: a move needs a to_class"),
    ],
)
def test_bad_cleaning_csv_is_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "c.csv").write_text(content)
    assert main(["apply", str(tmp_path / "c.csv"), "--quarantine", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


def test_cli_usage(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "geektime.clean", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = run("apply", str(tmp_path / "none.csv"), "--quarantine", str(tmp_path / "q"))
    assert result.returncode == 2
    assert result.stderr == f"error: cannot read {tmp_path / 'none.csv'}: No such file or directory\n"
    assert run("apply", str(tmp_path / "none.csv")).returncode == 2  # --quarantine is required
    (tmp_path / "log.csv").write_text("a,b\n")
    result = run("undo", str(tmp_path / "log.csv"))
    assert result.returncode == 2 and "not an undo log" in result.stderr
