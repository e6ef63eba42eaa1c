from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from geektime.badcases import (
    badcases_json,
    find_badcases,
    format_badcases,
    losses,
    main,
    most_confused,
    top_losses,
    write_gallery,
)
from geektime.clean import main as clean_main
from geektime.predictions import Predictions, read_predictions, write_predictions

REPO = Path(__file__).resolve().parents[1]
REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared/datasets/doraemon_walle"
RED, BLUE = (220, 30, 30), (30, 60, 220)


class GalleryParser(HTMLParser):
    """Collects what a browser would show, and checks that every element is closed in order."""

    VOID = frozenset({"meta", "img", "br", "link", "input", "hr"})

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.links, self.figures, self.text = [], [], [], [], 0, []
        self.doctype = None
        self.selects, self.options = [], []

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "figure":
            self.figures += 1
        elif tag == "select":
            self.selects.append(attrs)
            self.options.append([])
        elif tag == "option":
            self.options[-1].append(attrs["value"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        self.text.append(data)


def parse_gallery(path: Path) -> GalleryParser:
    parser = GalleryParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.doctype == "DOCTYPE html"
    assert parser.errors == [] and parser.stack == []
    return parser


def decode_data_uri(src: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    image.load()
    return image


@pytest.fixture
def gallery_case(tmp_path, monkeypatch):
    """Images on disk and a prediction txt with relative paths, read from tmp_path as cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images/logo").mkdir(parents=True)
    (tmp_path / "images/others").mkdir(parents=True)
    Image.new("RGB", (120, 80), RED).save("images/logo/真 logo 1.jpg")
    Image.new("RGB", (90, 90), BLUE).save("images/others/a&b <2>.png")
    rotated = Image.new("RGB", (200, 100), BLUE)
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display, so it shows as 100 x 200
    rotated.save("images/others/rotated.jpg", exif=exif)
    Path("images/logo/broken.jpg").write_bytes(b"not an image")
    lines = [  # (path, truth, p(logo)); predicted = argmax
        ("images/logo/真 logo 1.jpg", 0, 0.90),
        ("images/others/a&b <2>.png", 1, 0.70),  # false positive, confidence 0.70
        ("images/others/rotated.jpg", 1, 0.95),  # false positive, confidence 0.95
        ("images/logo/missing.jpg", 0, 0.20),  # false negative, confidence 0.80
        ("images/logo/broken.jpg", 0, 0.40),  # false negative, confidence 0.60
        ("images/logo/unlabeled.jpg", -1, 0.99),  # unlabeled: never a bad case
        ("images/others/right.png", 1, 0.10),
    ]
    txt = tmp_path / "eval" / "epoch_002.txt"
    write_predictions(
        txt,
        ["logo", "others"],
        np.array([[p, 1 - p] for _, _, p in lines]),
        np.array([t for _, t, _ in lines]),
        [path for path, _, _ in lines],
        header={"checkpoint": "epoch_002.pth"},
    )
    return txt


def test_find_badcases_sorts_by_confidence(gallery_case):
    pred = read_predictions(gallery_case)
    assert find_badcases(pred, "logo") == {"false_positives": [2, 1], "false_negatives": [3, 4]}
    assert find_badcases(pred, "others") == {"false_positives": [3, 4], "false_negatives": [2, 1]}
    assert find_badcases(pred) == {"wrong": [2, 3, 1, 4]}
    with pytest.raises(ValueError, match="unknown class 'cat'; choose one of: logo, others"):
        find_badcases(pred, "cat")


def test_find_badcases_three_classes_and_ties():
    probs = np.array(
        [
            [0.5, 0.3, 0.2],  # dog predicted cat (0.5)
            [0.1, 0.2, 0.7],  # dog predicted bird (0.7)
            [0.6, 0.3, 0.1],  # bird predicted cat (0.6)
            [0.5, 0.4, 0.1],  # dog predicted cat (0.5): ties with line 0, keeps file order
            [0.1, 0.8, 0.1],  # dog right
        ]
    )
    pred = Predictions(["cat", "dog", "bird"], probs, np.array([1, 1, 2, 1, 1]), probs.argmax(1), list("abcde"), {})
    assert find_badcases(pred, "dog") == {"false_positives": [], "false_negatives": [1, 0, 3]}
    assert find_badcases(pred, "cat") == {"false_positives": [2, 0, 3], "false_negatives": []}
    assert find_badcases(pred) == {"wrong": [1, 2, 0, 3]}


def test_format_badcases_table(gallery_case):
    pred = read_predictions(gallery_case)
    text = format_badcases(pred, find_badcases(pred, "logo"), limit=1)
    lines = text.splitlines()
    assert lines[0] == "false positives: 2, showing the 1 most confident"
    assert lines[1].split() == ["#", "p(pred)", "true", "predicted", "path"]
    assert lines[2].split(maxsplit=4) == ["1", "0.95000", "others", "logo", "images/others/rotated.jpg"]
    assert lines[4] == "false negatives: 2, showing the 1 most confident"
    assert lines[6].split(maxsplit=4) == ["1", "0.80000", "logo", "others", "images/logo/missing.jpg"]
    assert format_badcases(pred, {"wrong": []}) == "wrong predictions: none"


def test_gallery_is_valid_html_referencing_every_listed_image(gallery_case, tmp_path):
    pred = read_predictions(gallery_case)
    cases = find_badcases(pred, "logo")
    html_path = tmp_path / "eval" / "gallery.html"
    assert write_gallery(pred, cases, html_path) == 2  # missing.jpg and broken.jpg
    parsed = parse_gallery(html_path)

    listed = [pred.paths[i] for group in cases.values() for i in group]
    assert parsed.figures == len(listed) == 4
    # Links are relative to the gallery's folder and percent-encoded (space, &, <, Chinese).
    assert parsed.links[0] == "../images/others/rotated.jpg"
    assert parsed.links[1] == "../images/others/a%26b%20%3C2%3E.png"
    resolved = [(html_path.parent / unquote(href)).resolve() for href in parsed.links]
    assert resolved == [(tmp_path / path).resolve() for path in listed]

    text = " ".join(parsed.text)
    for path in listed:
        assert path in text  # shown as text, escaped in the source
    source = html_path.read_text(encoding="utf-8")
    assert "a&b <2>" not in source and "a&amp;b &lt;2&gt;.png" in source
    assert text.count("image not found") == 1 and text.count("cannot read image") == 1
    assert "checkpoint: epoch_002.pth" in text
    assert "False positives (2)" in text and "False negatives (2)" in text

    # Only the two readable images get thumbnails, embedded, in list order.
    assert [img["alt"] for img in parsed.imgs] == ["images/others/rotated.jpg", "images/others/a&b <2>.png"]
    rotated, square = (decode_data_uri(img["src"]) for img in parsed.imgs)
    assert rotated.size == (80, 160)  # EXIF orientation applied, then fit into 160 x 160
    assert square.size == (90, 90)  # small images are not enlarged
    assert all(abs(a - b) < 12 for a, b in zip(square.getpixel((45, 45)), BLUE))
    # Self-contained: nothing fetched, one inline script.
    assert 'src="http' not in source and "<link" not in source and "<script src" not in source
    assert source.count("<script>") == 1


def test_gallery_limit_and_empty_group(gallery_case, tmp_path):
    pred = read_predictions(gallery_case)
    html_path = tmp_path / "limited.html"
    write_gallery(pred, {"false_positives": [2, 1], "false_negatives": []}, html_path, thumb_size=64, limit=1)
    parsed = parse_gallery(html_path)
    text = " ".join(parsed.text)
    assert parsed.figures == 1
    assert "False positives (showing 1 of 2)" in text and "False negatives (0)" in text and "None." in text
    assert decode_data_uri(parsed.imgs[0]["src"]).size == (32, 64)


def test_cli_writes_table_and_default_gallery(gallery_case, capsys):
    assert main([str(gallery_case), "--positive", "logo", "--limit", "1"]) == 0
    out, err = capsys.readouterr()
    assert "false positives: 2, showing the 1 most confident" in out
    assert out.rstrip().splitlines()[-2:] == [
        f"gallery: {gallery_case.with_name('epoch_002_badcases.html')}",
        f"json: {gallery_case.with_name('epoch_002_badcases.json')}",
    ]
    assert err.startswith("warning: 1 of 2 images could not be read")  # the top false negative is missing
    parsed = parse_gallery(gallery_case.with_name("epoch_002_badcases.html"))
    assert parsed.figures == 2


def test_cli_warns_about_unreadable_images(gallery_case, tmp_path, capsys):
    out_html = tmp_path / "all.html"
    assert main([str(gallery_case), "--out", str(out_html)]) == 0
    _, err = capsys.readouterr()
    assert err.startswith("warning: 2 of 4 images could not be read")
    assert parse_gallery(out_html).figures == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.txt"], "error: cannot read missing.txt: No such file or directory"),
        (["{txt}", "--positive", "cat"], "error: unknown class 'cat'; choose one of: logo, others"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(gallery_case, capsys, argv, message):
    assert main([a.format(txt=gallery_case) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == message + "\n"


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "geektime.badcases", str(tmp_path / "nope.txt")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: cannot read {tmp_path / 'nope.txt'}: No such file or directory\n"


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason=f"real photos not found at {REAL_PHOTOS}")
def test_gallery_of_real_photos(tmp_path):
    photos = [
        photo for name in ("doraemon", "walle") for photo in sorted((REAL_PHOTOS / "valid" / name).glob("*.jpg"))[:2]
    ]
    assert len(photos) == 4
    # Every photo is predicted as the other class, with falling confidence.
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    txt = tmp_path / "real.txt"
    write_predictions(txt, ["doraemon", "walle"], probs, np.array([0, 0, 1, 1]), [str(p) for p in photos])
    pred = read_predictions(txt)
    cases = find_badcases(pred)
    assert cases == {"wrong": [0, 1, 2, 3]}
    html_path = tmp_path / "real.html"
    assert write_gallery(pred, cases, html_path) == 0
    parsed = parse_gallery(html_path)
    for img, photo in zip(parsed.imgs, photos):
        with Image.open(photo) as original:
            width, height = original.size
        thumb = decode_data_uri(img["src"])
        assert max(thumb.size) == min(160, max(width, height))
        assert thumb.size[0] / thumb.size[1] == pytest.approx(width / height, rel=0.05)
    assert [(html_path.parent / unquote(href)).resolve() for href in parsed.links] == [p.resolve() for p in photos]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_gallery_screenshot_in_headless_chromium(gallery_case, tmp_path):
    pred = read_predictions(gallery_case)
    html_path = tmp_path / "shot.html"
    # Give the red logo image its own false negative so that its thumbnail is on the page.
    pred.predicted[0] = 1
    write_gallery(pred, find_badcases(pred), html_path)
    screenshot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--screenshot={screenshot}",
            "--window-size=1200,900",
            html_path.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert screenshot.is_file()
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB")).astype(int).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # not blank: text, borders, thumbnails
    # The embedded thumbnails were decoded and drawn: red and blue areas of some size.
    for color in (RED, BLUE):
        assert (np.abs(pixels - color).max(axis=1) < 25).sum() > 1000


def three_class_predictions() -> Predictions:
    probs = np.array(
        [
            [0.5, 0.3, 0.2],  # dog predicted cat: loss -ln 0.3
            [0.1, 0.2, 0.7],  # dog predicted bird: -ln 0.2
            [0.6, 0.3, 0.1],  # bird predicted cat: -ln 0.1
            [0.5, 0.4, 0.1],  # dog predicted cat: -ln 0.4
            [0.45, 0.55, 0.0],  # dog right, but barely: -ln 0.55
            [0.0, 1.0, 0.0],  # unlabeled
            [0.01, 0.98, 0.01],  # dog right: -ln 0.98
        ]
    )
    return Predictions(
        ["cat", "dog", "bird"],
        probs,
        np.array([1, 1, 2, 1, 1, -1, 1]),
        probs.argmax(1),
        [f"{c}.jpg" for c in "abcdefg"],
        {},
    )


def test_top_losses_rank_right_and_wrong_by_loss():
    pred = three_class_predictions()
    loss = losses(pred)
    assert loss[:5] == pytest.approx(-np.log([0.3, 0.2, 0.1, 0.4, 0.55]))
    assert np.isnan(loss[5])
    assert top_losses(pred) == [2, 1, 0, 3, 4, 6]  # the right-but-unsure line 4 ranks above the sure one
    assert top_losses(pred, 2) == [2, 1]
    zero = Predictions(["a", "b"], np.array([[1.0, 0.0]]), np.array([1]), np.array([0]), ["z.jpg"], {})
    assert np.isfinite(losses(zero)).all()  # p(true) = 0 is floored, not infinite


def test_most_confused_counts_pairs():
    pred = three_class_predictions()
    assert most_confused(pred) == [("dog", "cat", 2), ("dog", "bird", 1), ("bird", "cat", 1)]
    report = badcases_json(pred, {"wrong": find_badcases(pred)["wrong"], "top_losses": top_losses(pred, 3)})
    assert report["most_confused"][0] == {"actual": "dog", "predicted": "cat", "count": 2}
    assert [e["path"] for e in report["top_losses"]] == ["c.jpg", "b.jpg", "a.jpg"]
    assert report["top_losses"][0]["loss"] == pytest.approx(-np.log(0.1), abs=1e-5)
    assert report["top_losses"][0]["true"] == "bird" and report["top_losses"][0]["predicted"] == "cat"


def test_cli_top_losses_table_json_and_controls(gallery_case, tmp_path, capsys):
    html_path = tmp_path / "g.html"
    assert main([str(gallery_case), "--top-losses", "3", "--out", str(html_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("top losses: 3")
    assert lines[start + 1].split() == ["#", "loss", "p(true)", "true", "predicted", "path"]
    # Highest loss first: rotated.jpg (p(true) 0.05), missing.jpg (0.20), a&b <2>.png (0.30).
    assert [line.split(maxsplit=5)[-1] for line in lines[start + 2 : start + 5]] == [
        "images/others/rotated.jpg",
        "images/logo/missing.jpg",
        "images/others/a&b <2>.png",
    ]
    assert lines[start + 2].split()[1] == f"{-np.log(0.05):.4f}"
    assert "most confused (actual -> predicted: count)" in out and "  others -> logo: 2" in out

    report = json.loads(gallery_case.with_name("epoch_002_badcases.json").read_text(encoding="utf-8"))
    assert report["most_confused"] == [
        {"actual": "logo", "predicted": "others", "count": 2},
        {"actual": "others", "predicted": "logo", "count": 2},
    ]
    assert [e["path"] for e in report["top_losses"]] == [
        "images/others/rotated.jpg",
        "images/logo/missing.jpg",
        "images/others/a&b <2>.png",
    ]
    assert len(report["wrong"]) == 4

    parsed = parse_gallery(html_path)
    assert parsed.figures == len(parsed.selects) == 4 + 3
    for select, options in zip(parsed.selects, parsed.options):
        assert Path(select["data-path"]).is_absolute()
        other = "others" if select["data-label"] == "logo" else "logo"
        assert options == ["keep", "delete", f"move:{other}"]
    assert parsed.selects[0]["data-path"] == str(tmp_path / "images/others/rotated.jpg")


def chrome(download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"{CHROMIUM} or {CHROMEDRIVER} is not installed",
)
def test_gallery_choices_download_cleaning_csv_that_clean_applies(gallery_case, tmp_path):
    """In a real headless Chromium: choose, download cleaning.csv, apply it, undo it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    html_path = tmp_path / "g.html"
    assert main([str(gallery_case), "--top-losses", "3", "--out", str(html_path)]) == 0
    rotated, odd = tmp_path / "images/others/rotated.jpg", tmp_path / "images/others/a&b <2>.png"
    before = {p: p.read_bytes() for p in (rotated, odd)}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome(downloads)
    try:
        driver.get(html_path.as_uri())
        selects = driver.find_elements(By.CSS_SELECTOR, "select.decision")
        assert len(selects) == 7
        by_path = {}
        for element in selects:
            by_path.setdefault(element.get_attribute("data-path"), []).append(element)
        assert len(by_path[str(rotated)]) == 2  # in "wrong" and in "top losses"
        Select(by_path[str(rotated)][0]).select_by_visible_text("move to logo")
        Select(by_path[str(odd)][1]).select_by_visible_text("delete")
        # One choice per image: its other figure follows, and both are outlined.
        assert Select(by_path[str(rotated)][1]).first_selected_option.text == "move to logo"
        assert Select(by_path[str(odd)][0]).first_selected_option.text == "delete"
        assert "move" in by_path[str(rotated)][1].find_element(By.XPATH, "ancestor::figure").get_attribute("class")
        assert driver.find_element(By.ID, "decision-count").text == "2 image(s) to delete or move"
        driver.find_element(By.ID, "download-cleaning").click()
        target = downloads / "cleaning.csv"
        deadline = time.monotonic() + 20
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert target.exists(), f"no download: {list(downloads.iterdir())}"
    finally:
        driver.quit()
    with open(target, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["path"], r["action"], r["label"], r["to_class"]) for r in rows) == [
        (str(odd), "delete", "others", ""),
        (str(rotated), "move", "others", "logo"),
    ]

    quarantine = tmp_path / "quarantine"
    assert clean_main(["apply", str(target), "--quarantine", str(quarantine), "--log", str(tmp_path / "undo.csv")]) == 0
    assert not rotated.exists() and not odd.exists()
    assert (tmp_path / "images/logo/rotated.jpg").read_bytes() == before[rotated]
    assert (quarantine / "others/a&b <2>.png").read_bytes() == before[odd]
    assert clean_main(["undo", str(tmp_path / "undo.csv")]) == 0
    assert {p: p.read_bytes() for p in (rotated, odd)} == before
    assert not (tmp_path / "images/logo/rotated.jpg").exists()
