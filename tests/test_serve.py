"""geektime.serve: the API contract and every error code, URL fetching and its refusals, a real uvicorn with
batching, and the upload page end to end in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import DORAEMON_WALLE, REPO, make_folders, train_tiny
from geektime import predict
from geektime.images import load_rgb
from geektime.inference import Engine
from geektime.serve import Settings, create_app, parse_size

MAX_BYTES = 300_000
API = "/api/1.0/classify-image"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    train_dir, val_dir = make_folders(root / "data")
    train_tiny(root / "run", train_dir, val_dir, "trainer.epochs=1")
    return root / "run" / "last.pth", val_dir


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(trained[0])


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, Settings(max_bytes=MAX_BYTES))) as c:
        yield c


def jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


def upload(client, data: bytes, name: str = "photo.jpg", field: str = "image", mime: str = "image/jpeg"):
    return client.post(API, files={field: (name, data, mime)})


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A 30000x30000 PNG: 110 kB on disk, 900 megapixels when decoded."""
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_classify_image_contract(client, engine, trained):
    image = min((trained[1] / "red").iterdir())
    response = upload(client, jpeg_bytes(image))
    assert response.status_code == 200
    answer = response.json()
    assert set(answer["probabilities"]) == set(engine.classes)
    probs = np.array([answer["probabilities"][c] for c in engine.classes])
    expected = engine.predict(engine.load_image(image)[None])[0]
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert answer["result"] == engine.classes[int(expected.argmax())]
    assert answer["received_bytes"] == image.stat().st_size
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["classes"] == engine.classes and health["served"]["images"] >= 1
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        "api/1.0/classify-image" in page.text
        and "<script src" not in page.text
        and "http" not in page.text.split("<script>")[1]
    )  # self-contained: no external script or stylesheet


@pytest.mark.slow
def test_error_codes(client, trained, png_bomb):
    photo = jpeg_bytes(min((trained[1] / "red").iterdir()))
    cases = [
        (upload(client, b"just some text, not a picture"), 400, "not an image: a text file"),
        (upload(client, photo[: len(photo) // 2]), 400, "truncated"),
        (upload(client, b""), 400, "empty file"),
        (upload(client, png_bomb, "bomb.png", mime="image/png"), 400, "possible decompression bomb"),
        (upload(client, np.random.default_rng(0).bytes(MAX_BYTES + 1000)), 413, "limit"),
        (upload(client, photo, field="file"), 422, "missing the file field 'image'"),
        (client.post(API, data={"image": "not a file"}), 415, "multipart/form-data"),
        (client.post(API, content=photo, headers={"content-type": "image/jpeg"}), 415, "multipart/form-data"),
        (
            client.post(API, content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
            400,
            "malformed multipart",
        ),
        (client.get(API), 405, "Method Not Allowed"),
        (client.get("/classify-url", params={"url": "http://example.com/a.jpg"}), 404, "--allow-url"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"] == "application/json"
        assert words in response.json()["error"]
    assert client.get("/healthz").status_code == 200  # still serving


def test_parse_size():
    assert parse_size("10MB") == 10**7 and parse_size("512KiB") == 512 * 1024 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("ten megs")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files from a folder, plus /redirect?to=..., /slow (answers after 3 s) and /missing (404)."""

    def do_GET(self):
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path, trained):
    shutil.copy(min((trained[1] / "blue").iterdir()), tmp_path / "photo.jpg")
    (tmp_path / "big.jpg").write_bytes(b"\xff" * (MAX_BYTES + 1))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "photo.jpg"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_classify_url_and_its_refusals(engine, file_server):
    base, photo = file_server
    open_app = create_app(
        engine, Settings(max_bytes=MAX_BYTES, allow_url=True, allow_private_urls=True, url_timeout_s=1.0)
    )
    strict_app = create_app(engine, Settings(max_bytes=MAX_BYTES, allow_url=True))
    with TestClient(open_app) as client:
        answer = client.get("/classify-url", params={"url": f"{base}/photo.jpg"})
        assert answer.status_code == 200
        direct = upload(client, photo.read_bytes()).json()
        assert answer.json()["probabilities"] == direct["probabilities"]
        assert client.get("/classify-url", params={"url": f"{base}/redirect?to=/photo.jpg"}).status_code == 200
        for url, status, words in [
            (f"{base}/big.jpg", 413, "over the limit"),
            (f"{base}/missing.jpg", 502, "HTTP 404"),
            (f"{base}/slow", 504, "did not answer"),
            ("file:///etc/passwd", 400, "only http:// and https://"),
            ("ftp://127.0.0.1/a.jpg", 400, "only http:// and https://"),
            ("http://no-such-host.invalid/a.jpg", 502, "cannot resolve"),
        ]:
            response = client.get("/classify-url", params={"url": url})
            assert response.status_code == status, (url, response.text)
            assert words in response.json()["error"]
        assert client.get("/classify-url").status_code == 422
    with TestClient(strict_app) as client:
        for url in [
            f"{base}/photo.jpg",
            "http://localhost:9/a.jpg",
            "http://10.1.2.3/a.jpg",
            "http://[::1]:9/a.jpg",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]/a.jpg",
        ]:
            response = client.get("/classify-url", params={"url": url})
            assert response.status_code == 403, (url, response.text)
            assert "refused" in response.json()["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, *args: str, log: Path):
    """`python -m geektime.serve` on a free port of 127.0.0.1, until /healthz answers; stopped afterwards."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geektime.serve", str(model), "--port", str(port), *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start within 120 s:\n" + log.read_text()
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_real_uvicorn_batches_concurrent_requests(trained, engine, tmp_path):
    images = sorted(trained[1].rglob("*.jpg"))
    with serving(trained[0], "--batch-size", "8", "--max-wait-ms", "100", log=tmp_path / "serve.log") as base:

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(
                    *[client.post(API, files={"image": (p.name, p.read_bytes())}) for p in images]
                )

        responses = asyncio.run(burst())
        health = httpx.get(f"{base}/healthz").json()
    assert [r.status_code for r in responses] == [200] * len(images)
    for path, response in zip(images, responses):
        expected = engine.predict(engine.load_image(path)[None])[0]
        got = [response.json()["probabilities"][c] for c in engine.classes]
        np.testing.assert_allclose(got, expected, atol=1e-5)  # a batch answers each image as if it were alone
    assert health["served"]["images"] == len(images)
    assert health["served"]["batches"] < len(images)  # concurrent requests shared batches


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(driver).is_file():
        pytest.skip("chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.mark.slow
@pytest.mark.skipif(not DORAEMON_WALLE.is_dir(), reason=f"{DORAEMON_WALLE} (real photos) is not here")
def test_upload_page_in_headless_chromium(tmp_path_factory, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = tmp_path_factory.mktemp("photos") / "run"
    train_tiny(run, DORAEMON_WALLE / "train", DORAEMON_WALLE / "valid", "trainer.epochs=1")
    photo = max(DORAEMON_WALLE.rglob("*.jpg"), key=lambda p: p.stat().st_size)  # the largest real photo
    assert max(load_rgb(photo).size) > 1024
    assert predict.main([str(run / "last.pth"), str(photo), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["images"][0]

    browser = _browser()
    try:
        with serving(run / "last.pth", log=tmp_path / "serve.log") as base:
            browser.get(base + "/")
            browser.find_element(By.ID, "file").send_keys(str(photo))
            WebDriverWait(browser, 60).until(
                lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
            )
            body = browser.find_element(By.TAG_NAME, "body")
            status = browser.find_element(By.ID, "status").text
            assert body.get_attribute("data-state") == "done", status
            shown = browser.find_element(By.ID, "result").text
            rows = browser.find_elements(By.CSS_SELECTOR, "#probabilities tr")
            shown_probs = {r.get_attribute("data-class"): float(r.get_attribute("data-probability")) for r in rows}
            sent, received = int(body.get_attribute("data-sent-bytes")), int(body.get_attribute("data-received-bytes"))
            width, height = map(int, body.get_attribute("data-sent-size").split("x"))
    finally:
        browser.quit()
    assert shown == expected["result"]
    for name, p in shown_probs.items():  # the shrunk photo gives nearly the original's probabilities
        assert abs(p - expected["probabilities"][name]) < 0.05, (name, p, expected["probabilities"])
    original = load_rgb(photo)  # upright, as the browser sees it
    assert max(width, height) == 1024 and abs(width / height - original.width / original.height) < 0.01
    assert received == sent < photo.stat().st_size  # the server got the shrunk JPEG, not the original file
