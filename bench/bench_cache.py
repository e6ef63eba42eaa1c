#!/usr/bin/env python
"""The on-disk cache of decoded views (geektime.cache), measured in one run (issue 18, target 3).

Each measurement runs in its own child process (a job of a sweep is a process), against a fresh cache folder:

a) decode before training: `build_data` (train + valid) in a first job, which decodes into the disk cache, and
   in a second job, which maps it; and, for reference, a job with `data.disk_cache=false` (today's per-process
   decode). Target: second / first <= 0.05.
b) a train split 10x larger than `data.cache_max_gb`: `train_one_epoch` over the loader, served from the mapped
   cache, against the compute limit (the same model's step on one in-memory batch, re-measured in the same
   child between epochs, as bench_train.py's `ours` does); beside it the same split held in memory (it fits)
   and decoded on every access (`data.disk_cache=false`: before the disk cache). Target: mapped >= 0.9 of the
   limit, with peak RSS bounded (RssAnon and RssFile at the end say what the resident memory is).

    python bench/bench_cache.py [--model efficientnet_b0] [--data ../shared/datasets/doraemon_walle]
        [--image-size 224] [--batch-size 16] [--threads 2] [--epochs 2] [--augment]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from bench_train import DEFAULT_DATA, compose, data_dirs, epochs_against_limit, peak_rss_mib, training_parts  # noqa: E402


def config(args, extra: list[str]):
    train_dir, val_dir = data_dirs(args)
    return compose(
        "train",
        [
            f"model={args.model}",
            "scheduler=none",
            f"data.image_size=[{args.image_size},{args.image_size}]",
            f"data.batch_size={args.batch_size}",
            f"trainer.threads={args.threads}",
            f"data.train_dir={train_dir}",
            f"data.val_dir={val_dir}",
            f"transforms.augment.enabled={str(args.augment).lower()}",
            f"data.cache_dir={args.cache_dir}",
            *extra,
        ],
    )


def memory_status() -> dict:
    """This process's resident memory now, split into anonymous (its own) and file-backed (the page cache's)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key.lower() + "_mib"] = int(value.split()[0]) / 1024
    return out


def child_prepare(args) -> dict:
    """Everything a job does with its data before the first training step."""
    import torch

    from geektime.data import build_data

    torch.set_num_threads(args.threads)
    cfg = config(args, args.extra)
    started = time.perf_counter()
    data = build_data(cfg)
    return {
        "seconds": time.perf_counter() - started,
        "train": len(data.train),
        "val": len(data.val),
        "kind": type(data.train).__name__,
    }


def child_train(args) -> dict:

    import torch

    from geektime.data import build_data
    from geektime.train import seed_everything

    cfg = config(args, args.extra)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    started = time.perf_counter()
    data = build_data(cfg)
    prepare_seconds = time.perf_counter() - started
    _, loop_seconds, limit_seconds = epochs_against_limit(*training_parts(cfg, data), data, cfg, args.epochs)
    images = getattr(data.train, "images", None)
    return {
        "kind": type(images).__name__ if images is not None else type(data.train).__name__,
        "split_mib": len(data.train) * 3 * int(torch.tensor(data.train.view(0).shape[1:]).prod()) / 2**20,
        "prepare_seconds": prepare_seconds,
        "ratio_to_limit": limit_seconds / loop_seconds,
        "loop_images_per_s": args.epochs * len(data.train_loader) * args.batch_size / loop_seconds,
        **memory_status(),
    }


CHILDREN = {"prepare": child_prepare, "train": child_train}


def run_child(name: str, args, extra: list[str]) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--model",
        args.model,
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
        "--cache-dir",
        args.cache_dir,
        *(["--augment"] * args.augment),
        "--extra",
        *extra,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"child {name} {extra} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name:8s} {' '.join(extra) or '(defaults)'}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an ImageFolder root with train/ and valid/")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--augment", action="store_true", help="random crops and flips (a 2x view, in workers)")
    parser.add_argument("--only", nargs="+", choices=["a", "b"], default=["a", "b"], help="the measurements to run")
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--extra", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (an ImageFolder root with train/ and valid/)")
    args.cache_dir = tempfile.mkdtemp(prefix="bench-cache-")
    print(
        f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.threads} threads, "
        f"{args.epochs} epochs, data {args.data}, {os.cpu_count()} cores; cache {args.cache_dir}"
    )
    rows = []
    try:
        first = run_child("prepare", args, [])  # a cold cache: this job decodes into it
        if "a" in args.only:
            print("a) a sweep's jobs: data ready before the first step")
            second = run_child("prepare", args, [])
            today = run_child("prepare", args, ["data.disk_cache=false"])
            ratio = second["seconds"] / first["seconds"]
            rows.append(
                f"| a) second job / first job, time before training | {ratio:.3f} "
                f"({second['seconds']:.2f} s / {first['seconds']:.2f} s; without the disk cache "
                f"{today['seconds']:.2f} s) | <= 0.05 |"
            )
        if "b" in args.only:
            views = 3 * args.image_size**2 * (4 if args.augment else 1)
            tenth = first["train"] * views / 10 / 2**30  # the split is 10x this
            print(f"b) a train split 10x larger than data.cache_max_gb={tenth:.4f}")
            for name, extra in (
                ("mapped cache (split 10x cache_max_gb)", [f"data.cache_max_gb={tenth}"]),
                ("in memory (split fits)", []),
                ("decoded on access (disk_cache=false)", [f"data.cache_max_gb={tenth}", "data.disk_cache=false"]),
            ):
                run = run_child("train", args, extra)
                rows.append(
                    f"| b) {name}: training / compute limit | {run['ratio_to_limit']:.2f} "
                    f"({run['loop_images_per_s']:.1f} img/s; peak RSS {run['peak_rss_mib']:.0f} MiB, at the end "
                    f"RssAnon {run['rssanon_mib']:.0f} + RssFile {run['rssfile_mib']:.0f} MiB; views "
                    f"{run['split_mib']:.0f} MiB) | {'>= 0.9' if name.startswith('mapped') else 'reference'} |"
                )
    finally:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
        print("\n| measurement | figure | target |\n|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
