#!/usr/bin/env python
"""What a frozen phase costs, and what one epoch of it buys, on doraemon_walle with lite0 ImageNet weights.

speed: images/s of a training step (photos decoded once beforehand, so compute only) for
  unfrozen             every layer trains (forward + backward through the body)
  frozen_train_bn      body frozen fastai-style (BN weights, biases and statistics train: backward through the body)
  frozen               body frozen with BN frozen (eval mode; backward through the head only)
  cached_first_epoch   body features computed (`geektime.models.head_features`, no autograd), head step on them
  cached_later_epochs  head step on the cached features only
accuracy: val accuracy / loss after 1 head-only epoch, 1 all-layers epoch, staged (1 + 1: BN frozen in phase 1;
  BN frozen in phase 1 and kept in eval mode in phase 2; fastai's BN training in both) and 2 all-layers epochs
  (AdamW, one cycle per phase as fastai's fine_tune), over --seeds.

    python bench/bench_frozen_phase.py speed [--image-size 224] [--threads 2]
    python bench/bench_frozen_phase.py accuracy [--image-size 128] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from efficientnet_pytorch import EfficientNet, packaged_weights
from geektime.data import InputNormalizer
from geektime.models import classifier, freeze_body, head_features, unfreeze_body
from geektime.optim import build_optimizer, onecycle, param_groups, set_schedule

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"
FAMILY = "efficientnet"


def load_split(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for index, cls in enumerate(("doraemon", "walle")):
        for path in sorted((DATA / split / cls).iterdir()):
            images.append(TF.pil_to_tensor(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)))
            targets.append(index)
    return torch.stack(images), torch.tensor(targets)


def batches(images, targets, batch_size, seed):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return [
        (images[order[i : i + batch_size]], targets[order[i : i + batch_size]])
        for i in range(0, len(images), batch_size)
    ]


def lite0(size: int) -> nn.Module:
    return EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=packaged_weights("efficientnet-lite0"),
        num_classes=2,
        image_size=size,
        batch_norm_momentum=0.9,
    )


def run_phase(model, loader, normalize, optimizer, pct_start, div, features=False):
    """One epoch of one-cycle training (the cycle spans this phase's one epoch)."""
    criterion = nn.CrossEntropyLoss()
    head = classifier(model, FAMILY) if features else model
    model.train()
    for step, (x, y) in enumerate(loader):
        set_schedule(optimizer, *onecycle(step, len(loader), pct_start=pct_start, div=div))
        loss = criterion(head(x if features else normalize(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(model, images, targets, normalize):
    model.eval()
    logits = torch.cat([model(normalize(images[i : i + 32])) for i in range(0, len(images), 32)])
    return (logits.argmax(1) == targets).float().mean().item(), nn.functional.cross_entropy(logits, targets).item()


def speed(args) -> dict:
    """Per-batch seconds of each mode, the modes interleaved batch by batch so they share the machine's load;
    figures are medians over the batches, ratios the median of per-batch ratios."""
    normalize = InputNormalizer("tflite", torch.device("cpu"), channels_last=True)
    images, targets = load_split("train", args.image_size)
    loader = batches(images, targets, args.batch_size, 0)[: args.batches]
    criterion = nn.CrossEntropyLoss()
    modes = ("unfrozen", "frozen_train_bn", "frozen", "cached_first_epoch", "cached_later_epochs")
    models, optimizers = {}, {}
    for mode in modes:
        model = lite0(args.image_size).to(memory_format=torch.channels_last).train()
        if mode != "unfrozen":
            freeze_body(model, FAMILY, freeze_bn=mode != "frozen_train_bn")
        models[mode] = model
        optimizers[mode] = build_optimizer("sgd", param_groups(model, FAMILY, 0.01, 1.0, 1e-4))
    features, _ = head_features(
        models["cached_later_epochs"], FAMILY, loader, normalize, torch.device("cpu"), show_progress=False
    )

    def step(mode, index):
        x, y = loader[index]
        if mode == "cached_first_epoch":  # the feature pass, then the head step
            feats, _ = head_features(
                models[mode], FAMILY, [(x, y)], normalize, torch.device("cpu"), show_progress=False
            )
            logits = classifier(models[mode], FAMILY)(feats)
        elif mode == "cached_later_epochs":
            logits = classifier(models[mode], FAMILY)(features[index * args.batch_size :][: len(y)])
        else:
            logits = models[mode](normalize(x))
        loss = criterion(logits, y)
        optimizers[mode].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[mode].step()

    seconds = {mode: [] for mode in modes}
    for index in range(len(loader)):
        for mode in modes:
            started = time.perf_counter()
            step(mode, index)
            seconds[mode].append(time.perf_counter() - started)
    warm = slice(1, None)  # the first batch pays one-time costs
    results = {}
    for mode in modes:
        per_batch = statistics.median(seconds[mode][warm])
        ratio = statistics.median(u / m for u, m in zip(seconds["unfrozen"][warm], seconds[mode][warm]))
        results[mode] = {
            "batch_s": per_batch,
            "images_per_s": args.batch_size / per_batch,
            "speedup_vs_unfrozen": ratio,
        }
    return results


def accuracy(args) -> dict:
    normalize = InputNormalizer("tflite", torch.device("cpu"), channels_last=False)
    train, val = load_split("train", args.image_size), load_split("valid", args.image_size)
    lr = args.lr
    plans = {
        "head_1": [("frozen", 1)],
        "all_1": [("all", 1)],
        "staged_1+1": [("frozen", 1), ("unfrozen", 1)],
        "all_2": [("all", 2)],
        "staged_train_bn_1+1": [("frozen_train_bn", 1), ("unfrozen", 1)],
        "staged_bn_eval_1+1": [("frozen", 1), ("unfrozen_bn_eval", 1)],
    }
    rows = {}
    for name, plan in plans.items():
        if args.plans and name not in args.plans:
            continue
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = lite0(args.image_size)
            epoch = 0
            for phase, epochs in plan:
                if phase.startswith("frozen"):
                    freeze_body(model, FAMILY, freeze_bn=phase == "frozen")
                    groups, pct, div = param_groups(model, FAMILY, lr, 1.0, 0.01), 0.99, 25.0
                elif phase.startswith("unfrozen"):  # fastai: base_lr / 2 over slice(lr / lr_mult, lr), pct 0.3, div 5
                    unfreeze_body(model, FAMILY, bn_eval=phase == "unfrozen_bn_eval")
                    groups = param_groups(model, FAMILY, lr * args.unfrozen_lr_factor, args.lr_mult, 0.01)
                    pct, div = 0.3, 5.0
                else:
                    groups, pct, div = param_groups(model, FAMILY, lr, 1.0, 0.01), 0.25, 25.0
                optimizer = build_optimizer("adamw", groups)  # fresh state at each phase
                loader = [b for e in range(epochs) for b in batches(*train, args.batch_size, 100 * seed + epoch + e)]
                run_phase(model, loader, normalize, optimizer, pct, div)
                epoch += epochs
            runs.append(evaluate(model, *val, normalize))
        accs, losses = [r[0] for r in runs], [r[1] for r in runs]
        rows[name] = {
            "val_acc_mean": statistics.mean(accs),
            "val_acc_sd": statistics.pstdev(accs),
            "val_loss_mean": statistics.mean(losses),
            "val_loss_sd": statistics.pstdev(losses),
        }
        print(name, json.dumps(rows[name]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "accuracy"))
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 (speed), 128 (accuracy)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="speed: batches per mode (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-mult", type=float, default=100.0)
    parser.add_argument("--unfrozen-lr-factor", type=float, default=0.5, help="fastai: 0.5")
    parser.add_argument("--plans", nargs="*", default=None, help="accuracy: run only these plans")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"error: {DATA} is not there (the shared doraemon_walle photos)", file=sys.stderr)
        return 2
    args.image_size = args.image_size or (224 if args.what == "speed" else 128)
    torch.set_num_threads(args.threads)
    result = speed(args) if args.what == "speed" else accuracy(args)
    print(json.dumps({"args": vars(args), "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
