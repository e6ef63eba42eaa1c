"""Evaluate checkpoints: per-image prediction txt, metrics, the checkpoint that fits the need, thresholds.

The val images are decoded and transformed once; every checkpoint of a run is then only inference.
Metrics are always computed from the txt as written, so the txt, its JSON and the table agree.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from geektime import checkpoint
from geektime.config import ConfigError, choose, cpu_count, image_size
from geektime.data import InputNormalizer, build_transform, decode_all, decode_size, ensure_digits, open_folder, report_bad
from geektime.distributed import resolve_device
from geektime.engine import predict
from geektime.images import list_images
from geektime.metrics import (SelectionError, confusion_png_path, epoch_table, format_report, format_selection,
                              format_table, save_confusion_png, select_best, threshold_for, write_report,
                              write_table_csv, write_threshold_outputs)
from geektime.models import build_model, channels_last_pays
from geektime.predictions import read_predictions, write_predictions

log = logging.getLogger("geektime.evaluate")


def checkpoint_files(target: str) -> list[Path]:
    """A checkpoint file as given; a run dir's epoch_NNN.pth files (or its last.pth)."""
    path = Path(target).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = checkpoint.epoch_checkpoints(path) or [p for p in [path / "last.pth"] if p.is_file()]
        if files:
            return files
        raise ConfigError(f"checkpoint={target}: the folder holds no epoch_NNN.pth or last.pth")
    raise ConfigError(f"checkpoint={target}: no such file or run folder")


def _same_input(ckpt: dict, first: dict, path: Path, first_path: Path) -> None:
    if (ckpt.get("config", {}).get("model", {}).get("name") != first["config"]["model"]["name"]
            or list(ckpt.get("classes", [])) != list(first["classes"])):
        raise checkpoint.CheckpointError(f"{path} holds {checkpoint.describe(ckpt)}, but {first_path} holds "
                                         f"{checkpoint.describe(first)}; evaluate them separately")
    for key in ("image_size", "normalization", "transforms"):
        if ckpt.get(key) != first.get(key):
            raise checkpoint.CheckpointError(f"{path}: its {key} {ckpt.get(key)} differs from the first checkpoint's "
                                             f"{first.get(key)}; evaluate them separately")


def _images(cfg: DictConfig, first: dict, size: tuple[int, int], tcfg: DictConfig):
    """(paths, targets, source folder): the test folder (unlabeled) or the val folder (the checkpoint's by default)."""
    if cfg.data.test_dir is not None:
        paths = [str(p) for p in list_images(cfg.data.test_dir)]
        if not paths:
            raise ConfigError(f"data.test_dir={cfg.data.test_dir}: no images found")
        return paths, np.full(len(paths), -1), str(cfg.data.test_dir)
    val_dir = cfg.data.val_dir or first["config"]["data"].get("val_dir") or ensure_digits()[1]
    try:
        folder = open_folder("data.val_dir", val_dir, first["classes"])
    except ConfigError as err:
        raise ConfigError(f"{err} (the checkpoint holds {checkpoint.describe(first)})") from None
    return [p for p, _ in folder.samples], np.array(folder.targets), str(val_dir)


def evaluate_checkpoints(cfg: DictConfig) -> dict | None:
    files = checkpoint_files(cfg.checkpoint)
    first = checkpoint.load(files[0])
    classes = first["classes"]
    size = image_size("data.image_size", cfg.data.image_size) if cfg.data.image_size else tuple(first["image_size"])
    tcfg = OmegaConf.create(first["transforms"])
    if cfg.transforms.name is not None:
        tcfg.name = choose("transforms.name", cfg.transforms.name, ("resize", "letterbox", "center_crop"))
    device = resolve_device(cfg.trainer.device)
    torch.set_num_threads(int(cfg.trainer.threads or cpu_count()))
    labeled = cfg.data.test_dir is None
    run_dir = files[0].parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    paths, targets, source = _images(cfg, first, size, tcfg)
    images, bad = decode_all(paths, build_transform(tcfg, size, train=False), decode_size(tcfg, size, False), size,
                             desc=f"decoding {source}")
    report_bad("data.test_dir" if not labeled else "data.val_dir", bad, cfg.data.on_bad_image, source)
    if bad:
        unusable = {b for b, _ in bad}
        keep = np.array([p not in unusable for p in paths])
        images, targets = images[torch.from_numpy(keep)], targets[keep]
        paths = [p for p, k in zip(paths, keep) if k]
    log.info("%d %s images from %s at %s (%s); %d checkpoint(s) of %s", len(paths), "val" if labeled else "unlabeled",
             source, size, tcfg.name, len(files), first["config"]["model"]["name"])

    model_cfg = OmegaConf.create({**first["config"]["model"], "pretrained": False})
    channels_last = channels_last_pays("auto", model_cfg.family, size, device)
    model = build_model(model_cfg, len(classes), size).to(
        device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    normalizer = InputNormalizer(first["normalization"], device, channels_last)
    rows, txts, reports = [], {}, {}
    for path in files:
        ckpt = first if path == files[0] else checkpoint.load(path)
        _same_input(ckpt, first, path, files[0])
        model.load_state_dict(ckpt["model"])  # same architecture throughout: only the weights change
        probs = predict(model, images, normalizer, device, cfg.data.batch_size, amp=device.type == "cuda")
        txt = out_dir / (f"{path.stem}.txt" if labeled else f"{path.stem}_test.txt")
        write_predictions(txt, classes, probs.numpy(), targets, paths, header={
            "checkpoint": str(path), "epoch": ckpt.get("epoch"), "data": source, "image_size": f"{size[0]}x{size[1]}",
            "transform": tcfg.name, "date": datetime.now().isoformat(timespec="seconds")})
        txts[path.name] = txt
        if labeled:
            reports[path.name] = write_report(read_predictions(txt), txt, confusion_png=len(files) == 1)
            rows.append((path.name, reports[path.name]))
        else:
            counts = Counter(classes[i] for i in probs.argmax(1).tolist())
            print(f"{txt}: {len(paths)} images; predicted " + ", ".join(f"{c}: {counts[c]}" for c in classes))
    if not labeled:
        return None

    table = epoch_table(rows)
    write_table_csv(table, out_dir / "epochs.csv")
    print(format_table(table))
    if len(rows) == 1:
        print(format_report(rows[0][1]))
    print(f"\nper-checkpoint txt and JSON, epochs.csv and the chosen checkpoint's confusion PNG in {out_dir}")
    try:
        best = select_best(rows, cfg.select.metric, cfg.select.positive, cfg.select.min_precision,
                           cfg.select.min_recall)
    except SelectionError as err:
        raise ConfigError(f"{err}. Lower the floor (select.min_precision / select.min_recall) "
                          "or train longer.") from None
    best["checkpoint_path"] = str(run_dir / best["checkpoint"])
    best["predictions"] = str(txts[best["checkpoint"]])
    best["confusion_png"] = str(confusion_png_path(txts[best["checkpoint"]]))
    if len(files) > 1:
        save_confusion_png(reports[best["checkpoint"]], best["confusion_png"])
        for txt in txts.values():  # an earlier evaluation's choice would read as this one's
            stale = confusion_png_path(txt)
            if str(stale) != best["confusion_png"]:
                stale.unlink(missing_ok=True)
    (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    print(format_selection(best) + f"\n  -> {out_dir / 'best.json'}")
    if cfg.select.positive is not None:
        thresholds(cfg, read_predictions(txts[best["checkpoint"]]), txts[best["checkpoint"]])
    return best


def thresholds(cfg: DictConfig, pred, txt: Path) -> None:
    """PR table and curve for the positive class; the threshold for a target when one is given."""
    positive = cfg.select.positive
    csv_path, png_path = write_threshold_outputs(pred, positive, txt)
    print(f"precision/recall at every threshold of p({positive}): {csv_path}, {png_path}")
    if cfg.threshold.target_recall is not None or cfg.threshold.target_precision is not None:
        found = threshold_for(pred, positive, cfg.threshold.target_recall, cfg.threshold.target_precision)
        print(f"threshold {found['threshold']:.5f} on p({positive}): precision {found['precision']:.5f}, "
              f"recall {found['recall']:.5f}")
        txt.with_name(f"{txt.stem}_{positive}_threshold.json").write_text(json.dumps(found, indent=2) + "\n")


def evaluate_txt(cfg: DictConfig) -> dict:
    """Metrics again from a (possibly hand-edited) prediction txt: no model, no images."""
    txt = Path(cfg.predictions)
    if not txt.is_file():
        raise ConfigError(f"predictions={txt}: no such file")
    pred = read_predictions(txt)
    report = write_report(pred, txt)
    print(format_report(report))
    print(f"\n-> {txt.with_name(txt.stem + '.json')}")
    if cfg.select.positive is not None:
        thresholds(cfg, pred, txt)
    return report


def main(cfg: DictConfig):
    choose("select.metric", cfg.select.metric, ("precision", "recall", "f1", "accuracy"))
    if (cfg.checkpoint is None) == (cfg.predictions is None):
        raise ConfigError("give exactly one of checkpoint=<file or run dir> and predictions=<txt>")
    if cfg.predictions is not None:
        return evaluate_txt(cfg)
    return evaluate_checkpoints(cfg)
