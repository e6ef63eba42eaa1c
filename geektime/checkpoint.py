"""Checkpoints: everything needed to resume or evaluate, written so that a kill never leaves a broken file."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says what it holds and what to do."""


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
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"could not write checkpoint {path}: {err.strerror or err}. "
                                     "Free disk space or make the run folder writable; "
                                     "the previous checkpoints are intact.") from None
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
                "\n")[0]) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}".split("\n")[0]) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{path}: not a geektime checkpoint (no 'model' / 'format_version' entries)")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {ckpt['format_version']} is newer than this geektime "
                              f"understands ({FORMAT_VERSION}); upgrade geektime")
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
        raise CheckpointError(f"trainer.resume={resume}: the folder holds no last.pth or epoch_NNN.pth; "
                              "start a new run instead")
    return epochs[-1]


def remove_torn_temp_files(run_dir: Path | str) -> list[Path]:
    """Delete the temp files of saves a kill interrupted (.<name>.pth.XXXX.tmp); they are never checkpoints."""
    torn = [p for p in Path(run_dir).glob(".*.pth.*.tmp") if p.is_file()]
    for path in torn:
        path.unlink(missing_ok=True)
    return torn


def describe(ckpt: dict) -> str:
    cfg = ckpt.get("config", {})
    return (f"{cfg.get('model', {}).get('name', '?')} with {len(ckpt.get('classes', []))} classes "
            f"{ckpt.get('classes')}, image size {ckpt.get('image_size')}")


def check_compatible(ckpt: dict, path: Path | str, model_name: str, classes: list[str] | None) -> None:
    """A checkpoint of another architecture or class list is a clear error, not a shape-mismatch traceback."""
    held = ckpt.get("config", {}).get("model", {}).get("name")
    if held != model_name:
        raise CheckpointError(f"{path} holds {describe(ckpt)}, not {model_name}. "
                              f"Use model={held} (or a checkpoint of {model_name}).")
    if classes is not None and list(ckpt.get("classes", [])) != list(classes):
        raise CheckpointError(f"{path} holds {describe(ckpt)}; the data has classes {list(classes)}. "
                              "Use data folders with the checkpoint's classes.")
