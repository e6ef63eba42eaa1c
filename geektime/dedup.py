"""Duplicate images and the split leaks they cause: `python -m geektime.dedup <dir>... [--model <checkpoint>]`.

Three kinds of pair, each pair reported once under the first kind that finds it:
* exact: the same bytes (SHA-256 of the file);
* near: perceptual hashes (imagehash's 64-bit pHash of the image as training decodes it) at most
  `--phash-distance` bits apart: resized, recompressed or lightly edited copies;
* model: with `--model`, cosine similarity of the model's pooled features (the input of its final classifier)
  of at least `--min-similarity`: the same scene from another frame or crop, ranked the way fastai's
  from_similars ranks them. The model is a geektime checkpoint, or a model config name (efficientnet_lite0)
  whose ImageNet weights install offline.

Thresholds misfire both ways (on doraemon_walle's 318 images, pHash distance <= 10 finds 2 true near copies
and 3 look-alikes; EfficientNet-Lite0 ImageNet features at cosine >= 0.9 find 4 near copies, none false, and
at 0.8 63 pairs, mostly look-alikes), so near and model pairs are only listed for review, never moved. A pair
whose images lie in different splits (train / val / valid / validation / test as a folder name; the last one in
the path counts) is a leak that inflates validation figures, flagged `cross_split`.

Outputs in `--out` (default: the current folder): duplicates.csv (path_a,path_b,kind,score,cross_split; score
is 1 for exact, 1 - distance/64 for near, the cosine for model) and duplicates.html (each pair side by side,
thumbnails embedded). `--quarantine DIR` moves the second (in path order) of each exact pair to DIR under its
path relative to the folders given (their common folder), never overwriting and never deleting.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from geektime.badcases import thumbnail_data_uri
from geektime.images import BadImageError, list_images, load_rgb, move_file

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
KINDS = ("exact", "near", "model")
DEFAULT_PHASH_DISTANCE = 10
DEFAULT_MIN_SIMILARITY = 0.9
_HASH_DECODE = (64, 64)  # pHash looks at 32 x 32: a JPEG decoded at 1/8 scale is plenty


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    kind: str
    score: float
    cross_split: bool


def split_of(path: Path) -> str | None:
    """train / val / test from the last folder name in `path` that names a split (val, valid, validation: val)."""
    for part in reversed(path.parent.parts):
        split = SPLIT_NAMES.get(part.lower())
        if split is not None:
            return split
    return None


def crosses(a: Path, b: Path) -> bool:
    split_a, split_b = split_of(a), split_of(b)
    return split_a is not None and split_b is not None and split_a != split_b


def make_pair(a: Path, b: Path, kind: str, score: float) -> Pair:
    a, b = sorted((a, b))
    return Pair(a, b, kind, score, crosses(a, b))


def _fingerprint(path: Path) -> tuple[str, int | None]:
    """(SHA-256 of the bytes, pHash as an int or None when the image cannot be decoded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        phash = int(str(imagehash.phash(load_rgb(path, min_size=_HASH_DECODE))), 16)
    except BadImageError:
        phash = None
    return digest.hexdigest(), phash


def fingerprints(
    paths: Sequence[Path], workers: int | None = None, progress: bool = True
) -> dict[Path, tuple[str, int | None]]:
    """{path: (sha256, pHash or None)}, computed in worker processes."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    bar = tqdm(total=len(paths), desc="hashing", unit="img", disable=not progress, leave=False)
    try:
        if workers == 1:
            results = []
            for path in paths:
                results.append(_fingerprint(path))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = []
                for result in pool.map(_fingerprint, paths, chunksize=max(1, min(32, len(paths) // (workers * 8)))):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return dict(zip(paths, results))


def exact_pairs(prints: dict[Path, tuple[str, int | None]]) -> list[Pair]:
    """(first, other) for every other file with the first one's bytes, the first in path order."""
    groups: dict[str, list[Path]] = {}
    for path, (digest, _) in prints.items():
        groups.setdefault(digest, []).append(path)
    pairs = []
    for group in groups.values():
        first, *others = sorted(group)
        pairs += [make_pair(first, other, "exact", 1.0) for other in others]
    return pairs


def near_pairs(prints: dict[Path, tuple[str, int | None]], max_distance: int) -> list[Pair]:
    """Every pair whose pHashes differ in at most `max_distance` of 64 bits (blockwise, so memory stays small)."""
    paths = [p for p, (_, phash) in prints.items() if phash is not None]
    hashes = np.array([prints[p][1] for p in paths], dtype=np.uint64)
    pairs = []
    block = 1024
    for start in range(0, len(paths), block):
        rows = hashes[start : start + block]
        distances = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            i = int(i) + start
            if j > i:
                pairs.append(make_pair(paths[i], paths[j], "near", 1 - int(distances[i - start, j]) / 64))
    return pairs


def similar_pairs(paths: Sequence[Path], features: np.ndarray, min_similarity: float) -> list[Pair]:
    """Every pair whose feature vectors have a cosine similarity of at least `min_similarity`."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    pairs = []
    block = 1024
    for start in range(0, len(paths), block):
        sims = unit[start : start + block] @ unit.T
        for i, j in zip(*np.nonzero(sims >= min_similarity)):
            i = int(i) + start
            if j > i:
                pairs.append(make_pair(paths[i], paths[j], "model", float(sims[i - start, j])))
    return pairs


def _load_model(spec: str):
    """(model, family, image size, transforms group, normalization) for a checkpoint file or a model config name."""
    from omegaconf import OmegaConf

    from geektime.checkpoint import load
    from geektime.config import find_conf_dir, model_names
    from geektime.errors import ConfigError
    from geektime.models import build_model

    if Path(spec).is_file():
        ckpt = load(spec)
        mcfg = OmegaConf.create(ckpt["config"]["model"])
        mcfg.pretrained = False
        size = tuple(ckpt["image_size"])
        model = build_model(mcfg, len(ckpt["classes"]), size)
        model.load_state_dict(ckpt["model"])
        return model, mcfg.family, size, OmegaConf.create(ckpt["transforms"]), ckpt["normalization"]
    if spec not in model_names():
        raise ConfigError(f"--model {spec}: neither a checkpoint file nor a model name ({', '.join(model_names())})")
    conf = find_conf_dir()
    mcfg = OmegaConf.load(conf / "model" / f"{spec}.yaml")
    bases = [OmegaConf.load(conf / "model" / f"{base}.yaml") for base in mcfg.pop("defaults", []) if base != "_self_"]
    mcfg = OmegaConf.merge(*bases, mcfg)
    mcfg.pretrained = True  # ImageNet weights, found offline (see the model's yaml)
    size = tuple(mcfg.image_size)
    model = build_model(mcfg, 1000, size)
    return model, mcfg.family, size, OmegaConf.load(conf / "transforms" / "center_crop.yaml"), mcfg.normalization


def model_features(
    model_spec: str | Path, paths: Sequence[Path], batch_size: int = 32, progress: bool = True
) -> tuple[list[Path], np.ndarray]:
    """Pooled features (the final classifier's input) of the readable images, as the model evaluates them.

    `model_spec`: a geektime checkpoint, or a model config name (efficientnet_lite0) for its ImageNet weights."""
    import torch

    from geektime.data import InputNormalizer, build_transform, decode_size

    model, family, size, tcfg, normalization = _load_model(str(model_spec))
    model.eval()
    if family == "efficientnet":

        def pooled(x):
            return model.extract_features(x).mean((2, 3))
    else:  # torchvision ResNet: everything up to fc
        trunk = torch.nn.Sequential(*list(model.children())[:-1])

        def pooled(x):
            return trunk(x).flatten(1)

    transform = build_transform(tcfg, size, train=False)
    min_size = decode_size(tcfg, size, train=False)
    normalize = InputNormalizer(normalization, torch.device("cpu"), channels_last=False)
    kept, chunks = [], []
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(paths), batch_size), desc="features", unit="batch", disable=not progress, leave=False
        ):
            batch, names = [], []
            for path in paths[start : start + batch_size]:
                try:
                    batch.append(transform(load_rgb(path, min_size=min_size)))
                    names.append(path)
                except BadImageError:
                    continue
            if batch:
                chunks.append(pooled(normalize(torch.stack(batch))).numpy())
                kept += names
    return kept, (np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32))


def find_duplicates(
    paths: Sequence[Path],
    max_distance: int = DEFAULT_PHASH_DISTANCE,
    model: str | Path | None = None,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    workers: int | None = None,
    progress: bool = True,
) -> list[Pair]:
    """Ranked pairs: exact first, then near, then model; within a kind by score, highest first."""
    prints = fingerprints(paths, workers, progress)
    found: dict[tuple[Path, Path], Pair] = {}
    candidates: list[Iterable[Pair]] = [exact_pairs(prints), near_pairs(prints, max_distance)]
    if model is not None:
        candidates.append(similar_pairs(*model_features(model, paths, progress=progress), min_similarity))
    for pairs in candidates:
        for pair in pairs:
            found.setdefault((pair.a, pair.b), pair)
    return sorted(found.values(), key=lambda p: (KINDS.index(p.kind), -p.score, str(p.a), str(p.b)))


def duplicate_groups(
    paths: Sequence[Path], max_distance: int = DEFAULT_PHASH_DISTANCE, workers: int | None = None, progress: bool = True
) -> list[list[Path]]:
    """Groups (2 or more, sorted) of images tied by exact or near pairs, chained: what must stay on one side."""
    parent = {p: p for p in paths}

    def root(p: Path) -> Path:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for pair in find_duplicates(paths, max_distance, workers=workers, progress=progress):
        ra, rb = root(pair.a), root(pair.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[Path, list[Path]] = {}
    for p in paths:
        groups.setdefault(root(p), []).append(p)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def write_csv(pairs: Iterable[Pair], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path_a", "path_b", "kind", "score", "cross_split"])
        for p in pairs:
            writer.writerow([p.a, p.b, p.kind, f"{p.score:.4f}", str(p.cross_split).lower()])


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
.pair { display: flex; gap: 16px; align-items: flex-start; background: #fff; border: 1px solid #ddd;
        border-radius: 6px; padding: 8px; margin-bottom: 12px; }
.pair.leak { border: 2px solid #c00; }
.side { width: 260px; }
.side img, .missing { display: block; width: 260px; height: 260px; object-fit: contain; background: #eee; }
.info { min-width: 160px; font-size: 14px; }
.path { font-size: 12px; color: #555; word-break: break-all; }
.badge { color: #fff; background: #c00; border-radius: 4px; padding: 1px 6px; }
"""


def write_html(pairs: Sequence[Pair], path: Path, limit: int | None = None, thumb_size: int = 260) -> None:
    """One self-contained page: each pair side by side, leaks outlined in red."""
    esc = html.escape
    leaks = sum(p.cross_split for p in pairs)
    shown = pairs[:limit]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>Duplicates</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>Duplicates</h1>",
        f"<p>{len(pairs)} pairs, {leaks} across splits"
        + (f"; showing the first {len(shown)}" if len(shown) < len(pairs) else "")
        + ".</p>",
    ]
    for rank, pair in enumerate(shown, start=1):
        parts.append(f'<div class="pair{" leak" if pair.cross_split else ""}">')
        parts.append(
            f'<div class="info"><div>#{rank} <b>{pair.kind}</b></div><div>score {pair.score:.4f}</div>'
            + ('<div><span class="badge">cross-split</span></div>' if pair.cross_split else "")
            + "</div>"
        )
        for image in (pair.a, pair.b):
            try:
                picture = f'<img src="{thumbnail_data_uri(image, thumb_size)}" alt="{esc(str(image))}">'
            except (OSError, ValueError, Image.DecompressionBombError):
                picture = '<div class="missing">cannot read image</div>'
            parts.append(f'<div class="side">{picture}<div class="path">{esc(str(image))}</div></div>')
        parts.append("</div>")
    parts += ["</body>", "</html>"]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def quarantine_exact(pairs: Iterable[Pair], root: Path, qdir: Path) -> tuple[int, list[str]]:
    """Move the second image of each exact pair to qdir/<path under root>; returns (moved, problems)."""
    moved, problems = 0, []
    for pair in pairs:
        if pair.kind != "exact" or not pair.b.exists():
            continue
        target = qdir / pair.b.relative_to(root)
        if (why := move_file(pair.b, target)) is not None:
            problems.append(f"not moved: {pair.b}: {why}")
            continue
        print(f"  moved {pair.b} -> {target}")
        moved += 1
    return moved, problems


def format_pairs(pairs: Sequence[Pair], root: Path, limit: int) -> str:
    def show(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    lines = [f"{'#':>4}  {'kind':<5}  score   leak  pair"]
    for rank, pair in enumerate(pairs[:limit], start=1):
        leak = "LEAK" if pair.cross_split else ""
        lines.append(f"{rank:>4}  {pair.kind:<5}  {pair.score:.4f}  {leak:<4}  {show(pair.a)}  {show(pair.b)}")
    if len(pairs) > limit:
        lines.append(f"  ... and {len(pairs) - limit} more in duplicates.csv")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.dedup",
        description=(
            "Find exact and near duplicate images (and, with --model, look-alikes) under the folders, flag the pairs "
            "that cross train/val/test, and write duplicates.csv and duplicates.html."
        ),
    )
    parser.add_argument("dirs", type=Path, nargs="+", help="folders of images (searched recursively)")
    parser.add_argument(
        "--model",
        metavar="CHECKPOINT|NAME",
        help="also pair images by the pooled features of a checkpoint, or of a model name's "
        "ImageNet weights (e.g. efficientnet_lite0)",
    )
    parser.add_argument(
        "--min-similarity",
        type=float,
        default=DEFAULT_MIN_SIMILARITY,
        metavar="COS",
        help=f"cosine similarity for a model pair (default {DEFAULT_MIN_SIMILARITY})",
    )
    parser.add_argument(
        "--phash-distance",
        type=int,
        default=DEFAULT_PHASH_DISTANCE,
        metavar="BITS",
        help=f"most differing pHash bits (of 64) for a near pair (default {DEFAULT_PHASH_DISTANCE})",
    )
    parser.add_argument(
        "--quarantine",
        type=Path,
        metavar="QDIR",
        help="move the second image of each exact pair here (paths relative to the folders kept)",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for duplicates.csv/html (default .)")
    parser.add_argument("--show", type=int, default=50, metavar="N", help="pairs to print (default 50)")
    parser.add_argument("--workers", type=int, metavar="N", help="hashing processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for folder in args.dirs:
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder")
    if not 0 <= args.phash_distance <= 64:
        parser.error("--phash-distance: must be between 0 and 64")
    root = Path(os.path.commonpath([d.resolve() for d in args.dirs]))
    paths = sorted({p.resolve() for d in args.dirs for p in list_images(d)})
    if len(paths) < 2:
        print(f"error: fewer than two images under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    if args.quarantine is not None and args.quarantine.resolve().is_relative_to(root):
        parser.error(f"--quarantine {args.quarantine}: must be outside {root}, or its files would be searched too")
    try:
        pairs = find_duplicates(
            paths, args.phash_distance, args.model, args.min_similarity, args.workers, not args.quiet
        )
    except ValueError as err:  # CheckpointError, ConfigError
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(pairs, args.out / "duplicates.csv")
    write_html(pairs, args.out / "duplicates.html")
    counts = {kind: sum(p.kind == kind for p in pairs) for kind in KINDS}
    leaks = sum(p.cross_split for p in pairs)
    print(
        f"{len(paths)} images under {root}: "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items())
        + f" pair(s); {leaks} cross splits"
    )
    if pairs:
        print(format_pairs(pairs, root, args.show))
    print(f"-> {args.out / 'duplicates.csv'}, {args.out / 'duplicates.html'}")
    if args.quarantine is not None:
        moved, problems = quarantine_exact(pairs, root, args.quarantine)
        for problem in problems:
            print(f"  {problem}")
        print(f"moved {moved} exact duplicate(s) to {args.quarantine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
