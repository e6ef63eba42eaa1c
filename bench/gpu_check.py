#!/usr/bin/env python
"""Ready for a GPU (issue 18, target 5): what one CUDA machine does with geektime, in a few minutes.

Parts, each printed as it finishes (and all of them written to --out as JSON):
  train   training images/s of EfficientNet-B0 and -Lite0 (uint8 batches already on the device, our
          InputNormalizer, SGD): float32, AMP + channels_last, and AMP + channels_last + torch.compile;
  data    the data path alone: geektime.data.build_data's train loader (augmented) iterated without a model,
          with one worker per core, the views decoded once into memory (decode images/s and loader images/s),
          and decoded on every access in workers (data.cache=false); each against the training rate (keeps up?);
  eval    `python train.py` for 2 epochs, then `python evaluate.py checkpoint=<its run dir>` over both
          checkpoints: wall time and images/s;
  ddp     `torchrun --nproc_per_node 2 train.py` for the same 2 epochs when 2 GPUs exist.

    bench/gpu_check.sh [--no-compile] [--batch-size 128] [--parts train data eval ddp] [--out gpu_check.json]
    python bench/gpu_check.py --cpu-smoke     # every part for a few steps on the CPU: proves the script runs

Without CUDA (and without --cpu-smoke) it says so and exits 0. Photos come from ../shared/datasets/doraemon_walle
when present, else the embedded digits (train.py with no data dirs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"
MODELS = ("efficientnet_b0", "efficientnet_lite0")


def compose(overrides: list[str]):
    """conf/train.yaml as train.py composes it, without a Hydra run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def data_overrides(data: Path | None) -> list[str]:
    return [f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'valid'}"] if data else []


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- train: the step alone


def train_rate(
    model_name: str,
    device,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    amp: bool,
    channels_last: bool,
    compiled: bool,
) -> float:
    """Images/s of full training steps on one uint8 batch kept on the device."""
    import torch
    from torch import nn

    from geektime.data import InputNormalizer
    from geektime.models import build_model

    cfg = compose([f"model={model_name}", "model.pretrained=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, (size, size)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    normalizer = InputNormalizer(cfg.model.normalization, device, channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    criterion = nn.CrossEntropyLoss()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    targets = torch.randint(0, 2, (batch,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = criterion(step_model(normalizer(images)), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):  # compiles here, when compiled
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def part_train(args, device) -> dict:
    variants = [("float32", False, False, False), ("amp+channels_last", True, True, False)]
    if args.compile:
        variants.append(("amp+channels_last+compile", True, True, True))
    rates = {}
    for model_name in MODELS:
        for label, amp, channels_last, compiled in variants:
            amp = amp and device.type == "cuda"  # float16 autocast is a CUDA lever; on CPU the variant runs float32
            started = time.perf_counter()
            rate = train_rate(
                model_name,
                device,
                args.size,
                args.batch_size,
                args.steps,
                args.warmup + (3 if compiled else 0),
                amp,
                channels_last,
                compiled,
            )
            rates[f"{model_name} {label}"] = rate
            print(
                f"  train {model_name:18s} {label:26s} {rate:9.1f} img/s  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return rates


# ---------------------------------------------------------------- data: the loader alone


def loader_rate(cfg, images_wanted: int) -> tuple[float, float, int]:
    """(seconds build_data took, images/s of the train loader after it, workers): epochs cycle until
    `images_wanted` images have come out."""
    from geektime.data import build_data

    started = time.perf_counter()
    data = build_data(cfg)
    built = time.perf_counter() - started
    seen, epoch = 0, 0
    started = time.perf_counter()
    first = None
    while seen < images_wanted:
        epoch += 1
        data.train_sampler.set_epoch(epoch)
        for images, _ in data.train_loader:
            if first is None:  # workers start on the first batch: leave that out of the rate
                first, started = images.shape[0], time.perf_counter()
                continue
            seen += images.shape[0]
    return built, seen / (time.perf_counter() - started), data.train_loader.num_workers


def part_data(args, gpu_rate: float | None) -> dict:
    import torch

    workers = os.cpu_count() or 1
    base = [
        *data_overrides(args.data),
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={workers}",
        "transforms.augment.enabled=true",
        "data.disk_cache=false",
        f"trainer.threads={workers}",
    ]
    torch.set_num_threads(workers)
    results = {}
    for label, extra in (
        ("decoded once, in memory", ["data.cache=true"]),
        ("decoded on every access", ["data.cache=false"]),
    ):
        built, rate, used = loader_rate(compose(base + extra), args.data_images)
        results[label] = {"build_data_s": built, "loader_img_s": rate, "workers": used}
        verdict = (
            ""
            if gpu_rate is None
            else (
                f"  vs training {gpu_rate:.0f} img/s: {'keeps up' if rate >= gpu_rate else 'TOO SLOW'} "
                f"({rate / gpu_rate:.2f}x)"
            )
        )
        print(
            f"  data  {label:26s} build_data {built:6.1f} s, loader {rate:8.1f} img/s, {used} workers{verdict}",
            flush=True,
        )
    return results


# ---------------------------------------------------------------- eval and ddp: the scripts as a user runs them


def run(argv: list[str], env: dict | None = None, timeout: float | None = None) -> float:
    """Wall seconds of `argv` from the repo root. On a timeout it gets SIGTERM (torchrun passes it to its
    workers, which run in sessions of their own), then SIGKILL, and TimeoutError is raised."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise TimeoutError(f"{' '.join(argv[:6])} ... still running after {timeout:.0f} s: stopped") from None
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{log.read()[-2000:]}")
    return time.perf_counter() - started


def train_argv(args, run_dir: Path, device: str) -> list[str]:
    return [
        "train.py",
        *data_overrides(args.data),
        f"data.image_size={args.size}",
        "model=efficientnet_b0",
        "model.pretrained=false",
        f"trainer.epochs={args.epochs}",
        f"trainer.device={device}",
        f"trainer.amp={str(device != 'cpu').lower()}",
        "transforms.augment.enabled=true",
        f"hydra.run.dir={run_dir}",
    ]


def part_eval(args, device: str, work: Path) -> dict:
    run_dir = work / "train"
    train_s = run([sys.executable, *train_argv(args, run_dir, device)], {"GEEKTIME_CACHE": str(work / "views")})
    checkpoints = sorted(run_dir.glob("epoch_*.pth"))
    from geektime.data import ensure_digits
    from geektime.images import list_images

    val_dir = args.data / "valid" if args.data else ensure_digits()[1]
    images = len(checkpoints) * len(list_images(val_dir))
    eval_s = run(
        [sys.executable, "evaluate.py", f"checkpoint={run_dir}", f"trainer.device={device}"],
        {"GEEKTIME_CACHE": str(work / "views")},
    )
    result = {"train_s": train_s, "evaluate_s": eval_s, "checkpoints": len(checkpoints), "images": images}
    rate = f", {images / eval_s:.1f} img/s end to end" if eval_s else ""
    print(
        f"  eval  train.py {args.epochs} epoch(s) {train_s:.1f} s; evaluate.py over {len(checkpoints)} checkpoints "
        f"{eval_s:.1f} s{rate}",
        flush=True,
    )
    return result


def part_ddp(args, device: str, work: Path, single_s: float) -> dict:
    """torchrun as a user runs it; if that hangs (past 3x the 1-process run), once more without the disk cache."""
    result = {"single_process_s": single_s}
    for label, extra in (("default", []), ("data.disk_cache=false", ["data.disk_cache=false"])):
        run_dir = work / f"ddp_{len(result)}"
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *train_argv(args, run_dir, device),
            *extra,
        ]
        try:
            seconds = run(argv, {"GEEKTIME_CACHE": str(work / "views")}, timeout=max(120.0, 3 * single_s))
        except TimeoutError as err:
            result[label] = "hung"
            print(f"  ddp   torchrun 2 processes ({label}): HUNG: {err}", flush=True)
            continue
        ok = (run_dir / "last.pth").is_file()
        result[label] = {"seconds": seconds, "last_pth": ok}
        single = f" (1 process: {single_s:.1f} s)" if single_s else ""
        print(
            f"  ddp   torchrun 2 processes ({label}), {args.epochs} epoch(s): {seconds:.1f} s{single}, "
            f"last.pth {'written' if ok else 'MISSING'}",
            flush=True,
        )
        if not ok:
            raise RuntimeError(f"torchrun wrote no {run_dir / 'last.pth'}")
        break
    else:
        raise RuntimeError("torchrun hung with and without the disk cache")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every part, a few steps, on the CPU")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="of the train.py run evaluate.py then reads")
    parser.add_argument("--data-images", type=int, default=2000, help="images the data part draws per variant")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--data", type=Path, default=DATA if (DATA / "train").is_dir() else None)
    parser.add_argument(
        "--parts", nargs="+", choices=["train", "data", "eval", "ddp"], default=["train", "data", "eval", "ddp"]
    )
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): skipping the GPU checks. "
            "`python bench/gpu_check.py --cpu-smoke` runs every part briefly on the CPU."
        )
        return 0
    if args.cpu_smoke:
        args.batch_size, args.size, args.steps, args.warmup = 4, 64, 2, 1
        args.epochs, args.data_images, args.compile = 1, 16, False
    device = torch.device("cuda" if cuda and not args.cpu_smoke else "cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    name = torch.cuda.get_device_name(0) if gpus else "cpu (smoke run)"
    print(
        f"gpu_check: {name}, {gpus} GPU(s), {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"data: {args.data or 'embedded digits'}; batch {args.batch_size} at {args.size} px",
        flush=True,
    )
    report: dict = {
        "device": name,
        "gpus": gpus,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "size": args.size,
        "smoke": args.cpu_smoke,
    }
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        parts = [
            ("train", lambda: part_train(args, device)),
            (
                "data",
                lambda: part_data(
                    args,
                    report.get("train", {}).get("efficientnet_b0 amp+channels_last") if device.type == "cuda" else None,
                ),
            ),
            ("eval", lambda: part_eval(args, device.type, work)),
        ]
        if gpus >= 2 or args.cpu_smoke:
            parts.append(("ddp", lambda: part_ddp(args, device.type, work, report.get("eval", {}).get("train_s", 0))))
        elif "ddp" in args.parts:
            print("  ddp   skipped: fewer than 2 GPUs")
        for key, part in parts:
            if key not in args.parts:
                continue
            started = time.perf_counter()
            try:
                report[key] = part()
            except Exception as err:  # one broken part must not hide the others' figures
                failures.append(key)
                print(f"  {key}: FAILED: {type(err).__name__}: {err}", flush=True)
            report.setdefault("part_seconds", {})[key] = time.perf_counter() - started
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    total = sum(report.get("part_seconds", {}).values())
    print(f"gpu_check: {'failed parts: ' + ', '.join(failures) if failures else 'all parts ran'} in {total:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
