"""Bad cases: the images a model got wrong, most confident first, as a table, JSON and an HTML gallery.

    python -m geektime.badcases checkpoints/<run>/eval/epoch_007.txt --positive logo
    python -m geektime.badcases checkpoints/<run>/eval/epoch_007.txt --top-losses 50

`--top-losses K` adds the K images (right or wrong) with the highest loss -ln p(true class): confident
mistakes, and right answers the model barely believed, which is where wrong labels hide.
`<txt stem>_badcases.json` holds every list and `most_confused`: (actual, predicted, count) of the wrong
predictions, most frequent first.

The gallery is one self-contained HTML file (thumbnails embedded as JPEG data URIs, inline script, no
server, nothing fetched) that a person opens in a browser; each thumbnail links to the original image.
Each image has a keep / delete / move-to-<class> choice; "Download cleaning.csv" saves the choices other
than keep (path,action,label,to_class; absolute paths), for `python -m geektime.clean apply`.
Relative image paths in the txt are resolved against the current directory, as they were when the txt
was written.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageOps

from geektime.predictions import Predictions, class_index, printable, read_predictions

_TITLES = {
    "false_positives": "False positives",
    "false_negatives": "False negatives",
    "wrong": "Wrong predictions",
    "top_losses": "Top losses",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
.meta { color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: {size}px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
figure img, .missing { display: block; width: {size}px; height: {size}px; object-fit: contain; }
.missing { background: #eee; color: #a00; display: flex; align-items: center; justify-content: center; }
figcaption { font-size: 12px; line-height: 1.4; margin-top: 4px; }
.path { color: #666; word-break: break-all; }
select.decision { margin-top: 4px; max-width: 100%; }
figure.delete { outline: 3px solid #c00; }
figure.move { outline: 3px solid #d80; }
#cleaning { position: sticky; top: 0; background: #fafafa; padding: 6px 0; z-index: 1; }
"""

# Builds cleaning.csv from the choices and hands it to the browser as a download; a choice applies to every
# figure of the same image (it may be in several lists).
_SCRIPT = r"""
function csvField(value) {
  return /[",\r\n]/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value;
}
function cleaningCsv() {
  const rows = new Map();
  for (const select of document.querySelectorAll('select.decision')) {
    if (select.value === 'keep') continue;
    const move = select.value.startsWith('move:');
    rows.set(select.dataset.path, [select.dataset.path, move ? 'move' : 'delete', select.dataset.label,
                                   move ? select.value.slice(5) : '']);
  }
  const lines = ['path,action,label,to_class'];
  for (const row of rows.values()) lines.push(row.map(csvField).join(','));
  return lines.join('\r\n') + '\r\n';
}
function showDecisions() {
  const count = new Set([...document.querySelectorAll('select.decision')]
    .filter(s => s.value !== 'keep').map(s => s.dataset.path)).size;
  document.getElementById('decision-count').textContent = count + ' image(s) to delete or move';
}
document.addEventListener('change', event => {
  const select = event.target;
  if (!select.matches || !select.matches('select.decision')) return;
  for (const other of document.querySelectorAll('select.decision')) {
    if (other.dataset.path === select.dataset.path) {
      other.value = select.value;
      const figure = other.closest('figure');
      figure.classList.toggle('delete', select.value === 'delete');
      figure.classList.toggle('move', select.value.startsWith('move:'));
    }
  }
  showDecisions();
});
document.getElementById('download-cleaning').addEventListener('click', () => {
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([cleaningCsv()], {type: 'text/csv'}));
  link.download = 'cleaning.csv';
  document.body.appendChild(link);
  link.click();
  link.remove();
});
showDecisions();
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


def losses(pred: Predictions) -> np.ndarray:
    """-ln p(true class) per line (NaN for unlabeled lines); p is floored at 1e-12 so a 0 stays finite."""
    labeled = pred.targets >= 0
    p_true = pred.probs[np.arange(len(pred.paths)), np.where(labeled, pred.targets, 0)]
    return np.where(labeled, -np.log(np.maximum(p_true, 1e-12)), np.nan)


def top_losses(pred: Predictions, k: int | None = None) -> list[int]:
    """Indices of the labeled lines, right or wrong, highest loss first (ties keep file order); the first k."""
    loss = losses(pred)
    ranked = sorted(np.flatnonzero(pred.targets >= 0).tolist(), key=lambda i: -loss[i])
    return ranked[:k]


def most_confused(pred: Predictions) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) of the wrong labeled lines, most frequent first (ties by class order)."""
    wrong = (pred.targets >= 0) & (pred.predicted != pred.targets)
    counts = Counter(zip(pred.targets[wrong].tolist(), pred.predicted[wrong].tolist()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [(pred.classes[t], pred.classes[p], n) for (t, p), n in ranked]


def badcases_json(pred: Predictions, cases: dict[str, list[int]]) -> dict:
    """Every list with each image's classes, probabilities and loss, and most_confused."""
    loss = losses(pred)

    def entry(i: int) -> dict:
        true, predicted = int(pred.targets[i]), int(pred.predicted[i])
        return {
            "path": pred.paths[i],
            "true": pred.classes[true],
            "predicted": pred.classes[predicted],
            "p_true": round(float(pred.probs[i, true]), 5),
            "p_predicted": round(float(pred.probs[i, predicted]), 5),
            "loss": round(float(loss[i]), 5),
        }

    return {
        "classes": list(pred.classes),
        "header": dict(pred.header),
        **{group: [entry(i) for i in indices] for group, indices in cases.items()},
        "most_confused": [{"actual": a, "predicted": p, "count": n} for a, p, n in most_confused(pred)],
    }


def format_most_confused(pred: Predictions, limit: int = 10) -> str:
    pairs = most_confused(pred)
    if not pairs:
        return "most confused: none"
    lines = ["most confused (actual -> predicted: count)"]
    lines += [f"  {actual} -> {predicted}: {count}" for actual, predicted, count in pairs[:limit]]
    return "\n".join(lines)


def format_badcases(pred: Predictions, cases: dict[str, list[int]], limit: int | None = None) -> str:
    """A table per group: rank, p(predicted) (loss for top losses), true class, predicted class, path."""
    width = max(len("predicted"), *(len(name) for name in pred.classes))
    loss = losses(pred)
    blocks = []
    for group, indices in cases.items():
        if group == "top_losses":
            lines = [
                f"top losses: {len(indices)}",
                (f"{'#':>4}  {'loss':>7}  p(true)  {'true':<{width}}  {'predicted':<{width}}  path"),
            ]
            for rank, i in enumerate(indices, start=1):
                true, predicted = pred.targets[i], pred.predicted[i]
                lines.append(
                    f"{rank:>4}  {loss[i]:>7.4f}  {pred.probs[i, true]:.5f}  {pred.classes[true]:<{width}}  "
                    f"{pred.classes[predicted]:<{width}}  {printable(pred.paths[i])}"
                )
            blocks.append("\n".join(lines) if indices else "top losses: none")
            continue
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
                f"{pred.classes[predicted]:<{width}}  {printable(pred.paths[i])}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def thumbnail_data_uri(path: Path, size: int) -> str:
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
        return quote(os.fsencode(Path(os.path.relpath(image, html_dir)).as_posix()))
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

    def esc(text: str) -> str:
        return html.escape(printable(text))

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
        "<p>Most confident first (top losses: highest loss first); click a thumbnail to open the original image.</p>",
        (
            '<div id="cleaning"><button type="button" id="download-cleaning">Download cleaning.csv</button> '
            '<span id="decision-count"></span> <span class="meta">then: python -m geektime.clean apply cleaning.csv '
            "--quarantine DIR</span></div>"
        ),
    ]
    loss = losses(pred)
    for group, indices in cases.items():
        shown = indices[:limit]
        count = f"{len(indices)}" if len(shown) == len(indices) else f"showing {len(shown)} of {len(indices)}"
        parts += [f'<section id="{group}">', f"<h2>{_TITLES[group]} ({count})</h2>", '<div class="grid">']
        for rank, i in enumerate(shown, start=1):
            image_path = pred.paths[i]
            true, predicted = pred.targets[i], pred.predicted[i]
            try:
                picture = f'<img src="{thumbnail_data_uri(Path(image_path), thumb_size)}" alt="{esc(image_path)}">'
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                unreadable += 1
                reason = "image not found" if isinstance(e, FileNotFoundError) else "cannot read image"
                picture = f'<div class="missing">{reason}</div>'
            parts += [
                "<figure>",
                f'<a href="{esc(_href(Path(image_path), html_dir))}">{picture}</a>',
                "<figcaption>",
                f"<div>#{rank} predicted <b>{esc(pred.classes[predicted])}</b> {pred.probs[i, predicted]:.5f}</div>",
                (f"<div>true <b>{esc(pred.classes[true])}</b> {pred.probs[i, true]:.5f} · loss {loss[i]:.3f}</div>"),
                f'<div class="path">{esc(image_path)}</div>',
                _decision(pred, i),
                "</figcaption>",
                "</figure>",
            ]
        if not shown:
            parts.append("<p>None.</p>")
        parts += ["</div>", "</section>"]
    parts += [f"<script>{_SCRIPT}</script>", "</body>", "</html>"]
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return unreadable


def _decision(pred: Predictions, i: int) -> str:
    """The keep / delete / move-to-<class> choice of line i; the path is absolute so cleaning.csv works anywhere."""

    def esc(text: str) -> str:
        return html.escape(printable(text))

    true = pred.classes[pred.targets[i]]
    options = ['<option value="keep" selected>keep</option>', '<option value="delete">delete</option>']
    options += [
        f'<option value="move:{esc(name)}">move to {esc(name)}</option>' for name in pred.classes if name != true
    ]
    path = os.path.abspath(pred.paths[i])
    return (
        f'<select class="decision" data-path="{esc(path)}" data-label="{esc(true)}" '
        f'aria-label="decision for {esc(pred.paths[i])}">{"".join(options)}</select>'
    )


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
    parser.add_argument(
        "--top-losses",
        type=_positive_int,
        metavar="K",
        help="also list the K images (right or wrong) with the highest loss -ln p(true)",
    )
    parser.add_argument("--json", type=Path, metavar="JSON", help="JSON path (default: <txt stem>_badcases.json)")
    args = parser.parse_args(argv)

    try:
        pred = read_predictions(args.txt)
        cases = find_badcases(pred, args.positive)
        if args.top_losses:
            cases["top_losses"] = top_losses(pred, args.top_losses)
    except OSError as e:
        print(f"error: cannot read {args.txt}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_badcases(pred, cases, args.limit))
    print(f"\n{format_most_confused(pred)}")
    out = args.out or args.txt.with_name(f"{args.txt.stem}_badcases.html")
    unreadable = write_gallery(pred, cases, out, limit=args.limit)
    json_path = args.json or args.txt.with_name(f"{args.txt.stem}_badcases.json")
    json_path.write_text(json.dumps(badcases_json(pred, cases), indent=2) + "\n", encoding="utf-8")
    print(f"\ngallery: {out}\njson: {json_path}")
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
