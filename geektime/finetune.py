"""The phases of a run: one phase ("all") from scratch or for all layers of pretrained weights, or a staged
fine-tune's "frozen" phase (only the head learns) then "unfrozen" (every layer, discriminative lrs).

This module owns which phase an epoch is in, how the model is set up for it (body frozen or not), the phase's
optimizer, and the learning rate (and one-cycle momentum) at every step of the phase: a pure function of the
epoch and the step, so a resume in either phase, under any process count, continues where a straight run is.
At a phase boundary the optimizer starts afresh; the checkpoint records the phase it was written in.
The training input size of each epoch (`trainer.progressive_resize`) is such a pure function of the epoch too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from geektime.models import freeze_body, unfreeze_body
from geektime.optim import lr_factor, onecycle, optimizer_from_config, set_schedule


@dataclass(frozen=True)
class Phase:
    name: str  # all | frozen | unfrozen
    first_epoch: int  # 1-based
    epochs: int
    lr: float  # the head's lr; the body's groups get less in the unfrozen phase
    lr_mult: float  # head lr / first body group's lr
    pct_start: float  # one-cycle warm-up share of this phase

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


def phases(cfg: DictConfig) -> list[Phase]:
    """The run's phases over `trainer.epochs`: one, or the staged fine-tune's two (frozen first)."""
    epochs, lr, pct = cfg.trainer.epochs, cfg.optimizer.lr, cfg.scheduler.pct_start
    ft = cfg.finetune
    if str(ft.name) == "none" or ft.freeze_epochs == 0:
        return [Phase("all", 1, epochs, lr, 1.0, pct)]
    frozen = min(ft.freeze_epochs, epochs)
    out = [Phase("frozen", 1, frozen, lr, 1.0, ft.frozen_pct_start)]
    if epochs > frozen:
        out.append(Phase("unfrozen", frozen + 1, epochs - frozen, lr * ft.unfrozen_lr_factor, ft.lr_mult, pct))
    return out


def phase_of(all_phases: list[Phase], epoch: int) -> Phase:
    return next(p for p in all_phases if p.first_epoch <= epoch <= p.last_epoch)


def set_up_model(model: nn.Module, family: str, phase: Phase, freeze_bn: bool) -> None:
    """Freeze the body for the frozen phase; every layer trains otherwise.

    With `freeze_bn` the body's BatchNorm statistics stay the pretrained ones in the unfrozen phase too (its
    weights and biases train): switching to batch statistics shifts the features the head has just learned on
    (doraemon_walle, lite0, 2 seeds: val loss 0.11 against 0.26)."""
    if phase.name == "frozen":
        freeze_body(model, family, freeze_bn)
    else:
        unfreeze_body(model, family, bn_eval=freeze_bn and phase.name == "unfrozen")


def phase_optimizer(cfg: DictConfig, model: nn.Module, phase: Phase) -> torch.optim.Optimizer:
    """The optimizer over what trains in `phase`, its groups' lrs spread over the layer groups by lr_mult."""
    return optimizer_from_config(cfg.optimizer, model, str(cfg.model.family), lr=phase.lr, lr_mult=phase.lr_mult)


class Schedule:
    """The lr factor (and momentum, for one-cycle) at each step of a phase, from the scheduler config."""

    def __init__(self, scfg: DictConfig, phase: Phase, steps_per_epoch: int):
        self.scfg, self.phase, self.steps_per_epoch = scfg, phase, max(1, steps_per_epoch)
        self.per_step = str(scfg.name) == "onecycle"
        self.epoch_factor = lr_factor(scfg, phase.epochs, phase.lr)

    def at(self, epoch: int, step: int) -> tuple[float, float | None]:
        """(lr factor, momentum or None) before `step` (0-based) of `epoch` (1-based, of the whole run)."""
        done = epoch - self.phase.first_epoch  # epochs of this phase already done
        if not self.per_step:
            return self.epoch_factor(done), None
        total = self.phase.epochs * self.steps_per_epoch
        return onecycle(
            done * self.steps_per_epoch + step,
            total,
            self.phase.pct_start,
            self.scfg.div,
            self.scfg.div_final,
            tuple(self.scfg.moms),
        )

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        set_schedule(optimizer, *self.at(epoch, step))


def input_size(prcfg: DictConfig, all_phases: list[Phase], epoch: int, full: tuple[int, int]) -> tuple[int, int]:
    """The training input size of `epoch` under `trainer.progressive_resize` (FFCV's and fastai's progressive
    resizing): `start_scale` of the full size at the first epoch that trains the body, growing linearly, then
    the full size for the last `full_size_epochs` epochs; each side a multiple of `multiple`. Validation and the
    frozen phase (head on features of full-size images) always see the full size."""
    full = tuple(full)
    first = next((p.first_epoch for p in all_phases if p.name != "frozen"), None)
    if not prcfg.enabled or first is None:
        return full
    full_from = max(first, all_phases[-1].last_epoch - prcfg.full_size_epochs + 1)
    if not first <= epoch < full_from:
        return full
    scale = prcfg.start_scale + (1 - prcfg.start_scale) * (epoch - first) / (full_from - first)
    step = prcfg.multiple
    return tuple(min(side, max(step, round(side * scale / step) * step)) for side in full)
