"""Evaluate checkpoints: per-image prediction txt, metrics, the checkpoint that fits the need, thresholds.

`checkpoint=` takes a checkpoint file, a run folder (each epoch_NNN.pth) or a sweep folder (each job's).
Every request is checked before any image is decoded. The images come through `data.load_split`, the
same path as training: decoded once and cached when they fit `data.cache_max_gb` (each checkpoint is then
only inference; in a sweep, once for every job sharing data, size and transform), streamed by DataLoader
workers when they don't. Metrics are computed from the txt as written, so the txt, its JSON and the table
agree; a txt that was edited by hand since this program wrote it is moved aside, never overwritten.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from geektime import checkpoint
from geektime.config import image_size
from geektime.data import InputNormalizer, ensure_digits, eval_loader, held_out, load_split, open_folder
from geektime.engine import predict
from geektime.errors import ConfigError
from geektime.images import list_images
from geektime.inference import fold_batchnorm
from geektime.machine import cpu_count, keep_freed_memory, resolve_device
from geektime.metrics import (
    confusion_png_path,
    epoch_table,
    format_report,
    format_selection,
    format_table,
    save_confusion_png,
    select_best,
    threshold_for,
    write_report,
    write_table_csv,
    write_threshold_outputs,
)
from geektime.models import build_model, channels_last_pays
from geektime.predictions import read_predictions, write_predictions
from geektime.schema import EvaluateConfig, check_ranges

log = logging.getLogger("geektime.evaluate")


# ---------------------------------------------------------------- what to evaluate


def checkpoint_files(target: Path) -> list[Path]:
    """A checkpoint file as given; a run dir's epoch_NNN.pth files (or its last.pth); [] for anything else."""
    if target.is_file():
        return [target]
    if target.is_dir():
        return checkpoint.epoch_checkpoints(target) or [p for p in [target / "last.pth"] if p.is_file()]
    return []


@dataclass
class Job:
    """One run's checkpoints; in a sweep, one job of it (`name` is its folder)."""

    name: str
    files: list[Path]
    first: dict = field(repr=False)

    @property
    def run_dir(self) -> Path:
        return self.files[0].parent


def find_jobs(target: str) -> tuple[list[Job], bool]:
    """The runs under `checkpoint=` and whether it is a sweep folder (runs in its sub-folders)."""
    path = Path(target).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint={target}: no such file, run folder or sweep folder")
    files = checkpoint_files(path)
    if files:
        return [Job(path.name, files, checkpoint.load(files[0]))], False
    jobs = []
    if path.is_dir():
        for sub in sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: _job_order(p.name)):
            if sub_files := checkpoint_files(sub):
                jobs.append(Job(sub.name, sub_files, checkpoint.load(sub_files[0])))
    if not jobs:
        raise ConfigError(f"checkpoint={target}: holds no epoch_NNN.pth or last.pth, and no run folders that do")
    return jobs, True


def _job_order(name: str) -> tuple[int, str]:
    head = name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, name)


def check_request(cfg: DictConfig, classes: list[str]) -> None:
    """Everything about the selection and thresholds that can be wrong, before any image is decoded."""
    positive = cfg.select.positive
    if positive is not None and positive not in classes:
        raise ConfigError(
            f"select.positive={positive!r} is not a class of the checkpoint; choose one of: {', '.join(classes)}"
        )
    targets = [k for k in ("target_recall", "target_precision") if cfg.threshold[k] is not None]
    if targets and positive is None:
        raise ConfigError(
            f"threshold.{targets[0]} needs select.positive=<class>: a threshold is on one class's "
            f"probability (one of: {', '.join(classes)})"
        )
    if len(targets) == 2:
        raise ConfigError("give one of threshold.target_recall and threshold.target_precision, not both")
    if cfg.data.test_dir is not None and targets:
        raise ConfigError("threshold.* needs labeled images; data.test_dir images are unlabeled")


# ---------------------------------------------------------------- the images


@dataclass
class Inputs:
    """The images that checkpoints sharing an input signature are evaluated on, decoded once."""

    loader: torch.utils.data.DataLoader
    paths: list[str]
    targets: torch.Tensor
    source: str
    labeled: bool
    size: tuple[int, int]
    transform: str


def input_settings(cfg: DictConfig, first: dict) -> tuple[tuple[int, int], DictConfig]:
    size = image_size("data.image_size", cfg.data.image_size) if cfg.data.image_size else tuple(first["image_size"])
    tcfg = OmegaConf.create(first["transforms"])
    if cfg.transforms.name is not None:
        tcfg.name = str(cfg.transforms.name)
    return size, tcfg


def load_inputs(cfg: DictConfig, first: dict) -> Inputs:
    """The test folder (unlabeled) or the val folder (the checkpoint's own by default), as one split."""
    size, tcfg = input_settings(cfg, first)
    if cfg.data.test_dir is not None:
        key, root = "data.test_dir", str(cfg.data.test_dir)
        if not Path(root).is_dir():
            raise ConfigError(f"data.test_dir={root}: no such folder")
        paths = [str(p) for p in list_images(root)]
        if not paths:
            raise ConfigError(f"data.test_dir={root}: no images found")
        targets = [-1] * len(paths)
    else:
        key, trained_on = "data.val_dir", first["config"]["data"]
        held = cfg.data.val_dir is None and trained_on.get("valid_pct")
        root = str(
            cfg.data.val_dir
            or (trained_on["train_dir"] if held else None)
            or trained_on.get("val_dir")
            or ensure_digits()[1]
        )
        try:
            folder = open_folder(key, root, first["classes"])
        except ConfigError as err:
            raise ConfigError(f"{err} (the checkpoint holds {checkpoint.describe(first)})") from None
        samples = folder.samples
        if held:  # the images the run held out of its train folder, found again the same way
            samples = held_out(folder, trained_on["valid_pct"], first["config"]["trainer"]["seed"])[1]
        paths, targets = [p for p, _ in samples], [t for _, t in samples]
    split = load_split(key, paths, targets, root, tcfg, cfg.data, size, train=False, workers=cpu_count())
    if len(split) == 0:
        raise ConfigError(f"{key}={root}: no usable images left")
    log.info(
        "%d %s images from %s at %s (%s)",
        len(split),
        "val" if cfg.data.test_dir is None else "unlabeled",
        root,
        size,
        tcfg.name,
    )
    return Inputs(
        eval_loader(split, cfg.data), split.paths, split.targets, root, cfg.data.test_dir is None, size, str(tcfg.name)
    )


# ---------------------------------------------------------------- txt files a person may have edited


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written_digest(txt: Path) -> str | None:
    """The digest of `txt` as this program last wrote it (kept in the JSON beside it)."""
    meta = txt.with_suffix(".json")
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("written_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def move_aside_if_edited(txt: Path) -> Path | None:
    """A txt whose content differs from what this program wrote goes to `<stem>.edited-<time>.txt`."""
    if not txt.exists() or written_digest(txt) == _sha256(txt):
        return None
    aside = txt.with_name(f"{txt.stem}.edited-{datetime.now():%Y%m%d-%H%M%S}.txt")
    txt.rename(aside)
    log.warning("%s was edited since it was written: kept as %s; the new predictions go to %s", txt, aside, txt)
    print(f"note: {txt} was edited by hand: kept as {aside}")
    return aside


def record_digest(txt: Path) -> None:
    meta = txt.with_suffix(".json")
    data = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    data["written_sha256"] = _sha256(txt)
    meta.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- evaluating


def evaluate_job(cfg: DictConfig, job: Job, inputs: Inputs, device: torch.device, out_dir: Path) -> list[tuple]:
    """Every checkpoint of `job` on `inputs`: its txt (and, when labeled, JSON report); [(name, report, txt)]."""
    first, classes = job.first, job.first["classes"]
    model_cfg = OmegaConf.create({**first["config"]["model"], "pretrained": False})
    channels_last = channels_last_pays("auto", model_cfg.family, inputs.size, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    base = build_model(model_cfg, len(classes), inputs.size)
    normalizer = InputNormalizer(first["normalization"], device, channels_last)
    signature = checkpoint.input_signature(first)
    results = []
    for path in job.files:
        ckpt = first if path == job.files[0] else checkpoint.load(path)
        checkpoint.check_compatible(
            ckpt,
            path,
            signature,
            f"{job.files[0]} holds {checkpoint.describe(first)}",
            "The files of one run must share their input: evaluate them separately.",
        )
        base.load_state_dict(ckpt["model"])  # same architecture throughout: only the weights change
        # BatchNorm folded into the convolutions: 1.17-1.35x unfolded (bench_inference; README "Inference speed")
        model = fold_batchnorm(copy.deepcopy(base)).to(device=device, memory_format=memory_format)
        probs = predict(model, inputs.loader, normalizer, device, amp=device.type == "cuda")
        txt = out_dir / (f"{path.stem}.txt" if inputs.labeled else f"{path.stem}_test.txt")
        move_aside_if_edited(txt)
        write_predictions(
            txt,
            classes,
            probs.numpy(),
            inputs.targets.numpy(),
            inputs.paths,
            header={
                "checkpoint": str(path),
                "epoch": ckpt.get("epoch"),
                "data": inputs.source,
                "image_size": f"{inputs.size[0]}x{inputs.size[1]}",
                "transform": inputs.transform,
                "date": datetime.now().isoformat(timespec="seconds"),
            },
        )
        report = None
        if inputs.labeled:
            report = write_report(read_predictions(txt), txt, confusion_png=len(job.files) == 1)
        else:
            counts = Counter(classes[i] for i in probs.argmax(1).tolist())
            print(f"{txt}: {len(inputs.paths)} images; predicted " + ", ".join(f"{c}: {counts[c]}" for c in classes))
        record_digest(txt)
        results.append((path.name, report, txt))
    return results


def choose(cfg: DictConfig, results: list[tuple], out_dir: Path, run_dir: Path) -> dict:
    """The epochs table and the checkpoint `select.*` asks for, with its confusion PNG and thresholds."""
    rows = [(name, report) for name, report, _ in results]
    txts = {name: txt for name, _, txt in results}
    table = epoch_table(rows)
    write_table_csv(table, out_dir / "epochs.csv")
    print(format_table(table))
    if len(rows) == 1:
        print(format_report(rows[0][1]))
    best = select_best(
        rows, str(cfg.select.metric), cfg.select.positive, cfg.select.min_precision, cfg.select.min_recall
    )
    best["checkpoint_path"] = str(run_dir / best["checkpoint"])
    best["predictions"] = str(txts[best["checkpoint"]])
    best["confusion_png"] = str(confusion_png_path(txts[best["checkpoint"]]))
    if len(rows) > 1:
        save_confusion_png(dict(rows)[best["checkpoint"]], best["confusion_png"])
        for txt in txts.values():  # an earlier evaluation's choice would read as this one's
            stale = confusion_png_path(txt)
            if str(stale) != best["confusion_png"]:
                stale.unlink(missing_ok=True)
    return best


def thresholds(cfg: DictConfig, txt: Path) -> None:
    """PR table and curve for the positive class; the threshold for a target when one is given."""
    positive, pred = cfg.select.positive, read_predictions(txt)
    csv_path, png_path = write_threshold_outputs(pred, positive, txt)
    print(f"precision/recall at every threshold of p({positive}): {csv_path}, {png_path}")
    if cfg.threshold.target_recall is not None or cfg.threshold.target_precision is not None:
        found = threshold_for(pred, positive, cfg.threshold.target_recall, cfg.threshold.target_precision)
        print(
            f"threshold {found['threshold']:.5f} on p({positive}): precision {found['precision']:.5f}, "
            f"recall {found['recall']:.5f}"
        )
        txt.with_name(f"{txt.stem}_{positive}_threshold.json").write_text(json.dumps(found, indent=2) + "\n")


def _write_best(best: dict, out_dir: Path) -> None:
    (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    print(format_selection(best) + f"\n  -> {out_dir / 'best.json'}")


def evaluate_run(cfg: DictConfig, job: Job) -> dict | None:
    check_request(cfg, job.first["classes"])
    device = resolve_device(cfg.trainer.device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else job.run_dir / "eval"
    (out_dir / "best.json").unlink(missing_ok=True)  # a failed selection must not leave an old choice in place
    inputs = load_inputs(cfg, job.first)
    log.info("%d checkpoint(s) of %s", len(job.files), checkpoint.model_name(job.first))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_job(cfg, job, inputs, device, out_dir)
    if not inputs.labeled:
        return None
    print(f"\nper-checkpoint txt and JSON, epochs.csv and the chosen checkpoint's confusion PNG in {out_dir}")
    best = choose(cfg, results, out_dir, job.run_dir)
    _write_best(best, out_dir)
    if cfg.select.positive is not None:
        thresholds(cfg, Path(best["predictions"]))
    return best


def evaluate_sweep(cfg: DictConfig, jobs: list[Job], sweep_dir: Path) -> dict | None:
    """Every job's epochs (each job's eval/ as for a run), then the sweep's own eval/: checkpoints.csv (one row
    per job x epoch) and best.json, chosen by `select.*` across all of them (ties: earlier job, earlier epoch).

    Jobs sharing val data, image size, transform and normalization are evaluated on one decoded split."""
    from geektime.sweep import job_overrides, swept_keys

    for job in jobs:
        check_request(cfg, job.first["classes"])
    if cfg.out_dir:
        raise ConfigError("out_dir= is for one run; a sweep writes each job's eval/ and <sweep>/eval/")
    device = resolve_device(cfg.trainer.device)
    sweep_eval = sweep_dir / "eval"
    (sweep_eval / "best.json").unlink(missing_ok=True)
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        size, tcfg = input_settings(cfg, job.first)
        trained_on = job.first["config"]["data"]
        val_dir = cfg.data.test_dir or cfg.data.val_dir or trained_on.get("val_dir")
        held = [trained_on.get("train_dir"), trained_on.get("valid_pct"), job.first["config"]["trainer"]["seed"]]
        key = json.dumps(
            [
                str(val_dir),
                None if val_dir else held,
                size,
                OmegaConf.to_container(tcfg),
                job.first["normalization"],
                job.first["classes"],
            ],
            sort_keys=True,
        )
        groups.setdefault(key, []).append(job)
    overrides = {job.name: job_overrides(job.run_dir) for job in jobs}
    varying, _ = swept_keys(list(overrides.values()))
    results: dict[str, list[tuple]] = {}
    for group in groups.values():
        inputs = load_inputs(cfg, group[0].first)
        print(f"decoded {len(inputs.paths)} images once for job(s): {', '.join(j.name for j in group)}")
        for job in group:
            out_dir = job.run_dir / "eval"
            out_dir.mkdir(parents=True, exist_ok=True)
            results[job.name] = evaluate_job(cfg, job, inputs, device, out_dir)
            if inputs.labeled:
                _write_best(choose(cfg, results[job.name], out_dir, job.run_dir), out_dir)
    if cfg.data.test_dir is not None:
        return None
    sweep_eval.mkdir(exist_ok=True)
    rows, reports = [], []
    for job in jobs:  # job order, then epoch order: select_best's ties go to the earlier one
        for name, report, _ in results[job.name]:
            qualified = f"{job.name}/{name}"
            reports.append((qualified, report))
            row = {
                "job": job.name,
                **{k: overrides[job.name].get(k) for k in varying},
                "epoch": ckpt_epoch(Path(name)),
                "accuracy": report["accuracy"],
            }
            for cls, figures in report["per_class"].items():
                row[f"{cls}_precision"], row[f"{cls}_recall"] = figures["precision"], figures["recall"]
            rows.append(row)
    with (sweep_eval / "checkpoints.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = select_best(
        reports, str(cfg.select.metric), cfg.select.positive, cfg.select.min_precision, cfg.select.min_recall
    )
    job_name, name = best["checkpoint"].split("/", 1)
    job = next(j for j in jobs if j.name == job_name)
    txt = next(t for n, _, t in results[job_name] if n == name)
    best.update(
        job=job_name,
        overrides=overrides[job_name],
        checkpoint_path=str(job.run_dir / name),
        predictions=str(txt),
        epoch=ckpt_epoch(job.run_dir / name),
    )
    _write_best(best, sweep_eval)
    print(f"one row per job and epoch: {sweep_eval / 'checkpoints.csv'}")
    if cfg.select.positive is not None:
        thresholds(cfg, txt)
    return best


def ckpt_epoch(path: Path) -> int | None:
    match = checkpoint.EPOCH_FILE.match(path.name)
    return int(match.group(1)) if match else None


def evaluate_txt(cfg: DictConfig) -> dict:
    """Metrics again from a (possibly hand-edited) prediction txt: no model, no images."""
    txt = Path(cfg.predictions)
    if not txt.is_file():
        raise ConfigError(f"predictions={txt}: no such file")
    pred = read_predictions(txt)
    check_request(cfg, pred.classes)
    written = written_digest(txt)
    report = write_report(pred, txt)
    if written is not None:  # what the evaluator wrote stays on record, so a later evaluation keeps this edit
        meta = txt.with_suffix(".json")
        meta.write_text(
            json.dumps({**json.loads(meta.read_text(encoding="utf-8")), "written_sha256": written}, indent=2) + "\n",
            encoding="utf-8",
        )
    print(format_report(report))
    print(f"\n-> {txt.with_suffix('.json')}")
    if cfg.select.positive is not None:
        thresholds(cfg, txt)
    return report


def main(cfg: DictConfig):
    check_ranges(cfg, EvaluateConfig)
    keep_freed_memory()
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    if (cfg.checkpoint is None) == (cfg.predictions is None):
        raise ConfigError("give exactly one of checkpoint=<file, run dir or sweep dir> and predictions=<txt>")
    if cfg.predictions is not None:
        return evaluate_txt(cfg)
    jobs, is_sweep = find_jobs(cfg.checkpoint)
    if is_sweep:
        return evaluate_sweep(cfg, jobs, Path(cfg.checkpoint).expanduser())
    return evaluate_run(cfg, jobs[0])
