"""Optimizers and their schedules: parameter groups with discriminative learning rates, SGD or AdamW, and
the one-cycle policy as a pure function of the global step.

A parameter group carries its own `base_lr` (the lr a schedule factor of 1 gives), so one factor per step
drives groups whose lrs differ (head vs body); torch saves the extra key with the optimizer's state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from geektime.config import ConfigError
from geektime.models import layer_groups

OPTIMIZERS = ("sgd", "adamw")


def group_lrs(lr: float, lr_mult: float, count: int) -> list[float]:
    """`count` lrs rising geometrically from lr / lr_mult to lr (fastai's `slice(lr / lr_mult, lr)`)."""
    if count == 1:
        return [lr]
    return [lr / lr_mult ** ((count - 1 - i) / (count - 1)) for i in range(count)]


def param_groups(
    model: nn.Module, family: str, lr: float, lr_mult: float = 1.0, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups over `layer_groups` (body early, body late, head), lrs spread by `group_lrs`.

    Only parameters that require a gradient are included (a frozen body adds none). Biases and norm weights
    (every parameter of one dimension or less) get no weight decay: their scale is not what decay should shrink.
    """
    groups = []
    for params, group_lr in zip(layer_groups(model, family), group_lrs(lr, lr_mult, 3)):
        trainable = [p for p in params if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in trainable if (p.ndim > 1) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": group_lr,
                        "base_lr": group_lr,
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    if not groups:
        raise ValueError("no parameter of the model requires a gradient: nothing to optimize")
    return groups


def build_optimizer(
    name: str,
    groups: list[dict],
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-5,
) -> torch.optim.Optimizer:
    """SGD (with momentum, optionally Nesterov) or AdamW over `groups` (each with its lr and weight_decay).

    AdamW's defaults are fastai's (betas (0.9, 0.99), eps 1e-5; weight_decay 0.01 in conf/optimizer/adamw.yaml):
    torch's own (0.9, 0.999), 1e-8 adapt slower to the short, changing runs of a fine-tune.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), eps=eps)
    raise ConfigError(f"optimizer.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")


def optimizer_from_config(
    ocfg, model: nn.Module, family: str, lr: float | None = None, lr_mult: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer group's choice over `model`'s trainable parameters; `lr` (default `ocfg.lr`) is the head's."""
    groups = param_groups(model, family, ocfg.lr if lr is None else lr, lr_mult, ocfg.weight_decay)
    return build_optimizer(
        str(ocfg.name),
        groups,
        momentum=ocfg.get("momentum", 0.9),
        nesterov=ocfg.get("nesterov", False),
        betas=tuple(ocfg.get("betas", (0.9, 0.99))),
        eps=ocfg.get("eps", 1e-5),
    )


def _cos(start: float, end: float, pos: float) -> float:
    """Half a cosine from `start` (pos 0) to `end` (pos 1)."""
    return start + (1.0 + math.cos(math.pi * (1.0 - pos))) * (end - start) / 2.0


def onecycle(
    step: int,
    total_steps: int,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> tuple[float, float]:
    """(lr factor, momentum) of the one-cycle policy before global step `step` of `total_steps`.

    The lr rises along a cosine from 1/div to 1 over the first `pct_start` of the steps, then falls along a
    cosine to 1/div_final; momentum moves the other way, moms[0] -> moms[1] -> moms[2]. These are fastai's
    defaults (`fit_one_cycle`). A pure function of the global step: a run resumed under another process count
    (so another number of steps per epoch) continues at the same fraction of the schedule.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    pos = min(max(step / total_steps, 0.0), 1.0)
    if pos < pct_start:
        phase = pos / pct_start
        return _cos(1.0 / div, 1.0, phase), _cos(moms[0], moms[1], phase)
    phase = 1.0 if pct_start >= 1.0 else (pos - pct_start) / (1.0 - pct_start)
    return _cos(1.0, 1.0 / div_final, phase), _cos(moms[1], moms[2], phase)


def set_schedule(optimizer: torch.optim.Optimizer, lr_factor: float, momentum: float | None = None) -> None:
    """Set every group's lr to its `base_lr` * `lr_factor`, and the momentum (SGD) or beta1 (Adam-style)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor
        if momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


def lr_factor(scfg, epochs: int, lr: float):
    """The lr multiplier after `done` epochs: linear warm-up, then none | step | cosine.

    A pure function of the epoch count, so a resumed run (even one given more epochs) follows the
    schedule its config describes, and a checkpoint needs no scheduler state.
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
