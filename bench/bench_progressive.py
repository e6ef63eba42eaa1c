#!/usr/bin/env python
"""Time to accuracy with progressive resizing (issue 18, target 4): `trainer.progressive_resize` against a
fixed-size run of the same epochs, seeds interleaved, each a real `python train.py`.

Per case and seed, the fixed-size run's final val accuracy is the bar; each run's time to the bar is the sum of
its `epoch_seconds` (train + val, metrics.csv) up to the first epoch at or above it. Reported: medians over the
seeds of the time to the bar, the total epoch time and the final val accuracy and loss, and fixed / progressive
ratios (above 1: progressive is faster).

cases
  digits    the embedded digits with ResNet-18 from scratch (32 px, 10 epochs); progressive sizes are multiples
            of 8 (16 px first). EfficientNet needs multiples of 32, which leave nothing to ramp at 32 px
  finetune  experiment=doraemon_walle (EfficientNet-Lite0 ImageNet weights, staged, one-cycle, 5 epochs, 224 px);
            the unfrozen epochs grow 128 -> 224 px

    python bench/bench_progressive.py [--cases digits finetune] [--seeds 3] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"
CASES = {
    "digits": (["model=resnet18"], ["trainer.progressive_resize.multiple=8"]),
    "finetune": (["experiment=doraemon_walle"], []),
}
VARIANTS = ("fixed", "progressive")


def run(case: str, variant: str, seed: int, args, out: Path) -> list[dict]:
    """One `python train.py`; its metrics.csv rows (epoch, epoch_seconds, val_acc, val_loss as floats)."""
    common, progressive = CASES[case]
    run_dir = out / case / f"{variant}_seed{seed}"
    argv = [
        sys.executable,
        "train.py",
        *common,
        f"trainer.seed={seed}",
        f"trainer.threads={args.threads}",
        f"hydra.run.dir={run_dir}",
    ]
    if variant == "progressive":
        argv += ["trainer.progressive_resize.enabled=true", *progressive]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = out / case / f"{variant}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[1:])} exited {proc.returncode}; see {log}")
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [
            {k: float(row[k]) for k in ("epoch", "epoch_seconds", "val_acc", "val_loss")} for row in csv.DictReader(f)
        ]


def time_to(rows: list[dict], bar: float) -> float | None:
    """Seconds of epochs until the first epoch whose val accuracy reaches `bar`; None if none does."""
    spent = 0.0
    for row in rows:
        spent += row["epoch_seconds"]
        if row["val_acc"] >= bar - 1e-9:
            return spent
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if "finetune" in args.cases and not DATA.is_dir():
        print(f"note: {DATA} is absent: the finetune case is left out", file=sys.stderr)
        args.cases = [c for c in args.cases if c != "finetune"]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_progressive_"))
    print(f"runs and logs in {out}", file=sys.stderr)
    report = {}
    for case in args.cases:
        per_seed = []
        for seed in range(42, 42 + args.seeds):
            order = VARIANTS if seed % 2 == 0 else VARIANTS[::-1]  # the same background load for both
            rows = {}
            for variant in order:
                started = time.perf_counter()
                rows[variant] = run(case, variant, seed, args, out)
                print(f"  {case} seed {seed} {variant}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            bar = rows["fixed"][-1]["val_acc"]
            per_seed.append(
                {
                    v: {
                        "to_bar": time_to(rows[v], bar),
                        "total": sum(r["epoch_seconds"] for r in rows[v]),
                        "val_acc": rows[v][-1]["val_acc"],
                        "val_loss": rows[v][-1]["val_loss"],
                    }
                    for v in VARIANTS
                }
                | {"bar": bar}
            )
        report[case] = per_seed

    print(
        "\n| case | variant | time to the fixed run's final acc (s) | all epochs (s) | final val acc | final val loss |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for case, per_seed in report.items():
        medians = {}
        for v in VARIANTS:
            reached = [s[v]["to_bar"] for s in per_seed if s[v]["to_bar"] is not None]
            medians[v] = {
                "to_bar": statistics.median(reached) if len(reached) == len(per_seed) else None,
                **{k: statistics.median(s[v][k] for s in per_seed) for k in ("total", "val_acc", "val_loss")},
            }
            m = medians[v]
            to_bar = f"{m['to_bar']:.1f}" if m["to_bar"] is not None else f"reached in {len(reached)}/{len(per_seed)}"
            print(f"| {case} | {v} | {to_bar} | {m['total']:.1f} | {m['val_acc']:.4f} | {m['val_loss']:.4f} |")
        fixed, prog = medians["fixed"], medians["progressive"]
        ratio = f"{fixed['to_bar'] / prog['to_bar']:.2f}x" if prog["to_bar"] else "n/a (bar not reached every seed)"
        total = fixed["total"] / prog["total"]
        print(f"  {case}: fixed / progressive, time to accuracy {ratio}, all epochs {total:.2f}x (medians of seeds)")
    (out / "bench_progressive.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_progressive.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
