"""The on-disk cache of decoded views: each split's images decoded once per machine, not once per process.

A sweep's jobs, torchrun's processes and every evaluation of a run read the same files through the same
transform; decoding a multi-megapixel JPEG costs as much as a training step on a small machine. The first
process to need a split decodes it (in parallel) into one cache entry; every later one maps the entry's
file and decodes nothing. A split larger than memory is served from the mapped file: its pages come from the
OS page cache and can be dropped, so a process's resident memory stays bounded.

Layout (`data.cache_dir`, default `$GEEKTIME_CACHE` or ~/.cache/geektime/views), one entry per split listing
and view:
    <name>.npy   the good images' views, uint8 (N, 3, H, W) in listing order: a plain .npy that
                 `numpy.load(path, mmap_mode="r")` opens; unreadable files have no row
    <name>.json  the index: the spec, every file's (path, size, mtime_ns), the unreadable ones with their
                 reasons (so no process decodes them again); written last, so it marks the entry complete
    <name>.lock  the entry's lock file (fcntl.flock)
<name> is the split folder's name, the view size and a SHA-256 of everything the pixels depend on: each file's
absolute path, size and mtime_ns, the transform (name, letterbox fill), the view size, the decode min_size and
the versions of the decoders (Pillow, torchvision, this format). Any change gives another name, so a stale
entry is never read; it is evicted in time by the size limit.

Why one array per split, not a record per image: one mapping and one contiguous file read in listing order
(a sequential read when the page cache is cold), one lock and one rename per build, and eviction by whole
entries. The cost: a split that changes (one image added) is decoded again in full.

Concurrency: builders take the entry's lock exclusively, so the first one decodes while the others wait and then
map its result; files are written to temporary names and moved into place with os.replace, so a reader never
sees half an entry and a killed builder leaves only a temporary file that the next eviction removes. A process
holds a shared lock on each entry it uses for its whole life, and eviction (least recently used first, to
`data.cache_dir_max_gb`) passes over entries that any live process holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from tqdm import tqdm

from geektime.machine import cpu_count

log = logging.getLogger(__name__)

FORMAT = 1  # raise when the entry layout or the meaning of a view changes: old entries are then never read
GB = 2**30
_HELD: dict[str, int] = {}  # entry path (no suffix) -> fd of its lock file, held shared for this process's life


def default_root() -> Path:
    return Path(os.environ.get("GEEKTIME_CACHE") or Path.home() / ".cache" / "geektime" / "views").expanduser()


def from_config(dcfg) -> ViewCache | None:
    """The cache `data.disk_cache`, `data.cache_dir` and `data.cache_dir_max_gb` ask for; None when it is off."""
    if not dcfg.disk_cache:
        return None
    root = Path(dcfg.cache_dir).expanduser() if dcfg.cache_dir else default_root()
    return ViewCache(root, int(float(dcfg.cache_dir_max_gb) * GB))


class MappedViews:
    """An entry's views, memory-mapped; indexing copies out one image.

    It pickles as its file name, so a DataLoader worker started by spawn or forkserver maps the file again
    instead of receiving a copy of the whole split."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index]))

    def __reduce__(self):
        return MappedViews, (self.path,)


def file_stats(paths: Sequence[str]) -> list[list]:
    """[absolute path, size, mtime_ns] per file; size and mtime -1 for a file that cannot be stat'ed."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
            stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([os.path.abspath(path), -1, -1])
    return stats


def entry_name(label: str, spec: dict, stats: list[list]) -> str:
    versions = {"format": FORMAT, "pillow": PIL.__version__, "torchvision": torchvision.__version__}
    digest = hashlib.sha256(json.dumps([versions, spec, stats], sort_keys=True).encode()).hexdigest()[:32]
    height, width = spec["view_size"]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", label)[:40] or "split"  # no dots: names split at the first
    return f"{slug}-{height}x{width}-{digest}"


class ViewCache:
    """A folder of entries with a size limit; see the module docstring."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes

    def views(
        self,
        label: str,
        paths: Sequence[str],
        spec: dict,
        decode: Callable,
        jobs: Sequence,
        workers: int | None = None,
        progress: bool = True,
        mapped: bool = True,
    ) -> tuple[MappedViews | torch.Tensor, list[tuple[str, str]]] | None:
        """The good images' views of `paths` (a mapped file, or a tensor in memory when not `mapped`) and the
        unreadable files with their reasons; decoded now, with `decode(job)` -> (uint8 CHW array | None, reason
        | None) over `jobs` (one per path) in worker processes, unless a complete entry exists. None (with a
        warning) when the cache folder cannot hold the entry: the caller decodes as without a cache."""
        if not paths:
            return torch.empty((0, 3, *spec["view_size"]), dtype=torch.uint8), []
        stats = file_stats(paths)
        name = entry_name(label, spec, stats)
        entry_bytes = len(paths) * 3 * spec["view_size"][0] * spec["view_size"][1]
        held = str(self.root / name)
        if held not in _HELD:  # else this process built or opened it, and holds it: complete, never evicted
            if entry_bytes > self.max_bytes:
                log.warning(
                    "%s: the decoded views (%.2f GB) exceed data.cache_dir_max_gb=%g; decoding without the "
                    "disk cache. Raise data.cache_dir_max_gb to keep them.",
                    label,
                    entry_bytes / GB,
                    self.max_bytes / GB,
                )
                return None
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                lock, complete = self._acquire(name)
            except OSError as err:
                log.warning(
                    "data.cache_dir=%s: %s; decoding without the disk cache (set data.cache_dir to a "
                    "writable folder, or data.disk_cache=false).",
                    self.root,
                    err.strerror or err,
                )
                return None
            try:
                if not complete:
                    if not self._make_room(entry_bytes, keep=name):
                        os.close(lock)
                        return None
                    try:
                        self._build(name, label, spec, stats, decode, jobs, workers, progress)
                    except OSError as err:  # the disk filled up under us, a read-only folder, ...
                        log.warning("data.cache_dir=%s: %s; decoding without the disk cache.", self.root, err)
                        os.close(lock)
                        return None
                else:
                    os.utime(self.root / f"{name}.json")  # recently used: evicted last
            except BaseException:
                os.close(lock)
                raise
            # Shared from now on: other processes map the entry too, and no one evicts it while this one lives.
            fcntl.flock(lock, fcntl.LOCK_SH)
            _HELD[held] = lock
        index = self._read_index(name)
        given = {os.path.abspath(p): p for p in paths}  # the bad files as the caller spelled them
        bad = [(given[path], reason) for path, reason in index["bad"]]
        if index["shape"][0] == 0:  # numpy cannot map an empty file
            return torch.empty((0, *index["shape"][1:]), dtype=torch.uint8), bad
        if not mapped:
            return torch.from_numpy(np.load(self.root / f"{name}.npy")), bad
        return MappedViews(self.root / f"{name}.npy"), bad

    # ------------------------------------------------------------ entries

    def _acquire(self, name: str) -> tuple[int, bool]:
        """The entry's lock file, held shared when the entry is complete (returns (fd, True)), or exclusive for
        this process to build it (returns (fd, False)).

        Shared first: processes that only map a complete entry never wait for each other, so torchrun's ranks
        (which then meet in collectives) cannot deadlock on it. A process that finds the entry incomplete tries
        for the exclusive lock without waiting, and backs off while another process builds. The path is checked
        to still name the locked file: eviction unlinks lock files, and a lock on an unlinked one excludes nobody."""
        path = self.root / f"{name}.lock"
        said = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a builder holds it exclusively
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same and self._read_index(name) is not None:
                return fd, True
            if same:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if self._read_index(name) is not None:  # built between the two locks
                        fcntl.flock(fd, fcntl.LOCK_SH)
                        return fd, True
                    return fd, False
                except BlockingIOError:
                    if not said:
                        log.info("waiting for another process to finish decoding %s into %s", name, self.root)
                        said = True
            os.close(fd)
            time.sleep(0.05 + random.random() * 0.1)

    def _read_index(self, name: str) -> dict | None:
        """The entry's index when the entry is complete, else None."""
        try:
            with open(self.root / f"{name}.json", encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") == FORMAT and (self.root / f"{name}.npy").exists():
                return index
        except (OSError, ValueError):
            pass
        return None

    def _build(
        self,
        name: str,
        label: str,
        spec: dict,
        stats: list[list],
        decode: Callable,
        jobs: Sequence,
        workers: int | None,
        progress: bool,
    ) -> None:
        """Decode every image in parallel straight into the entry's file (never the whole split in memory)."""
        started = time.perf_counter()
        count, shape = len(jobs), (3, *spec["view_size"])
        tmp = self.root / f"{name}.{os.getpid()}.tmp.npy"
        bad, row, pool = [], 0, None
        workers = workers or cpu_count()
        bar = tqdm(
            total=count,
            desc=f"decoding {label} into the cache",
            unit="img",
            leave=False,
            dynamic_ncols=True,
            disable=not progress,
        )
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, *shape))
            with open(tmp, "r+b") as f:  # the blocks now: a full disk is an OSError here, not a SIGBUS mid-write
                os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
            if workers > 1 and count > 8:
                pool = multiprocessing.get_context("fork").Pool(workers)
                results = pool.imap(decode, jobs, chunksize=max(1, min(32, count // (workers * 8))))
            else:
                results = map(decode, jobs)
            for (path, _, _), (array, reason) in zip(stats, results):
                if reason is None:
                    out[row] = array
                    row += 1
                else:
                    bad.append((path, reason))
                bar.update()
            out.flush()
            offset = out.offset
            del out
            # Only the good rows: the header's shape rewritten (numpy pads it so that the first axis can
            # shrink or grow in place) and the file cut after the last good image.
            with open(tmp, "r+b") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (row, *shape)}
                )
                if f.tell() != offset:
                    raise RuntimeError(f"{tmp}: the .npy header changed length")
                f.truncate(offset + row * int(np.prod(shape)))
            os.replace(tmp, self.root / f"{name}.npy")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
        index = {
            "format": FORMAT,
            "label": label,
            "spec": spec,
            "shape": [row, *shape],
            "decode_seconds": round(time.perf_counter() - started, 3),
            "files": stats,
            "bad": bad,
        }
        tmp_index = self.root / f"{name}.{os.getpid()}.tmp.json"
        with open(tmp_index, "w", encoding="utf-8") as f:
            json.dump(index, f)
        os.replace(tmp_index, self.root / f"{name}.json")

    # ------------------------------------------------------------ the size limit

    def entries(self) -> list[tuple[float, int, str]]:
        """(last used, bytes, name) of every entry, least recently used first."""
        found = []
        for index in self.root.glob("*.json"):
            if ".tmp." in index.name:
                continue
            name = index.name[: -len(".json")]
            try:
                used = index.stat().st_mtime
                size = index.stat().st_size + _size(self.root / f"{name}.npy")
            except FileNotFoundError:
                continue
            found.append((used, size, name))
        return sorted(found)

    def _make_room(self, needed: int, keep: str) -> bool:
        """Evict least recently used entries that no process holds until `needed` more bytes fit the limit
        (and the disk); False, with a warning, when they cannot."""
        self._remove_orphans()
        entries = [e for e in self.entries() if e[2] != keep]
        total = sum(size for _, size, _ in entries)
        for _, size, name in entries:
            if total + needed <= self.max_bytes:
                break
            if self._evict(name):
                total -= size
        free = shutil.disk_usage(self.root).free
        if total + needed > self.max_bytes or needed > free:
            why = (
                f"only {free / GB:.2f} GB free on its disk"
                if needed > free
                else f"entries in use by running processes fill data.cache_dir_max_gb={self.max_bytes / GB:g}"
            )
            log.warning(
                "data.cache_dir=%s: %s, the split needs %.2f GB; decoding without the disk cache.",
                self.root,
                why,
                needed / GB,
            )
            return False
        return True

    def _evict(self, name: str) -> bool:
        """Remove an entry unless a process holds it; the index goes first, so the entry is incomplete before
        its array is removed."""
        path = self.root / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            for suffix in (".json", ".npy", ".lock"):
                (self.root / f"{name}{suffix}").unlink(missing_ok=True)
            log.info("evicted %s from %s (data.cache_dir_max_gb=%g)", name, self.root, self.max_bytes / GB)
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def _remove_orphans(self) -> None:
        """Temporary files of builders that died (their entry's lock is free) and lock files of no entry."""
        for tmp in self.root.glob("*.tmp.*"):
            name = tmp.name.split(".")[0]
            try:
                fd = os.open(self.root / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink(missing_ok=True)
                if not (self.root / f"{name}.json").exists():
                    (self.root / f"{name}.lock").unlink(missing_ok=True)
            except BlockingIOError:
                pass  # a live builder's
            finally:
                os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
