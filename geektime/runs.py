"""Run folders: where a run lands, claimed by one run only, and never silently mixed with another.

* A fresh run's folder is created with a plain `mkdir` (no exist_ok) when Hydra names it: two runs started
  in the same second (two shells, parallel sweep launchers) get `<name>`, `<name>_1`, ... — never one folder.
* A folder named by hand (`hydra.run.dir=...`) that already holds a run is refused unless the user says
  `trainer.overwrite=true`, which moves the old run aside into `replaced_<time>/` (nothing is deleted).
* A run that fails before it wrote anything leaves no folder behind.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from geektime.distributed import launch_rank
from geektime.errors import RunFolderError

# Files and folders a run writes into its folder; their presence means the folder holds a run.
RUN_FILES = ("last.pth", "metrics.csv", "result.json", "tb", "eval", "split.csv")
# What Hydra writes into every run folder before the run starts.
HYDRA_FILES = {".hydra", "train.log", "lr_find.log"}  # and .hydra-<time>/ folders

# The folder this process claimed, per kind ("run", "sweep"): Hydra resolves a folder's name more than once,
# and `${now:...}` inside it may read another second the second time.
_claimed: dict[str, str] = {}


def claim_fresh_dir(name: str, kind: str = "run") -> str:
    """Create `name` (or `name_1`, `name_2`, ... when taken) exclusively and return it; once per process and kind."""
    if kind in _claimed:
        return _claimed[kind]
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(10_000):
        candidate = name if attempt == 0 else f"{name}_{attempt}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        _claimed[kind] = candidate
        return candidate
    raise RunFolderError(f"{name}: 10,000 run folders of that name exist; clean up checkpoints/")


def created_here(folder: str | Path) -> bool:
    return os.path.abspath(folder) in {os.path.abspath(p) for p in _claimed.values()}


def _run_dir(resume: Any, fresh_dir: str) -> str:
    """A resumed run continues in its own folder; any other run gets a fresh one, and so does a resume
    from a path that does not exist (a typo must not create that folder; the run then stops with the error).

    Under torchrun only rank 0 gets one: the other ranks' clocks may read another second, so they
    get "." (nothing to create) and take rank 0's folder when they join its process group.
    """
    if launch_rank() != 0:
        return "."
    if resume not in (None, "", "null"):
        path = Path(str(resume)).expanduser()
        if path.exists():
            return str(path.parent if path.is_file() else path)
    return claim_fresh_dir(fresh_dir)


def _hydra_subdir(output_dir: str) -> str | None:
    """Where Hydra records this invocation's config: .hydra/ in a new folder; in one that already holds a run
    (a resume, an overwrite, a refused start) .hydra-<time>/, so the old run's record is never rewritten."""
    if launch_rank() != 0:
        return None
    folder = Path(output_dir)
    if not (folder / ".hydra").exists() and not holds_run(folder):
        return ".hydra"
    return f".hydra-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"


def register_resolvers() -> None:
    """The resolvers conf/hydra uses: run_dir, sweep_dir, hydra_subdir, direction, rank0."""
    if not OmegaConf.has_resolver("geektime.run_dir"):
        OmegaConf.register_new_resolver("geektime.run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("geektime.sweep_dir"):
        OmegaConf.register_new_resolver(
            "geektime.sweep_dir",
            lambda name: claim_fresh_dir(name, "sweep") if launch_rank() == 0 else name,
            use_cache=True,
        )
    if not OmegaConf.has_resolver("geektime.hydra_subdir"):
        OmegaConf.register_new_resolver("geektime.hydra_subdir", _hydra_subdir)
    if not OmegaConf.has_resolver("geektime.direction"):  # an Optuna sweep's direction from sweep_metric
        OmegaConf.register_new_resolver(
            "geektime.direction", lambda metric: "minimize" if str(metric).endswith("loss") else "maximize"
        )
    if not OmegaConf.has_resolver("geektime.rank0"):
        # ${geektime.rank0:a,b}: a in a single process and on rank 0 of torchrun's processes, b on the others
        OmegaConf.register_new_resolver(
            "geektime.rank0", lambda main, other=None: main if launch_rank() == 0 else other
        )


def holds_run(folder: Path) -> bool:
    folder = Path(folder)
    return any((folder / name).exists() for name in RUN_FILES) or any(folder.glob("epoch_*.pth"))


def prepare(folder: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a fresh run in a folder that holds a run; with overwrite, move that run aside first."""
    if resuming or not holds_run(folder):
        return
    if not overwrite:
        raise RunFolderError(
            f"{folder} already holds a run (checkpoints, metrics.csv or result.json). To continue it: "
            f"`python train.py trainer.resume={folder}`. To start over there, moving the old run into "
            f"{folder}/replaced_<time>/: add trainer.overwrite=true. Or leave hydra.run.dir unset for a new folder."
        )
    aside = folder / f"replaced_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    aside.mkdir()
    for entry in folder.iterdir():
        if entry.name in RUN_FILES or (entry.name.startswith("epoch_") and entry.suffix == ".pth"):
            shutil.move(str(entry), aside / entry.name)


def discard_if_unused(folder: Path) -> bool:
    """Remove a folder this process created for a run that then wrote nothing of its own (a failed start)."""
    folder = Path(folder)
    if not created_here(folder) or not folder.is_dir():
        return False
    if any(entry.name not in HYDRA_FILES and not entry.name.startswith(".hydra-") for entry in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
