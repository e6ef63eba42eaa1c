"""geektime.images on real files: every kind of dirty image a scraped folder holds, built with Pillow."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geektime import images
from geektime.data import open_folder
from geektime.errors import ConfigError
from geektime.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    check_image,
    list_images,
    list_split,
    load_rgb,
    scan_images,
    walk_files,
)


def noise_jpeg(path, size=(256, 256), **save):
    """A JPEG whose entropy-coded data fills the file, so cutting it anywhere truncates pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", **save)
    return path


def truncated_jpeg(path):
    data = noise_jpeg(io.BytesIO()).getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def pixel(img, xy):
    return img.getpixel(xy)


def assert_close(actual, expected, tol=1):
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), (actual, expected)


# ---------------------------------------------------------------- unusable files


def reason_of(path) -> str:
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == path
    assert check_image(path) == info.value.reason
    return info.value.reason


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert reason_of(path) == "empty file (0 bytes)"


def test_truncated_jpeg_is_caught_also_in_draft_mode(tmp_path):
    path = truncated_jpeg(tmp_path / "half.jpg")
    assert "truncated" in reason_of(path)
    with pytest.raises(BadImageError, match="truncated"):
        load_rgb(path, min_size=(8, 8))  # 1/8 scale still reads the whole stream


def test_truncated_progressive_jpeg(tmp_path):
    data = noise_jpeg(io.BytesIO(), progressive=True).getvalue()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) * 9 // 10])
    assert "truncated" in reason_of(path)


def test_random_bytes_named_jpg(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert reason_of(path).startswith("not an image: unrecognised content")


def test_text_and_html_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("labels: cat, dog\n")
    assert reason_of(txt) == "not an image: a text file"
    html = tmp_path / "photo.jpg"
    html.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    assert "HTML" in reason_of(html)


def test_ds_store_is_not_an_image(tmp_path):
    path = tmp_path / ".DS_Store"
    path.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 4)
    assert reason_of(path).startswith("not an image")


def test_corrupt_png_data(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 20] = b"\xff" * 20  # zlib stream garbage, header intact
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    assert "corrupt" in reason_of(path)


def test_missing_file_and_directory(tmp_path):
    assert reason_of(tmp_path / "gone.jpg").startswith("cannot read the file: No such file")
    (tmp_path / "dir.jpg").mkdir()
    assert reason_of(tmp_path / "dir.jpg").startswith("cannot read the file")


@pytest.mark.parametrize("size", [(40, 40), (100, 100)])  # warning range, then error range (> 2x)
def test_decompression_bomb(tmp_path, monkeypatch, size):
    path = tmp_path / "bomb.png"
    Image.new("L", size).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    reason = reason_of(path)
    assert reason.startswith("possible decompression bomb")
    assert "MAX_IMAGE_PIXELS" in reason and "legitimate" in reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_rgb(path).size == size


def test_bad_image_error_names_file_reason_and_fix(tmp_path):
    err = BadImageError(tmp_path / "data" / "cat" / "x.jpg", "empty file (0 bytes)")
    text = str(err)
    assert text.startswith(f"{tmp_path / 'data' / 'cat' / 'x.jpg'}: empty file (0 bytes)")
    assert f"python -m geektime.verify {tmp_path / 'data'} --quarantine" in text
    assert "data.on_bad_image=skip" in text
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))  # DataLoader workers send errors back pickled
    assert (copy.path, copy.reason) == (err.path, err.reason)


# ---------------------------------------------------------------- every mode to 8-bit RGB


def test_rgb_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (32, 16), (200, 40, 90)).save(path, quality=95)
    img = load_rgb(str(path))
    assert (img.mode, img.size) == ("RGB", (32, 16))
    assert_close(pixel(img, (5, 5)), (200, 40, 90), tol=3)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_opened_by_content_not_extension(tmp_path, fmt):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    path = tmp_path / "really_not_a.jpg"
    img.save(path, fmt)
    out = load_rgb(path, min_size=(4, 4))
    assert (out.mode, out.size, pixel(out, (3, 3))) == ("RGB", (8, 8), (12, 34, 56))


def palette_image(transparency=None):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def la_image():
    img = Image.new("LA", (3, 1))
    for x, value in enumerate([(100, 255), (100, 0), (0, 128)]):
        img.putpixel((x, 0), value)
    return img


def rgba_image():
    img = Image.new("RGBA", (3, 1))
    for x, value in enumerate([(1, 2, 3, 255), (1, 2, 3, 0), (200, 100, 0, 128)]):
        img.putpixel((x, 0), value)
    return img


def wide_image(dtype):
    return Image.fromarray(np.array([[0, 257 * 100, 65535, 1000]], dtype=dtype))


def cmyk_image():
    img = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 0))
    return img


def rgb_keyed():
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (9, 9, 9))
    return img


# (builder, file format, save options, expected RGB per pixel of row 0)
MODES = {
    "P": (palette_image, "PNG", {}, [(10, 20, 30), (200, 100, 50)]),
    "P+transparency": (lambda: palette_image(transparency=1), "PNG", {}, [(10, 20, 30), (255, 255, 255)]),
    "GIF transparency": (lambda: palette_image(transparency=0), "GIF", {}, [(255, 255, 255), (200, 100, 50)]),
    "L": (lambda: Image.new("L", (2, 1), 77), "PNG", {}, [(77, 77, 77)] * 2),
    "LA": (la_image, "PNG", {}, [(100, 100, 100), (255, 255, 255), (127, 127, 127)]),
    "CMYK": (cmyk_image, "TIFF", {}, [(255, 255, 255), (0, 255, 255)]),
    "I;16": (lambda: wide_image(np.uint16), "PNG", {}, [(0, 0, 0), (100, 100, 100), (255, 255, 255), (3, 3, 3)]),
    "I": (lambda: wide_image(np.int32), "TIFF", {}, [(0, 0, 0), (100, 100, 100), (255, 255, 255), (3, 3, 3)]),
    "RGBA": (rgba_image, "PNG", {}, [(1, 2, 3), (255, 255, 255), (227, 177, 127)]),
    "RGB+transparency": (rgb_keyed, "PNG", {"transparency": (1, 2, 3)}, [(255, 255, 255), (9, 9, 9)]),
    "1": (lambda: Image.new("1", (2, 1), 1), "BMP", {}, [(255, 255, 255)] * 2),
}


@pytest.mark.parametrize("case", MODES)
def test_every_mode_becomes_8bit_rgb(tmp_path, case):
    build, fmt, options, expected = MODES[case]
    path = tmp_path / f"img.{fmt.lower()}"
    source = build()
    source.save(path, fmt, **options)
    assert Image.open(path).mode == source.mode  # the file really holds that mode
    out = load_rgb(path)
    assert out.mode == "RGB"
    for x, rgb in enumerate(expected):
        assert_close(pixel(out, (x, 0)), rgb)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # red in print colours
    assert_close(pixel(load_rgb(path, min_size=(8, 8)), (4, 4)), (255, 0, 0), tol=4)


# ---------------------------------------------------------------- orientation and draft mode


def marked_jpeg(path, size, orientation=None):
    """Blue image with a red block in the stored top-left corner."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 4, size[1] // 4))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=90, exif=exif)
    return path


def is_red(rgb):
    return rgb[0] > 200 and rgb[2] < 60


@pytest.mark.parametrize("orientation, red_corner", [(6, "top-right"), (8, "bottom-left"), (3, "bottom-right")])
def test_exif_orientation_is_followed(tmp_path, orientation, red_corner):
    path = marked_jpeg(tmp_path / "phone.jpg", (80, 40), orientation)
    img = load_rgb(path)
    assert img.size == ((80, 40) if orientation == 3 else (40, 80))
    w, h = img.size
    corners = {"top-left": (2, 2), "top-right": (w - 3, 2), "bottom-left": (2, h - 3), "bottom-right": (w - 3, h - 3)}
    assert [name for name, xy in corners.items() if is_red(pixel(img, xy))] == [red_corner]


def test_draft_mode_decodes_the_smallest_sufficient_scale(tmp_path):
    path = marked_jpeg(tmp_path / "big.jpg", (2000, 1500))
    img = load_rgb(path, min_size=(224, 224))
    assert img.size == (500, 375)  # 1/4: 1/8 would be 250x188, under 224 high
    assert is_red(pixel(img, (5, 5))) and not is_red(pixel(img, (495, 370)))
    # (height, width): 400 high is 1/3 of 1500 but 1000 wide is 1/2 of 2000 -> 1/2, not the 1/1 of (w, h) mixed up
    assert load_rgb(path, min_size=(400, 1000)).size == (1000, 750)
    assert load_rgb(path, min_size=(4000, 4000)).size == (2000, 1500)
    assert load_rgb(path).size == (2000, 1500)


def test_draft_mode_accounts_for_rotation(tmp_path):
    path = marked_jpeg(tmp_path / "big.jpg", (2000, 1500), orientation=6)  # shown 1500 wide, 2000 high
    img = load_rgb(path, min_size=(224, 224))
    assert img.size == (375, 500)
    img = load_rgb(path, min_size=(1000, 400))  # shown: 1000 high fits 2000/2, 400 wide fits 1500/2
    assert img.size == (750, 1000)
    assert is_red(pixel(img, (745, 5)))  # stored top-left shows top-right


def test_multi_picture_phone_jpeg_uses_draft_mode(tmp_path):
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (2000, 1500)).save(path, "MPO", save_all=True, append_images=[Image.new("RGB", (200, 150))])
    assert Image.open(path).format == "MPO"
    assert load_rgb(path, min_size=(224, 224)).size == (500, 375)


def test_load_rgb_is_picklable_for_dataloader_workers():
    assert pickle.loads(pickle.dumps(load_rgb)) is load_rgb


# ---------------------------------------------------------------- listing and scanning


def test_list_images_skips_hidden_and_survives_symlink_loops(tmp_path):
    root = tmp_path / "data"
    for rel in ["cat/a.jpg", "cat/B.JPG", "cat/c.Png", "dog/sub/d.webp", "dog/e.tiff"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    for rel in ["cat/notes.txt", "cat/.DS_Store", "cat/._a.jpg", ".cache/x.jpg", "dog/.git/y.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    (root / "dog" / "sub" / "loop").symlink_to(root)  # back to the top: a loop
    (root / "cat" / "self").symlink_to(".")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "f.gif").touch()
    (root / "bird").symlink_to(outside)  # a linked class folder is followed
    (root / "cat" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(root / "cat" / "pipe.jpg")  # opening a pipe would block forever

    found = list_images(root)
    assert found == sorted(found)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "bird/f.gif",
        "cat/B.JPG",
        "cat/a.jpg",
        "cat/c.Png",
        "cat/dangling.jpg",
        "dog/e.tiff",
        "dog/sub/d.webp",
    ]
    skipped = {p.relative_to(root).as_posix(): why for p, why in walk_files(root) if why}
    assert skipped == {
        "cat/.DS_Store": "hidden, skipped",
        "cat/._a.jpg": "hidden, skipped",
        ".cache": "hidden, skipped",
        "dog/.git": "hidden, skipped",
        "dog/sub/loop": "symlink up the tree (a loop, or other folders read as this one), skipped",
        "cat/self": "symlink up the tree (a loop, or other folders read as this one), skipped",
    }
    assert reason_of(root / "cat" / "dangling.jpg").startswith("cannot read the file: No such file")


def split_with_links(tmp_path):
    """train/{ants,bees} with real images and every kind of folder link a user or a tool might leave."""
    root = tmp_path / "data" / "train"
    for rel in ["ants/a1.png", "ants/a2.png", "bees/b1.png", "bees/sub/b2.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)
    outside = tmp_path / "extra"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    (root / "ants" / "loop").symlink_to("..")  # up to the split: would read bees/ as ants
    (root / "ants" / "split").symlink_to(root)  # the same, absolute
    (root / "ants" / "above").symlink_to(tmp_path)  # an ancestor of the split
    (root / "ants" / "alias").symlink_to("../bees/sub")  # inside the split: already listed as bees
    (root / "ants" / "more").symlink_to(outside)  # outside: followed (how a folder is shared)
    (root / "bees" / "more").symlink_to(outside)  # the same folder again: already listed under ants
    (root / "wasps").symlink_to("bees")  # a class folder that is another class
    return root


def test_folder_links_up_or_back_into_the_split_are_not_read_as_this_class(tmp_path, caplog):
    root = split_with_links(tmp_path)
    folder = open_folder("data.train_dir", root)
    labelled = sorted((Path(p).relative_to(root).as_posix(), folder.classes[t]) for p, t in folder.samples)
    assert labelled == [
        ("ants/a1.png", "ants"),
        ("ants/a2.png", "ants"),
        ("ants/more/x.png", "ants"),
        ("bees/b1.png", "bees"),
        ("bees/sub/b2.png", "bees"),
    ]
    warned = {r.getMessage().split(": ", 1)[0] for r in caplog.records if r.levelname == "WARNING"}
    assert warned == {
        str(root / rel) for rel in ["ants/loop", "ants/split", "ants/above", "ants/alias", "bees/more", "wasps"]
    }


def test_list_split_and_walk_files_agree_on_every_file(tmp_path):
    root = split_with_links(tmp_path)
    classes, passed_over = list_split(root)
    assert list(classes) == ["ants", "bees"]
    walked = sorted(p for p, why in walk_files(root) if why is None)
    assert sorted(p for files in classes.values() for p in files) == walked
    why = {p.relative_to(root).as_posix(): reason for p, reason in passed_over}
    assert why == {
        "ants/loop": "symlink up the tree (a loop, or other folders read as this one), skipped",
        "ants/split": "symlink up the tree (a loop, or other folders read as this one), skipped",
        "ants/above": "symlink up the tree (a loop, or other folders read as this one), skipped",
        "ants/alias": "symlink into the data folder (listed under its own name), skipped",
        "bees/more": "second way into a folder already listed, skipped",
        "wasps": "symlink into the data folder (listed under its own name), skipped",
    }
    # a folder reached through an outside link may link back up to the data folder
    (tmp_path / "extra" / "back").symlink_to(root)
    assert dict(list_split(root)[1])[root / "ants" / "more" / "back"] == (
        "symlink up the tree (a loop, or other folders read as this one), skipped"
    )


def test_class_folder_names_that_cannot_be_shown_are_refused_before_training(tmp_path):
    """A folder name with bytes that are not UTF-8 (or a line break, a tab) trained one epoch, then failed to
    write metrics.csv and the log: it is now refused when the data is opened, naming the fix."""
    root = tmp_path / "train"
    for name in (b"caf\xe9", b"two\nlines", b"dog"):
        folder = os.path.join(os.fsencode(root), name)
        os.makedirs(folder)
        Image.new("RGB", (8, 8)).save(os.path.join(folder, b"a.png").decode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as info:
        open_folder("data.train_dir", root)
    assert str(info.value) == (
        f"{root}: class folder name(s) caf%E9, two%0Alines hold a line break, tab, control character or bytes that "
        "are not UTF-8 (shown as %XX); rename the folder(s) to use them as classes."
    )


def test_class_folders_with_spaces_are_classes(tmp_path):
    for name in ("big cat", " hot\u00a0dog ", "100%"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    assert open_folder("data.train_dir", tmp_path).classes == sorted(["big cat", " hot\u00a0dog ", "100%"])


def test_image_extensions():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def make_mixed(tmp_path):
    good = []
    for i in range(6):
        path = tmp_path / f"good{i}.png"
        Image.new("RGB", (8, 8), (i, i, i)).save(path)
        good.append(path)
    empty = tmp_path / "empty.jpg"
    empty.touch()
    half = truncated_jpeg(tmp_path / "half.jpg")
    return [good[0], empty, *good[1:4], half, *good[4:]], empty, half


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_images_reports_bad_files_in_order(tmp_path, workers):
    paths, empty, half = make_mixed(tmp_path)
    bad = scan_images(paths, workers=workers, progress=False)
    assert [p for p, _ in bad] == [empty, half]
    assert bad[0][1] == "empty file (0 bytes)" and "truncated" in bad[1][1]
    assert scan_images([], progress=False) == []


def test_scan_images_workers_see_the_pixel_limit(tmp_path, monkeypatch):
    paths, _, _ = make_mixed(tmp_path)
    big = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bad = scan_images(paths[:3] + [big], workers=2, progress=False)
    assert [p for p, _ in bad] == [paths[1], big]
    assert "decompression bomb" in bad[1][1]


def test_scan_images_progress_bar_goes_to_stderr(tmp_path, capsys):
    paths, _, _ = make_mixed(tmp_path)
    scan_images(paths, workers=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "checking images" in err


# ---------------------------------------------------------------- shapes no transform can use


def strip_png(path, size):
    Image.new("RGB", size, (200, 10, 10)).save(path, optimize=True)
    return path


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (21, 1), (4200, 200)])
def test_extreme_aspect_ratio_is_a_bad_image(tmp_path, size):
    path = strip_png(tmp_path / "strip.png", size)
    reason = reason_of(path)
    assert reason.startswith(f"extreme aspect ratio {size[0]}x{size[1]} (more than 20:1)")
    assert "MAX_ASPECT_RATIO" in reason


def test_a_20000x1_png_is_tiny_on_disk_and_refused_from_its_header(tmp_path):
    path = strip_png(tmp_path / "strip.png", (20000, 1))
    assert path.stat().st_size < 200  # what a scraper can pick up without noticing
    assert "extreme aspect ratio" in check_image(path)


@pytest.mark.parametrize("size", [(20, 1), (1, 20), (1600, 500)])
def test_elongated_but_usable_images_pass(tmp_path, size):
    assert load_rgb(strip_png(tmp_path / "ok.png", size)).size == size


@pytest.mark.parametrize("workers", [1, 2])
def test_aspect_limit_can_be_raised_and_workers_see_it(tmp_path, monkeypatch, workers):
    paths = [strip_png(tmp_path / f"{i}.png", (2000, 1)) for i in range(2)]
    assert [r for _, r in scan_images(paths, workers=workers, progress=False)] == [
        (
            "extreme aspect ratio 2000x1 (more than 20:1): fitted to the model's input it would be a thin line or a "
            "sliver of the picture. Crop it, or raise geektime.images.MAX_ASPECT_RATIO if such images are legitimate"
        )
    ] * 2
    monkeypatch.setattr(images, "MAX_ASPECT_RATIO", 5000)
    assert scan_images(paths, workers=workers, progress=False) == []
