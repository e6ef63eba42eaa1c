"""TensorBoard HParams for a run: its hyper-parameters and best-epoch metrics, one session per run folder.

Written into `tb/hparams` of the run (a fixed name, not the timestamped sub-folder `SummaryWriter.add_hparams`
makes), so `tensorboard --logdir <sweep folder>` shows one row per job in the HPARAMS tab: a sortable table and a
parallel-coordinates view of the sweep. No experiment summary is written: TensorBoard then builds the column list
from every job's values, with the keys that differ between jobs (the swept ones) first, and takes the metric
columns from the `best/*` scalars of these sessions only (not every per-epoch curve in `tb/`).
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from geektime.sweep import parse_overrides

# The config values worth a column in every run, swept or not.
MAIN_KEYS = [
    "model.name",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "data.batch_size",
    "data.image_size",
    "transforms.name",
    "scheduler.name",
    "trainer.epochs",
]
METRICS = ["val_acc", "val_loss", "macro_precision", "macro_recall"]
HPARAMS_DIR = "tb/hparams"
METRIC_TAG = "best/{}"  # apart from the per-epoch val/* curves: HParams shows a scalar's value at its last step
_ABSENT = object()


def _scalar(value):
    """A value TensorBoard's hparams accept (bool, int, float, str): an enum by name, lists and null as text."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def run_hparams(cfg: DictConfig, overrides: list[str]) -> dict:
    """The main config values plus every command-line override (the swept keys among them), by dotted key.

    An override of a value is logged with the config's value (a float stays a number, for the
    parallel-coordinates axis); a group choice (`transforms=letterbox`) and a deleted key with the override's text.
    """
    values = {key: _scalar(OmegaConf.select(cfg, key)) for key in MAIN_KEYS}
    for key, text in parse_overrides(overrides).items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        values[key] = text if value is _ABSENT or isinstance(value, DictConfig) else _scalar(value)
    return values


def log_hparams(run_dir: Path, hparams: dict, metrics: dict, step: int = 0) -> None:
    """Record one HParams session in `run_dir/tb/hparams`: `hparams` (bool/int/float/str), `metrics` as `best/<name>`.

    Metrics that are None or NaN (a failed epoch) are left out rather than shown as a number.
    """
    metrics = {METRIC_TAG.format(k): float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
    _, session_start, session_end = hparams_summaries({k: _scalar(v) for k, v in hparams.items()}, metrics)
    with SummaryWriter(str(Path(run_dir) / HPARAMS_DIR)) as writer:
        for summary in (session_start, session_end):
            writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
