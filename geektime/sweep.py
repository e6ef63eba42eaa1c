"""The sweep summary: one row per job (its overrides, best epoch and figures), as CSV and Markdown."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("geektime.sweep")

COLUMNS = ["job", "overrides", "status", "best_epoch", "val_acc", "macro_precision", "macro_recall", "val_loss",
           "sweep_metric", "value", "run_dir", "error"]


def collect(sweep_dir: Path) -> list[dict]:
    """Every job's result.json under the sweep folder, in job order."""
    rows = []
    for path in sweep_dir.glob("*/result.json"):
        result = json.loads(path.read_text())
        best = result.get("best") or {}
        rows.append({
            "job": int(path.parent.name.split("_", 1)[0]) if path.parent.name.split("_", 1)[0].isdigit() else -1,
            "overrides": " ".join(result.get("overrides", [])),
            "status": result.get("status", "?"),
            "best_epoch": result.get("best_epoch"),
            **{k: best.get(k) for k in ("val_acc", "macro_precision", "macro_recall", "val_loss")},
            "sweep_metric": result.get("sweep_metric"),
            "value": result.get("value"),
            "run_dir": str(path.parent),
            "error": (result.get("error") or "").split("\n")[0],
        })
    return sorted(rows, key=lambda r: (r["job"], r["run_dir"]))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict]) -> str:
    columns = ["job", "overrides", "status", "best_epoch", "val_acc", "macro_precision", "macro_recall", "error"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown(rows))
    return rows


class SweepSummary(Callback):
    """Hydra callback: after the last job of a multirun, summarize every job, failed ones included."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # Runs in the launching process: the one `python train.py -m` started, also for joblib and SLURM jobs.
        from geektime.distributed import launch_rank

        sweep_dir = Path(config.hydra.sweep.dir)
        if launch_rank() != 0 or not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        failed = [r for r in rows if r["status"] != "ok"]
        print(f"\nsweep summary ({len(rows)} jobs, {len(failed)} failed): {sweep_dir / 'summary.csv'}\n")
        print(markdown(rows))
        for row in failed:
            log.error("job %s failed (%s): %s — see %s", row["job"], row["overrides"], row["error"], row["run_dir"])
