"""A training run: config -> data -> model -> epochs (train, evaluate, log, checkpoint) -> result."""
from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from geektime import checkpoint, distributed
from geektime.config import ConfigError, cpu_count, to_plain, validate_train_config
from geektime.data import InputNormalizer, build_data
from geektime.engine import NonFiniteLossError, evaluate, train_one_epoch
from geektime.models import build_model, channels_last_pays, unwrap

log = logging.getLogger("geektime.train")

FAILURES = (ConfigError, checkpoint.CheckpointError, NonFiniteLossError, OSError)


JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def default_threads(local_processes: int) -> int:
    """Torch threads per process when trainer.threads is null: this machine's cores, shared out.

    Shared by torchrun's processes on this machine, and by the jobs a joblib launcher
    (hydra/launcher=joblib) runs side by side: hydra.launcher.n_jobs of them (-1: one per core).
    """
    cores, parallel = cpu_count(), local_processes
    if HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        if launcher.get("_target_") == JOBLIB_LAUNCHER:
            n_jobs = int(launcher.get("n_jobs") or 1)
            parallel *= n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning of -1, -2, ...
    return max(1, cores // parallel)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(ocfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD; no weight decay on biases and norm layers (their scale is not what decay should shrink)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov)


def lr_factor(scfg, epochs: int, lr: float):
    """The lr multiplier after `done` epochs: linear warm-up, then none | step | cosine.

    A pure function of the epoch count, so a resumed run (even one given more epochs) follows the
    schedule its config describes; LambdaLR saves only the position in it.
    """
    warmup = min(int(scfg.get("warmup_epochs", 0)), epochs - 1)
    start = float(scfg.get("warmup_start_factor", 0.1))

    def factor(done: int) -> float:
        if done < warmup:
            return start + (1.0 - start) * done / warmup
        if scfg.name == "step":
            return scfg.gamma ** ((done - warmup) // scfg.step_size)
        if scfg.name == "cosine":
            floor = scfg.min_lr / lr
            progress = (done - warmup) / max(1, epochs - warmup)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def config_for_resume(cfg: DictConfig, ckpt: dict) -> DictConfig:
    """The checkpoint's own config, with only what was given on this command line changed."""
    resumed = OmegaConf.create(ckpt["config"])
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "trainer.resume" or key.startswith("hydra"):
            continue
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    resumed.trainer.resume = cfg.trainer.resume
    return resumed


def metric_columns(classes: list[str]) -> list[str]:
    per_class = [f"{c}_{m}" for c in classes for m in ("precision", "recall")]
    return ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", *per_class,
            "macro_precision", "macro_recall", "train_images_per_s", "epoch_seconds"]


def write_metrics_row(path: Path, columns: list[str], row: dict, keep_up_to: int) -> None:
    """Append one epoch; rows after `keep_up_to` (left by a run killed before its checkpoint) are dropped."""
    rows = []
    if path.exists():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_up_to]
    rows.append({k: row.get(k, "") for k in columns})
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: (float(v) if k != "epoch" else int(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The best epoch by `metric` (val_loss: lowest; others: highest); ties go to the earlier epoch."""
    rows = [r for r in rows if metric in r and not math.isnan(r[metric])]
    if not rows:
        return None
    sign = -1 if metric.endswith("loss") else 1
    return max(rows, key=lambda r: (sign * r[metric], -r["epoch"]))


def log_epoch(epoch: int, epochs: int, row: dict, classes: list[str]) -> None:
    per_class = "  ".join(f"{c} P {row[f'{c}_precision']:.3f} R {row[f'{c}_recall']:.3f}" for c in classes[:8])
    log.info("epoch %d/%d  lr %.5f  train loss %.4f acc %.4f  |  val loss %.4f acc %.4f  |  %s  |  %.1f img/s",
             epoch, epochs, row["lr"], row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
             per_class + ("  ..." if len(classes) > 8 else ""), row["train_images_per_s"])


def save_checkpoints(run_dir: Path, state: dict, epoch: int, epochs: int, save_interval: int) -> None:
    """epoch_NNN.pth every `save_interval` epochs and at the end; last.pth always (a hard link when possible)."""
    last = run_dir / "last.pth"
    if epoch % save_interval == 0 or epoch == epochs:
        target = run_dir / checkpoint.epoch_name(epoch)
        checkpoint.save_atomic(state, target)
        tmp = run_dir / ".last.pth.link"
        tmp.unlink(missing_ok=True)
        try:
            tmp.hardlink_to(target)
            tmp.replace(last)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    checkpoint.save_atomic(state, last)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train per `cfg`, writing into `run_dir`; returns the run's result (best epoch and its metrics)."""
    ckpt = None
    if cfg.trainer.resume:
        resume_path = checkpoint.resume_file(cfg.trainer.resume)
        ckpt = checkpoint.load(resume_path)
        cfg = config_for_resume(cfg, ckpt)
    validate_train_config(cfg)
    procs = distributed.setup(cfg.trainer.device)
    run_dir = Path(distributed.broadcast_object(str(run_dir), procs))  # every rank: rank 0's run folder
    torch.set_num_threads(int(cfg.trainer.threads or default_threads(procs.local_world_size)))
    device = procs.device
    amp = bool(cfg.trainer.amp) and device.type == "cuda"
    if cfg.trainer.amp and not amp and procs.is_main:
        log.warning("trainer.amp=true is used on CUDA only; training in float32 on %s", device)

    seed_everything(cfg.trainer.seed)
    data = build_data(cfg, procs.rank, procs.world_size, pin_memory=device.type == "cuda")
    classes = data.classes
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, resume_path, cfg.model.name, classes)
    model = build_model(cfg.model, len(classes), data.image_size)
    channels_last = channels_last_pays(cfg.trainer.channels_last, cfg.model.family, data.image_size, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.scheduler, cfg.trainer.epochs, cfg.optimizer.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # Follow this config's schedule from here (it may give more epochs or another lr than the saved one).
        scheduler.base_lrs = [cfg.optimizer.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optimizer.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
        if procs.is_main:
            log.info("resuming from %s (epoch %d done) in %s", resume_path, start_epoch, run_dir)
            if torn := checkpoint.remove_torn_temp_files(run_dir):
                log.info("removed %d temp file(s) of interrupted checkpoint saves", len(torn))
    if cfg.trainer.sync_bn and procs.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if procs.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        model = torch.compile(model)

    criterion = nn.CrossEntropyLoss()
    normalizer = InputNormalizer(cfg.model.normalization, device, channels_last)
    columns = metric_columns(classes)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1) if procs.is_main else None
    plain_cfg = to_plain(cfg)
    if procs.is_main:
        log.info("%s on %s: %d classes %s, %d train / %d val images at %s, %s, batch %d x %d process(es), "
                 "%d thread(s) each", cfg.model.name, device, len(classes),
                 classes if len(classes) <= 10 else f"{classes[:10]}...", len(data.train), len(data.val),
                 data.image_size, cfg.transforms.name, cfg.data.batch_size, procs.world_size, torch.get_num_threads())

    epoch = saved = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.trainer.epochs + 1):
            torch.manual_seed(cfg.trainer.seed + epoch)  # dropout, drop-connect: the same per epoch after a resume
            data.train_sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            row = train_one_epoch(model, data.train_loader, criterion, optimizer, scaler, normalizer, device, epoch,
                                  amp=amp, log_interval=cfg.trainer.log_interval, show_progress=procs.is_main)
            # One set of BatchNorm statistics (rank 0's, the checkpoint's) for every rank's val shard, and the
            # plain module: DDP's forward would add a collective that val shards of unequal length could hang.
            distributed.sync_buffers(model, procs)
            row.update(evaluate(unwrap(model) if procs.distributed else model, data.val_loader, criterion,
                                normalizer, device, classes, epoch, amp,
                                show_progress=procs.is_main))
            scheduler.step()
            row.update(epoch=epoch, lr=lr, epoch_seconds=time.perf_counter() - started)
            if not procs.is_main:
                continue
            log_epoch(epoch, cfg.trainer.epochs, row, classes)
            write_metrics_row(run_dir / "metrics.csv", columns, row, keep_up_to=epoch - 1)
            for key in columns[1:]:
                writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else f"val/{key}",
                                  row[key], epoch)
            writer.flush()
            state = {
                "format_version": checkpoint.FORMAT_VERSION,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "classes": classes,
                "image_size": list(data.image_size),
                "normalization": cfg.model.normalization,
                "transforms": plain_cfg["transforms"],
                "config": plain_cfg,
                "metrics": row,
            }
            with checkpoint.interrupts_deferred():
                save_checkpoints(run_dir, state, epoch, cfg.trainer.epochs, cfg.trainer.save_interval)
                saved = epoch
    except KeyboardInterrupt:
        if procs.is_main:
            lost = f"during epoch {epoch}: its progress is not saved" if epoch > saved else f"after saving epoch {saved}"
            log.warning("interrupted %s. Checkpoints up to epoch %d are in %s; "
                        "`python train.py trainer.resume=%s` starts again at epoch %d.",
                        lost, saved, run_dir, run_dir, saved + 1)
        raise
    finally:
        if writer is not None:
            writer.close()
        distributed.teardown()

    rows = read_metrics(run_dir / "metrics.csv") if procs.is_main else []
    best = best_row(rows, cfg.sweep_metric)
    return {"best_epoch": best["epoch"] if best else None, "best": best, "classes": classes,
            "sweep_metric": cfg.sweep_metric, "value": best.get(cfg.sweep_metric) if best else None,
            "epochs": len(rows), "run_dir": str(run_dir)}


def main(cfg: DictConfig) -> float:
    """Hydra task: one run. In a sweep a failing job is recorded in its result.json and the sweep goes on."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    result = {"overrides": list(hydra_cfg.overrides.task), "status": "ok"}
    try:
        result.update(train(cfg, run_dir))
    except Exception as err:  # in a sweep every failure is recorded, foreseen or not, and the other jobs go on
        if not multirun:
            raise
        known = isinstance(err, FAILURES)
        (log.error if known else log.exception)("job %s failed: %s", hydra_cfg.job.num, err)
        result.update(status="failed", error=str(err) if known else f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
    if distributed.launch_rank() == 0:  # under torchrun only rank 0 writes
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["status"] == "ok" and result.get("value") is not None:
        log.info("best epoch %s: %s = %.4f  (run folder: %s)", result["best_epoch"], result["sweep_metric"],
                 result["value"], run_dir)
        return float(result["value"])
    return float("nan")
