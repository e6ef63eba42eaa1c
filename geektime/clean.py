"""Apply the choices made in a bad-case gallery, and take them back: `python -m geektime.clean apply|undo`.

    python -m geektime.clean apply cleaning.csv --quarantine data/_quarantine
    python -m geektime.clean undo data/_quarantine/cleaning_undo_20260101-120000.csv

cleaning.csv (written by the gallery of geektime.badcases) has the columns path,action,label,to_class:
* delete: the image moves to the quarantine, under its path relative to the folder above the class folders
  of all the rows (data/train/cat/x.jpg -> QDIR/train/cat/x.jpg when rows span data/train and data/val);
* move: the image moves to the sibling class folder `to_class` (data/train/cat/x.jpg -> data/train/dog/x.jpg);
  a row whose image is not in a folder named `label` is refused, as the image was not where its label says.
Nothing is deleted or overwritten: where the target name is taken (class folders often all hold 0.jpg,
1.jpg, ...) the image gets the first free name <stem>_1, <stem>_2, ...; a row whose image is gone is reported.
Every move is appended to the undo log (action,src,dst) as soon as it is made, so the log is right even if
the run stops half way; `undo` moves each file back, last first, again never overwriting.

Exit status: 0 all rows applied (or undone), 1 some were left (listed), 2 usage error.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geektime.images import move_file

LOG_FIELDS = ("action", "src", "dst")


class CleaningError(ValueError):
    """A cleaning.csv or undo log that cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class Move:
    action: str
    src: Path
    dst: Path


def read_cleaning(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"path", "action"} - set(reader.fieldnames or ())
        if missing:
            raise CleaningError(
                f"{path}: no {', '.join(sorted(missing))} column; expected the header "
                "path,action,label,to_class (as the bad-case gallery writes it)"
            )
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        action = (row.get("action") or "").strip()
        if action not in ("delete", "move", "keep"):
            raise CleaningError(f"{path}, line {line}: action {action!r} is not keep, delete or move")
        if action == "move" and not (row.get("to_class") or "").strip():
            raise CleaningError(f"{path}, line {line}: a move needs a to_class")
        if not (row.get("path") or "").strip():
            raise CleaningError(f"{path}, line {line}: empty path")
    return [row for row in rows if row["action"].strip() != "keep"]


def plan(rows: list[dict[str, str]], quarantine: Path) -> tuple[list[Move], list[str]]:
    """The moves the rows ask for, and the rows refused (with why)."""
    paths = [Path(row["path"]).absolute() for row in rows]
    deletes = [p for p, row in zip(paths, rows) if row["action"].strip() == "delete"]
    root = Path(os.path.commonpath([p.parent.parent for p in deletes])) if deletes else None
    moves, refused = [], []
    for path, row in zip(paths, rows):
        label = (row.get("label") or "").strip()
        if row["action"].strip() == "delete":
            moves.append(Move("delete", path, quarantine.absolute() / path.relative_to(root)))
        elif label and path.parent.name != label:
            refused.append(f"{path}: not in a folder named {label!r} (its label); move it by hand")
        else:
            moves.append(Move("move", path, path.parent.parent / row["to_class"].strip() / path.name))
    return moves, refused


def free_name(path: Path) -> Path:
    """`path`, or <stem>_<n><suffix> with the smallest n that names nothing yet."""
    n = 0
    candidate = path
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def carry_out(
    moves: list[Move], record: Callable[[Move], None] | None = None, rename: bool = True
) -> tuple[int, list[str]]:
    """Make the moves, never overwriting: a taken target gets a free name (`rename`) or the move is left.

    `record` is called with each move as made (its real target); returns (done, problems)."""
    done, problems = 0, []
    for move in moves:
        if not move.src.exists():
            problems.append(f"{move.src}: not there (moved already?)")
            continue
        dst = free_name(move.dst) if rename else move.dst
        if (why := move_file(move.src, dst)) is not None:
            problems.append(f"{move.src}: not moved: {why}")
            continue
        if record is not None:
            record(Move(move.action, move.src, dst))
        done += 1
    return done, problems


def read_log(path: Path) -> list[Move]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != LOG_FIELDS:
            raise CleaningError(f"{path}: not an undo log of geektime.clean (expected the header action,src,dst)")
        return [Move(row["action"], Path(row["src"]), Path(row["dst"])) for row in reader]


def apply(cleaning: Path, quarantine: Path, log: Path | None = None) -> int:
    rows = read_cleaning(cleaning)
    if not rows:
        print(f"{cleaning}: nothing to delete or move")
        return 0
    moves, refused = plan(rows, quarantine)
    log = log or quarantine / f"cleaning_undo_{time.strftime('%Y%m%d-%H%M%S')}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    new_log = not log.exists() or log.stat().st_size == 0
    with open(log, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(LOG_FIELDS)

        def record(move: Move) -> None:
            writer.writerow([move.action, move.src, move.dst])
            f.flush()

        done, problems = carry_out(moves, record)
    deleted = sum(m.action == "delete" for m in moves)
    for problem in refused + problems:
        print(f"  left: {problem}")
    print(
        f"{done} of {len(rows)} applied ({deleted} to quarantine {quarantine}, {len(moves) - deleted} relabeled)"
        f"\nundo with: python -m geektime.clean undo {log}"
    )
    return 1 if refused or problems else 0


def undo(log: Path) -> int:
    moves = [Move(m.action, m.dst, m.src) for m in reversed(read_log(log))]
    done, problems = carry_out(moves, rename=False)  # back to the exact name it had
    for problem in problems:
        print(f"  left: {problem}")
    print(f"{done} of {len(moves)} moved back")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.clean",
        description=(
            "Apply a cleaning.csv from the bad-case gallery (deletes go to a quarantine, relabels to their class "
            "folder) with an undo log, or undo one. Nothing is ever deleted."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    apply_parser = commands.add_parser("apply", help="move the images as cleaning.csv says")
    apply_parser.add_argument("cleaning", type=Path, help="cleaning.csv downloaded from the gallery")
    apply_parser.add_argument(
        "--quarantine",
        type=Path,
        required=True,
        metavar="QDIR",
        help="where deleted images go (kept, with their relative paths)",
    )
    apply_parser.add_argument("--log", type=Path, help="undo log (default: QDIR/cleaning_undo_<time>.csv)")
    undo_parser = commands.add_parser("undo", help="move back what an apply moved")
    undo_parser.add_argument("log", type=Path, help="the undo log an apply wrote")
    args = parser.parse_args(argv)
    source = args.cleaning if args.command == "apply" else args.log
    try:
        return apply(args.cleaning, args.quarantine, args.log) if args.command == "apply" else undo(args.log)
    except CleaningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as err:
        print(f"error: cannot read {source}: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
