"""Classification metrics, their one set of names, and choosing the best epoch or checkpoint.

`scores` turns a confusion matrix into accuracy and per-class / macro precision, recall and F1 under the
names every consumer uses (`<class>_precision`, `macro_recall`, ...): the trainer's per-epoch log and
metrics.csv, the evaluator's reports, and the sweep summary. `pick_best` is the one rule for "best"
(a loss: lowest; anything else: highest; floors; ties to the earlier row; NaN never wins), used by
the trainer's result.json and the evaluator's checkpoint selection alike.

The reports, tables and thresholds work on prediction txt files (:class:`~geektime.predictions.Predictions`),
so they need no model; unlabeled images (all-zero truth) are left out of every metric. Figures are drawn on
matplotlib's Agg canvas directly, without pyplot, so no display is needed and the global backend is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geektime.errors import SelectionError
from geektime.predictions import Predictions, class_index

METRICS = ("precision", "recall", "f1", "accuracy")
_EPOCH_RE = re.compile(r"epoch_(\d+)")


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (imported here: training never pays for matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; rows: the true class, columns: the predicted one."""
    flat = np.asarray(targets, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, classes: Sequence[str]) -> dict:
    """accuracy, `<class>_precision|recall|f1|support`, `macro_*` and `weighted_*` from a confusion matrix.

    A class never predicted has precision 0, one never present recall 0 (scikit-learn's zero_division=0),
    and every class counts in the macro average."""
    confusion = np.asarray(confusion, dtype=np.float64)
    hits, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(actual > 0, hits / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = confusion.sum()
    out = {"accuracy": float(hits.sum() / total) if total else float("nan")}
    for i, name in enumerate(classes):
        out.update(
            {
                f"{name}_precision": float(precision[i]),
                f"{name}_recall": float(recall[i]),
                f"{name}_f1": float(f1[i]),
                f"{name}_support": int(actual[i]),
            }
        )
    weights = actual / total if total else np.zeros_like(actual)
    for metric, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{metric}"] = float(values.mean())
        out[f"weighted_{metric}"] = float((values * weights).sum())
    return out


def pick_best(rows: Sequence[dict], key: str, floors: dict[str, float] | None = None) -> dict | None:
    """The row with the best `key` among those meeting every floor (`{name: minimum}`), or None.

    A loss (a key ending in "loss") is best lowest, anything else highest; NaN or missing never wins;
    ties go to the earlier row, so callers pass rows in epoch (then job) order."""
    floors = floors or {}
    sign = -1.0 if key.endswith("loss") else 1.0
    best, best_value = None, None
    for row in rows:
        value = row.get(key)
        if value is None or not math.isfinite(value) or any(row.get(k, -math.inf) < v for k, v in floors.items()):
            continue
        if best is None or sign * value > best_value:
            best, best_value = row, sign * value
    return best


def _labeled(pred: Predictions) -> np.ndarray:
    mask = pred.targets >= 0
    if not mask.any():
        raise ValueError("no labeled images (every truth block is all zeros); metrics need true classes")
    return mask


def classification_report(pred: Predictions) -> dict:
    """Per-class precision/recall/F1/support, accuracy, averages and confusion matrix, from :func:`scores`.

    Plain floats, ints and lists, so the dict goes straight to JSON."""
    mask = _labeled(pred)
    classes = list(pred.classes)
    confusion = confusion_matrix(pred.targets[mask], pred.predicted[mask], len(classes))
    flat = scores(confusion, classes)
    support = int(mask.sum())
    return {
        "classes": classes,
        "accuracy": flat["accuracy"],
        "per_class": {
            name: {m: flat[f"{name}_{m}"] for m in ("precision", "recall", "f1", "support")} for name in classes
        },
        **{
            average: {
                "precision": flat[f"{average}_precision"],
                "recall": flat[f"{average}_recall"],
                "f1": flat[f"{average}_f1"],
                "support": support,
            }
            for average in ("macro", "weighted")
        },
        "confusion_matrix": confusion.tolist(),
        "num_images": len(pred.paths),
        "num_unlabeled": int((~mask).sum()),
    }


def _text_table(rows: Sequence[Sequence[object]]) -> str:
    """Align columns: the first to the left, the rest (numbers) to the right; floats get 5 decimals."""
    cells = [[f"{x:.5f}" if isinstance(x, float) else ("-" if x is None else str(x)) for x in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
        for row in cells
    )


def confusion_matrix_text(report: dict) -> str:
    """The confusion matrix with class names: rows are the true class, columns the predicted one."""
    rows = [["true \\ predicted", *report["classes"]]]
    rows += [[name, *counts] for name, counts in zip(report["classes"], report["confusion_matrix"])]
    return _text_table(rows)


def format_report(report: dict) -> str:
    """The whole report as text, for printing after each checkpoint."""
    labeled = report["num_images"] - report["num_unlabeled"]
    rows = [["class", "precision", "recall", "f1", "support"]]
    for name, s in [*report["per_class"].items(), ("macro avg", report["macro"]), ("weighted avg", report["weighted"])]:
        rows.append([name, s["precision"], s["recall"], s["f1"], s["support"]])
    return (
        f"accuracy {report['accuracy']:.5f} on {labeled} labeled images"
        f" ({report['num_unlabeled']} unlabeled left out)\n\n"
        f"{_text_table(rows)}\n\n{confusion_matrix_text(report)}"
    )


def save_confusion_png(report: dict, path: str | os.PathLike) -> None:
    """Confusion matrix as a heat map, with counts written in the cells while they stay legible."""
    classes, matrix = report["classes"], np.array(report["confusion_matrix"])
    side = min(4 + 0.5 * len(classes), 40)
    fig = _figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"accuracy {report['accuracy']:.5f}")
    if len(classes) <= 30:
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def confusion_png_path(txt_path: str | os.PathLike) -> Path:
    txt_path = Path(txt_path)
    return txt_path.with_name(f"{txt_path.stem}_confusion.png")


def write_report(pred: Predictions, txt_path: str | os.PathLike, confusion_png: bool = True) -> dict:
    """Compute the report and write ``<stem>.json`` (and ``<stem>_confusion.png``) beside the txt.

    The PNG costs about as much as inferring 30 images on a small CPU, so a run dir of many
    checkpoints draws it only for the chosen one.
    """
    txt_path = Path(txt_path)
    report = classification_report(pred)
    json_path = txt_path.with_name(f"{txt_path.stem}.json")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if confusion_png:
        save_confusion_png(report, confusion_png_path(txt_path))
    return report


def _epoch(checkpoint: str) -> int | None:
    match = _EPOCH_RE.search(checkpoint)
    return int(match.group(1)) if match else None


def epoch_table(rows: Sequence[tuple[str, dict]]) -> list[dict]:
    """One dict per (checkpoint name, report): checkpoint, epoch, accuracy, then per class
    ``<class>_precision`` and ``<class>_recall``. The epoch comes from ``epoch_NNN`` in the name
    (None without one)."""
    table = []
    for checkpoint, report in rows:
        if report["classes"] != rows[0][1]["classes"]:
            raise ValueError(
                f"{checkpoint} has classes {report['classes']}, but {rows[0][0]} has {rows[0][1]['classes']}"
            )
        row = {"checkpoint": checkpoint, "epoch": _epoch(checkpoint), "accuracy": report["accuracy"]}
        for name, scores in report["per_class"].items():
            row[f"{name}_precision"] = scores["precision"]
            row[f"{name}_recall"] = scores["recall"]
        table.append(row)
    return table


def _write_csv(path: str | os.PathLike, rows: Sequence[Sequence[object]]) -> None:
    """Write rows (the first is the header) with floats at 5 decimals and None as empty."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        for row in rows:
            writer.writerow(f"{x:.5f}" if isinstance(x, float) else ("" if x is None else x) for x in row)


def write_table_csv(table: Sequence[dict], path: str | os.PathLike) -> None:
    """Save :func:`epoch_table`'s rows as CSV, one line per checkpoint."""
    if not table:
        raise ValueError("the epoch table is empty")
    _write_csv(path, [list(table[0]), *(list(row.values()) for row in table)])


def format_table(table: Sequence[dict]) -> str:
    """:func:`epoch_table`'s rows as aligned text, for printing."""
    if not table:
        raise ValueError("the epoch table is empty")
    return _text_table([list(table[0]), *(list(row.values()) for row in table)])


def select_best(
    rows: Sequence[tuple[str, dict]],
    metric: str,
    positive: str | None = None,
    min_precision: float | None = None,
    min_recall: float | None = None,
) -> dict:
    """Pick the checkpoint with the highest ``metric`` among those meeting the floors.

    ``metric`` and the floors apply to the ``positive`` class, or to the macro average when it
    is None (accuracy is always overall). Ties go to the earlier epoch, then to the earlier row.
    Raises :class:`SelectionError` when no checkpoint meets the floors, naming the best value of
    each floored metric that was reached and where.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if not rows:
        raise SelectionError("no checkpoints to select from")
    if positive is not None:
        class_index(rows[0][1]["classes"], positive)
    floors = {"precision": min_precision, "recall": min_recall}
    floors = {name: floor for name, floor in floors.items() if floor is not None}
    for name, floor in floors.items():
        if not 0 <= floor <= 1:
            raise ValueError(f"min_{name} must lie in [0, 1], got {floor}")
    scope = f"class {positive!r}" if positive is not None else "macro average"

    candidates = []
    for checkpoint, report in rows:
        chosen = report["per_class"][positive] if positive is not None else report["macro"]
        candidates.append(
            {
                "checkpoint": checkpoint,
                "epoch": _epoch(checkpoint),
                "precision": chosen["precision"],
                "recall": chosen["recall"],
                "f1": chosen["f1"],
                "accuracy": report["accuracy"],
            }
        )
    candidates.sort(key=lambda c: (c["epoch"] is None, c["epoch"] or 0))
    best = pick_best(candidates, metric, floors)
    if best is None:
        wanted = " and ".join(f"{name} >= {floor}" for name, floor in floors.items())
        reached = []
        for name in floors:
            top = pick_best(candidates, name)
            reached.append(f"the best {name} reached is {top[name]:.5f} by {top['checkpoint']}")
        raise SelectionError(f"no checkpoint has {wanted} ({scope}); {'; '.join(reached)}")
    return {
        **best,
        "metric": metric,
        "positive": positive,
        "value": best[metric],
        "min_precision": min_precision,
        "min_recall": min_recall,
    }


def format_selection(best: dict) -> str:
    """One line about :func:`select_best`'s choice, for printing."""
    scope = best["positive"] if best["positive"] is not None else "macro"
    floors = "".join(
        f", {name} >= {best[f'min_{name}']}" for name in ("precision", "recall") if best[f"min_{name}"] is not None
    )
    return (
        f"best checkpoint: {best['checkpoint']} (highest {best['metric']}{floors}; {scope}): "
        f"precision {best['precision']:.5f}  recall {best['recall']:.5f}  f1 {best['f1']:.5f}  "
        f"accuracy {best['accuracy']:.5f}"
    )


def threshold_table(pred: Predictions, positive: str) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) at every distinct score of ``positive``, ascending.

    The score is the probability of ``positive``; an image counts as positive when its score is
    at least the threshold.
    """
    k = class_index(pred.classes, positive)
    mask = _labeled(pred)
    y_true = pred.targets[mask] == k
    if not y_true.any():
        raise ValueError(f"no labeled image of class {positive!r}, so recall is undefined")
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y_true, pred.probs[mask, k])
    # precision/recall end with an extra (1, 0) point that has no threshold; zip drops it.
    return [(float(t), float(p), float(r)) for t, p, r in zip(thresholds, precision, recall)]


def threshold_for(
    pred: Predictions,
    positive: str,
    target_recall: float | None = None,
    target_precision: float | None = None,
) -> dict:
    """The highest threshold reaching ``target_recall``, or the lowest reaching
    ``target_precision`` (which keeps the most recall); give exactly one target."""
    if (target_recall is None) == (target_precision is None):
        raise ValueError("give exactly one of target_recall and target_precision")
    metric, target = ("recall", target_recall) if target_recall is not None else ("precision", target_precision)
    if not 0 < target <= 1:
        raise ValueError(f"target {metric} must lie in (0, 1], got {target}")
    column = 1 if metric == "precision" else 2
    table = threshold_table(pred, positive)
    reaching = [row for row in table if row[column] >= target]
    if not reaching:
        best = max(table, key=lambda row: row[column])
        raise ValueError(
            f"no threshold reaches {metric} {target} for class {positive!r}; "
            f"the highest {metric} is {best[column]:.5f} at threshold {best[0]:.5f}"
        )
    threshold, precision, recall = reaching[-1] if metric == "recall" else reaching[0]
    return {
        "positive": positive,
        f"target_{metric}": target,
        "threshold": threshold,
        "precision": precision,
        "recall": recall,
    }


def write_threshold_outputs(pred: Predictions, positive: str, txt_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>_<positive>_thresholds.csv`` and ``<stem>_<positive>_pr.png`` beside the txt.

    The PNG has the precision-recall curve and, to read a threshold off, precision and recall
    against the threshold. Returns the two paths.
    """
    txt_path = Path(txt_path)
    table = threshold_table(pred, positive)
    csv_path = txt_path.with_name(f"{txt_path.stem}_{positive}_thresholds.csv")
    png_path = txt_path.with_name(f"{txt_path.stem}_{positive}_pr.png")
    _write_csv(csv_path, [("threshold", "precision", "recall"), *table])

    thresholds, precision, recall = np.array(table).T
    fig = _figure(figsize=(10, 4.5), layout="constrained")
    curve, by_threshold = fig.subplots(1, 2)
    curve.plot(recall, precision, drawstyle="steps-post", marker=".")
    curve.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    curve.set_title(f"precision-recall: {positive}")
    by_threshold.plot(thresholds, precision, marker=".", label="precision")
    by_threshold.plot(thresholds, recall, marker=".", label="recall")
    by_threshold.set(xlabel=f"threshold on p({positive})", xlim=(0, 1), ylim=(0, 1.02), title="by threshold")
    by_threshold.legend()
    for ax in (curve, by_threshold):
        ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    return csv_path, png_path
