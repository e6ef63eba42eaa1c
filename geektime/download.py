"""Download images from lists of URLs into class folders: `python -m geektime.download <urls> <dest>`.

`<urls>` is a text or CSV file (every line's first cell that starts with http:// or https:// is a URL; other
lines, such as a header, are passed over), whose images go straight into `<dest>`; or a folder of
`<class>.csv` / `<class>.txt` files, whose images go into `<dest>/<class>/`.

What a download must pass before it counts:
* HTTP 200 after at most 5 redirects, within `--max-bytes` (enforced while reading, so a huge or endless
  body costs at most that much; a gzip body is counted after decompression), `--timeout` per connect and
  per read, and 12 x `--timeout` for the whole file (a server dripping bytes cannot hold a worker forever);
* the MD5 the caller expects, if any (Open Images publishes one);
* geektime.images.check_image, the decode training does: HTML pages, truncated files and decompression
  bombs go to `<dest>/_failed/` (named as they would have been), with the reason in the log.

Files are named by a stable id of their URL (the first 16 hex digits of its SHA-1) and the extension of
their real format, so a rerun knows what it has: it downloads only what is missing or failed, and a failed
copy of a URL that now succeeds is removed from `_failed/` (it is this tool's own earlier output).
`<dest>/download_log.csv` holds one row per URL: url, class, status (ok, http_error, network_error,
too_large, md5_mismatch, bad_image), bytes, sha256, file (relative to dest), reason.

Network politeness: a User-Agent names the tool, each host gets at most `--host-rate` requests per second,
and transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential
back-off (honouring a Retry-After of up to a minute).

httpx rather than urllib: one connection pool shared by the worker threads keeps connections to a host
alive between images (a list from one site, or Open Images' mirror, would otherwise pay a TCP and TLS
handshake per image), and it has separate connect/read timeouts and streaming with decompression built in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image
from tqdm import tqdm

from geektime.images import check_image

USER_AGENT = "geektime-download/0.1 (image dataset builder; python-httpx)"
LOG_NAME = "download_log.csv"
FAILED_DIR = "_failed"
LOG_FIELDS = ("url", "class", "status", "bytes", "sha256", "file", "reason")
MAX_REDIRECTS = 5
_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "PPM": ".ppm",
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Job:
    """One URL to fetch into `folder` as `<name>.<ext>`; `label` is the class column of the log."""

    url: str
    folder: Path
    failed_folder: Path
    name: str
    label: str = ""
    md5: bytes | None = None


@dataclass
class Result:
    job: Job
    status: str
    bytes: int = 0
    sha256: str = ""
    file: Path | None = None
    reason: str = ""
    retryable: bool = False
    retry_after: float | None = None
    md5: str = ""


class HostPacer:
    """Spaces request starts to one host at least 1/rate seconds apart, across threads (rate 0: no limit)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def wait(self, url: str) -> None:
        if not self.interval:
            return
        host = urlsplit(url).netloc.lower()
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next.get(host, now))
            self._next[host] = start + self.interval
        if start > now:
            time.sleep(start - now)


def url_id(url: str) -> str:
    """A stable file name for a URL: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def parse_size(text: str) -> int:
    """'20MB' -> 20_000_000, '1MiB' -> 1_048_576, '500' -> 500 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 500KB, 20MB or 1GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def read_urls(path: Path) -> tuple[list[str], int]:
    """The URLs of a list file in order, without repeats, and how many non-empty lines had none."""
    urls: dict[str, None] = {}
    without = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            url = next((cell.strip() for cell in row if cell.strip().lower().startswith(("http://", "https://"))), None)
            if url:
                urls[url] = None
            elif any(cell.strip() for cell in row):
                without += 1
    return list(urls), without


def list_files(urls: Path) -> dict[str, list[Path]]:
    """{class: list file(s)}: '' -> the file itself, or one entry per <class>.csv|txt in a folder."""
    if urls.is_file():
        return {"": [urls]}
    found: dict[str, list[Path]] = {}
    for path in sorted(urls.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in (".csv", ".txt"):
            found.setdefault(path.stem, []).append(path)
    return found


def fetch(
    client: httpx.Client,
    job: Job,
    max_bytes: int,
    pacer: HostPacer,
    retries: int = 3,
    backoff: float = 0.5,
    deadline: float = 120.0,
) -> Result:
    """Download, verify and file one job; transient failures are retried `retries` times."""
    result = Result(job, "network_error")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(result.retry_after if result.retry_after is not None else backoff * 2 ** (attempt - 1))
        pacer.wait(job.url)
        result = _attempt(client, job, max_bytes, deadline)
        if not result.retryable:
            break
    if result.status == "ok":
        for stale in _same_stem(job.failed_folder, job.name):
            stale.unlink()
    return result


def _attempt(client: httpx.Client, job: Job, max_bytes: int, deadline: float) -> Result:
    job.folder.mkdir(parents=True, exist_ok=True)
    part = job.folder / f".{job.name}.part"  # hidden: listings and training never see it
    try:
        fetched = _stream(client, job, part, max_bytes, deadline)
        if fetched.status != "ok":
            return fetched
        return _file(job, part, fetched)
    finally:
        part.unlink(missing_ok=True)


def _stream(client: httpx.Client, job: Job, part: Path, max_bytes: int, deadline: float) -> Result:
    started = time.monotonic()
    try:
        with client.stream("GET", job.url) as response:
            if response.status_code != 200:
                code = response.status_code
                wait_s = response.headers.get("retry-after", "")
                return Result(
                    job,
                    "http_error",
                    reason=f"HTTP {code} {response.reason_phrase}".strip(),
                    retryable=code == 429 or code >= 500,
                    retry_after=min(60.0, float(wait_s)) if wait_s.isdigit() else None,
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                return Result(job, "too_large", reason=f"Content-Length {declared} is over the limit of {max_bytes}")
            sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
            with open(part, "wb") as f:
                for chunk in response.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        return Result(job, "too_large", size, reason=f"body over the limit of {max_bytes} bytes")
                    if time.monotonic() - started > deadline:
                        return Result(
                            job,
                            "network_error",
                            size,
                            reason=f"too slow: not done after {deadline:g} s",
                            retryable=True,
                        )
                    f.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
    except httpx.TooManyRedirects:
        return Result(job, "http_error", reason=f"more than {MAX_REDIRECTS} redirects")
    except httpx.TransportError as err:
        return Result(job, "network_error", reason=f"{type(err).__name__}: {err}".rstrip(": "), retryable=True)
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        return Result(job, "http_error", reason=f"{type(err).__name__}: {err}")
    return Result(job, "ok", size, sha256.hexdigest(), md5=md5.hexdigest())


def _file(job: Job, part: Path, fetched: Result) -> Result:
    """Move a complete download to its place, or to the failed folder with the reason."""
    extension = _extension(part)
    status, reason = "ok", ""
    if job.md5 is not None and bytes.fromhex(fetched.md5) != job.md5:
        status, reason = "md5_mismatch", f"MD5 {fetched.md5} differs from the expected {job.md5.hex()}"
    elif (why := check_image(part)) is not None:
        status, reason = "bad_image", why
    folder = job.folder if status == "ok" else job.failed_folder
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{job.name}{extension}"
    for other in _same_stem(folder, job.name):  # a failed copy from an earlier run, maybe another type
        if other != target:
            other.unlink()
    os.replace(part, target)
    return Result(job, status, fetched.bytes, fetched.sha256, target, reason, md5=fetched.md5)


def _extension(path: Path) -> str:
    """The extension of the file's real format, by content; '.bin' for anything that is not an image."""
    try:
        with Image.open(path) as im:
            return _EXTENSIONS.get(im.format or "", ".bin")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # check_image gives the reason
        return ".bin"


def _same_stem(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.glob(f"{name}.*") if p.is_file() and p.stem == name] if folder.is_dir() else []


def download_all(
    jobs: Iterable[Job],
    client: httpx.Client,
    workers: int = 8,
    max_bytes: int = 20 * 10**6,
    host_rate: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    deadline: float = 120.0,
    max_per_folder: int | None = None,
    progress: bool = True,
    on_result: Callable[[Result], None] | None = None,
) -> tuple[list[Result], list[Job]]:
    """Fetch the jobs whose file is not there yet, in a thread pool, at most `max_per_folder` images per folder.

    Returns the new results (completion order) and the jobs skipped because their file was already there.
    """
    queues: dict[Path, deque[Job]] = {}
    have: Counter[Path] = Counter()
    present: list[Job] = []
    stems: dict[Path, set[str]] = {}
    for job in jobs:
        if job.folder not in stems:
            stems[job.folder] = (
                {p.stem for p in job.folder.iterdir() if p.is_file() and not p.name.startswith(".")}
                if job.folder.is_dir()
                else set()
            )
        if job.name in stems[job.folder]:
            present.append(job)
            have[job.folder] += 1
        else:
            queues.setdefault(job.folder, deque()).append(job)
    total = sum(
        len(q) if max_per_folder is None else min(len(q), max(0, max_per_folder - have[folder]))
        for folder, q in queues.items()
    )
    pacer = HostPacer(host_rate)
    results: list[Result] = []
    running: dict[Future, Job] = {}
    busy: Counter[Path] = Counter()
    bar = tqdm(total=total, desc="downloading", unit="img", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:

        def fill() -> None:
            added = True
            while added and len(running) < 2 * workers:  # round robin over the folders
                added = False
                for folder, queue in queues.items():
                    if queue and (max_per_folder is None or have[folder] + busy[folder] < max_per_folder):
                        job = queue.popleft()
                        running[pool.submit(fetch, client, job, max_bytes, pacer, retries, backoff, deadline)] = job
                        busy[folder] += 1
                        added = True

        try:
            fill()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    busy[job.folder] -= 1
                    result = future.result()
                    have[job.folder] += result.status == "ok"
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
                    bar.update()
                fill()
        except KeyboardInterrupt:
            for future in running:
                future.cancel()
            raise
        finally:
            bar.close()
    return results, present


# ---------------------------------------------------------------- the log


def read_log(dest: Path) -> dict[tuple[str, str], dict[str, str]]:
    """{(url, class): row} of an earlier run's download_log.csv (the last row of a URL wins)."""
    path = dest / LOG_NAME
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {(row["url"], row.get("class", "")): row for row in csv.DictReader(f)}


def write_log(dest: Path, rows: dict[tuple[str, str], dict[str, str]]) -> Path:
    """Replace the log in one step (written beside it, then renamed), so a kill never leaves half a log."""
    path = dest / LOG_NAME
    tmp = dest / f".{LOG_NAME}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())
    os.replace(tmp, path)
    return path


def log_row(result: Result, dest: Path) -> dict[str, str]:
    job = result.job
    return {
        "url": job.url,
        "class": job.label,
        "status": result.status,
        "bytes": str(result.bytes),
        "sha256": result.sha256,
        "file": result.file.relative_to(dest).as_posix() if result.file else "",
        "reason": result.reason,
    }


def present_row(job: Job, dest: Path, earlier: dict[str, str] | None) -> dict[str, str]:
    """The log row of a file that was already there: the earlier row, or one made from the file."""
    if earlier is not None and earlier["status"] == "ok":
        return earlier
    file = _same_stem(job.folder, job.name)[0]
    data = file.read_bytes()
    return log_row(Result(job, "ok", len(data), hashlib.sha256(data).hexdigest(), file), dest)


def run(
    jobs: list[Job], dest: Path, on_result: Callable[[Result], None] | None = None, **options
) -> tuple[list[Result], list[Job], Path]:
    """download_all with the log kept: earlier rows kept, new results replace them, written even on Ctrl-C.

    `on_result` sees each new result (in the main thread) before it is logged."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = read_log(dest)
    results: list[Result] = []
    present: list[Job] = []
    timeout = options.pop("timeout", 10.0)
    workers = options.get("workers", 8)
    limits = httpx.Limits(max_connections=max(10, 2 * workers), max_keepalive_connections=max(10, 2 * workers))

    def record(result: Result) -> None:
        if on_result is not None:
            on_result(result)
        rows[(result.job.url, result.job.label)] = log_row(result, dest)

    try:
        with httpx.Client(
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": USER_AGENT},
            limits=limits,
        ) as client:
            results, present = download_all(jobs, client, on_result=record, **options)
    finally:
        for job in present:
            rows[(job.url, job.label)] = present_row(job, dest, rows.get((job.url, job.label)))
        log = write_log(dest, rows)
    return results, present, log


def jobs_for(urls: list[str], dest: Path, label: str) -> list[Job]:
    folder = dest / label if label else dest
    failed = dest / FAILED_DIR / label if label else dest / FAILED_DIR
    return [Job(url, folder, failed, url_id(url), label) for url in urls]


def summary(results: list[Result], present: list[Job]) -> str:
    counts = Counter(r.status for r in results)
    ok = counts.pop("ok", 0)
    failed = sum(counts.values())
    text = f"downloaded {ok}, already there {len(present)}, failed {failed}"
    if failed:
        text += " (" + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) + ")"
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected requests per second (0: no limit), got {text!r}")
    return value


def build_parser(prog: str = "python -m geektime.download") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Download the images of a URL list (or a folder of <class>.csv|txt lists) into DEST, check each one "
            "as training decodes it, and log every URL in DEST/download_log.csv. A rerun resumes."
        ),
    )
    parser.add_argument("urls", type=Path, help="a .txt/.csv of URLs, or a folder of <class>.csv|txt files")
    parser.add_argument("dest", type=Path, help="folder for the images (one sub-folder per class list)")
    add_network_options(parser)
    parser.add_argument("--max-pics", type=_positive_int, metavar="N", help="stop a class at N good images")
    return parser


def add_network_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=8, metavar="N", help="parallel downloads (default 8)")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds to connect and between received bytes (default 10)",
    )
    parser.add_argument(
        "--max-bytes",
        type=parse_size,
        default=parse_size("20MB"),
        metavar="SIZE",
        help="largest file accepted, e.g. 500KB, 20MB (default 20MB)",
    )
    parser.add_argument(
        "--retries",
        type=_count,
        default=3,
        metavar="N",
        help="retries of a transient failure, with back-off (default 3)",
    )
    parser.add_argument(
        "--host-rate",
        type=_rate,
        default=10.0,
        metavar="R",
        help="at most R requests per second to one host, 0 for no limit (default 10)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def network_options(args: argparse.Namespace) -> dict:
    return {
        "workers": args.workers,
        "timeout": args.timeout,
        "max_bytes": args.max_bytes,
        "retries": args.retries,
        "host_rate": args.host_rate,
        "deadline": 12 * args.timeout,
        "progress": not args.quiet,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.urls.exists():
        parser.error(f"{args.urls}: no such file or folder; give a URL list or a folder of <class>.csv|txt files")
    if args.dest.exists() and not args.dest.is_dir():
        parser.error(f"{args.dest}: is a file; give a folder for the images")
    lists = list_files(args.urls)
    if not lists:
        parser.error(f"{args.urls}: no <class>.csv or <class>.txt files in this folder")
    jobs: list[Job] = []
    for label, files in lists.items():
        urls: list[str] = []
        for file in files:
            try:
                found, without = read_urls(file)
            except (OSError, UnicodeDecodeError) as err:
                print(f"error: cannot read {file}: {err}", file=sys.stderr)
                return 2
            if without:
                print(f"{file}: passed over {without} line(s) without an http(s) URL")
            urls += [u for u in found if u not in urls]
        if not urls:
            print(f"warning: {', '.join(map(str, files))}: no http(s) URLs", file=sys.stderr)
        jobs += jobs_for(urls, args.dest, label)
    if not jobs:
        print(f"error: {args.urls}: no http(s) URLs to download", file=sys.stderr)
        return 2
    try:
        results, present, log = run(jobs, args.dest, max_per_folder=args.max_pics, **network_options(args))
    except KeyboardInterrupt:
        print(f"interrupted; the log is written, run again to resume: {args.dest / LOG_NAME}", file=sys.stderr)
        return 130
    print(f"{summary(results, present)}\nlog: {log}")
    failed = [r for r in results if r.status != "ok"]
    for result in failed[:10]:
        print(f"  {result.status}: {result.job.url}: {result.reason}")
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more in the log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
