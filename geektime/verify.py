"""Check a folder of images before training: `python -m geektime.verify DIR [--quarantine QDIR]`.

Every file with an image extension is decoded exactly as training decodes it (geektime.images.load_rgb);
the unusable ones are listed with the reason and, with --quarantine, moved to QDIR under the same
relative path (never deleted, never overwritten), so they can be moved back.
Files without an image extension are listed separately: training ignores them, so they do not fail the
check. Folder links that training does not follow (up the tree, back into DIR, a second way into a folder)
are listed with the reason; hidden files and folders (.DS_Store, .git) are skipped, and --verbose lists them.
The walk is geektime.images.walk_files, the one training lists a split with, so for a split folder
(data/train) verify and training agree on every file. Names that cannot be printed as they are (a line break,
bytes that are not UTF-8) are shown with %XX escapes.

Exit status: 0 all images usable, 1 some are not (even when quarantined), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geektime.images import IMAGE_EXTENSIONS, move_file, scan_images, walk_files
from geektime.predictions import printable


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.verify",
        description="List (and optionally move out) the images under DIR that training cannot read.",
    )
    parser.add_argument("dir", type=Path, help="folder to check, e.g. data/train (<class>/<image> inside)")
    parser.add_argument(
        "--quarantine",
        type=Path,
        metavar="QDIR",
        help="move bad images here, keeping their path relative to DIR (outside DIR)",
    )
    parser.add_argument("--workers", type=_positive, metavar="N", help="processes (default: all cores)")
    parser.add_argument("--verbose", action="store_true", help="also list the hidden entries that were skipped")
    return parser


def _usage_error(message: str) -> int:
    print(f"python -m geektime.verify: error: {message}", file=sys.stderr)
    return 2


def _quarantine(bad: list[tuple[Path, str]], root: Path, qdir: Path) -> int:
    """Move each bad file to qdir/<its path under root>; returns how many moved."""
    moved = 0
    for path, _ in bad:
        target = qdir / path.relative_to(root)
        if (why := move_file(path, target)) is not None:
            print(f"  not moved: {printable(path)}: {printable(why)}")
            continue
        print(f"  moved {printable(path)} -> {printable(target)}")
        moved += 1
    return moved


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage line; return rather than exit
        return int(exit_.code or 0)
    root: Path = args.dir
    if not root.is_dir():
        return _usage_error(f"{root}: {'not a directory' if root.exists() else 'no such directory'}")
    if args.quarantine is not None:
        qdir = args.quarantine.resolve()
        if qdir.exists() and not qdir.is_dir():
            return _usage_error(f"--quarantine {args.quarantine}: exists and is not a directory")
        if qdir.is_relative_to(root.resolve()):
            return _usage_error(
                f"--quarantine {args.quarantine} is inside {root}: "
                "training would read it as a class folder; choose a folder outside it"
            )

    images, others, links, hidden = [], [], [], []
    try:
        for path, why in walk_files(root):
            if why is not None:
                (hidden if why.startswith("hidden") else links).append((path, why))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                others.append(path)
    except OSError as err:
        return _usage_error(f"cannot list {err.filename}: {err.strerror}")
    images.sort()
    bad = scan_images(images, workers=args.workers)

    if bad:
        print(f"Unusable images ({len(bad)}):")
        for path, reason in bad:
            print(f"  {printable(path)}: {reason}")
    if others:
        print(f"Not image files, ignored by training ({len(others)}; extensions {' '.join(IMAGE_EXTENSIONS)}):")
        for path in sorted(others):
            print(f"  {printable(path)}")
    if links:
        print(f"Folder links not followed (training skips them too) ({len(links)}):")
        for path, why in sorted(links):
            print(f"  {printable(path)}: {why}")
    if args.verbose and hidden:
        print(f"Hidden, skipped ({len(hidden)}):")
        for path, why in sorted(hidden):
            print(f"  {printable(path)}: {why}")

    summary = f"{len(images)} files checked, {len(bad)} bad"
    if others:
        summary += f", {len(others)} non-image file(s) ignored"
    if links:
        summary += f", {len(links)} folder link(s) not followed"
    if hidden:
        summary += f", {len(hidden)} hidden entries skipped"
    if bad and args.quarantine is not None:
        print(f"Quarantining to {args.quarantine}:")
        summary += f", {_quarantine(bad, root, args.quarantine)} moved to {args.quarantine}"
    elif bad:
        summary += (
            f". Move them out with `python -m geektime.verify {root} --quarantine <dir>` or set data.on_bad_image=skip"
        )
    print(summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
