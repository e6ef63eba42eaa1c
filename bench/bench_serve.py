#!/usr/bin/env python
"""Serving benchmark (issue 16): bounded load on 127.0.0.1 against three servers of EfficientNet-B0 at 224 px.

(a) a baseline written the way the course's seeds do it: one request at a time, PIL -> torchvision transforms ->
    eager torch -> JSON, no batching (a Starlette endpoint that does the work inline, like a Flask view);
(b) geektime.serve on the exported model.onnx (onnxruntime);
(c) geektime.serve on the checkpoint (eager torch, BatchNorm folded).
Each gets N concurrent clients for T seconds (both bounded), posting real photos shrunk to a long side of 1024 as
the upload page sends them; reported: requests/s, p50/p95/p99 latency, errors. Then a hostile burst against (b):
text named .jpg, a truncated JPEG, zero bytes, a 30000x30000 PNG bomb and 25 MB of noise, all of which must get
4xx JSON while good requests keep succeeding.

    python bench/bench_serve.py [--clients 8] [--seconds 10] [--threads 2] [--checkpoint last.pth]

Without --checkpoint a randomly initialised 2-class B0 checkpoint is written to a temp folder (speed does not
depend on the weights). The load generator shares the machine with the server: on a small machine it takes
CPU from it, which the figures include.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "datasets" / "doraemon_walle" / "valid"
API = "/api/1.0/classify-image"
MAX_CLIENTS, MAX_SECONDS = 32, 60


def baseline_app(checkpoint_path: str, threads: int):
    """The seed-style server: everything inline in the request handler, one request at a time."""
    import torch
    from omegaconf import OmegaConf
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from torchvision import transforms

    from geektime.models import build_model

    torch.set_num_threads(threads)
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = build_model(
        OmegaConf.create({**ckpt["config"]["model"], "pretrained": False}),
        len(ckpt["classes"]),
        tuple(ckpt["image_size"]),
    )
    model.load_state_dict(ckpt["model"])
    model.eval()
    preprocess = transforms.Compose(
        [
            transforms.Resize(tuple(ckpt["image_size"])),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    async def classify(request):
        form = await request.form()
        try:
            image = Image.open(io.BytesIO(await form["image"].read())).convert("RGB")
        except Exception as err:  # noqa: BLE001 - what the seeds do
            return JSONResponse({"error": str(err)}, status_code=400)
        with torch.no_grad():
            probs = model(preprocess(image).unsqueeze(0)).softmax(1)[0].tolist()
        return JSONResponse(
            {
                "result": ckpt["classes"][max(range(len(probs)), key=probs.__getitem__)],
                "probabilities": dict(zip(ckpt["classes"], probs)),
            }
        )

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(API, classify, methods=["POST"]), Route("/healthz", healthz)])


def make_checkpoint(folder: Path) -> Path:
    """A randomly initialised 2-class EfficientNet-B0 checkpoint at 224 px, in the format train.py writes."""
    from omegaconf import OmegaConf

    from geektime import checkpoint
    from geektime.models import build_model

    mcfg = {
        "name": "efficientnet_b0",
        "family": "efficientnet",
        "arch": "efficientnet-b0",
        "pretrained": False,
        "normalization": "imagenet",
        "dropout_rate": None,
        "drop_connect_rate": 0.2,
        "bn_momentum": 0.9,
        "image_size": [224, 224],
    }
    model = build_model(OmegaConf.create(mcfg), 2, (224, 224))
    transforms = {"name": "resize", "fill": [124, 116, 104], "augment": {"enabled": False}}
    path = folder / "last.pth"
    checkpoint.save_atomic(
        {
            "format_version": checkpoint.FORMAT_VERSION,
            "model": model.state_dict(),
            "classes": ["doraemon", "walle"],
            "image_size": [224, 224],
            "normalization": "imagenet",
            "transforms": transforms,
            "config": {"model": mcfg, "data": {}},
            "epoch": 0,
            "metrics": {},
        },
        path,
    )
    return path


def photos() -> list[bytes]:
    """Real photos as the upload page sends them: JPEG, long side at most 1024."""

    from geektime.images import list_images, load_rgb

    out = []
    for path in list_images(PHOTOS)[:16]:
        image = load_rgb(path)
        image.thumbnail((1024, 1024))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        out.append(buffer.getvalue())
    if not out:
        raise SystemExit(f"error: no photos in {PHOTOS}")
    return out


def hostile() -> dict[str, tuple[str, bytes]]:
    from PIL import Image

    good = photos()[0]
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, "PNG")
    return {
        "text as .jpg": ("notes.jpg", b"this is a text file, not a photo\n" * 20),
        "truncated JPEG": ("cut.jpg", good[: len(good) // 3]),
        "zero bytes": ("empty.jpg", b""),
        "30000x30000 PNG bomb": ("bomb.png", bomb.getvalue()),
        "25 MB of noise": ("noise.jpg", os.urandom(25 * 10**6)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], log: Path):
    import httpx

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GEEKTIME_LOG_LEVEL": "warning"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: server {command} exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"error: server {command} did not start in 180 s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def load(base: str, images: list[bytes], clients: int, seconds: float, hostile_files=None) -> dict:
    """`clients` loops posting good images for `seconds`; optionally one more loop posting the hostile files."""
    import httpx

    latencies, errors, hostile_results = [], [], {}
    stop = time.monotonic() + seconds

    async def good(client, k: int):
        i = k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                response = await client.post(API, files={"image": ("photo.jpg", images[i % len(images)], "image/jpeg")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as err:
                errors.append(type(err).__name__)
            i += clients

    async def bad(client):
        await asyncio.sleep(min(1.0, seconds / 4))
        for name, (filename, data) in hostile_files.items():
            try:
                response = await client.post(API, files={"image": (filename, data, "image/jpeg")})
                is_json = response.headers.get("content-type") == "application/json"
                hostile_results[name] = (response.status_code, response.json().get("error") if is_json else None)
            except httpx.HTTPError as err:
                hostile_results[name] = (None, f"{type(err).__name__}: {err}")

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=clients + 1)) as c:
        started = time.monotonic()
        jobs = [good(c, k) for k in range(clients)] + ([bad(c)] if hostile_files else [])
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": q[49] * 1000,
        "p95": q[94] * 1000,
        "p99": q[98] * 1000,
        "errors": errors,
        "hostile": hostile_results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=10, help=f"load per server (at most {MAX_SECONDS})")
    parser.add_argument("--threads", type=int, default=2, help="inference threads of every server")
    parser.add_argument("--checkpoint", help="an EfficientNet-B0 checkpoint at 224 (default: random weights)")
    parser.add_argument("--baseline-server", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        import uvicorn

        uvicorn.run(
            baseline_app(args.baseline_server, args.threads), host="127.0.0.1", port=args.port, log_level="warning"
        )
        return 0
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds 0..{MAX_SECONDS}")

    from geektime.export import export

    images = photos()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp)
        t0 = time.perf_counter()
        export(ckpt, "onnx", tmp / "export", images_dir=str(PHOTOS))
        print(f"exported {ckpt} to ONNX in {time.perf_counter() - t0:.1f} s", flush=True)
        serve = [sys.executable, "-m", "geektime.serve", "--threads", str(args.threads)]
        setups = {
            "(a) baseline: one at a time, PIL -> torch eager": [
                sys.executable,
                __file__,
                "--baseline-server",
                str(ckpt),
                "--threads",
                str(args.threads),
            ],
            "(b) geektime.serve, onnxruntime": [*serve, str(tmp / "export" / "model.onnx")],
            "(c) geektime.serve, torch eager": [*serve, str(ckpt)],
        }
        results = {}
        for name, command in setups.items():
            with server(command, tmp / "server.log") as base:
                asyncio.run(load(base, images, 2, 2))  # warm-up
                results[name] = asyncio.run(load(base, images, args.clients, args.seconds))
                print(f"{name}: {results[name]['rps']:.1f} req/s", flush=True)
        with server(setups["(b) geektime.serve, onnxruntime"], tmp / "server.log") as base:
            burst = asyncio.run(load(base, images, args.clients, args.seconds, hostile_files=hostile()))

    print(
        f"\nEfficientNet-B0 224 px, {args.clients} concurrent clients x {args.seconds:g} s each, "
        f"{args.threads} inference threads, 127.0.0.1, {os.cpu_count()} CPUs shared with the load generator"
    )
    print(f"{'server':50s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    base_rps = results["(a) baseline: one at a time, PIL -> torch eager"]["rps"]
    for name, r in results.items():
        print(
            f"{name:50s} {r['rps']:7.1f} {r['p50']:8.0f} {r['p95']:8.0f} {r['p99']:8.0f} {len(r['errors']):7d}"
            f"   {r['rps'] / base_rps:.2f}x the baseline"
        )
    print(
        f"\nhostile burst against (b) during load: good requests {burst['requests']} ok, "
        f"{len(burst['errors'])} failed {sorted(set(burst['errors']))}"
    )
    ok = not burst["errors"]
    for name, (status, error) in burst["hostile"].items():
        fine = status is not None and 400 <= status < 500 and error is not None
        ok &= fine
        print(f"  {name:22s} -> {status} {json.dumps(error)[:110]}{'' if fine else '   <-- NOT a 4xx JSON error'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
