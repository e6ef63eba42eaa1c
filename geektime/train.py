"""A training run: config -> data -> model -> epochs (train, evaluate, log, checkpoint) -> result."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from geektime import checkpoint, distributed, runs
from geektime.config import to_plain, validate_train_config
from geektime.data import InputNormalizer, build_data, eval_loader
from geektime.engine import evaluate, train_head_epoch, train_one_epoch
from geektime.errors import EXPECTED_FAILURES, ConfigError, NonFiniteLossError, RunFolderError
from geektime.finetune import Phase, Schedule, input_size, phase_of, phase_optimizer, phases, set_up_model
from geektime.hparams import METRICS as HPARAMS_METRICS
from geektime.hparams import log_hparams, run_hparams
from geektime.machine import default_threads
from geektime.metrics import pick_best
from geektime.models import build_model, channels_last_pays, classifier, head_features
from geektime.schema import TrainConfig

log = logging.getLogger("geektime.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_for_resume(cfg: DictConfig, ckpt: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's own config, with only what was given on this command line (`overrides`) changed."""
    resumed = OmegaConf.create(ckpt["config"])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "trainer.resume" or key.startswith("hydra"):
            continue
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    resumed.trainer.resume = cfg.trainer.resume
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), resumed)


def metric_columns(classes: list[str]) -> list[str]:
    per_class = [f"{c}_{m}" for c in classes for m in ("precision", "recall")]
    return [
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        *per_class,
        "macro_precision",
        "macro_recall",
        "train_images_per_s",
        "epoch_seconds",
    ]


def log_epoch(epoch: int, epochs: int, row: dict, classes: list[str]) -> None:
    per_class = "  ".join(f"{c} P {row[f'{c}_precision']:.3f} R {row[f'{c}_recall']:.3f}" for c in classes[:8])
    log.info(
        "epoch %d/%d  lr %.5f  train loss %.4f acc %.4f  |  val loss %.4f acc %.4f  |  %s  |  %.1f img/s",
        epoch,
        epochs,
        row["lr"],
        row["train_loss"],
        row["train_acc"],
        row["val_loss"],
        row["val_acc"],
        per_class + ("  ..." if len(classes) > 8 else ""),
        row["train_images_per_s"],
    )


def claim_run_dir(run_dir: Path, resuming: bool, overwrite: bool, procs: distributed.Processes) -> None:
    """Rank 0 checks (and with overwrite, clears) the run folder; every rank stops alike when it is refused."""
    problem = None
    if procs.is_main:
        try:
            runs.prepare(run_dir, resuming, overwrite)
        except RunFolderError as err:
            problem = str(err)
    problem = distributed.broadcast_object(problem, procs)
    if problem:
        raise RunFolderError(problem)


def wrap(model: nn.Module, cfg: DictConfig, procs: distributed.Processes, device: torch.device) -> nn.Module:
    """DDP and torch.compile around the plain model; done again at a phase boundary, as what trains changes."""
    if procs.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        model = torch.compile(model)
    return model


def head_only(cfg: DictConfig, phase: Phase, procs: distributed.Processes) -> bool:
    """Whether the frozen phase can train the head on pooled features computed once: a body frozen with its
    BatchNorm, no augmentation (every epoch would see other crops), one process."""
    return (
        phase.name == "frozen"
        and cfg.finetune.cache_features
        and cfg.finetune.freeze_bn
        and not cfg.transforms.augment.enabled
        and not procs.distributed
    )


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train per `cfg`, writing into `run_dir`; returns the run's result (best epoch and its metrics)."""
    ckpt = None
    if cfg.trainer.resume:
        resume_path = checkpoint.resume_file(cfg.trainer.resume)
        ckpt = checkpoint.load(resume_path)
        cfg = config_for_resume(cfg, ckpt, list(HydraConfig.get().overrides.task))
    validate_train_config(cfg)
    procs = distributed.setup(cfg.trainer.device)
    run_dir = Path(distributed.broadcast_object(str(run_dir), procs))  # every rank: rank 0's run folder
    claim_run_dir(run_dir, ckpt is not None, cfg.trainer.overwrite, procs)
    torch.set_num_threads(int(cfg.trainer.threads or default_threads(procs.local_world_size)))
    device = procs.device
    amp = bool(cfg.trainer.amp) and device.type == "cuda"
    if cfg.trainer.amp and not amp and procs.is_main:
        log.warning("trainer.amp=true is used on CUDA only; training in float32 on %s", device)

    seed_everything(cfg.trainer.seed)
    data = build_data(cfg, procs.rank, procs.world_size, pin_memory=device.type == "cuda")
    classes = data.classes
    if cfg.data.valid_pct and procs.is_main:  # which images this run held out, for a person to look at
        with (run_dir / "split.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split"])
            writer.writerows([(p, "train") for p in data.train.paths] + [(p, "val") for p in data.val.paths])
    columns = metric_columns(classes)
    if cfg.sweep_metric not in columns[1:]:
        raise ConfigError(f"sweep_metric={cfg.sweep_metric!r} is not one of: {', '.join(columns[1:])}")
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, resume_path, {"model": cfg.model.name, "classes": classes}, "the data")
    model = build_model(cfg.model, len(classes), data.image_size)
    channels_last = channels_last_pays(cfg.trainer.channels_last, cfg.model.family, data.image_size, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    family = str(cfg.model.family)
    all_phases = phases(cfg)
    start_epoch = int(ckpt["epoch"]) if ckpt is not None else 0
    phase = phase_of(all_phases, min(start_epoch + 1, cfg.trainer.epochs))
    set_up_model(model, family, phase, cfg.finetune.freeze_bn)
    optimizer = phase_optimizer(cfg, model, phase)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    saver = checkpoint.CheckpointSaver(run_dir, cfg.trainer.epochs, cfg.trainer.save_interval)
    if ckpt is not None:
        # The optimizer's state only within the phase it was saved in: a new phase starts it afresh.
        saver.restore(ckpt, model, optimizer, scaler, with_optimizer=ckpt.get("phase", "all") == phase.name)
        if procs.is_main:
            log.info("resuming from %s (epoch %d done, %s phase) in %s", resume_path, start_epoch, phase.name, run_dir)
            if torn := saver.remove_torn_temp_files():
                log.info("removed %d temp file(s) of interrupted checkpoint saves", len(torn))
    if cfg.trainer.sync_bn and procs.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plain_model, model = model, wrap(model, cfg, procs, device)

    criterion = nn.CrossEntropyLoss()
    normalizer = InputNormalizer(cfg.model.normalization, device, channels_last)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1) if procs.is_main else None
    plain_cfg = to_plain(cfg)
    if procs.is_main:
        log.info(
            "%s on %s: %d classes %s, %d train / %d val images at %s, %s, batch %d x %d process(es), %d thread(s) each",
            cfg.model.name,
            device,
            len(classes),
            classes if len(classes) <= 10 else f"{classes[:10]}...",
            len(data.train),
            len(data.val),
            data.image_size,
            cfg.transforms.name,
            cfg.data.batch_size,
            procs.world_size,
            torch.get_num_threads(),
        )

    epoch = start_epoch
    schedule, features = None, None
    try:
        for epoch in range(start_epoch + 1, cfg.trainer.epochs + 1):
            if epoch > phase.last_epoch:  # the staged fine-tune's boundary: every layer trains from here
                phase = phase_of(all_phases, epoch)
                set_up_model(plain_model, family, phase, cfg.finetune.freeze_bn)
                optimizer = phase_optimizer(cfg, plain_model, phase)
                model, schedule, features = wrap(plain_model, cfg, procs, device), None, None
            if schedule is None:
                schedule = Schedule(cfg.scheduler, phase, len(data.train_loader))
                if procs.is_main and phase.name != "all":
                    log.info(
                        "epochs %d-%d: %s phase (%s)",
                        phase.first_epoch,
                        phase.last_epoch,
                        phase.name,
                        "only the head learns" if phase.name == "frozen" else "every layer learns",
                    )
            torch.manual_seed(cfg.trainer.seed + epoch)  # dropout, drop-connect: the same per epoch after a resume
            data.train_sampler.set_epoch(epoch)
            schedule.apply(optimizer, epoch, 0)
            lr = max(group["lr"] for group in optimizer.param_groups)
            set_lr = partial(schedule.apply, optimizer, epoch) if schedule.per_step else None
            started = time.perf_counter()
            if head_only(cfg, phase, procs):
                if features is None:
                    # In index order, not this epoch's shuffle: a resumed run must pair the same batches.
                    features = head_features(
                        plain_model,
                        family,
                        eval_loader(data.train, cfg.data),
                        normalizer,
                        device,
                        show_progress=procs.is_main,
                    )
                row = train_head_epoch(
                    classifier(plain_model, family),
                    *features,
                    criterion,
                    optimizer,
                    cfg.data.batch_size,
                    epoch,
                    cfg.trainer.seed,
                    set_lr,
                )
            else:
                size = input_size(cfg.trainer.progressive_resize, all_phases, epoch, data.image_size)
                if procs.is_main and size != tuple(data.image_size):
                    log.info("epoch %d trains at %dx%d (trainer.progressive_resize)", epoch, *size)
                row = train_one_epoch(
                    model,
                    data.train_loader,
                    criterion,
                    optimizer,
                    scaler,
                    normalizer,
                    device,
                    epoch,
                    amp=amp,
                    log_interval=cfg.trainer.log_interval,
                    show_progress=procs.is_main,
                    set_lr=set_lr,
                    input_size=size,
                )
            # One set of BatchNorm statistics (rank 0's, the checkpoint's) for every rank's val shard, and the
            # plain module: DDP's forward would add a collective that val shards of unequal length could hang.
            distributed.sync_buffers(plain_model, procs)
            row.update(
                evaluate(
                    plain_model,
                    data.val_loader,
                    criterion,
                    normalizer,
                    device,
                    classes,
                    epoch,
                    amp,
                    show_progress=procs.is_main,
                )
            )
            if not math.isfinite(row["val_loss"]):
                raise NonFiniteLossError(
                    f"validation loss became non-finite at epoch {epoch} (train loss {row['train_loss']:.4g}): "
                    "the model diverged; this epoch is not saved, the checkpoints already written are intact. "
                    "Lower optimizer.lr."
                )
            row.update(epoch=epoch, lr=lr, epoch_seconds=time.perf_counter() - started)
            if not procs.is_main:
                continue
            log_epoch(epoch, cfg.trainer.epochs, row, classes)
            saver.write_metrics(columns, row)
            for key in columns[1:]:
                writer.add_scalar(
                    key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else f"val/{key}", row[key], epoch
                )
            writer.flush()
            saver.save(
                saver.state(plain_model, optimizer, scaler, epoch, phase.name, classes, data.image_size, plain_cfg, row)
            )
    except KeyboardInterrupt:
        if procs.is_main:
            saved = saver.saved_epoch
            lost = (
                f"during epoch {epoch}: its progress is not saved" if epoch > saved else f"after saving epoch {saved}"
            )
            log.warning(
                "interrupted %s. Checkpoints up to epoch %d are in %s; "
                "`python train.py trainer.resume=%s` starts again at epoch %d.",
                lost,
                saved,
                run_dir,
                run_dir,
                saved + 1,
            )
        raise
    finally:
        if writer is not None:
            writer.close()
        distributed.teardown()

    rows = saver.read_metrics() if procs.is_main else []
    best = pick_best(rows, cfg.sweep_metric)
    if best:  # rank 0 only (the other ranks have no rows)
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        log_hparams(
            run_dir,
            run_hparams(cfg, overrides),
            {m: best[m] for m in dict.fromkeys([cfg.sweep_metric, *HPARAMS_METRICS]) if m in best},
            step=best["epoch"],
        )
    return {
        "best_epoch": best["epoch"] if best else None,
        "best": best,
        "classes": classes,
        "sweep_metric": cfg.sweep_metric,
        "value": best.get(cfg.sweep_metric) if best else None,
        "epochs": len(rows),
        "run_dir": str(run_dir),
    }


def main(cfg: DictConfig) -> float | None:
    """Hydra task: one run. In a sweep a failing job is recorded in its result.json and the sweep goes on.

    Returns the best `sweep_metric` to a sweeper, None for a failed job (Optuna records it as a failed trial;
    a NaN would make the plugin raise and end the whole search)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    result = {"overrides": list(hydra_cfg.overrides.task), "status": "ok"}
    try:
        result.update(train(cfg, run_dir))
    except Exception as err:  # in a sweep every failure is recorded, foreseen or not, and the other jobs go on
        if not multirun:
            raise
        known = isinstance(err, EXPECTED_FAILURES)
        (log.error if known else log.exception)("job %s failed: %s", hydra_cfg.job.num, err)
        result.update(
            status="failed",
            error=str(err) if known else f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(),
        )
    if distributed.launch_rank() == 0:  # under torchrun only rank 0 writes
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["status"] == "ok" and result.get("value") is not None:
        log.info(
            "best epoch %s: %s = %.4f  (run folder: %s)",
            result["best_epoch"],
            result["sweep_metric"],
            result["value"],
            run_dir,
        )
        return float(result["value"])
    return None
