"""Bad cases: the images a model got wrong, most confident first, as a table and an HTML gallery.

    python -m geektime.badcases checkpoints/<run>/eval/epoch_007.txt --positive logo

The gallery is one self-contained HTML file (thumbnails embedded as JPEG data URIs) that a
person opens in a browser; each thumbnail links to the original image. Relative image paths in
the txt are resolved against the current directory, as they were when the txt was written.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageOps

from geektime.predictions import Predictions, class_index, read_predictions

_TITLES = {"false_positives": "False positives", "false_negatives": "False negatives", "wrong": "Wrong predictions"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
.meta { color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: {size}px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
figure img, .missing { display: block; width: {size}px; height: {size}px; object-fit: contain; }
.missing { background: #eee; color: #a00; display: flex; align-items: center; justify-content: center; }
figcaption { font-size: 12px; line-height: 1.4; margin-top: 4px; }
.path { color: #666; word-break: break-all; }
"""


def find_badcases(pred: Predictions, positive: str | None = None) -> dict[str, list[int]]:
    """Indices of the wrong lines, most confident first (ties keep file order).

    Confidence is the probability the model gave its (wrong) prediction. With ``positive``:
    ``false_positives`` (predicted positive, labeled otherwise) and ``false_negatives``
    (labeled positive, predicted otherwise); without: every ``wrong`` line. Unlabeled lines are
    never bad cases.
    """
    wrong = (pred.targets >= 0) & (pred.predicted != pred.targets)
    if positive is None:
        groups = {"wrong": wrong}
    else:
        k = class_index(pred.classes, positive)
        groups = {"false_positives": wrong & (pred.predicted == k), "false_negatives": wrong & (pred.targets == k)}
    confidence = pred.probs[np.arange(len(pred.paths)), pred.predicted]
    return {name: sorted(np.flatnonzero(mask).tolist(), key=lambda i: -confidence[i]) for name, mask in groups.items()}


def format_badcases(pred: Predictions, cases: dict[str, list[int]], limit: int | None = None) -> str:
    """A table per group: rank, p(predicted), true class, predicted class, path."""
    width = max(len("predicted"), *(len(name) for name in pred.classes))
    blocks = []
    for group, indices in cases.items():
        if not indices:
            blocks.append(f"{_TITLES[group].lower()}: none")
            continue
        shown = indices[:limit]
        title = f"{_TITLES[group].lower()}: {len(indices)}"
        if len(shown) < len(indices):
            title += f", showing the {len(shown)} most confident"
        lines = [title, f"{'#':>4}  p(pred)  {'true':<{width}}  {'predicted':<{width}}  path"]
        for rank, i in enumerate(shown, start=1):
            true, predicted = pred.targets[i], pred.predicted[i]
            lines.append(
                f"{rank:>4}  {pred.probs[i, predicted]:.5f}  {pred.classes[true]:<{width}}  "
                f"{pred.classes[predicted]:<{width}}  {pred.paths[i]}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _thumbnail(path: Path, size: int) -> str:
    """A JPEG data URI of the image shrunk to fit ``size`` x ``size``; raises OSError/ValueError."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # lets the JPEG decoder skip most pixels of big photos
        image = ImageOps.exif_transpose(image).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _href(image: Path, html_dir: Path) -> str:
    """Link to the original image, relative to the gallery's folder (a file URI across drives)."""
    try:
        return quote(Path(os.path.relpath(image, html_dir)).as_posix())
    except ValueError:  # on another drive (Windows)
        return image.resolve().as_uri()


def write_gallery(
    pred: Predictions,
    cases: dict[str, list[int]],
    html_path: str | os.PathLike,
    thumb_size: int = 160,
    limit: int | None = None,
) -> int:
    """Write a self-contained HTML gallery of ``cases`` from :func:`find_badcases` (the first
    ``limit`` of each group).

    Images that are missing or unreadable get a placeholder. Returns how many there were, so a
    caller can warn about, say, relative paths resolved from the wrong directory.
    """
    html_path = Path(html_path)
    html_dir = html_path.absolute().parent
    esc = html.escape
    unreadable = 0
    meta = " · ".join(f"{key}: {value}" for key, value in {"classes": " ".join(pred.classes), **pred.header}.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>Bad cases: {esc(html_path.stem)}</title>",
        f"<style>{_STYLE.replace('{size}', str(thumb_size))}</style>",
        "</head>",
        "<body>",
        "<h1>Bad cases</h1>",
        f'<p class="meta">{esc(meta)}</p>',
        "<p>Most confident first; click a thumbnail to open the original image.</p>",
    ]
    for group, indices in cases.items():
        shown = indices[:limit]
        count = f"{len(indices)}" if len(shown) == len(indices) else f"showing {len(shown)} of {len(indices)}"
        parts += [f'<section id="{group}">', f"<h2>{_TITLES[group]} ({count})</h2>", '<div class="grid">']
        for rank, i in enumerate(shown, start=1):
            image_path = pred.paths[i]
            true, predicted = pred.targets[i], pred.predicted[i]
            try:
                picture = f'<img src="{_thumbnail(Path(image_path), thumb_size)}" alt="{esc(image_path)}">'
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                unreadable += 1
                reason = "image not found" if isinstance(e, FileNotFoundError) else "cannot read image"
                picture = f'<div class="missing">{reason}</div>'
            parts += [
                "<figure>",
                f'<a href="{esc(_href(Path(image_path), html_dir))}">{picture}</a>',
                "<figcaption>",
                f"<div>#{rank} predicted <b>{esc(pred.classes[predicted])}</b> {pred.probs[i, predicted]:.5f}</div>",
                f"<div>true <b>{esc(pred.classes[true])}</b> {pred.probs[i, true]:.5f}</div>",
                f'<div class="path">{esc(image_path)}</div>',
                "</figcaption>",
                "</figure>",
            ]
        if not shown:
            parts.append("<p>None.</p>")
        parts += ["</div>", "</section>"]
    parts += ["</body>", "</html>"]
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return unreadable


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.badcases",
        description="List a prediction txt's wrong images, most confident first, and write an HTML gallery.",
    )
    parser.add_argument("txt", type=Path, help="prediction txt written by evaluate.py")
    parser.add_argument("--positive", metavar="CLASS", help="show false positives/negatives for this class")
    parser.add_argument("--out", type=Path, metavar="HTML", help="gallery path (default: <txt stem>_badcases.html)")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="show only the N most confident per list")
    args = parser.parse_args(argv)

    try:
        pred = read_predictions(args.txt)
        cases = find_badcases(pred, args.positive)
    except OSError as e:
        print(f"error: cannot read {args.txt}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_badcases(pred, cases, args.limit))
    out = args.out or args.txt.with_name(f"{args.txt.stem}_badcases.html")
    unreadable = write_gallery(pred, cases, out, limit=args.limit)
    print(f"\ngallery: {out}")
    if unreadable:
        shown = sum(len(indices[: args.limit]) for indices in cases.values())
        print(
            f"warning: {unreadable} of {shown} images could not be read; relative paths are resolved "
            f"against the current directory ({Path.cwd()})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
