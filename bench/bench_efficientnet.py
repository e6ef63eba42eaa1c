#!/usr/bin/env python
"""CPU training-step benchmark: our ``efficientnet_pytorch`` vs the published 0.7.1.

The published package is installed once with ``pip install --no-deps --target`` into a
cache directory. Each model lives in its own child process (the two packages share a
name, and peak RSS must be per model). The parent drives the children in lockstep, one
training step at a time, so only one model computes at any moment and both see the same
background load; the speed ratio is the median over rounds of the per-round ratio.

    python bench/bench_efficientnet.py [--model efficientnet-b0] [--batch-size 16]
        [--image-size 224] [--threads 2] [--steps 10] [--warmup 2] [--nchw]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = "efficientnet_pytorch==0.7.1"


def install_published(target: str, requirement: str = PUBLISHED, package: str = "efficientnet_pytorch") -> str:
    """pip-install `requirement` (no dependencies) into ``target`` once, for a bench to put on sys.path; return
    ``target``. Anchors such as the published package or timm are never installed into the environment."""
    if not os.path.exists(os.path.join(target, package, "__init__.py")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                target,
                requirement,
            ],
            check=True,
        )
    return target


def child(args) -> None:
    """Build the model, then run one train step per ``step`` line on stdin."""
    import resource
    import time

    root = args.published_dir if args.child == "published" else REPO
    sys.path.insert(0, root)
    import torch

    import efficientnet_pytorch
    from efficientnet_pytorch import EfficientNet

    assert os.path.abspath(efficientnet_pytorch.__file__).startswith(os.path.abspath(root))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EfficientNet.from_name(args.model, image_size=args.image_size).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        print(time.perf_counter() - t0, flush=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rss_mib": rss_mib}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-b0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--nchw", action="store_true", help="also measure ours in NCHW layout")
    p.add_argument(
        "--published-dir", default=os.path.join(tempfile.gettempdir(), "geektime-bench", PUBLISHED.replace("==", "-"))
    )
    p.add_argument("--child", choices=["published", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    install_published(args.published_dir)
    # Published: its defaults (NCHW). Ours: the way geektime trains, channels_last.
    configs = [("published 0.7.1 (NCHW)", "published", False), ("ours (channels_last)", "ours", True)]
    if args.nchw:
        configs.append(("ours (NCHW)", "ours", False))
    common = [
        "--published-dir",
        args.published_dir,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--threads",
        str(args.threads),
    ]
    procs = {}
    for label, impl, cl in configs:  # started one at a time so that setups do not overlap
        cmd = [sys.executable, os.path.abspath(__file__), "--child", impl] + common
        proc = subprocess.Popen(
            cmd + (["--channels-last"] if cl else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=tempfile.gettempdir(),
        )
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{label} child failed to start")
        procs[label] = proc

    times = {label: [] for label in procs}
    for i in range(args.warmup + args.steps):
        for label, proc in procs.items():
            proc.stdin.write("step\n")
            t = float(proc.stdout.readline())
            if i >= args.warmup:
                times[label].append(t)
    rss = {}
    for label, proc in procs.items():
        proc.stdin.close()
        rss[label] = json.loads(proc.stdout.readline())["rss_mib"]
        proc.wait()

    base = configs[0][0]
    print(
        f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.threads} threads; "
        f"train step = forward + backward + SGD; {args.steps} timed steps each, interleaved; "
        f"images/s from the median step, speed ratio = median of per-round ratios"
    )
    print(f"| {'model':<24} | {'images/s':>8} | {'speed ratio':>11} | {'peak RSS MiB':>12} | {'RSS ratio':>9} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 13}|{'-' * 14}|{'-' * 11}|")
    for label in procs:
        ips = args.batch_size / statistics.median(times[label])
        ratio = statistics.median(b / t for b, t in zip(times[base], times[label]))
        print(f"| {label:<24} | {ips:8.2f} | {ratio:10.2f}x | {rss[label]:12.0f} | {rss[label] / rss[base]:8.2f}x |")


if __name__ == "__main__":
    main()
