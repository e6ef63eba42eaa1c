"""geektime.download against a real HTTP server on 127.0.0.1 (tests/local_server.py)."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from local_server import LocalServer, Route, jpeg_bytes, png_bomb
from PIL import Image

from geektime.download import (
    LOG_NAME,
    USER_AGENT,
    HostPacer,
    Job,
    download_all,
    main,
    parse_size,
    read_urls,
    url_id,
)

REPO = Path(__file__).resolve().parents[1]
GOOD_JPEG = jpeg_bytes(seed=1)
GOOD_PNG = jpeg_bytes((40, 40, 200), seed=2, fmt="PNG")


@pytest.fixture
def server():
    with LocalServer() as srv:
        srv.routes.update(
            {
                "/good.jpg": Route(GOOD_JPEG, content_type="image/jpeg"),
                "/photo.jpg": Route(GOOD_PNG, content_type="image/jpeg"),  # a PNG behind a .jpg URL
                "/page.jpg": Route(b"<!DOCTYPE html><html><body>Sign in</body></html>", content_type="text/html"),
                "/truncated.jpg": Route(GOOD_JPEG[: len(GOOD_JPEG) // 2], content_type="image/jpeg"),
                "/bomb.png": Route(png_bomb(), content_type="image/png"),
                "/slow.jpg": Route(GOOD_JPEG, delay=1.5),
                "/big.jpg": Route(jpeg_bytes(size=(600, 600), seed=3)),  # declares its too-large length
                "/endless.jpg": Route(endless=True),  # no length: must be cut while reading
                "/moved.jpg": Route(status=302, location="/good.jpg"),
            }
        )
        yield srv


def read_log(dest: Path) -> dict[str, dict[str, str]]:
    with open(dest / LOG_NAME, newline="") as f:
        return {row["url"]: row for row in csv.DictReader(f)}


def test_each_kind_of_response(server, tmp_path, capsys):
    names = [
        "good.jpg",
        "photo.jpg",
        "page.jpg",
        "truncated.jpg",
        "bomb.png",
        "slow.jpg",
        "big.jpg",
        "endless.jpg",
        "moved.jpg",
        "missing.jpg",
    ]
    urls = {name: f"{server.url}/{name}" for name in names}
    url_file = tmp_path / "urls.csv"
    url_file.write_text("url,comment\n" + "".join(f"{u},x\n" for u in urls.values()) + f"{urls['good.jpg']}\n")
    dest = tmp_path / "dest"
    started = time.monotonic()
    assert (
        main([str(url_file), str(dest), "--timeout", "0.5", "--retries", "1", "--max-bytes", "100KB", "--quiet"]) == 0
    )
    assert time.monotonic() - started < 20
    out = capsys.readouterr().out
    assert "passed over 1 line(s) without an http(s) URL" in out  # the header
    assert "downloaded 3, already there 0, failed 7" in out

    log = read_log(dest)
    assert set(log) == set(urls.values())  # the repeated URL is fetched once
    status = {name: log[url]["status"] for name, url in urls.items()}
    assert status == {
        "good.jpg": "ok",
        "photo.jpg": "ok",
        "moved.jpg": "ok",
        "page.jpg": "bad_image",
        "truncated.jpg": "bad_image",
        "bomb.png": "bad_image",
        "slow.jpg": "network_error",
        "big.jpg": "too_large",
        "endless.jpg": "too_large",
        "missing.jpg": "http_error",
    }
    # Named by the URL's id and the content's real type; the redirect keeps the id of the URL asked for.
    assert (dest / f"{url_id(urls['good.jpg'])}.jpg").read_bytes() == GOOD_JPEG
    assert (dest / f"{url_id(urls['photo.jpg'])}.png").read_bytes() == GOOD_PNG
    assert (dest / f"{url_id(urls['moved.jpg'])}.jpg").read_bytes() == GOOD_JPEG
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [f"{url_id(urls[n])}{ext}" for n, ext in (("good.jpg", ".jpg"), ("photo.jpg", ".png"), ("moved.jpg", ".jpg"))]
        + ["_failed", LOG_NAME]
    )
    row = log[urls["good.jpg"]]
    assert row["sha256"] == hashlib.sha256(GOOD_JPEG).hexdigest() and row["bytes"] == str(len(GOOD_JPEG))
    assert row["file"] == f"{url_id(urls['good.jpg'])}.jpg"
    # Unusable images are kept out, in _failed/ with the reason.
    assert (dest / log[urls["page.jpg"]]["file"]).parent == dest / "_failed"
    assert log[urls["page.jpg"]]["file"].endswith(".bin") and "HTML" in log[urls["page.jpg"]]["reason"]
    assert "truncated" in log[urls["truncated.jpg"]]["reason"]
    assert log[urls["truncated.jpg"]]["file"] == f"_failed/{url_id(urls['truncated.jpg'])}.jpg"
    assert "decompression bomb" in log[urls["bomb.png"]]["reason"]
    assert log[urls["big.jpg"]]["file"] == "" and "Content-Length" in log[urls["big.jpg"]]["reason"]
    assert "over the limit" in log[urls["endless.jpg"]]["reason"]
    assert "404" in log[urls["missing.jpg"]]["reason"]
    assert server.hits["/slow.jpg"] == 2  # retried once after the timeout
    assert server.hits["/missing.jpg"] == 1  # a 404 is not retried
    assert set(server.user_agents) == {USER_AGENT}
    assert not list(dest.rglob(".*.part"))


def test_rerun_downloads_only_missing_or_failed(server, tmp_path):
    server.routes["/flaky.jpg"] = Route(lambda hit: GOOD_PNG if hit > 1 else b"<html>busy</html>")
    urls = [f"{server.url}/{name}" for name in ("good.jpg", "flaky.jpg", "missing.jpg")]
    url_file = tmp_path / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    dest = tmp_path / "dest"
    assert main([str(url_file), str(dest), "--quiet", "--retries", "0"]) == 0
    failed_copy = dest / "_failed" / f"{url_id(urls[1])}.bin"
    assert failed_copy.is_file() and read_log(dest)[urls[1]]["status"] == "bad_image"

    assert main([str(url_file), str(dest), "--quiet", "--retries", "0"]) == 0
    assert dict(server.hits) == {"/good.jpg": 1, "/flaky.jpg": 2, "/missing.jpg": 2}
    log = read_log(dest)
    assert [log[u]["status"] for u in urls] == ["ok", "ok", "http_error"]
    assert (dest / f"{url_id(urls[1])}.png").read_bytes() == GOOD_PNG
    assert not failed_copy.exists()  # the stale failed copy of that URL is gone
    assert log[urls[0]]["sha256"] == hashlib.sha256(GOOD_JPEG).hexdigest()  # kept from the first run


def test_folder_of_class_lists_and_max_pics(server, tmp_path):
    for i in range(5):
        server.routes[f"/cat{i}.jpg"] = Route(jpeg_bytes(seed=10 + i))
    lists = tmp_path / "lists"
    lists.mkdir()
    cat = [f"{server.url}/missing.jpg"] + [f"{server.url}/cat{i}.jpg" for i in range(5)]
    (lists / "cat.csv").write_text("url\n" + "\n".join(cat) + "\n")
    (lists / "dog.txt").write_text(f"{server.url}/good.jpg\n{server.url}/page.jpg\n")
    (lists / "notes.md").write_text("not a list")
    dest = tmp_path / "dest"
    assert main([str(lists), str(dest), "--max-pics", "3", "--workers", "2", "--quiet"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["_failed", "cat", "dog", LOG_NAME]
    assert len(list((dest / "cat").iterdir())) == 3  # the 404 did not count
    assert [p.name for p in (dest / "dog").iterdir()] == [f"{url_id(cat[0].replace('missing', 'good'))}.jpg"]
    assert [p.parent.name for p in (dest / "_failed").rglob("*.bin")] == ["dog"]
    log = read_log(dest)
    assert {row["class"] for row in log.values()} == {"cat", "dog"}
    assert sum(row["status"] == "ok" for row in log.values() if row["class"] == "cat") == 3
    assert main([str(lists), str(dest), "--max-pics", "3", "--quiet"]) == 0  # already has 3: fetches no cat
    assert sum(server.hits[f"/cat{i}.jpg"] for i in range(5)) == 3


def test_transient_errors_are_retried_with_backoff(server, tmp_path):
    server.routes["/busy.jpg"] = Route(GOOD_JPEG, status=lambda hit: 503 if hit < 3 else 200)
    job = Job(f"{server.url}/busy.jpg", tmp_path / "d", tmp_path / "d/_failed", "busy")
    started = time.monotonic()
    with httpx.Client() as client:
        results, present = download_all([job], client, retries=3, backoff=0.2, progress=False)
    assert present == [] and [r.status for r in results] == ["ok"]
    assert server.hits["/busy.jpg"] == 3
    assert time.monotonic() - started >= 0.2 + 0.4  # waited 0.2 s, then 0.4 s


def test_md5_mismatch_is_kept_out(server, tmp_path):
    right = Job(f"{server.url}/good.jpg", tmp_path / "d", tmp_path / "f", "a", md5=hashlib.md5(GOOD_JPEG).digest())
    wrong = Job(f"{server.url}/good.jpg", tmp_path / "d", tmp_path / "f", "b", md5=hashlib.md5(b"x").digest())
    with httpx.Client() as client:
        results, _ = download_all([right, wrong], client, progress=False)
    by_name = {r.job.name: r for r in results}
    assert by_name["a"].status == "ok" and by_name["a"].file == tmp_path / "d/a.jpg"
    assert by_name["b"].status == "md5_mismatch" and by_name["b"].file == tmp_path / "f/b.jpg"


def test_host_pacer_spaces_requests_per_host():
    pacer = HostPacer(rate=20)
    started = time.monotonic()
    for _ in range(5):
        pacer.wait("http://a.example/x.jpg")
    one_host = time.monotonic() - started
    assert 0.19 <= one_host < 0.5  # 4 gaps of 50 ms
    started = time.monotonic()
    for host in "bcdef":
        pacer.wait(f"http://{host}.example/x.jpg")
    assert time.monotonic() - started < 0.05  # other hosts are not held up


def test_read_urls_and_sizes(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(
        '\ufeffname,link\ncat,https://a.example/1.jpg\n"b, c",HTTP://a.example/2.jpg\n\n# note\n'
        "https://a.example/1.jpg\n"
    )
    assert read_urls(path) == (["https://a.example/1.jpg", "HTTP://a.example/2.jpg"], 2)
    assert parse_size("20MB") == 20_000_000 and parse_size("1MiB") == 2**20 and parse_size("512") == 512


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope.txt", "{tmp}/d"], "nope.txt: no such file or folder"),
        (["{tmp}/urls.txt", "{tmp}/urls.txt"], "urls.txt: is a file"),
        (["{tmp}/urls.txt", "{tmp}/d", "--max-bytes", "lots"], "expected a size such as"),
        (["{tmp}/empty", "{tmp}/d"], "no <class>.csv or <class>.txt files"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "urls.txt").write_text("https://a.example/1.jpg\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_list_without_urls_is_an_error(tmp_path):
    (tmp_path / "urls.txt").write_text("just words\n")
    result = subprocess.run(
        [sys.executable, "-m", "geektime.download", str(tmp_path / "urls.txt"), str(tmp_path / "d")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'urls.txt'}: no http(s) URLs to download"
    )


@pytest.mark.slow
def test_throughput_1_vs_8_workers(server, tmp_path):
    """80 images, each answered after 50 ms: 8 workers must be several times faster than 1."""
    for i in range(80):
        server.routes[f"/d{i}.jpg"] = Route(jpeg_bytes(seed=100 + i), delay=0.05)
    url_file = tmp_path / "urls.txt"
    url_file.write_text("".join(f"{server.url}/d{i}.jpg\n" for i in range(80)))
    rates = {}
    for workers in (1, 8):
        dest = tmp_path / f"w{workers}"
        started = time.monotonic()
        assert main([str(url_file), str(dest), "--workers", str(workers), "--host-rate", "0", "--quiet"]) == 0
        rates[workers] = 80 / (time.monotonic() - started)
        assert len(list(dest.glob("*.jpg"))) == 80
        with Image.open(next(dest.glob("*.jpg"))) as im:
            assert im.size == (64, 48)
    print(f"\nthroughput, 50 ms per image: 1 worker {rates[1]:.1f} img/s, 8 workers {rates[8]:.1f} img/s")
    assert rates[8] > 3 * rates[1]
