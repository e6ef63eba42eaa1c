"""A run's saved state: the checkpoint format, its atomic saves and last.pth link, its restore, and metrics.csv.

`CheckpointSaver` is the one place that builds a checkpoint dict, writes it, and puts a run back from it;
training, evaluation, the benchmarks and the tests all go through this module. Files are written to a temp
name, fsynced and renamed, so a kill at any moment leaves every existing checkpoint whole, and they are
loaded with `weights_only=True`, so a checkpoint cannot run code.

Format 2 (format 1 files still load for evaluation and resume): model, optimizer, scaler, epoch, phase,
classes, image_size, normalization, transforms, config (the resolved config, plain types), metrics.
The lr schedule is a pure function of the config and the step, so no scheduler state is kept.
"""

from __future__ import annotations

import contextlib
import csv
import os
import pickle
import re
import signal
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

from geektime import testpoints
from geektime.errors import CheckpointError

FORMAT_VERSION = 2
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")
# What must match between a checkpoint and the data or the other checkpoints it is used with.
INPUT_KEYS = ("model", "classes", "image_size", "normalization", "transforms")


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pth"


class _RecordingWriter:
    """A file whose write() keeps its OSError: torch.save turns a failed write (disk full) into a RuntimeError
    ("unexpected pos ...") that does not say why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def interrupts_deferred():
    """Let a Ctrl-C that lands during a checkpoint write take effect once the write is done, not tear it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, rename: the old file stays whole until the new one is."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        testpoints.reached("checkpoint_write")
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(
                err.errno,
                f"could not write checkpoint {path}: {err.strerror or err}. "
                "Free disk space or make the run folder writable; "
                "the previous checkpoints are intact.",
            ) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path | str) -> dict:
    """Load a checkpoint without running any code from it (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain types "
            f"(torch.load weights_only=True). Only load checkpoints you trust; this one may run code. ({err})".split(
                "\n"
            )[0]
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {err}".split("\n")[0]
        ) from None
    missing = [
        k
        for k in ("format_version", "model", "epoch", "classes", "image_size", "config")
        if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise CheckpointError(
            f"{path}: not a geektime checkpoint (no {', '.join(repr(k) for k in missing)} "
            "entries). A plain state dict of weights goes to model.pretrained=<file> instead."
        )
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {ckpt['format_version']} is newer than this geektime "
            f"understands ({FORMAT_VERSION}); upgrade geektime"
        )
    return ckpt


def epoch_checkpoints(run_dir: Path | str) -> list[Path]:
    """A run's epoch_NNN.pth files in epoch order."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_file(resume: Path | str) -> Path:
    """The file to resume from: a file as given, or a run dir's newest complete checkpoint."""
    resume = Path(resume).expanduser()
    if resume.is_file():
        return resume
    if not resume.is_dir():
        raise CheckpointError(f"trainer.resume={resume}: no such file or run folder")
    if (resume / "last.pth").is_file():
        return resume / "last.pth"
    epochs = epoch_checkpoints(resume)
    if not epochs:
        raise CheckpointError(
            f"trainer.resume={resume}: the folder holds no last.pth or epoch_NNN.pth; start a new run instead"
        )
    return epochs[-1]


def model_name(ckpt: dict) -> str | None:
    return ckpt.get("config", {}).get("model", {}).get("name")


def describe(ckpt: dict) -> str:
    return (
        f"{model_name(ckpt) or '?'} with {len(ckpt.get('classes', []))} classes "
        f"{ckpt.get('classes')}, image size {ckpt.get('image_size')}"
    )


def input_signature(ckpt: dict) -> dict:
    """What a checkpoint expects of its input and produces: the keys of INPUT_KEYS."""
    return {
        "model": model_name(ckpt),
        "classes": list(ckpt.get("classes", [])),
        "image_size": list(ckpt.get("image_size") or []),
        "normalization": ckpt.get("normalization"),
        "transforms": ckpt.get("transforms"),
    }


def check_compatible(ckpt: dict, path: Path | str, expected: dict, against: str, fix: str | None = None) -> None:
    """Every key given in `expected` (of INPUT_KEYS) equals the checkpoint's, or a CheckpointError saying what
    the checkpoint holds, what `against` (the data, the first checkpoint of a run) has instead, and the fix."""
    held = input_signature(ckpt)
    for key, value in expected.items():
        value = list(value) if isinstance(value, tuple) else value
        if value is None or held[key] == value:
            continue
        if key == "model":
            problem = f"not {value} ({against})"
            fix = fix or f"Use model={held['model']} (or a checkpoint of {value})."
        elif key == "classes":
            problem = f"{against} has classes {value}"
            fix = fix or "Use data folders with the checkpoint's classes."
        else:
            problem = f"its {key} {held[key]} differs from {value} ({against})"
            fix = fix or "Use one of them."
        raise CheckpointError(f"{path} holds {describe(ckpt)}; {problem}. {fix}")


# ---------------------------------------------------------------- metrics.csv: one row per epoch


def write_metrics_row(path: Path, columns: list[str], row: dict, keep_up_to: int) -> None:
    """Append one epoch; rows after `keep_up_to` (left by a run killed before its checkpoint) are dropped."""
    rows = [r for r in read_metrics(path, raw=True) if int(r["epoch"]) <= keep_up_to]
    rows.append({k: row.get(k, "") for k in columns})
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_metrics(path: Path, raw: bool = False) -> list[dict]:
    """metrics.csv's rows: numbers (epoch an int), empty cells left out; `raw` keeps the strings."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if raw:
        return rows
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in ("", None)} for r in rows]


# ---------------------------------------------------------------- saving and restoring a run


class CheckpointSaver:
    """Writes a run's epoch_NNN.pth (every `save_interval` epochs and the last), last.pth (always; a hard link
    to the epoch file when there is one) and metrics.csv, and restores a run from any of its checkpoints."""

    def __init__(self, run_dir: Path, epochs: int, save_interval: int):
        self.run_dir, self.epochs, self.save_interval = Path(run_dir), epochs, save_interval
        self.saved_epoch = 0

    @staticmethod
    def state(
        model, optimizer, scaler, epoch: int, phase: str, classes: list[str], image_size, config: dict, metrics: dict
    ) -> dict:
        """The checkpoint dict; `config` is the resolved config as plain types (config.to_plain)."""
        return {
            "format_version": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "phase": phase,
            "classes": list(classes),
            "image_size": list(image_size),
            "normalization": config["model"]["normalization"],
            "transforms": config["transforms"],
            "config": config,
            "metrics": dict(metrics),
        }

    def save(self, state: dict) -> None:
        """Write `state` for its epoch; a Ctrl-C during the write takes effect once it is whole."""
        epoch = state["epoch"]
        with interrupts_deferred():
            last = self.run_dir / "last.pth"
            if epoch % self.save_interval == 0 or epoch == self.epochs:
                target = self.run_dir / epoch_name(epoch)
                save_atomic(state, target)
                if not self._link(target, last):
                    save_atomic(state, last)
            else:
                save_atomic(state, last)
            self.saved_epoch = epoch

    def _link(self, target: Path, last: Path) -> bool:
        tmp = self.run_dir / ".last.pth.link"
        tmp.unlink(missing_ok=True)
        try:
            tmp.hardlink_to(target)
            tmp.replace(last)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    def write_metrics(self, columns: list[str], row: dict) -> None:
        write_metrics_row(self.run_dir / "metrics.csv", columns, row, keep_up_to=row["epoch"] - 1)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.run_dir / "metrics.csv")

    def restore(self, ckpt: dict, model, optimizer, scaler, with_optimizer: bool = True) -> int:
        """Put model, optimizer and AMP scaler back as `ckpt` holds them; returns the epochs already done.

        `with_optimizer=False` (a resume that starts a new phase of a staged fine-tune) leaves the optimizer
        fresh; so does a checkpoint whose optimizer had other parameter groups (format 1's)."""
        model.load_state_dict(ckpt["model"])
        saved = ckpt.get("optimizer")
        if with_optimizer and saved and len(saved["param_groups"]) == len(optimizer.param_groups):
            # The state (momentum buffers, Adam moments) from the checkpoint; the hyper-parameters (lr, weight
            # decay, ...) from this run's config, which a resume may change on the command line.
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(saved)
            for group, values in zip(optimizer.param_groups, hyper):
                group.update(values)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        self.saved_epoch = int(ckpt["epoch"])
        return self.saved_epoch

    def remove_torn_temp_files(self) -> list[Path]:
        """Delete the temp files of saves a kill interrupted (.<name>.pth.XXXX.tmp); they are never checkpoints."""
        torn = [p for p in self.run_dir.glob(".*.pth.*.tmp") if p.is_file()]
        for path in torn:
            path.unlink(missing_ok=True)
        return torn
