"""One function per phase: `train_one_epoch`, `evaluate`, `predict`, each over a DataLoader.

The hot path never waits on the device: running sums stay on the device and are read only every
`log_interval` steps, which is also when a non-finite loss is noticed (and named by its step).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from geektime import testpoints
from geektime.errors import NonFiniteLossError
from geektime.metrics import scores


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext()


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _progress(loader, epoch: int, phase: str, enabled: bool):
    return tqdm(
        loader,
        desc=f"epoch {epoch} {phase}",
        unit="batch",
        leave=False,
        disable=None if enabled else True,
        dynamic_ncols=True,
    )


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    optimizer,
    scaler,
    normalizer,
    device: torch.device,
    epoch: int,
    amp: bool = False,
    log_interval: int = 10,
    show_progress: bool = True,
    set_lr=None,
    input_size: tuple[int, int] | None = None,
) -> dict:
    """Returns train loss and accuracy over all processes' samples, images/s and seconds.

    `set_lr(step)`, when given, sets the learning rate before each step (a per-step schedule such as
    one-cycle); `step` counts from the start of this epoch. `input_size` (progressive resizing) resizes each
    batch on the device, after augmentation, so the loader and its decoded views stay at the full size."""
    model.train()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    start = time.perf_counter()
    bar = _progress(loader, epoch, "train", show_progress)
    for step, (images, targets) in enumerate(bar):
        if set_lr is not None:
            set_lr(step)
        images = normalizer(images.to(device, non_blocking=True))
        if input_size is not None and tuple(images.shape[-2:]) != input_size:
            images = F.interpolate(images, size=input_size, mode="bilinear", antialias=True, align_corners=False)
            images = images.contiguous(memory_format=normalizer.memory_format)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        testpoints.reached("train_step")

        loss = loss.detach()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        totals += torch.stack(
            [
                loss.double() * targets.numel(),
                (logits.argmax(1) == targets).sum().double(),
                torch.tensor(targets.numel(), device=device, dtype=torch.float64),
            ]
        )
        if (step + 1) % log_interval == 0 or step + 1 == len(loader):
            bad = int(first_bad_step)
            if bad >= 0:
                raise NonFiniteLossError(
                    f"loss became non-finite at epoch {epoch}, step {bad + 1} of {len(loader)}; stopping. "
                    "The checkpoints already written are intact. Lower optimizer.lr, or check the data."
                )
            loss_sum, correct, count = totals.tolist()
            bar.set_postfix(
                loss=f"{loss_sum / count:.4f}",
                acc=f"{correct / count:.3f}",
                img_s=f"{count / (time.perf_counter() - start):.1f}",
            )
    seconds = time.perf_counter() - start
    loss_sum, correct, count = _all_reduce(totals).tolist()
    return {
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "train_images_per_s": count / seconds,
        "train_seconds": seconds,
    }


def train_head_epoch(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    criterion,
    optimizer,
    batch_size: int,
    epoch: int,
    seed: int,
    set_lr=None,
) -> dict:
    """One epoch of a classifier head on pooled features computed once (a frozen body's), in a seeded order.

    The same row as `train_one_epoch`; batches follow its rule (the last partial batch is dropped when there
    is more than one batch), so a one-cycle schedule counts the same steps."""
    head.train()
    start = time.perf_counter()
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    count = len(order) // batch_size * batch_size if len(order) > batch_size else len(order)
    loss_sum, correct = 0.0, 0
    for step, begin in enumerate(range(0, count, batch_size)):
        if set_lr is not None:
            set_lr(step)
        index = order[begin : begin + batch_size]
        logits = head(features[index])
        loss = criterion(logits, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {epoch}, step {step + 1} (frozen body, head "
                "only); stopping. Lower optimizer.lr."
            )
        loss_sum += loss.item() * len(index)
        correct += int((logits.argmax(1) == targets[index]).sum())
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "train_images_per_s": count / seconds,
        "train_seconds": seconds,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    criterion,
    normalizer,
    device: torch.device,
    classes: list[str],
    epoch: int = 0,
    amp: bool = False,
    show_progress: bool = True,
) -> dict:
    """Val loss, accuracy, per-class precision/recall and the confusion matrix, over all processes' shards."""
    model.eval()
    num_classes = len(classes)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.float64)
    for images, targets in _progress(loader, epoch, "val", show_progress):
        images = normalizer(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets).double() * targets.numel()
        confusion += torch.bincount(targets * num_classes + logits.argmax(1), minlength=num_classes**2).double()
    _all_reduce(loss_sum)
    _all_reduce(confusion)
    confusion = confusion.view(num_classes, num_classes).long().cpu().numpy()
    count = int(confusion.sum())
    figures = scores(confusion, classes)
    metrics = {"val_loss": loss_sum.item() / count if count else math.nan, "val_acc": figures.pop("accuracy")}
    metrics.update(figures)
    metrics["confusion"] = confusion.tolist()
    return metrics


@torch.inference_mode()
def predict(
    model: nn.Module, loader, normalizer, device: torch.device, amp: bool = False, show_progress: bool = False
) -> torch.Tensor:
    """Softmax probabilities for every image the loader yields, in its order."""
    model.eval()
    out = []
    for images, _ in tqdm(loader, desc="predicting", unit="batch", leave=False, disable=not show_progress):
        batch = normalizer(images.to(device, non_blocking=True))
        with _autocast(device, amp):
            out.append(model(batch).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0)
