"""Facts about this machine that the config resolves against: cores, devices, and how many threads to use;
and how this process's C allocator treats freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from geektime.errors import ConfigError

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and containers better than os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(local_processes: int) -> int:
    """Torch threads per process when trainer.threads is null: this machine's cores, shared out.

    Shared by torchrun's processes on this machine, and by the jobs a joblib launcher
    (hydra/launcher=joblib) runs side by side: hydra.launcher.n_jobs of them (-1: one per core).
    """
    from hydra.core.hydra_config import HydraConfig

    cores, parallel = cpu_count(), local_processes
    if HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        if launcher.get("_target_") == JOBLIB_LAUNCHER:
            n_jobs = int(launcher.get("n_jobs") or 1)
            parallel *= n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning of -1, -2, ...
    return max(1, cores // parallel)


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> a device that exists, or a clear error."""
    setting = str(setting)
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={setting}: no CUDA GPU is visible to PyTorch on this machine "
                f"(torch {torch.__version__}). Use trainer.device=cpu or trainer.device=auto."
            )
        index_text = setting.split(":", 1)[1] if ":" in setting else str(local_rank)
        if not index_text.isdigit():
            raise ConfigError(f"trainer.device={setting!r}: give cuda, or cuda:N with N a GPU index")
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device={setting}: only {torch.cuda.device_count()} GPU(s) visible "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    if setting == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.device=mps: Apple's MPS backend is not available here. Use trainer.device=cpu.")
        return torch.device("mps")
    raise ConfigError(f"trainer.device={setting!r} is not one of: auto, cpu, cuda, cuda:N, mps")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the system; True if set.

    By default glibc maps every block above 32 MB afresh and unmaps it when freed, so each forward pass
    page-faults its large feature maps in again: EfficientNet-B0 eager inference at 224 px runs 1.4-1.7x faster
    with this (bench_inference.py --keep-freed-memory against a run without, 2 cores). The entry points that run
    inference (evaluate.py, predict, serve) call it; the memory stays with the process at its peak, which inference
    reaches on its first batch anyway. Training gained nothing measurable (0.98-1.06x), so it is left as it was. Other C
    libraries (musl, macOS, Windows) have no such switch: nothing is changed there.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    # No mmap'd blocks (all from the reusable heap), and never trim the heap below 1 GiB of free space.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
