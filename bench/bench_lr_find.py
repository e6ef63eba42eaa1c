"""Is lr_find's suggestion a good lr? Train with it, 10x it and 0.1x it, and compare (issue: lr finder).

    python bench/bench_lr_find.py [--epochs 3] [--size 128] [--model efficientnet_lite0 --pretrained] [--out DIR]

Runs `python -m geektime.lr_find` on doraemon_walle (at --size px), then `python train.py` with the suggested
lr (valley unless --suggestion) times 0.1, 1 and 10, each for --epochs epochs from the same seed, and writes
DIR/bench_lr_find.json and a markdown table: final and best val accuracy and val loss per lr. The three
runs share everything but the lr. Without --model: efficientnet_lite0 with its ImageNet weights when that
model exists, else efficientnet_b0 from scratch.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "doraemon_walle"


def run(argv: list[str]) -> str:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - started:6.1f} s  {' '.join(argv)}", file=sys.stderr)
    return proc.stdout


def metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if k in ("epoch", "val_acc", "val_loss", "train_loss")}
            for row in csv.DictReader(f)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default=None)
    parser.add_argument("--pretrained", action="store_true", help="model.pretrained=true")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--suggestion", default="valley")
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "bench_lr_find")
    parser.add_argument(
        "--found",
        type=Path,
        default=None,
        help="an lr_find run folder made with the same settings: reuse its lr_find.json",
    )
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"error: {args.data}/train not found (doraemon_walle)", file=sys.stderr)
        return 2
    if args.model is None:
        lite = (REPO / "conf" / "model" / "efficientnet_lite0.yaml").is_file()
        args.model, args.pretrained = ("efficientnet_lite0", True) if lite else ("efficientnet_b0", False)
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        f"model={args.model}",
        f"model.pretrained={str(args.pretrained).lower()}",
        f"data.train_dir={args.data / 'train'}",
        f"data.val_dir={args.data / 'valid'}",
        f"data.image_size=[{args.size},{args.size}]",
        f"data.batch_size={args.batch_size}",
    ]

    find_dir = args.found or args.out / "lr_find"
    if args.found is None:
        run(["-m", "geektime.lr_find", *common, f"hydra.run.dir={find_dir}"])
    found = json.loads((find_dir / "lr_find.json").read_text())
    suggested = found["suggestions"][args.suggestion]
    rows = []
    for factor in (0.1, 1.0, 10.0):
        lr = float(f"{suggested * factor:.3g}")
        run_dir = args.out / f"lr_x{factor:g}"
        run(
            [
                "train.py",
                *common,
                f"optimizer.lr={lr}",
                f"trainer.epochs={args.epochs}",
                f"hydra.run.dir={run_dir}",
                "trainer.overwrite=true",
            ]
        )
        epochs = metrics(run_dir)
        best = max(epochs, key=lambda r: (r["val_acc"], -r["val_loss"]))
        rows.append(
            {
                "factor": factor,
                "lr": lr,
                "final_val_acc": epochs[-1]["val_acc"],
                "final_val_loss": epochs[-1]["val_loss"],
                "best_val_acc": best["val_acc"],
                "best_epoch": int(best["epoch"]),
                "final_train_loss": epochs[-1]["train_loss"],
            }
        )
    by_loss = min(rows, key=lambda r: r["final_val_loss"])
    by_acc = max(rows, key=lambda r: (r["final_val_acc"], -r["final_val_loss"]))
    result = {
        "model": args.model,
        "pretrained": args.pretrained,
        "size": args.size,
        "epochs": args.epochs,
        "suggestion": args.suggestion,
        "suggestions": found["suggestions"],
        "runs": rows,
        "best_by_final_val_loss": by_loss["factor"],
        "best_by_final_val_acc": by_acc["factor"],
    }
    (args.out / "bench_lr_find.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.model} (pretrained {args.pretrained}) at {args.size} px, {args.epochs} epochs, "
        f"{args.suggestion} suggestion {suggested:.3g}\n"
    )
    print("| lr | x suggestion | final val acc | final val loss | best val acc (epoch) | final train loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lr']:.3g} | {r['factor']:g} | {r['final_val_acc']:.3f} | {r['final_val_loss']:.3f} | "
            f"{r['best_val_acc']:.3f} ({r['best_epoch']}) | {r['final_train_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
