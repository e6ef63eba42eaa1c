"""Prediction txt files: the one format every evaluation tool writes and reads.

One line per image, for C classes::

    # classes: logo others
    # checkpoint: epoch_003.pth
    0.64460 0.35540 1 0 1 0 ./data/val/logo/13.jpeg

C probabilities (5 decimals, in class order), the C-wide one-hot of the true class (all zeros
for an unlabeled image), the C-wide one-hot of the predicted class, then the image path. The
path is everything after the 3C-th field, so spaces and non-ASCII characters survive. Lines
starting with ``#`` are comments; ``# key: value`` comments form the header, and ``classes`` is
required. A person may edit the file by hand (say, to fix a wrong label), so the reader keeps
both one-hot blocks as written and only checks that each one is well formed.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_HEADER_RE = re.compile(r"#\s*([A-Za-z0-9_.-]+)\s*:\s*(.*)")
_HEADER_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")


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
    header: dict[str, str]  # every "# key: value" line except classes


def class_index(classes: Sequence[str], name: str) -> int:
    """Position of ``name`` in ``classes``, with an error that lists the valid choices."""
    if name not in classes:
        raise ValueError(f"unknown class {name!r}; choose one of: {', '.join(classes)}")
    return list(classes).index(name)


def _check_classes(classes: Sequence[str]) -> None:
    if not classes:
        raise ValueError("classes is empty")
    for name in classes:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(
                f"class name {name!r} is empty or contains whitespace; the txt header separates "
                "class names with spaces"
            )
    duplicates = sorted(name for name, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate class names: {', '.join(duplicates)}")


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
    for image_path in paths:
        if not image_path or "\n" in image_path or "\r" in image_path or image_path != image_path.strip():
            raise ValueError(
                f"image path {image_path!r} is empty, contains a line break or starts/ends with "
                "whitespace, so it cannot be stored on one line"
            )

    lines = ["# classes: " + " ".join(classes)]
    for key, value in (header or {}).items():
        value = str(value)
        if key == "classes" or not _HEADER_KEY_RE.fullmatch(key) or "\n" in value or "\r" in value:
            raise ValueError(
                f"bad header item {key!r}: {value!r} (keys are [A-Za-z0-9_.-]+ other than "
                "'classes'; values are one line)"
            )
        lines.append(f"# {key}: {value.strip()}")
    eye = np.eye(num_classes, dtype=np.int64)
    no_label = np.zeros(num_classes, dtype=np.int64)
    for p, t, k, image_path in zip(probs, targets, probs.argmax(axis=1), paths):
        truth = eye[t] if t >= 0 else no_label
        fields = [f"{x:.5f}" for x in p] + [str(x) for x in truth] + [str(x) for x in eye[k]]
        lines.append(" ".join(fields) + " " + image_path)

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
    probs, targets, predicted, paths = [], [], [], []
    # Split on "\n" only: str.splitlines() would also break paths at characters like U+2028.
    text = Path(path).read_text(encoding="utf-8-sig")
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
            if key != "classes":
                header[key] = value
                continue
            classes = value.split()
            try:
                _check_classes(classes)
            except ValueError as e:
                raise PredictionFormatError(f"{where}: {e}") from None
            continue
        if classes is None:
            raise PredictionFormatError(
                f"{where}: data line before the '# classes: <name> <name> ...' header, which is required"
            )
        c = len(classes)
        fields = line.split(maxsplit=3 * c)
        if len(fields) != 3 * c + 1:
            raise PredictionFormatError(
                f"{where}: expected {c} probabilities, two one-hot blocks of {c} and a path, "
                f"got {len(fields)} fields"
            )
        try:
            p = [float(x) for x in fields[:c]]
            if not all(0.0 <= x <= 1.0 for x in p):  # also rejects nan
                raise ValueError(f"probabilities {' '.join(fields[:c])!r} must lie in [0, 1]")
            t = _one_hot(fields[c : 2 * c], allow_zero=True)
            k = _one_hot(fields[2 * c : 3 * c], allow_zero=False)
        except ValueError as e:
            raise PredictionFormatError(f"{where}: {e}") from None
        probs.append(p)
        targets.append(t)
        predicted.append(k)
        paths.append(fields[-1])
    if classes is None:
        raise PredictionFormatError(f"{path}: no '# classes: <name> <name> ...' header")
    return Predictions(
        classes=classes,
        probs=np.array(probs, dtype=np.float64).reshape(-1, len(classes)),
        targets=np.array(targets, dtype=np.int64),
        predicted=np.array(predicted, dtype=np.int64),
        paths=paths,
        header=header,
    )
