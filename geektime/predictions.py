"""Prediction txt files: the one format every evaluation tool writes and reads.

One line per image, for C classes::

    # classes: logo others
    # checkpoint: epoch_003.pth
    0.64460 0.35540 1 0 1 0 ./data/val/logo/13.jpeg

C probabilities (5 decimals, in class order, summing to 1), the C-wide one-hot of the true class
(all zeros for an unlabeled image), the C-wide one-hot of the predicted class, then the image
path. The path is everything after the 3C-th field, so spaces and non-ASCII characters survive.
Lines starting with ``#`` are comments; ``# key: value`` comments form the header, and
``classes`` is required. A person may edit the file by hand (say, to fix a wrong label), so the
reader keeps both one-hot blocks as written and only checks that each one is well formed, that
each row sums to 1 and that no path appears twice.

Names a line cannot hold as they are (a class folder named "big cat", a file name with a line
break or with bytes that are not UTF-8, a path starting or ending with a space) are written
percent-escaped, and the file then says so in its header::

    # classes: big%20cat dog
    # escaping: percent
    0.90000 0.10000 1 0 1 0 ./val/big%20cat/two%0Alines.jpg

In such a file every class name, path and header value is read with ``%XX`` standing for the
byte XX (a ``%`` not followed by two hex digits is itself) and the bytes decoded as the file
system does (os.fsdecode), so any name round-trips; ``%`` itself is written ``%25``. A file
whose names need no escaping is written without the header, exactly as before.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np

_HEADER_RE = re.compile(r"#\s*([A-Za-z0-9_.-]+)\s*:\s*(.*)")
_HEADER_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")
ESCAPING = "percent"  # the value of the "# escaping:" header of a file with escaped names
_RESERVED = ("classes", "escaping")  # header keys the format itself writes
# Characters a line cannot carry as they are: control characters (line breaks, tabs, ...), the line and
# paragraph separators that editors break lines at, and lone surrogates (os.fsdecode's stand-ins for bytes
# that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class PredictionFormatError(ValueError):
    """A prediction txt that cannot be read; the message starts with ``file:line:``."""


@dataclass
class Predictions:
    """One prediction txt in memory; row i is the file's i-th data line."""

    classes: list[str]
    probs: np.ndarray  # (N, C) float
    targets: np.ndarray  # (N,) int, -1 = unlabeled
    predicted: np.ndarray  # (N,) int
    paths: list[str]
    header: dict[str, str]  # every "# key: value" line except classes and escaping


def class_index(classes: Sequence[str], name: str) -> int:
    """Position of ``name`` in ``classes``, with an error that lists the valid choices."""
    if name not in classes:
        raise ValueError(f"unknown class {name!r}; choose one of: {', '.join(classes)}")
    return list(classes).index(name)


def _check_classes(classes: Sequence[str]) -> None:
    if not classes:
        raise ValueError("classes is empty")
    for name in classes:
        if not isinstance(name, str) or not name:
            raise ValueError(f"class name {name!r} must be a non-empty string")
    duplicates = sorted(name for name, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate class names: {', '.join(printable(d) for d in duplicates)}")


def _needs_escaping(text: str, spaces: bool) -> bool:
    """Whether `text` must be escaped to survive a line: unsafe characters, surrounding whitespace, or (for a
    class name, `spaces`) whitespace anywhere."""
    return bool(_UNSAFE.search(text)) or text != text.strip() or (spaces and any(c.isspace() for c in text))


def _escape(text: str, spaces: bool) -> str:
    """Percent-escape "%" and what _needs_escaping objects to, keeping everything else as it is."""
    inner = range(len(text) - len(text.lstrip()), len(text.rstrip()))
    out = []
    for i, char in enumerate(text):
        if char == "%" or _UNSAFE.match(char) or (char.isspace() and (spaces or i not in inner)):
            out.append(_percent(char))
        else:
            out.append(char)
    return "".join(out)


def _unescape(text: str) -> str:
    return os.fsdecode(unquote_to_bytes(text))


def printable(text: str | os.PathLike) -> str:
    """`text` on one printable line: control characters, line breaks and undecodable bytes as %XX.

    For showing a path or class name to a person (a table, a log, an HTML page); unlike the txt's escaping,
    "%" and spaces are left as they are, so ordinary names read unchanged."""
    return _UNSAFE.sub(lambda m: _percent(m.group()), os.fspath(text))


def _percent(char: str) -> str:
    """%XX for each byte of `char` as the file system stores it (a lone surrogate no file name holds: UTF-8)."""
    try:
        data = os.fsencode(char)
    except UnicodeEncodeError:
        data = char.encode("utf-8", "surrogatepass")
    return "".join(f"%{byte:02X}" for byte in data)


def _row_sum_tolerance(num_classes: int) -> float:
    """How far from 1 a row of probabilities written with 5 decimals may sum: each rounds by up to 0.5e-5."""
    return num_classes * 0.5e-5 + 1e-6


def write_predictions(
    path: str | os.PathLike,
    classes: Sequence[str],
    probs: np.ndarray,
    targets: np.ndarray,
    paths: Sequence[str | os.PathLike],
    header: Mapping[str, object] | None = None,
) -> None:
    """Write one line per image; the predicted class is the argmax of ``probs``.

    ``targets`` holds class indices, -1 for an unlabeled image. The file is written to a
    temporary name and renamed, so a reader never sees half a file.
    """
    _check_classes(classes)
    num_classes = len(classes)
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    paths = [os.fspath(p) for p in paths]
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (N, {num_classes}), got {probs.shape}")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits first)")
    if targets.shape != (len(probs),) or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"targets must be {len(probs)} integers, got {targets.dtype} of shape {targets.shape}")
    targets = targets.astype(np.int64)
    if ((targets < -1) | (targets >= num_classes)).any():
        raise ValueError(f"targets must be class indices in [0, {num_classes}) or -1 (unlabeled)")
    if len(paths) != len(probs):
        raise ValueError(f"got {len(paths)} paths for {len(probs)} rows of probs")
    if any(not p for p in paths):
        raise ValueError("an image path is empty")
    duplicates = sorted(printable(p) for p, n in Counter(paths).items() if n > 1)
    if duplicates:
        raise ValueError(f"image paths appear more than once: {', '.join(duplicates)}")
    header = {key: str(value) for key, value in (header or {}).items()}
    for key in header:
        if key in _RESERVED or not _HEADER_KEY_RE.fullmatch(key):
            raise ValueError(f"bad header item {key!r} (keys are [A-Za-z0-9_.-]+ other than {' and '.join(_RESERVED)})")
    for text in [*classes, *paths, *header.values()]:
        try:
            os.fsencode(text)
        except UnicodeEncodeError:
            raise ValueError(f"{printable(text)!r} holds a lone surrogate, which no file name can hold") from None
    escaped = any(_needs_escaping(c, spaces=True) for c in classes) or any(
        _needs_escaping(p, spaces=False) for p in [*paths, *header.values()]
    )

    def out(text: str, spaces: bool = False) -> str:
        return _escape(text, spaces) if escaped else text

    lines = ["# classes: " + " ".join(out(c, spaces=True) for c in classes)]
    if escaped:
        lines.append(f"# escaping: {ESCAPING}")
    lines += [f"# {key}: {out(value)}" for key, value in header.items()]
    eye = np.eye(num_classes, dtype=np.int64)
    no_label = np.zeros(num_classes, dtype=np.int64)
    tolerance = _row_sum_tolerance(num_classes)
    for row, (p, t, k, image_path) in enumerate(zip(probs, targets, probs.argmax(axis=1), paths)):
        written = [f"{x:.5f}" for x in p]
        total = sum(float(x) for x in written)
        if abs(total - 1) > tolerance:
            raise ValueError(
                f"probs row {row} ({printable(image_path)}) sums to {total:.5f}, not 1 (apply softmax to logits first)"
            )
        truth = eye[t] if t >= 0 else no_label
        fields = written + [str(x) for x in truth] + [str(x) for x in eye[k]]
        lines.append(" ".join(fields) + " " + out(image_path))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600), and os.replace would keep that mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _one_hot(tokens: list[str], allow_zero: bool) -> int:
    """Index of the single 1 in a block of "0"/"1" tokens; -1 for all zeros when allowed."""
    if any(t not in ("0", "1") for t in tokens):
        raise ValueError(f"one-hot block {' '.join(tokens)!r} must contain only 0 and 1")
    ones = tokens.count("1")
    if ones == 1:
        return tokens.index("1")
    if ones == 0 and allow_zero:
        return -1
    expected = "exactly one 1 (or all zeros for an unlabeled image)" if allow_zero else "exactly one 1"
    raise ValueError(f"one-hot block {' '.join(tokens)!r} must contain {expected}")


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read a prediction txt, checking every line; errors name the file and line number."""
    header: dict[str, str] = {}
    classes: list[str] | None = None
    probs, targets, predicted, paths, path_lines = [], [], [], [], []
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        raise PredictionFormatError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{data[err.start]:02X}); save the file as UTF-8"
        ) from None
    # Split on "\n" only: str.splitlines() would also break paths at characters like U+2028.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        if line.startswith("#"):
            match = _HEADER_RE.fullmatch(line.strip())
            if match is None:
                continue  # a free-form comment
            key, value = match.groups()
            if key in header or (key == "classes" and classes is not None):
                raise PredictionFormatError(f"{where}: header {key!r} appears twice")
            if key == "escaping" and value != ESCAPING:
                raise PredictionFormatError(f"{where}: unknown escaping {value!r}; this version reads {ESCAPING!r}")
            if key != "classes":
                header[key] = value
                continue
            classes = value.split()
            classes_line = lineno
            continue
        if classes is None:
            raise PredictionFormatError(
                f"{where}: data line before the '# classes: <name> <name> ...' header, which is required"
            )
        c = len(classes)
        fields = line.split(maxsplit=3 * c)
        if len(fields) != 3 * c + 1:
            raise PredictionFormatError(
                f"{where}: expected {c} probabilities, two one-hot blocks of {c} and a path, got {len(fields)} fields"
            )
        try:
            p = [float(x) for x in fields[:c]]
            if not all(0.0 <= x <= 1.0 for x in p):  # also rejects nan
                raise ValueError(f"probabilities {' '.join(fields[:c])!r} must lie in [0, 1]")
            if abs(sum(p) - 1) > _row_sum_tolerance(c):
                raise ValueError(f"probabilities {' '.join(fields[:c])!r} sum to {sum(p):.5f}, not 1")
            t = _one_hot(fields[c : 2 * c], allow_zero=True)
            k = _one_hot(fields[2 * c : 3 * c], allow_zero=False)
        except ValueError as e:
            raise PredictionFormatError(f"{where}: {e}") from None
        probs.append(p)
        targets.append(t)
        predicted.append(k)
        paths.append(fields[-1])
        path_lines.append(lineno)
    if classes is None:
        raise PredictionFormatError(f"{path}: no '# classes: <name> <name> ...' header")
    if header.pop("escaping", None) is not None:
        classes = [_unescape(name) for name in classes]
        paths = [_unescape(p) for p in paths]
        header = {key: _unescape(value) for key, value in header.items()}
    try:
        _check_classes(classes)
    except ValueError as e:
        raise PredictionFormatError(f"{path}:{classes_line}: {e}") from None
    first_line: dict[str, int] = {}
    for image_path, lineno in zip(paths, path_lines):
        if image_path in first_line:
            raise PredictionFormatError(
                f"{path}:{lineno}: image {printable(image_path)!r} appears twice, on lines {first_line[image_path]} "
                f"and {lineno}; keep one of them"
            )
        first_line[image_path] = lineno
    return Predictions(
        classes=classes,
        probs=np.array(probs, dtype=np.float64).reshape(-1, len(classes)),
        targets=np.array(targets, dtype=np.int64),
        predicted=np.array(predicted, dtype=np.int64),
        paths=paths,
        header=header,
    )
