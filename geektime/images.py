"""The one place an image file is opened: listing, decoding to 8-bit RGB, and checking folders of images.

Web-scraped folders are dirty, so every failure becomes a BadImageError that names the file, the reason
and the fix, instead of a crash deep inside a DataLoader worker.

Decisions:
* Files are opened by content among the formats of IMAGE_EXTENSIONS (a PNG named .jpg is fine); other
  formats are refused so that an odd file never reaches an exotic decoder (EPS would run Ghostscript).
* Transparency is composited on white, for every mode that has it (RGBA, LA, PA, P or L/RGB with a
  transparent colour): the colour under transparent pixels is arbitrary, white is how the page showed it.
* 16-bit (and 32-bit integer "I") pixels are read as 0..65535 and keep their high byte, so 65535 -> 255;
  Pillow's own conversion clips everything above 255 to white. Their transparency (rare) is dropped.
* A truncated JPEG is caught by the draft-mode (1/8 scale) decode too: libjpeg still reads every byte of
  the entropy-coded data at any scale (measured on baseline and progressive JPEGs cut at 380 points:
  identical verdicts, 2-5x faster), so check_image decodes at the smallest scale.
* Names starting with "." (.DS_Store, .git, ._photo.jpg) are not data: listings skip them.
* Images longer than MAX_ASPECT_RATIO times their width (or the reverse) are refused from the header alone,
  so that every tool (training, evaluation, verify) leaves the same files out.
* A folder is listed once, under its own path: links up the tree, into it again or to a folder already
  listed are passed over with a reason (walk_files), so no image is read as two classes.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from geektime.predictions import printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Long side / short side above which an image is refused: fitted to a square input it is a line of pixels
# (letterbox), a sliver of the whole (center_crop) or stretched beyond recognition (resize). Panoramas and
# web banners stay below 10:1; a 20000x1 spacer GIF does not. Raise it like PIL.Image.MAX_IMAGE_PIXELS.
MAX_ASPECT_RATIO = 20

# Pillow's openers for IMAGE_EXTENSIONS; JPEG's also opens MPO (phone JPEGs carrying extra pictures).
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_WHITE = (255, 255, 255)
_TEXT_BYTES = bytes(sorted((set(range(0x20, 0x100)) - {0x7F}) | {7, 8, 9, 10, 12, 13, 27}))  # as file(1)


class BadImageError(ValueError):
    """An image file that cannot be used; `reason` says why in words a user can act on."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return (
            f"{printable(self.path)}: {self.reason}. To find every such file run "
            f"`python -m geektime.verify {printable(self.path.parent.parent)} --quarantine <dir>`, "
            "or set data.on_bad_image=skip to leave them out."
        )


def load_rgb(path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` to 8-bit RGB, upright per its EXIF orientation.

    `min_size` = (height, width) the caller needs: a JPEG is then decoded at the smallest 1/2, 1/4 or 1/8
    scale that keeps both sides (after rotation) at least that large, which is most of its decoding cost.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_FORMATS) as im:
                _check_aspect(path, im.size)
                if min_size is not None and im.format in ("JPEG", "MPO"):
                    height, width = max(1, min_size[0]), max(1, min_size[1])
                    if _orientation(im) in _SWAPS_AXES:
                        height, width = width, height
                    im.draft("RGB", (width, height))
                im.load()
                method = _TRANSPOSE.get(_orientation(im))
                upright = im.transpose(method) if method is not None else im
                return _to_rgb(upright)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(
            path,
            (
                f"possible decompression bomb: {err} If the image is legitimate, raise the limit "
                "(PIL.Image.MAX_IMAGE_PIXELS = <pixels>, or None to disable it) or downscale the file"
            ),
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(path, _unidentified(path)) from None
    except OSError as err:
        if err.errno is not None:  # the file system's error, not the decoder's
            raise BadImageError(path, f"cannot read the file: {err.strerror}") from None
        raise BadImageError(path, _decode_failure(err)) from None
    except Exception as err:  # noqa: BLE001 - broken files make decoders fail in many ways (SyntaxError, ...)
        raise BadImageError(path, _decode_failure(err)) from None


def _check_aspect(path: str | os.PathLike, size: tuple[int, int]) -> None:
    """Refuse an image too elongated for any transform, from its header (before decoding a pixel)."""
    long, short = max(size), min(size)
    if MAX_ASPECT_RATIO is not None and long > MAX_ASPECT_RATIO * short:
        raise BadImageError(
            path,
            (
                f"extreme aspect ratio {size[0]}x{size[1]} (more than {MAX_ASPECT_RATIO}:1): fitted to the model's "
                "input it would be a thin line or a sliver of the picture. Crop it, or raise "
                "geektime.images.MAX_ASPECT_RATIO if such images are legitimate"
            ),
        )


def check_image(path: str | os.PathLike) -> str | None:
    """Why `path` is unusable for training, or None: the same decode as training, at the cheapest scale."""
    try:
        load_rgb(path, min_size=(1, 1))
    except BadImageError as err:
        return err.reason
    return None


def walk_files(root: str | os.PathLike) -> Iterator[tuple[Path, str | None]]:
    """Every file under `root` as (path, None), and what is passed over as (path, why).

    Hidden entries (a leading ".") are passed over and hidden folders not entered. Symlinks to files, and to
    folders outside `root`, are followed. A folder link is passed over when it leads to a folder above the one
    holding it (a loop), to `root` or above it (`train/ants/up -> ..` would list every class's images as ants),
    or into `root` (that folder is listed under its own name), and so is a folder reached a second time (two
    links to one folder). Folders are walked in name order, so which path wins is the same on every run; this
    is the one walk every tool uses, so training and verify agree on every file. Dangling symlinks are listed,
    so that they are reported rather than silently missing; sockets and pipes are not.
    """
    top = os.path.realpath(root)
    start = os.stat(root)
    seen = {(start.st_dev, start.st_ino)}
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                yield path, "hidden, skipped"
            elif entry.is_dir():
                why = _passed_over_folder(entry, folder, top, seen)
                if why is None:
                    subfolders.append(entry.path)
                else:
                    yield path, why
            elif entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path)):
                yield path, None
        stack.extend(reversed(subfolders))


def _passed_over_folder(entry: os.DirEntry, folder: str, top: str, seen: set) -> str | None:
    """Why walk_files does not enter the folder `entry` (found in `folder` while walking `top`), or None."""
    st = entry.stat()
    key = (st.st_dev, st.st_ino)
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if _within(os.path.realpath(folder), target) or _within(top, target):
            return "symlink up the tree (a loop, or other folders read as this one), skipped"
        if _within(target, top):
            return "symlink into the data folder (listed under its own name), skipped"
    if key in seen:
        return "second way into a folder already listed, skipped"
    seen.add(key)
    return None


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (both absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def list_images(root: str | os.PathLike) -> list[Path]:
    """The image files under `root` (by extension, any case), sorted; see walk_files for what is skipped."""
    return sorted(
        path for path, skipped in walk_files(root) if skipped is None and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_split(root: str | os.PathLike) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """A split folder as ({class folder name: its image files, sorted}, the folder links passed over).

    One walk of the whole split (not one per class folder), so that links are judged against the split folder
    exactly as `python -m geektime.verify <split>` judges them. Hidden entries are not reported.
    """
    root = Path(root)
    files: dict[str, list[Path]] = {}
    passed_over = []
    for path, why in walk_files(root):
        parts = path.relative_to(root).parts
        if why is not None:
            if not why.startswith("hidden"):
                passed_over.append((path, why))
        elif len(parts) > 1 and path.suffix.lower() in IMAGE_EXTENSIONS:
            files.setdefault(parts[0], []).append(path)
    refused = {path for path, _ in passed_over}
    with os.scandir(root) as entries:
        classes = sorted(
            e.name for e in entries if e.is_dir() and not e.name.startswith(".") and Path(e.path) not in refused
        )
    return {name: sorted(files.get(name, [])) for name in classes}, passed_over


def scan_images(paths: Iterable[Path], workers: int | None = None, progress: bool = True) -> list[tuple[Path, str]]:
    """The unusable files among `paths` with their reasons, in input order, checked in worker processes."""
    paths = list(paths)
    workers = min(workers or os.cpu_count() or 1, len(paths))
    # The limits travel explicitly: a user raising it must not depend on the start method.
    pool = (
        ProcessPoolExecutor(workers, initializer=_set_limits, initargs=(Image.MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO))
        if workers > 1
        else None
    )
    bar = tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress, leave=False)
    try:
        if pool is None:
            reasons: Iterable[str | None] = map(check_image, paths)
        else:
            reasons = pool.map(check_image, paths, chunksize=max(1, min(64, len(paths) // (workers * 8))))
        return [(p, r) for p, r in zip(paths, _counted(reasons, bar)) if r is not None]
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _counted(items: Iterable, bar: tqdm) -> Iterator:
    for item in items:
        bar.update()
        yield item


def _set_limits(pixels: int | None, aspect: float | None) -> None:
    global MAX_ASPECT_RATIO
    Image.MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO = pixels, aspect


def _orientation(im: Image.Image) -> int:
    """EXIF orientation; 1 when the EXIF is unreadable (the pixels are still fine)."""
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block fails in many ways; the pixels are still fine
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB by the rules in the module docstring; an RGB image is returned as is (no copy)."""
    if im.mode in _WIDE_MODES:
        high_byte = np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8
        return Image.fromarray(high_byte.astype(np.uint8)).convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def _unidentified(path: str | os.PathLike) -> str:
    """Why Pillow found no image in `path`, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty file (0 bytes)"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        return "not an image: an HTML/XML page (a failed download?)"
    if not head.translate(None, _TEXT_BYTES):
        return "not an image: a text file"
    return "not an image: unrecognised content (not JPEG, PNG, GIF, BMP, WebP, TIFF or PPM/PGM)"


def _decode_failure(err: Exception) -> str:
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return "truncated file: the image data ends early (an interrupted download or copy)"
    return f"corrupt image data ({type(err).__name__}: {err})"


def move_file(src: str | os.PathLike, dst: str | os.PathLike) -> str | None:
    """Move `src` to `dst` (folders created), never over an existing file: why it could not, or None.

    The one way every tool takes a user's file out of a folder (verify, dedup and clean quarantine, clean's
    relabels): nothing is deleted, nothing overwritten."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        return f"{dst} already exists (move it away and run again)"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), dst)
    except OSError as err:
        return f"{err.strerror or err}"
    return None
