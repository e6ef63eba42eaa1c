"""Images of a few Open Images classes, from the published CSV files: `python -m geektime.openimages`.

    python -m geektime.openimages --classes "Cat,Dog" --meta oi_csv/ --dest data/pets [--crop]

`--meta` holds Open Images' CSV files, recognised by their columns whatever their names:
* class descriptions (class-descriptions-boxable.csv): LabelName,DisplayName (with or without a header);
* boxes (*-annotations-bbox.csv): ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,... (coordinates
  are fractions of the width and height);
* images (*-images-with-rotation.csv, image_ids_and_rotation.csv): ImageID,Subset,OriginalURL,...,
  OriginalMD5 (base64 of the MD5 digest),...,Rotation.
They are gigabytes, so they are read row by row; only the chosen images are kept in memory.

Images are fetched with geektime.download (retries, size limit, the training decoder's check, a resumable
download_log.csv in DEST), from OriginalURL or, with `--base-url`, from `<base-url>/<Subset>/<ImageID>.jpg`
(the layout of the CVDF mirror), and must match OriginalMD5. Rotation (0, 90, 180, 270: degrees
counter-clockwise that the image and its boxes should be turned) is applied to the pixels; the turned image
is saved without EXIF, since the boxes belong to the pixel grid and an EXIF orientation would turn it again.

Without --crop each image lands in DEST/<class>/<ImageID>.jpg. With --crop the images go to DEST/_images/
and each box of a chosen class becomes DEST/<class>/<ImageID>_<n>.jpg (n counts that class's boxes in the
image); boxes smaller than --min-crop pixels on a side are passed over.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import difflib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from geektime.download import (
    FAILED_DIR,
    LOG_NAME,
    Job,
    Result,
    add_network_options,
    network_options,
    run,
    summary,
)

IMAGES_DIR = "_images"
_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
_BOX_COLUMNS = {"ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"}
_IMAGE_COLUMNS = {"ImageID", "OriginalURL"}


class OpenImagesError(ValueError):
    """Metadata that cannot be used; the message names the file and what is missing."""


@dataclass
class Chosen:
    """An image picked for one or more classes, with its boxes per class (XMin, XMax, YMin, YMax)."""

    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    url: str = ""
    subset: str = ""
    md5: bytes | None = None
    rotation: int = 0


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def find_meta(meta: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(class description files, box files, image files) in `meta`, told apart by their columns."""
    descriptions, boxes, images = [], [], []
    for path in sorted(meta.glob("*.csv")):
        columns = set(_header(path))
        if _BOX_COLUMNS <= columns:
            boxes.append(path)
        elif _IMAGE_COLUMNS <= columns:
            images.append(path)
        elif len(columns) == 2 and "class-descriptions" in path.name:
            descriptions.append(path)
    missing = [
        what
        for what, found in (
            ("class descriptions (class-descriptions-boxable.csv)", descriptions),
            ("boxes (*-annotations-bbox.csv)", boxes),
            ("images with URLs (*-images-with-rotation.csv)", images),
        )
        if not found
    ]
    if missing:
        raise OpenImagesError(
            f"{meta}: no CSV file of {' or '.join(missing)}; download them from the Open Images site into this folder"
        )
    return descriptions, boxes, images


def label_names(descriptions: list[Path], wanted: list[str]) -> dict[str, str]:
    """{LabelName (MID): display name as asked} for the wanted display names (case-insensitive)."""
    by_name: dict[str, str] = {}
    shown: dict[str, str] = {}
    for path in descriptions:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0] != "LabelName":
                    by_name.setdefault(row[1].strip().lower(), row[0])
                    shown.setdefault(row[1].strip().lower(), row[1].strip())
    mids = {}
    for name in wanted:
        mid = by_name.get(name.lower())
        if mid is None:
            close = difflib.get_close_matches(name.lower(), by_name, n=3)
            hint = f"; did you mean {', '.join(shown[c] for c in close)}?" if close else ""
            raise OpenImagesError(f"--classes: {name!r} is not a class of {', '.join(map(str, descriptions))}{hint}")
        mids[mid] = shown[name.lower()]
    return mids


def _rows(path: Path, desc: str, progress: bool = True) -> Iterator[dict[str, str]]:
    """The rows of a big CSV as dicts, one at a time, with a progress bar in bytes."""
    with (
        open(path, "rb") as f,
        tqdm(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True, leave=False, disable=not progress) as bar,
    ):

        def lines() -> Iterator[str]:
            for n, raw in enumerate(f):
                bar.update(len(raw))
                yield raw.decode("utf-8-sig" if n == 0 else "utf-8")

        yield from csv.DictReader(lines())


def choose_images(
    box_files: list[Path], mids: dict[str, str], max_per_class: int | None, progress: bool = True
) -> dict[str, Chosen]:
    """{ImageID: Chosen} with boxes of the wanted classes, at most `max_per_class` images per class, in file order."""
    chosen: dict[str, Chosen] = {}
    counts = dict.fromkeys(mids.values(), 0)
    for path in box_files:
        for row in _rows(path, f"reading {path.name}", progress):
            name = mids.get(row["LabelName"])
            if name is None:
                continue
            image = chosen.get(row["ImageID"])
            if image is None or name not in image.boxes:
                if max_per_class is not None and counts[name] >= max_per_class:
                    continue
                counts[name] += 1
                image = chosen.setdefault(row["ImageID"], Chosen())
                image.boxes[name] = []
            try:
                box = (float(row["XMin"]), float(row["XMax"]), float(row["YMin"]), float(row["YMax"]))
            except ValueError:
                raise OpenImagesError(f"{path}: image {row['ImageID']}: box coordinates are not numbers") from None
            image.boxes[name].append(box)
        if max_per_class is not None and all(n >= max_per_class for n in counts.values()):
            break
    return chosen


def add_urls(
    image_files: list[Path], chosen: dict[str, Chosen], base_url: str | None, progress: bool = True
) -> list[str]:
    """Fill in URL, MD5 and rotation of the chosen images; returns the ImageIDs no file lists."""
    todo = set(chosen)
    for path in image_files:
        for row in _rows(path, f"reading {path.name}", progress):
            image_id = row["ImageID"]
            if image_id not in todo:
                continue
            todo.discard(image_id)
            image = chosen[image_id]
            image.subset = row.get("Subset", "") or path.name.split("-")[0]
            image.url = f"{base_url.rstrip('/')}/{image.subset}/{image_id}.jpg" if base_url else row["OriginalURL"]
            if row.get("OriginalMD5"):
                try:
                    image.md5 = base64.b64decode(row["OriginalMD5"], validate=True)
                except binascii.Error:
                    raise OpenImagesError(f"{path}: image {image_id}: OriginalMD5 is not base64") from None
            rotation = row.get("Rotation", "") or "0"
            image.rotation = 0 if rotation.lower() == "nan" else int(float(rotation)) % 360
            if not todo:
                return []
    return sorted(todo)


def rotate_box(box: tuple[float, float, float, float], rotation: int) -> tuple[float, float, float, float]:
    """A box (XMin, XMax, YMin, YMax as fractions) after the image turns `rotation` degrees counter-clockwise."""
    x0, x1, y0, y1 = box
    if rotation == 90:  # (x, y) -> (y, 1 - x)
        return y0, y1, 1 - x1, 1 - x0
    if rotation == 180:
        return 1 - x1, 1 - x0, 1 - y1, 1 - y0
    if rotation == 270:  # (x, y) -> (1 - y, x)
        return 1 - y1, 1 - y0, x0, x1
    return box


def apply_rotation(path: Path, rotation: int) -> None:
    """Turn the file's pixels `rotation` degrees counter-clockwise, saved in place without EXIF."""
    if rotation not in _ROTATIONS:
        return
    with Image.open(path) as im:
        fmt = im.format
        turned = im.transpose(_ROTATIONS[rotation])
    tmp = path.with_name(f".{path.name}.rotating")
    turned.save(tmp, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    tmp.replace(path)


def write_crops(path: Path, image_id: str, boxes: dict[str, list], dest: Path, min_crop: int) -> tuple[int, int]:
    """Each box as DEST/<class>/<ImageID>_<n>.jpg (existing crops are kept); returns (written, too small)."""
    written = small = 0
    with Image.open(path) as im:
        im = im.convert("RGB")
        width, height = im.size
        for name, class_boxes in boxes.items():
            for n, (x0, x1, y0, y1) in enumerate(class_boxes):
                target = dest / name / f"{image_id}_{n}.jpg"
                left, right = round(max(0.0, x0) * width), round(min(1.0, x1) * width)
                top, bottom = round(max(0.0, y0) * height), round(min(1.0, y1) * height)
                if min(right - left, bottom - top) < min_crop:
                    small += 1
                    continue
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                im.crop((left, top, right, bottom)).save(target, "JPEG", quality=95)
                written += 1
    return written, small


def folder_name(display_name: str) -> str:
    return display_name.replace("/", "_").replace("\\", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.openimages",
        description=(
            "Download the images (or, with --crop, the boxes) of some Open Images classes, reading the published "
            "CSV files in --meta as streams."
        ),
    )
    parser.add_argument("--classes", required=True, help='display names, comma-separated, e.g. "Cat,Dog"')
    parser.add_argument("--meta", type=Path, required=True, help="folder of Open Images CSV files")
    parser.add_argument("--dest", type=Path, required=True, help="output folder: DEST/<class>/...")
    parser.add_argument("--max-per-class", type=int, metavar="N", help="at most N images per class")
    parser.add_argument("--crop", action="store_true", help="write each box as an image instead of whole images")
    parser.add_argument(
        "--min-crop",
        type=int,
        default=16,
        metavar="PX",
        help="with --crop, pass over boxes with a side under PX pixels (default 16)",
    )
    parser.add_argument("--base-url", metavar="URL", help="fetch <URL>/<Subset>/<ImageID>.jpg, not OriginalURL")
    add_network_options(parser)
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.classes.split(",") if name.strip()]
    if not wanted:
        parser.error("--classes: give at least one class name")
    if not args.meta.is_dir():
        parser.error(f"--meta {args.meta}: no such folder")
    if args.max_per_class is not None and args.max_per_class < 1:
        parser.error("--max-per-class: must be at least 1")
    try:
        descriptions, box_files, image_files = find_meta(args.meta)
        mids = label_names(descriptions, wanted)
        chosen = choose_images(box_files, mids, args.max_per_class, not args.quiet)
        unlisted = add_urls(image_files, chosen, args.base_url, not args.quiet)
    except OpenImagesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, KeyError, UnicodeDecodeError) as err:
        print(f"error: cannot read the CSV files in {args.meta}: {err!r}", file=sys.stderr)
        return 2
    if unlisted:
        print(
            f"warning: {len(unlisted)} chosen image(s) are in no images CSV, passed over: {', '.join(unlisted[:5])}",
            file=sys.stderr,
        )
    jobs = []
    for image_id, image in chosen.items():
        if image_id in unlisted:
            continue
        if args.crop:
            jobs.append(Job(image.url, args.dest / IMAGES_DIR, args.dest / FAILED_DIR, image_id, IMAGES_DIR, image.md5))
        else:
            jobs += [
                Job(
                    image.url,
                    args.dest / folder_name(name),
                    args.dest / FAILED_DIR / folder_name(name),
                    image_id,
                    folder_name(name),
                    image.md5,
                )
                for name in image.boxes
            ]
    print(
        f"{len(chosen) - len(unlisted)} images: "
        + ", ".join(f"{name} {sum(name in c.boxes for c in chosen.values())}" for name in mids.values())
    )

    def rotate(result: Result) -> None:  # as each download lands, so a rerun never turns a file twice
        if result.status == "ok":
            apply_rotation(result.file, chosen[result.job.name].rotation)

    try:
        results, present, log = run(jobs, args.dest, on_result=rotate, **network_options(args))
    except KeyboardInterrupt:
        print(f"interrupted; run again to resume ({args.dest / LOG_NAME})", file=sys.stderr)
        return 130
    print(f"{summary(results, present)}\nlog: {log}")
    if args.crop:
        done = [r.job for r in results if r.status == "ok"] + present
        written = small = 0
        for job in tqdm(done, desc="cropping", unit="img", disable=args.quiet):
            file = next(p for p in job.folder.glob(f"{job.name}.*") if p.stem == job.name)
            boxes = {
                folder_name(name): [rotate_box(b, chosen[job.name].rotation) for b in class_boxes]
                for name, class_boxes in chosen[job.name].boxes.items()
            }
            w, s = write_crops(file, job.name, boxes, args.dest, max(1, args.min_crop))
            written, small = written + w, small + s
        print(f"crops written: {written}" + (f", passed over {small} under {args.min_crop} px" if small else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
