#!/usr/bin/env python
"""Training and evaluation throughput, side by side, measured in one run (issue: performance).

Each measurement runs in its own child process, so peak RSS is per measurement:

1. compute   forward+backward+SGD on tensors already in memory (our model, our layout): the limit;
2. ours      geektime's own data path and `train_one_epoch` on real photos, E epochs, the
             one-time decode included; images/s and the ratio to the limit, which this child
             re-measures between its epochs (a copy of the model on one in-memory batch), so
             that the ratio is not at the mercy of the machine's load drifting between children;
             with --augment, random crops and flips of the cached views, every epoch;
3. course    the course-style loop: ImageFolder + PIL Resize to the tuple + ToTensor/Normalize +
             DataLoader, the published efficientnet_pytorch 0.7.1 (or torchvision's ResNet),
             `loss.item()` every step; our ratio over it, and both val accuracies after E epochs;
4. evaluate  `evaluate.py`'s path over a run dir of K checkpoints, against decode once +
             K x inference on tensors in memory.

    python bench/bench_train.py [--model efficientnet_b0 resnet18] [--data ../shared/datasets/doraemon_walle | digits]
        [--image-size 224] [--batch-size 16] [--threads 2] [--epochs 2] [--checkpoints 10] [--repeat 1] [--augment]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]  # runs from a checkout, installed or not
from bench_efficientnet import install_published  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compose(config_name: str, overrides: list[str]):
    """conf/<config_name>.yaml as train.py / evaluate.py compose it (schema included), without a Hydra run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def geektime_cfg(args, train_dir, val_dir):
    """The config train.py would compose for this benchmark."""
    overrides = [
        f"model={args.model}",
        "scheduler=none",
        f"data.image_size=[{args.image_size},{args.image_size}]",
        f"data.batch_size={args.batch_size}",
        f"trainer.threads={args.threads}",
        f"transforms.augment.enabled={str(args.augment).lower()}",
    ]
    if train_dir is not None:
        overrides += [f"data.train_dir={train_dir}", f"data.val_dir={val_dir}"]
    return compose("train", overrides)


def data_dirs(args) -> tuple[str | None, str | None]:
    if args.data == "digits":
        return None, None
    root = Path(args.data)
    val = root / "valid" if (root / "valid").is_dir() else root / "val"
    return str(root / "train"), str(val)


def layout(cfg, size) -> tuple:
    """(memory format, channels_last) as train.py resolves trainer.channels_last on this CPU."""
    import torch

    from geektime.models import channels_last_pays

    cl = channels_last_pays(cfg.trainer.channels_last, cfg.model.family, tuple(size), torch.device("cpu"))
    return (torch.channels_last if cl else torch.contiguous_format), cl


def training_parts(cfg, data) -> tuple:
    """(model, optimizer, scaler, normalizer, criterion) as train.py builds them for this config and data, on
    the CPU: what `epochs_against_limit` trains."""
    import torch

    from geektime.data import InputNormalizer
    from geektime.models import build_model
    from geektime.optim import optimizer_from_config

    memory_format, channels_last = layout(cfg, data.image_size)
    model = build_model(cfg.model, len(data.classes), data.image_size).to(memory_format=memory_format)
    optimizer = optimizer_from_config(cfg.optimizer, model, str(cfg.model.family))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    normalizer = InputNormalizer(cfg.model.normalization, torch.device("cpu"), channels_last)
    return model, optimizer, scaler, normalizer, torch.nn.CrossEntropyLoss()


def in_memory_step(model, optimizer, criterion, normalizer, images, targets):
    """One forward+backward+SGD step on a batch already in memory: the unit of the compute-only limit."""

    def step():
        loss = criterion(model(normalizer(images)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------- children


def child_compute(args) -> dict:
    import torch

    from geektime.data import InputNormalizer
    from geektime.models import build_model
    from geektime.optim import optimizer_from_config

    cfg = geektime_cfg(args, None, None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = (args.image_size, args.image_size)
    memory_format, channels_last = layout(cfg, size)
    model = build_model(cfg.model, 2, size).to(memory_format=memory_format).train()
    optimizer = optimizer_from_config(cfg.optimizer, model, str(cfg.model.family))
    normalizer = InputNormalizer("imagenet", torch.device("cpu"), channels_last)
    images = torch.randint(0, 256, (args.batch_size, 3, *size), dtype=torch.uint8)
    targets = torch.randint(0, 2, (args.batch_size,))
    step = in_memory_step(
        model, optimizer, criterion=torch.nn.CrossEntropyLoss(), normalizer=normalizer, images=images, targets=targets
    )
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    return {"images_per_s": args.steps * args.batch_size / seconds}


def epochs_against_limit(model, optimizer, scaler, normalizer, criterion, data, cfg, epochs: int):
    """`epochs` of `train_one_epoch` over the data's train loader; after each, as many compute-only steps (a copy
    of the model on one in-memory batch) as the epoch had batches, so that both see the same background load.
    Returns (images/s of each epoch, seconds in the loop, seconds of the compute-only steps)."""
    import copy

    import torch

    from geektime.engine import train_one_epoch
    from geektime.optim import optimizer_from_config

    limit_model = copy.deepcopy(model).train()
    limit_step = in_memory_step(
        limit_model,
        optimizer_from_config(cfg.optimizer, limit_model, str(cfg.model.family)),
        criterion,
        normalizer,
        *next(iter(data.train_loader)),
    )
    for _ in range(2):
        limit_step()
    rates, loop_seconds, limit_seconds = [], 0.0, 0.0
    for epoch in range(1, epochs + 1):
        data.train_sampler.set_epoch(epoch)
        row = train_one_epoch(
            model,
            data.train_loader,
            criterion,
            optimizer,
            scaler,
            normalizer,
            torch.device("cpu"),
            epoch,
            show_progress=False,
        )
        rates.append(row["train_images_per_s"])
        loop_seconds += row["train_seconds"]
        window = time.perf_counter()
        for _ in range(len(data.train_loader)):
            limit_step()
        limit_seconds += time.perf_counter() - window
    return rates, loop_seconds, limit_seconds


def child_ours(args) -> dict:
    """train.py's data path and loop; the compute-only limit is re-measured in this process between
    epochs (on a copy of the model, same batch) so that both see the same background load."""
    import torch

    from geektime.data import build_data
    from geektime.engine import evaluate
    from geektime.train import seed_everything

    train_dir, val_dir = data_dirs(args)
    cfg = geektime_cfg(args, train_dir, val_dir)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    started = time.perf_counter()
    data = build_data(cfg)
    decode_seconds = time.perf_counter() - started
    parts = training_parts(cfg, data)
    model, _, _, normalizer, criterion = parts
    epoch_rates, loop_seconds, limit_seconds = epochs_against_limit(*parts, data, cfg, args.epochs)
    images = args.epochs * len(data.train_loader) * args.batch_size
    val = evaluate(
        model, data.val_loader, criterion, normalizer, torch.device("cpu"), data.classes, show_progress=False
    )
    return {
        "images_per_s": images / (decode_seconds + loop_seconds),
        "loop_images_per_s": images / loop_seconds,
        "limit_images_per_s": images / limit_seconds,
        "epoch_images_per_s": epoch_rates,
        "decode_seconds": decode_seconds,
        "val_acc": val["val_acc"],
    }


def child_course(args) -> dict:
    """The course's loop, as a user would have written it before geektime."""
    import torch
    from torchvision import datasets, transforms

    if args.model.startswith("efficientnet"):
        sys.path.insert(0, install_published(str(Path(tempfile.gettempdir()) / "geektime-bench-published")))
        from efficientnet_pytorch import EfficientNet

        make_model = lambda n: EfficientNet.from_name(args.model.replace("_", "-"), num_classes=n)  # noqa: E731
    else:
        import torchvision

        make_model = lambda n: getattr(torchvision.models, args.model)(num_classes=n)  # noqa: E731
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_dir, val_dir = data_dirs(args)
    if train_dir is None:
        from geektime.data import ensure_digits

        train_dir, val_dir = map(str, ensure_digits())
    tf = transforms.Compose(
        [
            transforms.Resize((args.image_size, args.image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    train_set, val_set = datasets.ImageFolder(train_dir, tf), datasets.ImageFolder(val_dir, tf)
    workers = args.threads
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    model = make_model(len(train_set.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    started, images = time.perf_counter(), 0
    for _ in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running = loss.item()  # noqa: F841  (the course logged every step)
            images += len(y)
    seconds = time.perf_counter() - started
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=workers):
            correct += (model(x).argmax(1) == y).sum().item()
    return {"images_per_s": images / seconds, "val_acc": correct / len(val_set)}


def child_evaluate(args) -> dict:
    """evaluate.py's own path over K checkpoints vs decode once + K x inference in memory."""
    import torch

    from geektime import checkpoint
    from geektime.config import to_plain
    from geektime.data import InputNormalizer, build_transform, decode_all, decode_size, ensure_digits, open_folder
    from geektime.engine import predict
    from geektime.evaluate import main as evaluate_main
    from geektime.models import build_model
    from geektime.optim import optimizer_from_config

    train_dir, val_dir = data_dirs(args)
    if val_dir is None:
        val_dir = str(ensure_digits()[1])
    cfg = geektime_cfg(args, train_dir, val_dir)
    torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    folder = open_folder("data.val_dir", val_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(folder.classes), size)
    optimizer = optimizer_from_config(cfg.optimizer, model, str(cfg.model.family))
    for param in model.parameters():  # momentum buffers: a checkpoint as train.py writes it is about twice the weights
        optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    run = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    plain = to_plain(cfg)
    saver = checkpoint.CheckpointSaver(run, epochs=args.checkpoints, save_interval=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(1, args.checkpoints + 1):
        saver.save(saver.state(model, optimizer, scaler, epoch, "all", folder.classes, size, plain, {}))
    eval_cfg = compose(
        "evaluate",
        [
            f"checkpoint={run}",
            f"data.val_dir={val_dir}",
            f"trainer.threads={args.threads}",
            f"data.batch_size={args.batch_size}",
        ],
    )
    started = time.perf_counter()
    evaluate_main(eval_cfg)
    tool_seconds = time.perf_counter() - started

    # The limit: decode once, then K forward passes over tensors in memory (no files, no models rebuilt).
    started = time.perf_counter()
    paths = [p for p, _ in folder.samples]
    tcfg = cfg.transforms
    images, _ = decode_all(paths, build_transform(tcfg, size, False), decode_size(tcfg, size, False), size)
    decode_seconds = time.perf_counter() - started
    memory_format, channels_last = layout(cfg, size)
    model.to(memory_format=memory_format)
    normalizer = InputNormalizer("imagenet", torch.device("cpu"), channels_last)
    started = time.perf_counter()
    batches = [(images[i : i + args.batch_size], None) for i in range(0, len(images), args.batch_size)]
    for _ in range(args.checkpoints):
        predict(model, batches, normalizer, torch.device("cpu"))
    infer_seconds = time.perf_counter() - started
    n = len(paths) * args.checkpoints
    return {
        "images_per_s": n / tool_seconds,
        "limit_images_per_s": n / (decode_seconds + infer_seconds),
        "ratio_to_limit": tool_seconds / (decode_seconds + infer_seconds),
        "decode_seconds": decode_seconds,
    }


CHILDREN = {"compute": child_compute, "ours": child_ours, "course": child_course, "evaluate": child_evaluate}


def run_child(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, *argv], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(results: dict) -> dict:
    """The figures each target is judged by, computed within one run."""
    out = {}
    if "ours" in results:
        ours = results["ours"]
        out["ours"] = ours["images_per_s"] / ours["limit_images_per_s"]
        out["ours_loop"] = ours["loop_images_per_s"] / ours["limit_images_per_s"]
        if "course" in results:
            out["course"] = ours["images_per_s"] / results["course"]["images_per_s"]
    if "evaluate" in results:
        out["evaluate"] = results["evaluate"]["ratio_to_limit"]
    return out


def print_table(model: str, runs: list[dict]) -> None:
    names = list(runs[0])
    rs = [ratios(r) for r in runs]
    print(f"\n{model}: medians of {len(runs)} run(s); each ratio is computed within one run\n")
    print("| measurement | images/s | ratio | peak RSS MiB |\n|---|---|---|---|")
    for name in names:
        rate = median([r[name]["images_per_s"] for r in runs])
        rss = median([r[name]["peak_rss_mib"] for r in runs])
        if name == "ours":
            ratio = (
                f"{median([x['ours'] for x in rs]):.2f} of compute-only with the one-time decode, "
                f"{median([x['ours_loop'] for x in rs]):.2f} without"
            )
        elif name == "course" and "course" in rs[0]:
            ratio = f"ours / course = {median([x['course'] for x in rs]):.2f}"
        elif name == "evaluate":
            ratio = f"{median([x['evaluate'] for x in rs]):.2f} x (decode once + K x inference)"
        else:
            ratio = "limit"
        print(f"| {name} | {rate:.1f} | {ratio} | {rss:.0f} |")
    if "ours" in names and "course" in names:
        print(
            f"\nval accuracy after the same epochs, per run: ours "
            f"{[round(r['ours']['val_acc'], 3) for r in runs]}, "
            f"course {[round(r['course']['val_acc'], 3) for r in runs]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["efficientnet_b0", "resnet18"], help="conf/model names")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="an ImageFolder root with train/ and valid/, or 'digits'"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the compute-only child")
    parser.add_argument("--checkpoints", type=int, default=10, help="K for the evaluation benchmark")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole set; the table gives medians")
    parser.add_argument(
        "--augment", action="store_true", help="ours trains with random crops and flips (taken from the cached views)"
    )
    parser.add_argument("--only", nargs="+", choices=list(CHILDREN), default=list(CHILDREN))
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model = args.model[0]
        result = CHILDREN[args.child](args)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    if args.data != "digits" and not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (give an ImageFolder root or 'digits')")
    import torch

    print(
        f"{' and '.join(args.model)}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.threads} threads, {args.epochs} epochs, data {args.data}; torch {torch.__version__}, "
        f"{os.cpu_count()} cores"
    )
    for model in args.model:
        runs = []
        for run in range(args.repeat):
            results = {}
            for name in args.only:
                results[name] = run_child(
                    name,
                    [
                        "--model",
                        model,
                        "--data",
                        args.data,
                        "--image-size",
                        str(args.image_size),
                        "--batch-size",
                        str(args.batch_size),
                        "--threads",
                        str(args.threads),
                        "--epochs",
                        str(args.epochs),
                        "--steps",
                        str(args.steps),
                        "--checkpoints",
                        str(args.checkpoints),
                        *(["--augment"] * args.augment),
                    ],
                )
                print(f"  {model} run {run + 1} {name:9s} {json.dumps(results[name])}", flush=True)
            runs.append(results)
        print_table(model, runs)


if __name__ == "__main__":
    main()
