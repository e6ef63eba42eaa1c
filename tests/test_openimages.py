"""geektime.openimages on a miniature set of Open Images CSV files, images served from 127.0.0.1."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from local_server import LocalServer, Route
from PIL import Image

from geektime.download import LOG_NAME
from geektime.openimages import main, rotate_box

RED, BLUE = (220, 30, 30), (30, 60, 220)
BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
)
IMAGE_HEADER = (
    "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,OriginalSize,"
    "OriginalMD5,Thumbnail300KURL,Rotation"
)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def square_on_blue() -> bytes:
    """100 x 100 blue with a red square from 25 to 75 on both axes."""
    pixels = np.full((100, 100, 3), BLUE)
    pixels[25:75, 25:75] = RED
    return jpeg(pixels)


def red_left_blue_right() -> bytes:
    """80 wide, 40 high: left half red, right half blue."""
    pixels = np.full((40, 80, 3), BLUE)
    pixels[:, :40] = RED
    return jpeg(pixels)


IMAGES = {
    "c1": square_on_blue(),
    "c2": red_left_blue_right(),
    "c3": square_on_blue(),
    "d1": red_left_blue_right(),
    "f1": square_on_blue(),
}


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@pytest.fixture
def oi(tmp_path):
    """(server, meta folder): the CSVs in the published layout; c4 is listed but not served."""
    with LocalServer() as server:
        for image_id, data in IMAGES.items():
            subset = "validation" if image_id == "d1" else "train"
            server.routes[f"/flickr/{image_id}.jpg"] = Route(data, content_type="image/jpeg")
            server.routes[f"/mirror/{subset}/{image_id}.jpg"] = Route(data, content_type="image/jpeg")
        meta = tmp_path / "meta"
        meta.mkdir()
        (meta / "class-descriptions-boxable.csv").write_text(
            "/m/cat,Cat\n/m/dog,Dog\n/m/fish,Fish\n/m/catfish,Catfish\n"
        )
        boxes = [
            ("c1", "/m/cat", 0.25, 0.75, 0.25, 0.75),
            ("f1", "/m/fish", 0, 1, 0, 1),
            ("c1", "/m/cat", 0.0, 0.5, 0.0, 0.5),
            ("c2", "/m/cat", 0.0, 0.5, 0.0, 1.0),
            ("c3", "/m/cat", 0, 1, 0, 1),
            ("c4", "/m/cat", 0, 1, 0, 1),
            ("c1", "/m/cat", 0.1, 0.15, 0.1, 0.15),
        ]
        (meta / "train-annotations-bbox.csv").write_text(
            BOX_HEADER
            + "\n"
            + "".join(f"{i},xclick,{label},1,{x0},{x1},{y0},{y1},0,0,0,0,0\n" for i, label, x0, x1, y0, y1 in boxes)
        )
        (meta / "validation-annotations-bbox.csv").write_text(BOX_HEADER + "\nd1,xclick,/m/dog,1,0,1,0,1,0,0,0,0,0\n")

        def image_row(image_id, subset, md5, rotation):
            return (
                f"{image_id},{subset},{server.url}/flickr/{image_id}.jpg,https://flickr.example/{image_id},"
                f'https://creativecommons.org/licenses/by/2.0/,,someone,"a, title",1000,{md5},,{rotation}\n'
            )

        (meta / "train-images-boxable-with-rotation.csv").write_text(
            IMAGE_HEADER
            + "\n"
            + "".join(
                [
                    image_row("f1", "train", md5_b64(IMAGES["f1"]), "0.0"),
                    image_row("c1", "train", md5_b64(IMAGES["c1"]), ""),
                    image_row("c2", "train", md5_b64(IMAGES["c2"]), "90.0"),
                    image_row("c3", "train", md5_b64(b"other bytes"), "nan"),
                    image_row("c4", "train", md5_b64(b"x"), "0.0"),
                ]
            )
        )
        (meta / "validation-images-with-rotation.csv").write_text(
            IMAGE_HEADER + "\n" + image_row("d1", "validation", md5_b64(IMAGES["d1"]), "180.0")
        )
        yield server, meta


def colour_of(path: Path) -> tuple[int, int, int]:
    with Image.open(path) as im:
        return tuple(int(v) for v in np.asarray(im.convert("RGB")).reshape(-1, 3).mean(0))


def close(a, b, tol=20) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def read_log(dest: Path) -> dict[str, dict]:
    with open(dest / LOG_NAME, newline="") as f:
        return {Path(row["url"]).stem: row for row in csv.DictReader(f)}


def test_whole_images_md5_and_rotation(oi, tmp_path, capsys):
    server, meta = oi
    dest = tmp_path / "out"
    assert main(["--classes", "cat, Dog", "--meta", str(meta), "--dest", str(dest), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 images: Cat 4, Dog 1" in out
    assert sorted(p.name for p in (dest / "Cat").iterdir()) == ["c1.jpg", "c2.jpg"]
    assert (dest / "Cat/c1.jpg").read_bytes() == IMAGES["c1"]  # not turned: byte for byte what was published
    with Image.open(dest / "Cat/c2.jpg") as im:  # turned 90 degrees counter-clockwise: red (left) now at the bottom
        assert im.size == (40, 80)
        pixels = np.asarray(im.convert("RGB"))
        assert close(pixels[70, 20], RED) and close(pixels[10, 20], BLUE)
        assert not im.getexif()
    with Image.open(dest / "Dog/d1.jpg") as im:  # 180: red now on the right
        pixels = np.asarray(im.convert("RGB"))
        assert im.size == (80, 40) and close(pixels[20, 70], RED) and close(pixels[20, 10], BLUE)
    log = read_log(dest)
    assert log["c3"]["status"] == "md5_mismatch" and log["c3"]["file"] == "_failed/Cat/c3.jpg"
    assert log["c4"]["status"] == "http_error"
    assert "f1" not in log and server.hits["/flickr/f1.jpg"] == 0  # Fish was not asked for

    assert main(["--classes", "Cat,Dog", "--meta", str(meta), "--dest", str(dest), "--quiet"]) == 0
    assert server.hits["/flickr/c2.jpg"] == 1  # a rerun keeps the turned file: it is never turned twice
    with Image.open(dest / "Cat/c2.jpg") as im:
        assert im.size == (40, 80)


def test_crops_from_mirror(oi, tmp_path, capsys):
    server, meta = oi
    dest = tmp_path / "out"
    assert (
        main(
            [
                "--classes",
                "Cat,Dog",
                "--meta",
                str(meta),
                "--dest",
                str(dest),
                "--crop",
                "--quiet",
                "--base-url",
                f"{server.url}/mirror/",
                "--max-per-class",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 images: Cat 2, Dog 1" in out
    assert "passed over 1 under 16 px" in out  # c1's third box is 5 x 5 px
    assert server.hits["/mirror/train/c1.jpg"] == 1 and server.hits["/mirror/validation/d1.jpg"] == 1
    assert sum(server.hits[f"/flickr/{i}.jpg"] for i in IMAGES) == 0
    assert sorted(p.name for p in (dest / "_images").iterdir()) == ["c1.jpg", "c2.jpg", "d1.jpg"]
    crops = {p.relative_to(dest).as_posix(): p for p in dest.glob("[!_]*/*.jpg")}
    assert sorted(crops) == ["Cat/c1_0.jpg", "Cat/c1_1.jpg", "Cat/c2_0.jpg", "Dog/d1_0.jpg"]
    with Image.open(crops["Cat/c1_0.jpg"]) as im:
        assert im.size == (50, 50)
    assert close(colour_of(crops["Cat/c1_0.jpg"]), RED)  # exactly the red square
    # c2's box was the red left half; after the 90 degree turn it is the bottom half, still all red.
    with Image.open(crops["Cat/c2_0.jpg"]) as im:
        assert im.size == (40, 40)
    assert close(colour_of(crops["Cat/c2_0.jpg"]), RED)
    with Image.open(crops["Dog/d1_0.jpg"]) as im:
        assert im.size == (80, 40)


def test_rotate_box_matches_turned_pixels():
    pixels = np.zeros((30, 60), np.uint8)
    pixels[3:9, 12:24] = 255  # box x 0.2..0.4, y 0.1..0.3
    for rotation, transpose in (
        (90, Image.Transpose.ROTATE_90),
        (180, Image.Transpose.ROTATE_180),
        (270, Image.Transpose.ROTATE_270),
    ):
        turned = np.asarray(Image.fromarray(pixels).transpose(transpose))
        h, w = turned.shape
        x0, x1, y0, y1 = rotate_box((0.2, 0.4, 0.1, 0.3), rotation)
        region = turned[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        assert region.size == 72 and region.min() == 255, rotation


@pytest.mark.parametrize(
    "classes, message",
    [
        ("Kat", "'Kat' is not a class of"),
        ("Catfsh", "did you mean Catfish"),
    ],
)
def test_unknown_class_is_one_line_error(oi, tmp_path, capsys, classes, message):
    _, meta = oi
    assert main(["--classes", classes, "--meta", str(meta), "--dest", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --classes:") and message in err and err.count("\n") == 1


def test_missing_metadata_is_named(tmp_path, capsys):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "class-descriptions-boxable.csv").write_text("/m/cat,Cat\n")
    assert main(["--classes", "Cat", "--meta", str(tmp_path / "meta"), "--dest", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no CSV file of boxes (*-annotations-bbox.csv) or images with URLs" in err
