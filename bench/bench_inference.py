#!/usr/bin/env python
"""Inference benchmark (issue 18, target 2): our EfficientNet-B0 eval against timm's, side by side in one run.

Every variant takes the same uint8 NCHW batch and returns softmax probabilities (normalization inside), with
the same threads; variants run interleaved, round after round, so they share the machine's background load.
Figures are medians over rounds of images/s; ratios are against timm's eager efficientnet_b0 (channels_last).

    python bench/bench_inference.py [--batch-size 16] [--image-size 224] [--threads 2] [--rounds 8]
        [--iters 3] [--compile] [--profile]

Variants: timm eager channels_last; ours eager with BatchNorm as modules (channels_last);
ours with BatchNorm folded (geektime.inference.fold_batchnorm), with its activations out of place (as before
this round) and in place (now); that traced, frozen and passed through
torch.jit.optimize_for_inference (oneDNN conv fusions); ours exported to ONNX, in onnxruntime; and with
--compile, torch.compile of the folded model. --profile prints each eager variant's most expensive operators.
--keep-freed-memory runs every variant with glibc keeping freed memory, as our inference entry points do: compare
two runs (with and without) for what that switch gives, since it is process-wide.
timm is installed once with `pip install --no-deps --target` into a cache folder and added to sys.path here only.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from bench_efficientnet import install_published  # noqa: E402

TIMM_DIR = Path(os.environ.get("GEEKTIME_TIMM_DIR", "/tmp/timm_anchor"))


def timm_module():
    sys.path.insert(0, install_published(str(TIMM_DIR), "timm", "timm"))
    import timm

    return timm


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics, so that folding them is not a no-op."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def run_torch(model, x):
    return model(x).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="batches per variant per round")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the folded model (slow start)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of the eager variants")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="as evaluate.py, predict and serve run: geektime.machine.keep_freed_memory() first (every variant)",
    )
    args = parser.parse_args()
    if args.keep_freed_memory:
        from geektime.machine import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")

    import numpy as np
    import torch

    from efficientnet_pytorch import EfficientNet
    from geektime.export import _export_onnx
    from geektime.inference import Deployable, fold_batchnorm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.image_size
    timm = timm_module()

    ours = EfficientNet.from_name("efficientnet-b0", num_classes=2, image_size=[size, size]).eval()
    randomize_batchnorm(ours)
    theirs = timm.create_model("efficientnet_b0", num_classes=2, pretrained=False).eval()
    randomize_batchnorm(theirs, seed=1)

    out_of_place = fold_batchnorm(copy.deepcopy(ours))
    for module in out_of_place.modules():
        if hasattr(module, "inplace"):  # Swish, ReLU6: what the model did before this round
            module.inplace = False
    channels_last = torch.channels_last
    variants = {
        "timm eager (channels_last)": Deployable(theirs.to(memory_format=channels_last), "imagenet", True).eval(),
        "ours eager, BatchNorm unfolded": Deployable(
            copy.deepcopy(ours).to(memory_format=channels_last), "imagenet", True
        ).eval(),
        "ours folded, out-of-place act": Deployable(
            out_of_place.to(memory_format=channels_last), "imagenet", True
        ).eval(),
        "ours folded (evaluate.py now)": Deployable(
            fold_batchnorm(copy.deepcopy(ours)).to(memory_format=channels_last), "imagenet", True
        ).eval(),
    }
    x = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        reference = variants["ours eager, BatchNorm unfolded"](x).numpy()

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        _export_onnx(Deployable(copy.deepcopy(ours), "imagenet", False).eval(), x[:2], onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        print(f"ONNX export {time.perf_counter() - t0:.1f} s")
    runners = {name: functools.partial(run_torch, model, x) for name, model in variants.items()}
    runners["ours onnxruntime (exported)"] = lambda: session.run(None, {"images": x.numpy()})[0]
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        frozen = torch.jit.optimize_for_inference(
            torch.jit.freeze(torch.jit.trace(variants["ours folded (evaluate.py now)"], x[:2]).eval())
        )
        frozen(x)
    print(f"TorchScript trace + freeze + optimize_for_inference {time.perf_counter() - t0:.1f} s")
    runners["ours TorchScript frozen, folded"] = lambda: frozen(x).numpy()
    if args.compile:
        compiled = torch.compile(variants["ours folded (evaluate.py now)"])
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        print(f"torch.compile warm-up {time.perf_counter() - t0:.1f} s")
        runners["ours torch.compile, folded"] = lambda: compiled(x).numpy()

    rates: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for run in runners.values():  # warm-up: allocator, oneDNN primitive caches
            run()
        for _ in range(args.rounds):
            for name, run in runners.items():
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    run()
                rates[name].append(args.iters * args.batch_size / (time.perf_counter() - t0))
        diffs = {
            name: float(np.abs(run() - reference).max()) for name, run in runners.items() if not name.startswith("timm")
        }

    base = statistics.median(rates["timm eager (channels_last)"])
    print(
        f"\nEfficientNet-B0 inference, {size} px, batch {args.batch_size}, {args.threads} threads, "
        f"median of {args.rounds} rounds x {args.iters} batches (uint8 in, probabilities out)"
    )
    print(f"{'variant':34s} {'img/s':>8s} {'vs timm':>8s} {'max |dp| vs ours eager':>24s}")
    for name, values in rates.items():
        rate = statistics.median(values)
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(f"{name:34s} {rate:8.1f} {rate / base:7.2f}x {diff:>24s}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("timm eager (channels_last)", "ours eager, BatchNorm unfolded", "ours folded (evaluate.py now)"):
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.iters):
                    runners[name]()
            print(f"\n{name}: top operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
