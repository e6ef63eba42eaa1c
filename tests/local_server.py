"""A real HTTP server on 127.0.0.1 for download tests: routes of canned responses, a request log per path."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@dataclass
class Route:
    """What a path answers: a body (bytes or a callable of the hit count), or a redirect, after a delay."""

    body: bytes | Callable[[int], bytes] = b""
    status: int | Callable[[int], int] = 200
    content_type: str = "application/octet-stream"
    delay: float = 0.0
    location: str | None = None
    endless: bool = False  # chunked body that never ends (no Content-Length)
    headers: dict = field(default_factory=dict)


class LocalServer:
    """ThreadingHTTPServer on an ephemeral 127.0.0.1 port; `routes` may change while it runs."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms ACK wait

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                with server._lock:
                    server.hits[path] += 1
                    hit = server.hits[path]
                    server.user_agents.append(self.headers.get("User-Agent", ""))
                route = server.routes.get(path)
                if route is None:
                    self._send(404, b"not found", "text/plain")
                    return
                time.sleep(route.delay)
                status = route.status(hit) if callable(route.status) else route.status
                if route.location:
                    self.send_response(status)
                    self.send_header("Location", route.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.endless:
                    self.send_response(200)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = b"\xff" * 65536
                    try:
                        for _ in range(2000):  # bounded: 128 MB at most
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    except OSError:  # the client hung up, as it should
                        pass
                    self.close_connection = True
                    return
                body = route.body(hit) if callable(route.body) else route.body
                self._send(status, body, route.content_type, route.headers)

            def _send(self, status, body, content_type, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def jpeg_bytes(colour=(200, 40, 40), size=(64, 48), seed=0, fmt="JPEG") -> bytes:
    """A small noisy image, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def png_bomb(width=30000, height=30000) -> bytes:
    """A valid-looking PNG header declaring width x height pixels (over Pillow's bomb limit) and tiny data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
