"""The on-disk cache of decoded views (geektime.cache) through data.load_split, as training and evaluation use it.

Each load runs in a forked child process, as a second job of a sweep would: a process holds the entries it uses
(never evicted under it), so a fresh process is what sees the cache as another job does. Decodes are counted by
wrapping geektime.data.load_rgb in the child (decoding runs in that process with workers=1).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import time
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import geektime.data as data
from conftest import make_folders, make_image
from geektime.cache import GB, MappedViews
from geektime.data import build_transform, decode_all, decode_size, load_split
from geektime.images import list_images
from geektime.schema import DataConfig, TransformsConfig

SIZE = (24, 24)


def configs(cache_dir: Path, transform: str = "resize", fill=(124, 116, 104), **data_keys):
    dcfg = OmegaConf.structured(DataConfig(cache_dir=str(cache_dir), on_bad_image="skip", **data_keys))
    tcfg = OmegaConf.structured(TransformsConfig(name=transform, fill=list(fill)))
    return dcfg, tcfg


def _load(folder: Path, cache_dir: Path, size, transform, fill, data_keys, delay: float) -> dict:
    decodes = []
    real = data.load_rgb

    def counted(path, min_size=None):
        decodes.append(str(path))
        time.sleep(delay)  # a slow decode, so that concurrent builders overlap
        return real(path, min_size)

    data.load_rgb = counted
    dcfg, tcfg = configs(cache_dir, transform, fill, **data_keys)
    paths = [str(p) for p in list_images(folder)]
    split = load_split(
        "data.train_dir", paths, [0] * len(paths), str(folder), tcfg, dcfg, size, False, workers=1, progress=False
    )
    images = torch.stack([split.view(i) for i in range(len(split))])
    return {
        "decodes": len(decodes),
        "kind": type(getattr(split, "images", None)).__name__,
        "paths": split.paths,
        "images": images,
        "sha": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
    }


def _child(conn, args):
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: parallel ops would hang
    try:
        result = _load(*args)
        result["images"] = result["images"].numpy()  # plain pickling: torch would pass a shared-memory handle
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - the parent raises it with the child's traceback
        conn.send(("error", traceback.format_exc()))
    conn.close()


def start_load(folder, cache_dir, size=SIZE, transform="resize", fill=(124, 116, 104), delay=0.0, **data_keys):
    """load_split of `folder` in a fresh (forked) process; returns (process, pipe)."""
    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(
        target=_child, args=(child, (folder, cache_dir, size, transform, fill, data_keys, delay))
    )
    proc.start()
    return proc, parent


def finish(started) -> dict:
    proc, pipe = started
    status, result = pipe.recv()
    proc.join(30)
    assert status == "ok", result
    result["images"] = torch.from_numpy(result["images"])
    return result


def load_in_child(*args, **kwargs) -> dict:
    return finish(start_load(*args, **kwargs))


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name[: -len(".json")] for p in cache_dir.glob("*.json"))


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if ".tmp." in p.name)


@pytest.fixture
def split(tmp_path) -> Path:
    """12 small JPEGs and one bad file (a text file named .jpg) in two class folders."""
    train, _ = make_folders(tmp_path / "data", train_per_class=6, val_per_class=1)
    (train / "red" / "broken.jpg").write_text("not an image")
    return train


def reference(folder: Path, size=SIZE, transform="resize") -> tuple[torch.Tensor, list[str]]:
    """decode_all's views of the good images, in listing order."""
    tcfg = OmegaConf.structured(TransformsConfig(name=transform))
    paths = [str(p) for p in list_images(folder)]
    images, bad = decode_all(
        paths, build_transform(tcfg, size, False), decode_size(tcfg, size, False), size, workers=1, progress=False
    )
    unusable = {p for p, _ in bad}
    keep = [i for i, p in enumerate(paths) if p not in unusable]
    return images[keep], [paths[i] for i in keep]


def test_second_process_decodes_nothing_and_views_equal_decode_all(split, tmp_path):
    cache_dir = tmp_path / "cache"
    first = load_in_child(split, cache_dir)
    second = load_in_child(split, cache_dir)
    assert first["decodes"] == 13  # 12 images and the bad file, once
    assert second["decodes"] == 0  # the bad file too: its verdict is in the index
    images, paths = reference(split)
    for run in (first, second):
        assert run["kind"] == "Tensor"  # fits data.cache_max_gb: read into memory, as without the disk cache
        assert run["paths"] == paths and not any("broken" in p for p in run["paths"])
        assert torch.equal(run["images"], images)  # bit for bit
    assert len(entries(cache_dir)) == 1 and not leftovers(cache_dir)


def test_split_larger_than_cache_max_gb_is_mapped(split, tmp_path):
    cache_dir = tmp_path / "cache"
    tiny = {"cache_max_gb": 1e-6}  # ~1 KB: the 12 views (20 KB) are far larger
    first = load_in_child(split, cache_dir, **tiny)
    second = load_in_child(split, cache_dir, **tiny)
    assert (first["decodes"], second["decodes"]) == (13, 0)
    assert first["kind"] == second["kind"] == "MappedViews"
    images, _ = reference(split)
    assert torch.equal(second["images"], images)
    # A spawned DataLoader worker receives the file name, not the pixels, and maps the file itself.
    views = MappedViews(next(cache_dir.glob("*.npy")))
    assert len(pickle.dumps(views)) < 1000 and torch.equal(pickle.loads(pickle.dumps(views))[3], images[3])


def test_changed_file_transform_or_size_is_a_new_entry(split, tmp_path):
    cache_dir = tmp_path / "cache"
    assert load_in_child(split, cache_dir)["decodes"] == 13
    image = split / "blue" / "000.jpg"

    stat = image.stat()  # mtime only: same bytes, same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_in_child(split, cache_dir)["decodes"] == 13
    assert len(entries(cache_dir)) == 2

    make_image(image, (250, 250, 0), size=(60, 50), seed=7)  # new pixels, new size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # even with the old mtime
    changed = load_in_child(split, cache_dir)
    assert changed["decodes"] == 13 and len(entries(cache_dir)) == 3
    assert torch.equal(changed["images"], reference(split)[0])  # the new pixels, not the stale view

    assert load_in_child(split, cache_dir, transform="letterbox")["decodes"] == 13
    assert load_in_child(split, cache_dir, transform="letterbox", fill=(0, 0, 0))["decodes"] == 13
    assert load_in_child(split, cache_dir, size=(16, 16))["decodes"] == 13
    assert len(entries(cache_dir)) == 6
    for transform, fill, size in (("letterbox", (0, 0, 0), SIZE), ("resize", (124, 116, 104), (16, 16))):
        assert load_in_child(split, cache_dir, transform=transform, fill=fill, size=size)["decodes"] == 0


def test_concurrent_builders_leave_one_entry(split, tmp_path):
    cache_dir = tmp_path / "cache"
    runs = [start_load(split, cache_dir, delay=0.05) for _ in range(2)]  # each build takes > 0.6 s
    first, second = (finish(run) for run in runs)
    assert first["decodes"] + second["decodes"] == 13  # one built it; the other waited, then mapped it
    assert first["sha"] == second["sha"]
    assert torch.equal(first["images"], reference(split)[0])
    assert len(entries(cache_dir)) == 1 and len(list(cache_dir.glob("*.npy"))) == 1
    assert not leftovers(cache_dir)


def test_size_limit_evicts_least_recently_used(tmp_path):
    folders = [make_folders(tmp_path / name, train_per_class=4, val_per_class=1)[0] for name in "abc"]
    cache_dir = tmp_path / "cache"
    entry_bytes = 8 * 3 * SIZE[0] * SIZE[1]  # 13,824 B of views and ~1 KB of index per split
    limit = {"cache_dir_max_gb": 2.5 * (entry_bytes + 2048) / GB}  # room for two entries, not three
    a, b, c = folders
    for folder in (a, b):
        assert load_in_child(folder, cache_dir, **limit)["decodes"] == 8
    time.sleep(0.02)
    assert load_in_child(a, cache_dir, **limit)["decodes"] == 0  # a used again: b is now the least recent
    assert load_in_child(c, cache_dir, **limit)["decodes"] == 8
    assert len(entries(cache_dir)) == 2
    assert load_in_child(a, cache_dir, **limit)["decodes"] == 0
    assert load_in_child(c, cache_dir, **limit)["decodes"] == 0
    assert load_in_child(b, cache_dir, **limit)["decodes"] == 8  # b was evicted


def test_disk_cache_off_writes_nothing(split, tmp_path):
    cache_dir = tmp_path / "cache"
    assert load_in_child(split, cache_dir, disk_cache=False)["kind"] == "Tensor"
    on_access = load_in_child(split, cache_dir, cache="false")
    assert on_access["kind"] == "NoneType" and on_access["decodes"] == 12  # FileImages: decoded on each access
    assert not cache_dir.exists()
