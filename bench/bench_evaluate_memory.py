"""Peak memory of evaluate.py on a split that fits `data.cache_max_gb` and on one 10x larger than it allows.

    python3 bench/bench_evaluate_memory.py [--images 40] [--size 160]

Writes N photo-like JPEGs (and 10N for the large split), a ResNet-18 checkpoint through the checkpoint module,
then runs `evaluate.py` on each split in its own process with `data.cache_max_gb` set so that the small split is
cached and the large one is 10x over the limit (streamed through DataLoader workers), and prints the peak RSS of
each evaluation (the evaluator and its workers, from RUSAGE_CHILDREN of a wrapper process) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_split(root: Path, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = ("a", "b")[i % 2]
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        base = np.linspace(0, 255, size * 2, dtype=np.float32)[None, :, None] * (1 if cls == "a" else -1) % 255
        pixels = np.clip(base + rng.normal(0, 30, (size, size * 2, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def write_checkpoint(path: Path, size: int) -> None:
    code = textwrap.dedent(f"""
        import torch
        from hydra import compose, initialize_config_dir
        from geektime.checkpoint import CheckpointSaver
        from geektime.config import find_conf_dir, register_resolvers, to_plain
        from geektime.models import build_model
        register_resolvers()
        with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
            cfg = to_plain(compose(config_name="train", overrides=["model=resnet18",
                                                                  "data.image_size=[{size},{size}]"]))
        from omegaconf import OmegaConf
        model = build_model(OmegaConf.create(cfg["model"]), 2, ({size}, {size}))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        saver = CheckpointSaver({str(path.parent)!r}, epochs=1, save_interval=1)
        saver.save(saver.state(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1, "all", ["a", "b"],
                               ({size}, {size}), cfg, {{}}))
    """)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def peak_rss_mib(args: list[str]) -> float:
    """Peak RSS (MiB) of evaluate.py and everything it starts, measured from a wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, json; "
        "p = subprocess.run([sys.executable, 'evaluate.py', *sys.argv[1:]], capture_output=True, text=True); "
        "assert p.returncode == 0, p.stderr[-2000:]; "
        "print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40, help="images in the small split (the large has 10x)")
    parser.add_argument("--size", type=int, default=160, help="the model's input size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_split(tmp / "small", args.images, args.size, 0)
        write_split(tmp / "large", args.images * 10, args.size, 1)
        write_checkpoint(tmp / "run" / "epoch_001.pth", args.size)
        limit_gb = args.images * 3 * args.size**2 * 1.05 / 2**30  # the small split fits, the large is 10x over
        common = [
            f"checkpoint={tmp / 'run'}",
            f"data.cache_max_gb={limit_gb:.6f}",
            "data.disk_cache=false",
            "trainer.threads=2",
        ]
        small = peak_rss_mib([*common, f"data.val_dir={tmp / 'small'}", f"out_dir={tmp / 'eval_small'}"])
        large = peak_rss_mib([*common, f"data.val_dir={tmp / 'large'}", f"out_dir={tmp / 'eval_large'}"])
        print(
            f"cache_max_gb {limit_gb * 1024:.1f} MiB; small split {args.images} images (cached), "
            f"large split {args.images * 10} images (streamed)"
        )
        print(f"peak RSS: small {small:.0f} MiB, large {large:.0f} MiB, ratio {large / small:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
