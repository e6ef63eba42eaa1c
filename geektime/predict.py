"""Classify image files with an exported model (model.onnx / model.pt) or a checkpoint: top-k per image, JSON,
and for folders the course's prediction txt (all-zero truth block), readable by `evaluate.py predictions=`.

Images go through exactly the deterministic view evaluation uses (load_rgb at decode_size, then
build_transform with the model's transform), so the probabilities equal `evaluate.py data.test_dir=`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from geektime.checkpoint import CheckpointError
from geektime.data import eval_loader, load_split
from geektime.images import IMAGE_EXTENSIONS, list_images
from geektime.inference import Engine, ModelFileError
from geektime.machine import cpu_count, keep_freed_memory
from geektime.predictions import write_predictions
from geektime.schema import EvalDataConfig


class UsageError(ValueError):
    """Bad command-line input; the message says what to give instead."""


def collect(inputs: list[str]) -> tuple[list[str], list[Path]]:
    """(image paths in order, the folders among the inputs); a folder contributes its images, sorted."""
    paths, folders = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [str(p) for p in list_images(path)]
            if not found:
                raise UsageError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            paths.extend(found)
            folders.append(path)
        elif path.is_file():
            paths.append(str(path))
        else:
            raise UsageError(f"{path}: no such file or folder")
    return paths, folders


def predict_files(
    engine: Engine, paths: list[str], batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(probabilities, the paths they belong to, unreadable files with their reasons).

    The images come through `data.load_split`, the path training and evaluation use (decoded once in memory, or
    streamed in workers when they are many; nothing written to the disk cache for ad-hoc photos)."""
    dcfg = OmegaConf.structured(EvalDataConfig(batch_size=batch_size, on_bad_image="skip", disk_cache=False))
    split = load_split(
        "images",
        paths,
        [-1] * len(paths),
        ".",
        engine.tcfg,
        dcfg,
        engine.image_size,
        train=False,
        workers=cpu_count(),
        progress=progress,
    )
    loader = eval_loader(split, dcfg)
    bar = tqdm(loader, desc="predicting", unit="batch", leave=False, disable=not progress or len(loader) < 2)
    out = [engine.predict(images.numpy()) for images, _ in bar]
    probs = np.concatenate(out) if out else np.zeros((0, len(engine.classes)), dtype=np.float32)
    return probs, split.paths, split.skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geektime.predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model.onnx or model.pt (with its model.json), or a checkpoint .pth")
    parser.add_argument("inputs", nargs="+", metavar="image|dir", help="image files and/or folders of images")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument(
        "--out",
        help="prediction txt to write (default for folders: <model folder>/predict/"
        "<folder name>.txt; a txt is always written when given)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    keep_freed_memory()
    try:
        paths, folders = collect(args.inputs)
        engine = Engine(args.model, threads=args.threads or cpu_count())
    except (UsageError, ModelFileError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    probs, paths, bad = predict_files(engine, paths, args.batch_size, progress=not args.json)
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not paths:
        print("error: none of the inputs is a readable image", file=sys.stderr)
        return 2

    k = min(args.top_k, len(engine.classes))
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(engine.path),
                    "backend": engine.backend,
                    "classes": engine.classes,
                    "images": [
                        {
                            "path": path,
                            "result": engine.classes[int(p.argmax())],
                            "top_k": engine.top_k(p, k),
                            "probabilities": dict(zip(engine.classes, map(float, p))),
                        }
                        for path, p in zip(paths, probs)
                    ],
                    "skipped": [{"path": path, "reason": reason} for path, reason in bad],
                },
                indent=2,
            )
        )
    else:
        for path, p in zip(paths, probs):
            print(f"{path}: " + ", ".join(f"{name} {prob:.5f}" for name, prob in engine.top_k(p, k)))

    txt = (
        Path(args.out)
        if args.out
        else (engine.path.parent / "predict" / f"{folders[0].resolve().name or 'root'}.txt" if folders else None)
    )
    if txt is not None:
        write_predictions(
            txt,
            engine.classes,
            probs,
            np.full(len(paths), -1),
            paths,
            header={
                "model": str(engine.path),
                "backend": engine.backend,
                "data": " ".join(map(str, folders or args.inputs)),
                "image_size": f"{engine.image_size[0]}x{engine.image_size[1]}",
                "transform": engine.info["transforms"]["name"],
                "date": datetime.now().isoformat(timespec="seconds"),
            },
        )
        print(f"-> {txt}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
