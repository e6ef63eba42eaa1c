#!/usr/bin/env python
"""End to end against timm's own train.py (issue 18, target 1): ours `python train.py` as a user runs it.

Both tools train the same model from scratch (EfficientNet-B0; and EfficientNet-Lite0) on the same ImageFolder
(doraemon_walle train/valid at 224 px), batch 16, the same threads and loader workers, SGD with momentum (not
Nesterov) with the same lr / momentum / weight decay, a per-epoch cosine schedule without warm-up, dropout and
drop-connect 0.2, random-resized crop (scale 0.35..1, ratio 0.75..1.333) and horizontal flip only (timm: no
colour jitter, label smoothing, mixup, cutmix, auto-augment, random erasing or EMA), validation every epoch on
the same centre-crop view (ours: transforms=center_crop; timm: --crop-pct 1.0), each saving its checkpoints.

Each (model, tool) runs for 1 and for 3 epochs, --repeat times (seed 42 + repeat, the same for both tools),
interleaved so that both tools see the same background load (the tool order alternates per repeat). Reported per
tool: median process wall time at 1 and 3 epochs, per extra epoch ((t3 - t1) / 2) and the final val accuracy;
then timm/ours ratios (>= 1.35x is the target). `--startup` adds one instrumented 1-epoch run of ours (a driver
in this file patches timers around Hydra's task, build_data and the first training step; the product is
unchanged) and `python -X importtime`'s heaviest imports from one package into another.

    python bench/bench_vs_timm.py [--models efficientnet_b0 efficientnet_lite0] [--repeat 3] [--threads 2]
        [--data DIR] [--lr 0.01] [--disk-cache cold|warm] [--startup] [--out DIR]

timm's train.py and its package come from ../shared/anchors/timm-aa4b585.tgz, unpacked into a temp folder and put
on PYTHONPATH of timm's process only (never installed into this environment).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"
ANCHOR = REPO.parent / "shared" / "anchors" / "timm-aa4b585.tgz"
TIMM_SRC = Path(os.environ.get("GEEKTIME_TIMM_TRAIN_DIR", Path(tempfile.gettempdir()) / "geektime_timm_aa4b585"))
EPOCHS = (1, 3)


def timm_source(anchor: Path, target: Path) -> Path:
    """timm's train.py and package, unpacked once into `target`."""
    if not (target / "train.py").is_file():
        if not anchor.is_file():
            raise SystemExit(
                f"error: {anchor} not found: timm's train.py comes from that archive (see ../shared/anchors/README.md)"
            )
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(anchor) as tar:
            tar.extractall(target, filter="data")
    return target


def ours_argv(args, model: str, epochs: int, run_dir: Path, seed: int = 42) -> list[str]:
    return [
        "train.py",
        f"data.train_dir={args.data / 'train'}",
        f"data.val_dir={args.data / 'valid'}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"model={model}",
        "model.pretrained=false",
        "model.dropout_rate=0.2",
        "model.drop_connect_rate=0.2",
        f"trainer.epochs={epochs}",
        f"trainer.threads={args.threads}",
        f"trainer.seed={seed}",
        "optimizer=sgd",
        f"optimizer.lr={args.lr}",
        "optimizer.momentum=0.9",
        f"optimizer.weight_decay={args.weight_decay}",
        "optimizer.nesterov=false",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0",
        "scheduler.min_lr=0",
        "transforms=center_crop",
        "transforms.augment.enabled=true",
        "transforms.augment.hflip=true",
        "transforms.augment.random_resized_crop=true",
        "transforms.augment.scale=[0.35,1.0]",
        "transforms.augment.ratio=[0.75,1.3333]",
        f"hydra.run.dir={run_dir}",
    ]


def timm_argv(args, model: str, epochs: int, out: Path, seed: int = 42) -> list[str]:
    return [
        str(TIMM_SRC / "train.py"),
        "--data-dir",
        str(args.data),
        "--train-split",
        "train",
        "--val-split",
        "valid",
        "--model",
        model,
        "--num-classes",
        "2",
        "--img-size",
        str(args.size),
        "-b",
        str(args.batch_size),
        "--epochs",
        str(epochs),
        "--workers",
        str(args.workers),
        "--seed",
        str(seed),
        "--opt",
        "momentum",
        "--lr",
        str(args.lr),
        "--momentum",
        "0.9",
        "--weight-decay",
        str(args.weight_decay),
        "--sched",
        "cosine",
        "--warmup-epochs",
        "0",
        "--cooldown-epochs",
        "0",
        "--min-lr",
        "0",
        "--drop",
        "0.2",
        "--drop-path",
        "0.2",
        "--smoothing",
        "0",
        "--color-jitter",
        "0",
        "--reprob",
        "0",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--scale",
        "0.35",
        "1",
        "--ratio",
        "0.75",
        "1.3333",
        "--hflip",
        "0.5",
        "--crop-pct",
        "1.0",
        "--train-interpolation",
        "bilinear",
        "--interpolation",
        "bilinear",
        "--channels-last",
        "--device",
        "cpu",
        "--log-interval",
        "50",
        "--output",
        str(out),
        "--experiment",
        "run",
    ]


def view_cache(args, run_dir: Path) -> dict[str, str]:
    """Ours keeps decoded views on disk for later processes (geektime.cache): `cold` gives each run an empty
    cache of its own, so that it decodes as a first run does (timm decodes in every run); `warm` uses the
    user's cache, filled by the runs before."""
    return {"GEEKTIME_CACHE": str(run_dir.parent / f"{run_dir.name}_views")} if args.disk_cache == "cold" else {}


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra or {}))
    env.pop("GEEKTIME_SIGNAL_AT", None)
    return env


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    """Run `python argv` from the repo root; its wall seconds. Output goes to `log`."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(argv[:3])} ... exited {proc.returncode}; its output: {log}\n" + log.read_text()[-3000:]
        )
    return seconds


def last_row(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    return rows[-1]


def run_ours(args, model: str, epochs: int, work: Path, seed: int) -> tuple[float, float]:
    run_dir = work / f"ours_{model}_{epochs}"
    seconds = timed(
        ours_argv(args, model, epochs, run_dir, seed),
        thread_env(args.threads, view_cache(args, run_dir)),
        work / f"{run_dir.name}.log",
    )
    return seconds, float(last_row(run_dir / "metrics.csv")["val_acc"])


def run_timm(args, model: str, epochs: int, work: Path, seed: int) -> tuple[float, float]:
    out = work / f"timm_{model}_{epochs}"
    env = thread_env(args.threads, {"PYTHONPATH": str(TIMM_SRC)})
    seconds = timed(timm_argv(args, model, epochs, out, seed), env, work / f"{out.name}.log")
    return seconds, float(last_row(out / "run" / "summary.csv")["eval_top1"]) / 100


RUNNERS = {"ours": run_ours, "timm": run_timm}


# ---------------------------------------------------------------- start-up breakdown of ours


class FirstSteps:
    """Wraps the train loader of the first epoch: marks when its iterator exists, the first batch arrives and
    the first optimizer step is done (the loop asks for the second batch)."""

    def __init__(self, loader, marks: dict[str, float]):
        self.loader, self.marks = loader, marks

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        iterator = iter(self.loader)
        self.marks["loader_iter"] = time.time()
        for index, batch in enumerate(iterator):
            if index == 0:
                self.marks["first_batch"] = time.time()
            yield batch
            if index == 0:
                self.marks["first_step"] = time.time()


def startup_child(marks_path: str, train_args: list[str]) -> None:
    """`python train.py train_args` with timers; writes the marks (epoch seconds) to `marks_path`."""
    marks = {"spawn": float(os.environ["GEEKTIME_BENCH_SPAWN"]), "interpreter": time.time()}
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    marks["torch"] = time.time()
    import geektime.cli
    import geektime.train as gt

    marks["imports"] = time.time()
    train, build_data, train_one_epoch = gt.train, gt.build_data, gt.train_one_epoch

    def timed_train(cfg, run_dir):
        marks["composed"] = time.time()
        return train(cfg, run_dir)

    def timed_build_data(*a, **k):
        marks["data_start"] = time.time()
        data = build_data(*a, **k)
        marks["data_done"] = time.time()
        return data

    def timed_epoch(model, loader, *a, **k):
        return train_one_epoch(model, FirstSteps(loader, marks) if "loader_iter" not in marks else loader, *a, **k)

    gt.train, gt.build_data, gt.train_one_epoch = timed_train, timed_build_data, timed_epoch
    sys.argv = ["train.py", *train_args]
    try:
        geektime.cli.train()
    finally:
        marks["end"] = time.time()
        Path(marks_path).write_text(json.dumps(marks))


PHASES = [  # (label, from mark, to mark)
    ("python interpreter start", "spawn", "interpreter"),
    ("import torch + torchvision", "interpreter", "torch"),
    ("import hydra, geektime (tensorboard, ...)", "torch", "imports"),
    ("Hydra compose + run folder + logging", "imports", "composed"),
    ("device, threads, seed", "composed", "data_start"),
    ("data: list, decode + cache views, loaders", "data_start", "data_done"),
    ("model, optimizer, TensorBoard writer", "data_done", "loader_iter"),
    ("first batch (loader workers start)", "loader_iter", "first_batch"),
    ("first training step", "first_batch", "first_step"),
]


def heaviest_imports(threads: int, count: int = 12) -> list[tuple[str, float]]:
    """`python -X importtime` of what train.py loads: the heaviest imports that cross from one package into
    another ("torchvision.ops.roi_align -> torch._dynamo"), by cumulative seconds: where start-up can be cut."""
    code = "import geektime.cli, hydra, geektime.train"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        env=thread_env(threads),
        capture_output=True,
        text=True,
        check=True,
    )
    pending: dict[int, list[tuple[str, float]]] = {}  # depth -> imports waiting for their importer (printed after)
    edges = []
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$", line)
        if not match:
            continue
        seconds, depth, name = int(match.group(1)) / 1e6, len(match.group(2)) // 2, match.group(3)
        for child, child_seconds in pending.pop(depth + 1, []):
            if child.split(".")[0] != name.split(".")[0]:
                edges.append((f"{name} -> {child}", child_seconds))
        pending.setdefault(depth, []).append((name, seconds))
    edges += [(f"(script) -> {name}", seconds) for name, seconds in pending.get(0, [])]
    return sorted(edges, key=lambda item: -item[1])[:count]


def startup(args, model: str, work: Path) -> dict:
    run_dir = work / f"startup_{model}"
    marks_path = work / f"startup_{model}.json"
    env = thread_env(args.threads, {**view_cache(args, run_dir), "GEEKTIME_BENCH_SPAWN": repr(time.time())})
    timed(
        [str(Path(__file__).resolve()), "--startup-child", str(marks_path), *ours_argv(args, model, 1, run_dir)[1:]],
        env,
        work / f"{run_dir.name}.log",
    )
    marks = json.loads(marks_path.read_text())
    phases = {label: marks[b] - marks[a] for label, a, b in PHASES if a in marks and b in marks}
    return {
        "phases": phases,
        "to_first_step": marks["first_step"] - marks["spawn"],
        "total": marks["end"] - marks["spawn"],
        "imports": heaviest_imports(args.threads),
    }


# ---------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize(results: dict) -> dict:
    """Per model and tool: medians of t1, t3, per extra epoch, accuracy; and timm/ours ratios."""
    summary = {}
    for model, tools in results.items():
        row = {}
        for tool, runs in tools.items():
            extra = [(t3 - t1) / 2 for t1, t3 in zip(runs["1"]["seconds"], runs["3"]["seconds"])]
            row[tool] = {
                "t1": median(runs["1"]["seconds"]),
                "t3": median(runs["3"]["seconds"]),
                "extra_epoch": median(extra),
                "val_acc_3": median(runs["3"]["val_acc"]),
                "repeats": len(extra),
            }
        row["speedup_total_3"] = row["timm"]["t3"] / row["ours"]["t3"]
        row["speedup_extra_epoch"] = row["timm"]["extra_epoch"] / row["ours"]["extra_epoch"]
        row["speedup_total_1"] = row["timm"]["t1"] / row["ours"]["t1"]
        summary[model] = row
    return summary


def print_summary(summary: dict, target: float) -> None:
    print("\n| model | tool | 1 epoch (s) | 3 epochs (s) | per extra epoch (s) | val acc @3 | repeats |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model, row in summary.items():
        for tool in ("ours", "timm"):
            r = row[tool]
            print(
                f"| {model} | {tool} | {r['t1']:.1f} | {r['t3']:.1f} | {r['extra_epoch']:.1f} | "
                f"{r['val_acc_3']:.3f} | {r['repeats']} |"
            )
    print(f"\ntimm / ours (ours is faster above 1; target >= {target}x):")
    for model, row in summary.items():
        verdict = "met" if min(row["speedup_extra_epoch"], row["speedup_total_3"]) >= target else "NOT met"
        print(
            f"  {model}: per extra epoch {row['speedup_extra_epoch']:.2f}x, "
            f"3-epoch wall {row['speedup_total_3']:.2f}x, 1-epoch wall {row['speedup_total_1']:.2f}x  -> {verdict}"
        )


def print_startup(model: str, report: dict) -> None:
    print(f"\nstart-up of ours ({model}, 1 epoch; {report['total']:.1f} s in all):")
    for label, seconds in report["phases"].items():
        print(f"  {label:45s} {seconds:6.2f} s")
    print(f"  {'= spawn to the end of the first step':45s} {report['to_first_step']:6.2f} s")
    print("  heaviest imports from one package into another (python -X importtime, cumulative):")
    for name, seconds in report["imports"]:
        print(f"    {name:60s} {seconds:6.2f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--startup-child"]:
        startup_child(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "efficientnet_lite0"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both tools")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--target", type=float, default=1.35)
    parser.add_argument(
        "--disk-cache",
        choices=["cold", "warm"],
        default="cold",
        help="ours' on-disk view cache: empty per run (cold) or the user's (warm)",
    )
    parser.add_argument("--startup", action="store_true", help="also break down our start-up (one more run)")
    parser.add_argument("--anchor", type=Path, default=ANCHOR)
    parser.add_argument("--out", type=Path, default=None, help="keep runs and bench_vs_timm.json here")
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "valid").is_dir():
        print(f"error: {args.data} needs train/ and valid/ class folders (--data)", file=sys.stderr)
        return 2
    missing = [m for m in args.models if not (REPO / "conf" / "model" / f"{m}.yaml").is_file()]
    if missing:
        print(f"error: no conf/model/{missing[0]}.yaml (--models)", file=sys.stderr)
        return 2
    timm_source(args.anchor, TIMM_SRC)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_vs_timm_"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"runs and logs in {out}; {args.threads} thread(s), {args.workers} loader worker(s), "
        f"{args.repeat} repeat(s), {args.disk_cache} view cache",
        file=sys.stderr,
    )

    results = {m: {t: {str(e): {"seconds": [], "val_acc": []} for e in EPOCHS} for t in RUNNERS} for m in args.models}
    for rep in range(args.repeat):
        order = ["ours", "timm"] if rep % 2 == 0 else ["timm", "ours"]
        for model in args.models:
            for epochs in EPOCHS:
                for tool in order:
                    work = out / f"rep{rep}"
                    work.mkdir(exist_ok=True)
                    seconds, acc = RUNNERS[tool](args, model, epochs, work, seed=42 + rep)
                    slot = results[model][tool][str(epochs)]
                    slot["seconds"].append(seconds)
                    slot["val_acc"].append(acc)
                    print(
                        f"  rep {rep} {model} {tool} {epochs} epoch(s): {seconds:.1f} s, val acc {acc:.3f}",
                        file=sys.stderr,
                        flush=True,
                    )
    summary = summarize(results)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results, "summary": summary}
    print_summary(summary, args.target)
    if args.startup:
        report["startup"] = startup(args, args.models[0], out)
        print_startup(args.models[0], report["startup"])
    (out / "bench_vs_timm.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_vs_timm.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
