#!/usr/bin/env python
"""CPU training-step benchmark: our ``efficientnet_pytorch`` vs the published 0.7.1.

Each measurement runs in its own child process (so peak RSS is per model, and the two
packages, which share a name, never meet). The published package is installed once with
``pip install --no-deps --target`` into a cache directory and put first on the child's
``sys.path``.

    python bench/bench_efficientnet.py [--model efficientnet-b0] [--batch-size 16]
        [--image-size 224] [--threads 2] [--steps 8] [--repeats 1] [--nchw]
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


def install_published(target: str) -> str:
    """pip-install the published package into ``target`` once; return ``target``."""
    marker = os.path.join(target, "efficientnet_pytorch", "model.py")
    if not os.path.exists(marker):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--target", target, PUBLISHED], check=True)
    return target


def child(args) -> None:
    """Time forward+backward+SGD steps and print one JSON line."""
    import resource
    import time

    sys.path.insert(0, args.published_dir if args.impl == "published" else REPO)
    import torch
    import efficientnet_pytorch
    from efficientnet_pytorch import EfficientNet

    expected = args.published_dir if args.impl == "published" else REPO
    assert os.path.abspath(efficientnet_pytorch.__file__).startswith(os.path.abspath(expected)), \
        efficientnet_pytorch.__file__
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EfficientNet.from_name(args.model, image_size=args.image_size).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # Median step time: robust to the odd step stalled by other processes on a shared box.
    print(json.dumps({"ips": args.batch_size / statistics.median(times), "rss_mib": rss_mib}))


def run_child(args, impl: str, channels_last: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl,
           "--published-dir", args.published_dir, "--model", args.model,
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--channels-last"] if channels_last else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-b0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate the runs this often; report medians")
    p.add_argument("--nchw", action="store_true", help="also measure ours in NCHW layout")
    p.add_argument("--published-dir", default=os.path.join(tempfile.gettempdir(), "geektime-bench",
                                                          PUBLISHED.replace("==", "-")))
    p.add_argument("--child", choices=["published", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.impl = args.child
        return child(args)

    install_published(args.published_dir)
    # Published: its defaults (NCHW). Ours: how geektime trains, channels_last.
    configs = [("published 0.7.1 (NCHW)", "published", False), ("ours (channels_last)", "ours", True)]
    if args.nchw:
        configs.append(("ours (NCHW)", "ours", False))
    results = {label: [] for label, _, _ in configs}
    for _ in range(args.repeats):
        for label, impl, cl in configs:
            results[label].append(run_child(args, impl, cl))
            print(f"  {label}: {results[label][-1]['ips']:.2f} images/s", file=sys.stderr, flush=True)
    med = {label: {k: statistics.median(r[k] for r in runs) for k in ("ips", "rss_mib")}
           for label, runs in results.items()}
    base_runs = results[configs[0][0]]
    for label, runs in results.items():  # ratios of back-to-back runs: they saw the same load
        for k in ("ips", "rss_mib"):
            med[label][k + "_ratio"] = statistics.median(r[k] / b[k] for r, b in zip(runs, base_runs))
    print(f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.threads} threads, {args.steps} steps, median of {args.repeats} run(s); "
          f"train step = forward + backward + SGD; ratios = median of per-repeat ratios")
    print(f"| {'model':<24} | {'images/s':>8} | {'speed ratio':>11} | {'peak RSS MiB':>12} | {'RSS ratio':>9} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 13}|{'-' * 14}|{'-' * 11}|")
    for label, m in med.items():
        print(f"| {label:<24} | {m['ips']:8.2f} | {m['ips_ratio']:10.2f}x | "
              f"{m['rss_mib']:12.0f} | {m['rss_mib_ratio']:8.2f}x |")


if __name__ == "__main__":
    main()
