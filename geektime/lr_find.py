"""The learning-rate finder: an exponential lr sweep over the training data, and the lr it suggests.

`find_lr` trains for up to `num_it` steps with the lr growing from `start_lr` towards `end_lr`, records the
loss and its debiased moving average, stops when that average diverges, and puts the model, the optimizer
and the random generators back exactly as they were. `suggest` reads the recorded curve the way fastai 2.8's
`Learner.lr_find` does (same trimming, same four rules, same indices: tests/data/lr_find/ holds fastai's own
answers), and `main` is the Hydra task behind `python -m geektime.lr_find` (see README "Finding a learning rate").
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from geektime.errors import ConfigError

log = logging.getLogger("geektime.lr_find")

BETA = 0.98
SUGGESTIONS = ("valley", "slide", "minimum", "steep")
PHASES = ("frozen", "unfrozen")
MIN_STEPS = 6  # fastai's floor: the curve keeps steps num_it//10 .. -5, so fewer leave nothing to read


# ---------------------------------------------------------------- the schedule and the smoothing


def sweep_lrs(start_lr: float, end_lr: float, num_it: int) -> np.ndarray:
    """lr of step i (0-based): start_lr * (end_lr / start_lr) ** (i / num_it); the last step stays below end_lr."""
    return start_lr * (end_lr / start_lr) ** (np.arange(num_it) / num_it)


class SmoothedLoss:
    """Exponential moving average of the loss, debiased: early values are not pulled towards the zero it starts at."""

    def __init__(self, beta: float = BETA):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, loss: float) -> float:
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        self.count += 1
        return self.avg / (1 - self.beta**self.count)


# ---------------------------------------------------------------- reading the curve (fastai 2.8's rules)


def trimmed(lrs: Sequence[float], losses: Sequence[float], num_it: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of the curve the suggestions read: steps num_it//10 .. -5 (the first steps are noise, the last
    ones diverge), cut before the first non-finite loss. fastai cuts at NaN only; an inf cannot reach here
    from `find_lr`, which stops at it, and the last five steps are dropped."""
    lrs = np.asarray(lrs, dtype=np.float64)[num_it // 10 : -5]
    losses = np.asarray(losses, dtype=np.float64)[num_it // 10 : -5]
    bad = np.flatnonzero(~np.isfinite(losses))
    end = int(bad[0]) if len(bad) else len(losses)
    return lrs[:end], losses[:end]


def valley(losses: np.ndarray) -> int | None:
    """Index inside the longest strictly decreasing stretch of the loss, about half-way down it.

    As fastai: the stretch is a decreasing subsequence (not necessarily contiguous); its length L and end
    are taken the first time a point's length beats the best so far (later, longer chains through the same
    end do not update L); the index is end - L + int(L/3) + int(L/3/2). One quirk kept for equal answers:
    a best chain of 2 ending at step 1 gives index -1, which Python (and so fastai) reads as the last point.
    """
    n = len(losses)
    if n == 0:
        return None
    chain = [1] * n  # longest strictly decreasing subsequence ending at each point
    end, start = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j]:
                chain[i] = max(chain[i], chain[j] + 1)
            if chain[i] > chain[end]:
                end, start = i, i - chain[i]
    third = (end - start) / 3
    return (start + int(third) + int(third / 2)) % n


def slide(losses: np.ndarray, lr_diff: int = 15, thresh: float = 0.005) -> int | None:
    """Interval slide rule: move a window of `lr_diff` steps left from the end while the loss gradients at its
    two edges differ by more than `thresh`; the answer is the left edge where it last did (fastai's defaults).
    None when the curve is not longer than the window (fastai raises IndexError there)."""
    n = len(losses)
    if n <= lr_diff:
        return None
    grad = np.gradient(losses)
    right, left = n - 1, n - 1 - lr_diff
    index = left
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        index = left
        right, left = right - 1, left - 1
    return index


def minimum(losses: np.ndarray) -> int | None:
    """Index of the lowest loss (its first occurrence); the suggested lr is a tenth of that step's."""
    return int(np.argmin(losses)) if len(losses) else None


def steep(lrs: np.ndarray, losses: np.ndarray) -> int | None:
    """Index of the left end of the steepest descent of the loss against log lr (the first, on ties)."""
    if len(losses) < 2:
        return None
    return int(np.argmin(np.diff(losses) / np.diff(np.log(lrs))))


def suggestion_indices(lrs: np.ndarray, losses: np.ndarray) -> dict[str, int | None]:
    """Each rule's index into a trimmed curve (None where the curve is too short for the rule)."""
    return {"valley": valley(losses), "slide": slide(losses), "minimum": minimum(losses), "steep": steep(lrs, losses)}


def suggest(lrs: Sequence[float], smoothed: Sequence[float], num_it: int) -> tuple[dict, dict]:
    """({rule: suggested lr or None}, {rule: the step of the recorded curve it was read at, or None})."""
    start = num_it // 10
    cut_lrs, cut_losses = trimmed(lrs, smoothed, num_it)
    indices = suggestion_indices(cut_lrs, cut_losses)
    lrs_out, steps = {}, {}
    for name, index in indices.items():
        if index is None:
            lrs_out[name], steps[name] = None, None
            continue
        lrs_out[name] = float(cut_lrs[index]) / (10 if name == "minimum" else 1)
        steps[name] = start + index
    return lrs_out, steps


# ---------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """What a sweep recorded, one entry per step taken."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    num_it: int
    stopped_early: bool


def _rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _batches(loader, num_it: int):
    """`num_it` batches, passing over the loader as often as that takes (a new shuffle each pass)."""
    sampler = getattr(loader, "sampler", None)
    reshuffle = hasattr(sampler, "set_epoch")
    taken, epoch = 0, 0
    while taken < num_it:
        epoch += 1
        if reshuffle:
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
            taken += 1
            if taken == num_it:
                return
        if empty:
            raise ConfigError(
                "lr_find: the training loader gave no batch (data.batch_size larger than the split with drop_last?)"
            )


def find_lr(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    normalizer,
    device: torch.device,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    stop_factor: float = 4.0,
    amp: bool = False,
    show_progress: bool = True,
) -> Sweep:
    """Train `num_it` steps at exponentially growing lrs and return the curve; model, optimizer, gradients,
    train/eval modes, the loader's sampler epoch and every random generator are then as they were before.

    Every parameter group gets the step's lr times its own factor: its lr relative to the largest group's,
    so discriminative lrs keep their ratios and the recorded lr is the largest group's.
    """
    group_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if max(group_lrs) <= 0:
        raise ConfigError("lr_find: every parameter group has lr 0, so no group has a factor to scale the sweep by")
    factors = [lr / max(group_lrs) for lr in group_lrs]
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    saved_modes = [m.training for m in model.modules()]
    saved_rng = _rng_states(device)
    sampler = getattr(loader, "sampler", None)
    saved_epoch = getattr(sampler, "epoch", None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    sweep = Sweep([], [], [], num_it, stopped_early=False)
    smoother, best = SmoothedLoss(), math.inf
    try:
        model.train()
        schedule = sweep_lrs(start_lr, end_lr, num_it)
        bar = tqdm(
            _batches(loader, num_it),
            total=num_it,
            desc="lr_find",
            unit="step",
            leave=False,
            disable=None if show_progress else True,
            dynamic_ncols=True,
        )
        for step, (images, targets) in enumerate(bar):
            lr = float(schedule[step])
            for group, factor in zip(optimizer.param_groups, factors):
                group["lr"] = lr * factor
            images = normalizer(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(model(images), targets)
            value = float(loss.detach())
            smoothed = smoother.update(value)
            sweep.lrs.append(lr)
            sweep.losses.append(value)
            sweep.smoothed.append(smoothed)
            if not math.isfinite(value):
                sweep.stopped_early = step + 1 < num_it
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            best = min(best, smoothed)
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed:.4f}")
            if smoothed > stop_factor * best:
                sweep.stopped_early = step + 1 < num_it
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        for param, grad in zip(model.parameters(), saved_grads):
            param.grad = grad
        for module, training in zip(model.modules(), saved_modes):
            module.training = training
        _restore_rng(saved_rng, device)
        if saved_epoch is not None:
            sampler.set_epoch(saved_epoch)
    return sweep


# ---------------------------------------------------------------- outputs


def write_csv(path: Path, sweep: Sweep) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for step, row in enumerate(zip(sweep.lrs, sweep.losses, sweep.smoothed)):
            writer.writerow([step, *(repr(v) for v in row)])


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lrs, losses, smoothed losses) of an lr_find.csv."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return tuple(np.array([float(r[key]) for r in rows]) for key in ("lr", "loss", "smoothed_loss"))


def save_png(path: Path, sweep: Sweep, suggestions: dict, suggested: str) -> None:
    """Smoothed loss against lr on a log axis, each suggestion a labelled vertical line (the chosen one solid)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs, smoothed = np.array(sweep.lrs), np.array(sweep.smoothed)
    finite = np.isfinite(smoothed)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(lrs[finite], smoothed[finite], color="tab:blue", label="smoothed loss")
    colours = {"valley": "tab:red", "slide": "tab:green", "minimum": "tab:purple", "steep": "tab:orange"}
    for name, lr in suggestions.items():
        if lr is not None:
            ax.axvline(
                lr,
                color=colours[name],
                linestyle="-" if name == suggested else "--",
                linewidth=2 if name == suggested else 1,
                label=f"{name} {lr:.3g}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"lr_find: {len(lrs)} of {sweep.num_it} steps" + (", stopped early" if sweep.stopped_early else ""))
    ax.legend(loc="best")
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- the Hydra task


def validate_lr_find_config(lcfg) -> None:
    """The lr_find block's values, or a ConfigError naming the key."""
    for key in ("start_lr", "end_lr", "stop_factor"):
        value = lcfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"lr_find.{key}={value!r} must be a number > 0")
    if lcfg.start_lr >= lcfg.end_lr:
        raise ConfigError(f"lr_find.start_lr={lcfg.start_lr} must be below lr_find.end_lr={lcfg.end_lr}")
    if isinstance(lcfg.num_it, bool) or not isinstance(lcfg.num_it, int) or lcfg.num_it < MIN_STEPS:
        raise ConfigError(
            f"lr_find.num_it={lcfg.num_it!r} must be an int >= {MIN_STEPS} (the suggestions read "
            "steps num_it//10 to the 5th from last)"
        )
    if lcfg.stop_factor <= 1:
        raise ConfigError(
            f"lr_find.stop_factor={lcfg.stop_factor} must be > 1 (stop when the smoothed loss "
            "exceeds this many times its minimum)"
        )
    for key, choices in (("suggestion", SUGGESTIONS), ("phase", PHASES)):
        if lcfg[key] not in choices:
            raise ConfigError(f"lr_find.{key}={lcfg[key]!r} is not one of: {', '.join(choices)}")


def phase_to_sweep(cfg: DictConfig, phase_name: str):
    """train.py's phase that lr_find sweeps: the only one ("all"), or the staged fine-tune's `lr_find.phase`."""
    from geektime.finetune import phases

    all_phases = phases(cfg)
    if len(all_phases) == 1 and all_phases[0].name == "all":
        return all_phases[0]
    for phase in all_phases:
        if phase.name == phase_name:
            return phase
    raise ConfigError(
        f"lr_find.phase={phase_name}: this staged fine-tune has no such phase "
        f"(trainer.epochs={cfg.trainer.epochs}, finetune.freeze_epochs={cfg.finetune.freeze_epochs}); "
        "give trainer.epochs more than finetune.freeze_epochs"
    )


def build_phase_optimizer(cfg: DictConfig, model: nn.Module, phase) -> tuple[torch.optim.Optimizer, float]:
    """The model set up and the optimizer built as train.py does for `phase`, and optimizer.lr per unit of the
    swept lr: the sweep's lr is the largest group's (the head's), which is the phase's lr (in the unfrozen phase
    of a staged fine-tune, optimizer.lr * finetune.unfrozen_lr_factor)."""
    from geektime.finetune import phase_optimizer, set_up_model

    set_up_model(model, str(cfg.model.family), phase, cfg.finetune.freeze_bn)
    return phase_optimizer(cfg, model, phase), cfg.optimizer.lr / phase.lr


def train_command(overrides: Sequence[str], lr: float) -> str:
    """`python train.py` with this run's overrides (minus lr_find's and Hydra's own) and the lr to use."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("lr_find.", "hydra.", "optimizer.lr="))]
    return shlex.join(["python", "train.py", *kept, f"optimizer.lr={lr:g}"])


def main(cfg: DictConfig) -> dict:
    """Hydra task: build what train.py would, sweep, write lr_find.csv/.json/.png into the run folder."""
    from hydra.core.hydra_config import HydraConfig

    from geektime import distributed
    from geektime.config import validate_train_config
    from geektime.data import InputNormalizer, build_data
    from geektime.models import build_model, channels_last_pays
    from geektime.train import default_threads, seed_everything

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or distributed.launch_rank() != 0:
        raise ConfigError(
            "lr_find runs in one process: launch it with `python -m geektime.lr_find`, not torchrun "
            "(its single curve is the one to read; the lr it suggests is per process batch)"
        )
    validate_train_config(cfg)
    lcfg = cfg.lr_find
    validate_lr_find_config(lcfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    device = distributed.resolve_device(cfg.trainer.device)
    torch.set_num_threads(int(cfg.trainer.threads or default_threads(1)))
    amp = bool(cfg.trainer.amp) and device.type == "cuda"

    seed_everything(cfg.trainer.seed)
    data = build_data(cfg, 0, 1, pin_memory=device.type == "cuda")
    model = build_model(cfg.model, len(data.classes), data.image_size)
    channels_last = channels_last_pays(cfg.trainer.channels_last, cfg.model.family, data.image_size, device)
    model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    swept_phase = phase_to_sweep(cfg, lcfg.phase)
    optimizer, lr_per_swept = build_phase_optimizer(cfg, model, swept_phase)
    phase = f", {swept_phase.name} phase of the staged fine-tune" if swept_phase.name != "all" else ""
    normalizer = InputNormalizer(cfg.model.normalization, device, channels_last)
    log.info(
        "lr_find: %s%s on %s, %d train images at %s, batch %d, %d parameter group(s), lr %.1e -> %.1e over %d steps",
        cfg.model.name,
        phase,
        device,
        len(data.train),
        data.image_size,
        cfg.data.batch_size,
        len(optimizer.param_groups),
        lcfg.start_lr,
        lcfg.end_lr,
        lcfg.num_it,
    )
    sweep = find_lr(
        model,
        data.train_loader,
        optimizer,
        nn.CrossEntropyLoss(),
        normalizer,
        device,
        start_lr=float(lcfg.start_lr),
        end_lr=float(lcfg.end_lr),
        num_it=int(lcfg.num_it),
        stop_factor=float(lcfg.stop_factor),
        amp=amp,
    )
    suggestions, steps = suggest(sweep.lrs, sweep.smoothed, sweep.num_it)
    lr = suggestions[lcfg.suggestion]
    value = None if lr is None else float(f"{lr * lr_per_swept:.3g}")
    result = {
        "suggestions": suggestions,
        "suggested": lcfg.suggestion,
        "steps": steps,
        "num_it": sweep.num_it,
        "steps_taken": len(sweep.lrs),
        "stopped_early": sweep.stopped_early,
        "override": None if value is None else f"optimizer.lr={value:g}",
    }
    write_csv(run_dir / "lr_find.csv", sweep)
    (run_dir / "lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
    save_png(run_dir / "lr_find.png", sweep, suggestions, lcfg.suggestion)

    stopped = f", stopped early at step {len(sweep.lrs)}" if sweep.stopped_early else ""
    log.info(
        "lr_find: %d steps%s; suggestions: %s",
        len(sweep.lrs),
        stopped,
        ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} -" for k, v in suggestions.items()),
    )
    if lr is None:
        raise ConfigError(
            f"lr_find: the curve ({len(sweep.lrs)} steps) is too short for the {lcfg.suggestion} "
            f"rule; raise lr_find.num_it or lr_find.stop_factor, or pick another lr_find.suggestion. "
            f"Curve: {run_dir / 'lr_find.csv'}"
        )
    head = (
        f" (the {swept_phase.name} phase's head lr: optimizer.lr x finetune.unfrozen_lr_factor = {lr:.3g})"
        if swept_phase.name == "unfrozen"
        else ""
    )
    print(
        f"suggested lr ({lcfg.suggestion}{phase}): {lr:.3g}\n"
        f"override: optimizer.lr={value:g}{head}\n"
        f"  {train_command(hydra_cfg.overrides.task, value)}\n"
        f"curve: {run_dir / 'lr_find.png'}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    from geektime.cli import lr_find

    lr_find()
