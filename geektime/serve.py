"""The classify API and its upload page: a Starlette app served by uvicorn around one inference Engine.

Routes: `GET /` (the upload page, geektime/serve.html), `POST /api/1.0/classify-image` (multipart field
`image`), `GET /classify-url?url=` (only with --allow-url), `GET /healthz`. Every error is JSON `{"error": ...}`.

Decisions:
* Uploads are counted while they stream in and refused with 413 past --max-bytes, before anything is decoded;
  the decoder is geektime.images' (format allow-list, bomb and truncation checks), so a 400 says why.
* Concurrent requests are batched: a single task collects queued images for up to --max-wait-ms or until
  --batch-size, and runs the batch in one inference thread. Decoding runs in the default thread pool, so the
  event loop only moves bytes. Under load a batch fills while the previous one runs: throughput grows with load.
* --allow-url fetches only http(s), resolves the host once, refuses non-global addresses (loopback, private,
  link-local, ...) unless --allow-private-urls, then connects to the checked address itself (Host header and
  TLS server name keep the original host), so a DNS answer cannot change between the check and the connection.
  Redirects are followed by hand, each hop checked the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from geektime.checkpoint import CheckpointError
from geektime.images import BadImageError
from geektime.inference import Engine, ModelFileError
from geektime.machine import keep_freed_memory

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers allowed on top of --max-bytes
MAX_REDIRECTS = 3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10MB' -> 10_000_000, '512KiB' -> 524288, '1000' -> 1000."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 10MB, 512KB or 1048576")
    unit = (match.group(2) or "b").lower().rstrip("b") or "b"
    factor = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}[unit]
    return int(float(match.group(1)) * factor)


class ApiError(HTTPException):
    """An error answered as JSON {"error": detail} with its status code."""


@dataclass
class Settings:
    max_bytes: int = 10 * 10**6
    allow_url: bool = False
    allow_private_urls: bool = False
    batch_size: int = 16
    max_wait_ms: float = 5.0
    url_timeout_s: float = 10.0


class Batcher:
    """Turns concurrent single-image requests into batches for one inference thread."""

    def __init__(self, engine: Engine, batch_size: int, max_wait_s: float):
        self.engine, self.batch_size, self.max_wait_s = engine, batch_size, max_wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.batches = self.images = 0  # served so far, for /healthz

    async def predict(self, image: np.ndarray) -> np.ndarray:
        if self._task is None or self._task.done():  # started in the serving loop, on first use
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _collect(self) -> list:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before Python 3.11
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(image, future) for image, future in batch if not future.cancelled()]
            if not batch:
                continue
            try:
                probs = await loop.run_in_executor(
                    self._thread, self.engine.predict, np.stack([image for image, _ in batch])
                )
            except Exception as err:  # noqa: BLE001 - a failed batch fails its requests (uvicorn logs it), not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            self.images += len(batch)
            for (_, future), p in zip(batch, probs):
                if not future.done():
                    future.set_result(p)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


def _decode(engine: Engine, data: bytes | UploadFile) -> tuple[np.ndarray, int]:
    """Bytes (or a spooled upload) -> the model's uint8 view, via a temp file: the image loader reads paths."""
    with tempfile.NamedTemporaryFile(prefix="geektime-upload-") as tmp:
        if isinstance(data, bytes):
            tmp.write(data)
        else:
            data.file.seek(0)
            while block := data.file.read(1 << 20):
                tmp.write(block)
        tmp.flush()
        try:
            return engine.load_image(tmp.name), tmp.tell()
        except BadImageError as err:
            raise ApiError(400, err.reason) from None


async def _limited(stream, limit: int):
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise ApiError(
                413,
                f"upload larger than the server's limit of {limit - MULTIPART_OVERHEAD} bytes "
                "(--max-bytes); shrink the image",
            )
        yield chunk


def _check_length(headers: Headers, limit: int) -> None:
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(
            413,
            f"upload of {int(length)} bytes is larger than the server's limit of "
            f"{limit - MULTIPART_OVERHEAD} bytes (--max-bytes); shrink the image",
        )


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if not address.is_global or address.is_multicast:
        return "not a public address"
    return None


async def fetch_url(url: str, settings: Settings) -> bytes:
    """The body of an http(s) URL, within the size and time limits and the address policy."""
    import httpx

    async def follow(url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=settings.url_timeout_s, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                url, body = await _fetch_once(client, url, settings)
                if body is not None:
                    return body
            raise ApiError(502, f"more than {MAX_REDIRECTS} redirects")

    try:
        return await asyncio.wait_for(follow(url), settings.url_timeout_s)  # one limit for every hop together
    except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before Python 3.11
        raise ApiError(504, f"the URL did not answer within {settings.url_timeout_s:g} s") from None
    except httpx.HTTPError as err:
        raise ApiError(502, f"could not fetch the URL: {type(err).__name__}: {err}") from None


async def _fetch_once(client, url: str, settings: Settings) -> tuple[str, bytes | None]:
    """(redirect target, None) or (url, body) for one hop."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"only http:// and https:// URLs are fetched, not {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ApiError(400, f"bad port in {url!r}") from None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ApiError(502, f"cannot resolve {parts.hostname}: {err.strerror}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not settings.allow_private_urls:
        for address in addresses:
            why = _refusal(address)
            if why is not None:
                raise ApiError(
                    403,
                    f"refused: {parts.hostname} resolves to {address}, {why} "
                    "(start the server with --allow-private-urls to allow it)",
                )
    address = addresses[0]
    host = f"[{address}]" if address.version == 6 else str(address)
    pinned = parts._replace(netloc=f"{host}:{port}").geturl()
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    request = client.build_request(
        "GET", pinned, headers={"Host": parts.netloc.rpartition("@")[2]}, extensions=extensions
    )
    response = await client.send(request, stream=True)
    try:
        if response.is_redirect:
            return urljoin(url, response.headers["location"]), None
        if response.status_code != 200:
            raise ApiError(502, f"the URL answered HTTP {response.status_code}")
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_bytes:
            raise ApiError(413, f"the URL's image is {int(length)} bytes, over the limit of {settings.max_bytes}")
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > settings.max_bytes:
                raise ApiError(413, f"the URL's image is over the limit of {settings.max_bytes} bytes")
            chunks.append(chunk)
        return url, b"".join(chunks)
    finally:
        await response.aclose()


def create_app(engine: Engine, settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    batcher = Batcher(engine, settings.batch_size, settings.max_wait_ms / 1000)
    page = (Path(__file__).with_name("serve.html")).read_text(encoding="utf-8")

    async def classify(data) -> JSONResponse:
        view, received = await asyncio.to_thread(_decode, engine, data)  # received: the image's bytes
        probs = await batcher.predict(view)
        return JSONResponse(
            {
                "result": engine.classes[int(np.argmax(probs))],
                "probabilities": {name: float(p) for name, p in zip(engine.classes, probs)},
                "received_bytes": received,
            }
        )

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "model": engine.path.name,
                "backend": engine.backend,
                "classes": engine.classes,
                "image_size": list(engine.image_size),
                "max_bytes": settings.max_bytes,
                "allow_url": settings.allow_url,
                "served": {"images": batcher.images, "batches": batcher.batches},
            }
        )

    async def classify_image(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            raise ApiError(415, f"send multipart/form-data with the image in the field 'image', not {content_type!r}")
        limit = settings.max_bytes + MULTIPART_OVERHEAD
        _check_length(request.headers, limit)
        parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=1, max_fields=10)
        try:
            form = await parser.parse()
        except MultiPartException as err:
            raise ApiError(400, f"malformed multipart body: {err.message}") from None
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422, "missing the file field 'image' (multipart/form-data, <input type=file name=image>)"
                )
            if upload.size is not None and upload.size > settings.max_bytes:
                raise ApiError(413, f"image of {upload.size} bytes is over the limit of {settings.max_bytes} bytes")
            return await classify(upload)
        finally:
            await form.close()

    async def classify_url(request: Request) -> JSONResponse:
        if not settings.allow_url:
            raise ApiError(404, "classify-url is off; start the server with --allow-url")
        url = request.query_params.get("url")
        if not url:
            raise ApiError(422, "missing the query parameter url (GET /classify-url?url=https://...)")
        return await classify(await fetch_url(url, settings))

    async def error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"}, status_code=500)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/1.0/classify-image", classify_image, methods=["POST"]),
        Route("/classify-url", classify_url),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: error, Exception: crash}, lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.settings = engine, batcher, settings
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geektime.serve", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model.onnx or model.pt (with its model.json), or a checkpoint .pth")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-bytes", default="10MB", help="largest accepted image (default 10MB)")
    parser.add_argument("--allow-url", action="store_true", help="enable GET /classify-url?url=")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let --allow-url fetch loopback, private and link-local addresses too",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="largest inference batch (default 16)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5 ms)"
    )
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        max_bytes = parse_size(args.max_bytes)
    except ValueError as err:
        parser.error(f"--max-bytes: {err}")
    if args.batch_size < 1 or args.max_wait_ms < 0:
        parser.error("--batch-size must be at least 1 and --max-wait-ms at least 0")
    keep_freed_memory()
    try:
        engine = Engine(args.model, threads=args.threads)
    except (ModelFileError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(
        engine,
        Settings(
            max_bytes=max_bytes,
            allow_url=args.allow_url,
            allow_private_urls=args.allow_private_urls,
            batch_size=args.batch_size,
            max_wait_ms=args.max_wait_ms,
        ),
    )
    print(
        f"serving {engine.path} ({engine.backend}, classes {', '.join(engine.classes)}) on "
        f"http://{args.host}:{args.port}/",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("GEEKTIME_LOG_LEVEL", "info"))
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
