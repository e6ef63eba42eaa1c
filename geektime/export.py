"""Export a checkpoint to a deployable file (ONNX or TorchScript) plus the model.json that describes its input.

The exported graph takes uint8 NCHW images (the deterministic view evaluation uses, any batch size) and
returns softmax probabilities: normalization and softmax are inside, so a consumer only resizes and stacks.

The export checks itself before anything is written under its final name: probabilities on real images (the
--images folder, else the checkpoint's val folder, else random pixels) through the exported file are compared
with eager PyTorch at batch sizes N and 1; above --tolerance the export fails and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import uuid
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from geektime import checkpoint
from geektime.images import BadImageError, list_images
from geektime.inference import (
    INPUT_NAME,
    OUTPUT_NAME,
    Engine,
    eager_model,
    model_info,
    sidecar,
)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export did not produce a trustworthy file; nothing was written."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_images(ckpt: dict, images_dir: str | None, count: int, load_image) -> tuple[np.ndarray, str]:
    """Up to `count` real views spread over the folder (unreadable files skipped), or random pixels when no
    folder is available; returns (uint8 NCHW, where they came from)."""
    folder = images_dir or ckpt.get("config", {}).get("data", {}).get("val_dir")
    if folder is not None and Path(folder).is_dir():
        paths = list_images(folder)
        if images_dir is not None and not paths:
            raise ExportError(f"--images {images_dir}: no images found")
        picks = [paths[i] for i in np.linspace(0, len(paths) - 1, min(len(paths), 4 * count)).round().astype(int)]
        views = []
        for path in dict.fromkeys(picks):
            with contextlib.suppress(BadImageError):
                views.append(load_image(path))
            if len(views) == count:
                break
        if views:
            return np.stack(views), f"{len(views)} images from {folder}"
    elif images_dir is not None:
        raise ExportError(f"--images {images_dir}: no such folder")
    h, w = ckpt["image_size"]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 3, h, w), dtype=np.uint8), f"{count} random images (no image folder found)"


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _export_torchscript(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))


def export(
    ckpt_path: str | os.PathLike,
    fmt: str = "onnx",
    out_dir: str | os.PathLike | None = None,
    images_dir: str | None = None,
    count: int = 8,
    tolerance: float = TOLERANCE,
) -> dict:
    """Write <out>/model.onnx (or model.pt) and <out>/model.json; returns model.json's content."""
    ckpt_path = Path(ckpt_path)
    ckpt = checkpoint.load(ckpt_path)
    out_dir = Path(out_dir) if out_dir is not None else ckpt_path.parent / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / FORMATS[fmt]
    reference = eager_model(ckpt, fold=False, channels_last=False)  # the model exactly as trained and evaluated

    tmp = out_dir / f".{target.stem}.{uuid.uuid4().hex}{target.suffix}"
    tmp_meta = sidecar(tmp)
    try:
        probe = torch.zeros(2, 3, *ckpt["image_size"], dtype=torch.uint8)
        if fmt == "onnx":
            _export_onnx(reference, probe, tmp)
        else:
            _export_torchscript(eager_model(ckpt, fold=True), tmp)
        info = {**model_info(ckpt), "format": fmt, "file": target.name}
        tmp_meta.write_text(json.dumps(info))
        engine = Engine(tmp, threads=torch.get_num_threads())
        # the views for the check come from the same transform predict and evaluate use
        images, source = sample_images(ckpt, images_dir, count, engine.load_image)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(images)).numpy()
        got_batch = engine.predict(images)
        got_single = np.concatenate([engine.predict(images[i : i + 1]) for i in range(len(images))])
        max_diff = float(max(np.abs(got_batch - expected).max(), np.abs(got_single - expected).max()))
        if not max_diff <= tolerance:
            raise ExportError(
                f"{fmt} export of {ckpt_path} disagrees with eager PyTorch: max |dp| = {max_diff:.3g} "
                f"on {source} (tolerance {tolerance:g}); nothing was written"
            )
        info.update(
            {
                "input": {
                    "name": INPUT_NAME,
                    "dtype": "uint8",
                    "layout": "NCHW",
                    "shape": ["batch", 3, *ckpt["image_size"]],
                },
                "output": {
                    "name": OUTPUT_NAME,
                    "dtype": "float32",
                    "shape": ["batch", len(ckpt["classes"])],
                    "meaning": "softmax probabilities in the order of classes",
                },
                "source": {
                    "checkpoint": str(ckpt_path.resolve()),
                    "sha256": sha256(ckpt_path),
                    "epoch": ckpt.get("epoch"),
                },
                "versions": _versions(fmt),
                "check": {
                    "images": source,
                    "batch_sizes": [len(images), 1],
                    "max_abs_diff": max_diff,
                    "tolerance": tolerance,
                },
                "exported": datetime.now().isoformat(timespec="seconds"),
            }
        )
        tmp_meta.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, target)
        os.replace(tmp_meta, sidecar(target))
        return info
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)


def _versions(fmt: str) -> dict:
    versions = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geektime.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint .pth written by train.py")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/export)")
    parser.add_argument("--images", help="images for the self-check (default: the checkpoint's val folder)")
    parser.add_argument("--count", type=int, default=8, help="images in the self-check (default 8)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"largest |difference| in probability allowed against eager PyTorch ({TOLERANCE:g})",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        info = export(args.checkpoint, args.format, args.out, args.images, args.count, args.tolerance)
    except (checkpoint.CheckpointError, ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "export"
    print(
        f"wrote {out / info['file']} and {out / 'model.json'}: {len(info['classes'])} classes, "
        f"input uint8 (batch, 3, {info['image_size'][0]}, {info['image_size'][1]}), "
        f"max |dp| {info['check']['max_abs_diff']:.2g} against eager PyTorch on {info['check']['images']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
