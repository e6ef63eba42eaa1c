"""Split one folder of class folders into train/val(/test): `python -m geektime.split <src> <out>`.

    python -m geektime.split data/all data/split --valid-pct 0.2 [--test-pct 0.1] [--seed 0]

SRC holds <class>/<images>; folders whose names start with "." or "_" (download's _failed, openimages'
_images) are not classes. OUT receives train/<class>/, val/<class>/ and, with --test-pct, test/<class>/, as
hard links to the originals where the file system allows (no extra space, nothing moved), else copies, and
split.csv: path (under SRC), class, split, file (under OUT), group (near-duplicate group number, or empty).

assign_splits is the rule, kept pure so that training can split one folder the same way:
* stratified: each class gets round(n * pct) images in val (and test), the rest in train;
* near duplicates stay together: each group (geektime.dedup's exact and pHash pairs, chained) lands whole on
  one side, counted against the class most of its images have, so a copy cannot leak across splits;
* deterministic: the same files, percentages and seed give the same split, whatever the listing order; a
  class is shuffled by a generator seeded with (seed, class name), so adding a class moves no other class.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from geektime.images import list_images

SPLITS = ("train", "val", "test")
P = TypeVar("P", bound=Hashable)


def assign_splits(
    paths_by_class: Mapping[str, Sequence[P]],
    valid_pct: float,
    test_pct: float = 0.0,
    seed: int = 0,
    groups: Iterable[Iterable[P]] | None = None,
) -> dict[P, str]:
    """{path: "train" | "val" | "test"} by the rules in the module docstring.

    `groups`: collections of paths that must share a split (paths not in `paths_by_class` are ignored; a path in
    several groups stays with the first). Raises ValueError for percentages outside [0, 1) or summing to 1 or more.
    """
    for name, pct in (("valid_pct", valid_pct), ("test_pct", test_pct)):
        if not 0 <= pct < 1:
            raise ValueError(f"{name} must be at least 0 and below 1, got {pct}")
    if valid_pct + test_pct >= 1:
        raise ValueError(
            f"valid_pct + test_pct must be below 1 (something must be left to train on), got {valid_pct} + {test_pct}"
        )
    label = {p: c for c, paths in paths_by_class.items() for p in paths}
    units: list[list[P]] = []
    grouped: set[P] = set()
    for group in groups or ():
        members = sorted({p for p in group if p in label and p not in grouped}, key=str)
        if len(members) > 1:
            units.append(members)
            grouped.update(members)
    units += [[p] for p in label if p not in grouped]
    by_class: dict[str, list[list[P]]] = {c: [] for c in paths_by_class}
    for unit in units:
        votes = Counter(label[p] for p in unit)
        home = min(votes, key=lambda c: (-votes[c], c))
        by_class[home].append(unit)

    result: dict[P, str] = {}
    for name in sorted(by_class):
        class_units = sorted(by_class[name], key=lambda u: str(u[0]))
        random.Random(f"{seed}/{name}").shuffle(class_units)
        total = sum(len(u) for u in class_units)
        wanted = {"val": round(total * valid_pct), "test": round(total * test_pct)}
        while total and wanted["val"] + wanted["test"] >= total:  # leave at least one to train on
            wanted["test" if wanted["test"] else "val"] -= 1
        have = {"val": 0, "test": 0}
        for unit in class_units:
            split = "train"
            for candidate in ("val", "test"):
                gap = wanted[candidate] - have[candidate]
                if gap > 0 and len(unit) <= 2 * gap:  # taking it brings the count closer to the target
                    split = candidate
                    have[candidate] += len(unit)
                    break
            result.update(dict.fromkeys(unit, split))
    return result


def class_folders(src: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith((".", "_")))


def place(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target`, or copy it where links are impossible; True when linked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.split",
        description=(
            "Split SRC/<class>/ images into OUT/train, OUT/val (and OUT/test), stratified by class, keeping near "
            "duplicates on one side; hard links where possible; OUT/split.csv records where each file went."
        ),
    )
    parser.add_argument("src", type=Path, help="folder of <class>/<image> folders")
    parser.add_argument("out", type=Path, help="new (or empty) folder for train/, val/, test/ and split.csv")
    parser.add_argument("--valid-pct", type=float, default=0.2, help="share of each class for val (default 0.2)")
    parser.add_argument("--test-pct", type=float, default=0.0, help="share of each class for test (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same split (default 0)")
    parser.add_argument(
        "--phash-distance",
        type=int,
        default=None,
        metavar="BITS",
        help="near-duplicate threshold for grouping (default: geektime.dedup's)",
    )
    parser.add_argument("--no-groups", action="store_true", help="do not look for near duplicates")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src}: no such folder")
    src, out = args.src.resolve(), args.out.resolve()
    if out == src or out.is_relative_to(src):
        parser.error(f"{args.out}: must be outside {args.src}, or it would be read as a class folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{args.out}: exists and is not an empty folder; give a new folder (nothing is overwritten)")
    classes = class_folders(src)
    paths_by_class = {name: list_images(src / name) for name in classes}
    empty = [name for name, paths in paths_by_class.items() if not paths]
    if not classes or len(empty) == len(classes):
        print(
            f"error: {args.src}: no class folders with images; expected {args.src}/<class>/<image files>",
            file=sys.stderr,
        )
        return 2
    if empty:
        print(f"warning: no images in {', '.join(empty)}; left out", file=sys.stderr)
        paths_by_class = {name: paths for name, paths in paths_by_class.items() if paths}
    groups: list[list[Path]] = []
    if not args.no_groups:
        from geektime.dedup import DEFAULT_PHASH_DISTANCE, duplicate_groups

        distance = DEFAULT_PHASH_DISTANCE if args.phash_distance is None else args.phash_distance
        groups = duplicate_groups(
            [p for paths in paths_by_class.values() for p in paths], distance, progress=not args.quiet
        )
    try:
        splits = assign_splits(paths_by_class, args.valid_pct, args.test_pct, args.seed, groups)
    except ValueError as err:
        parser.error(str(err))
    group_of = {p: i for i, group in enumerate(groups, start=1) for p in group}
    out.mkdir(parents=True, exist_ok=True)
    linked = copied = 0
    counts: Counter[tuple[str, str]] = Counter()
    with open(out / "split.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "split", "file", "group"])
        jobs = [(p, name) for name, paths in paths_by_class.items() for p in paths]
        for path, name in tqdm(jobs, desc="placing", unit="img", disable=args.quiet, leave=False):
            split = splits[path]
            target = out / split / name / path.relative_to(src / name)
            if place(path, target):
                linked += 1
            else:
                copied += 1
            counts[(name, split)] += 1
            writer.writerow(
                [
                    path.relative_to(src).as_posix(),
                    name,
                    split,
                    target.relative_to(out).as_posix(),
                    group_of.get(path, ""),
                ]
            )
    used = [s for s in SPLITS if any(counts[(c, s)] for c in paths_by_class)]
    width = max(len("class"), *map(len, paths_by_class))
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in used))
    for name in paths_by_class:
        print(f"{name:<{width}}  " + "  ".join(f"{counts[(name, s)]:>6}" for s in used))
    print(
        f"{len(groups)} near-duplicate group(s) kept together; {linked} hard-linked, {copied} copied\n"
        f"-> {args.out / 'split.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
