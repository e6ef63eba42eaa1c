"""The sweep summary: one row per job of a multirun, its swept keys as columns, ranked by `sweep_metric`.

Written as summary.csv (the table), summary.md (the table under a header naming the constant overrides) and
summary.json (both, for programs) in the sweep folder: at the end of a sweep by the `SweepSummary` Hydra
callback, and at any time by `python -m geektime.sweep <sweep folder>` (a killed or still running sweep too).
A sweep with failed jobs makes `python train.py -m` exit 1 once every job has run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

METRICS = ["val_acc", "val_loss", "macro_precision", "macro_recall"]
UNFINISHED = "running/unfinished"
DELETED = "(deleted)"  # the value of a `~key` override: the job ran without the key
EXIT_FAILED_JOBS = 1


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: the sub-folders Hydra gave a .hydra/ (or that hold a result.json)."""
    return [
        p
        for p in sorted(sweep_dir.iterdir())
        if p.is_dir() and ((p / ".hydra").is_dir() or (p / "result.json").is_file())
    ]


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """`key=value` override lines -> {key: value}, the value as Hydra writes it (so `1e-2` and `0.01` agree).

    `+key=v` and `++key=v` count as `key=v` (the prefix only says whether the key existed before);
    `~key` gives the value "(deleted)". A group override with a package (`transforms@x=y`) keeps `@x` in its key.
    """
    parsed = {}
    for override in OverridesParser.create().parse_overrides(list(lines)):
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        parsed[key] = DELETED if override.type == OverrideType.DEL else override.get_value_element_as_str()
    return parsed


def job_overrides(job_dir: Path) -> dict[str, str]:
    """A job's command-line overrides as {key: value}: from .hydra/overrides.yaml, else its result.json.

    A job folder that has neither yet (Hydra is creating it) has none.
    """
    hydra_file, result_file = job_dir / ".hydra" / "overrides.yaml", job_dir / "result.json"
    if hydra_file.is_file():
        return parse_overrides(yaml.safe_load(hydra_file.read_text()) or [])
    if result_file.is_file():
        return parse_overrides(json.loads(result_file.read_text()).get("overrides", []))
    return {}


def swept_keys(jobs: list[dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """(the keys whose value differs between jobs, in command-line order; {key: value} of the others).

    A key is swept when the jobs did not all run with the same value, so `key=a,a` is constant and a key
    that some jobs lack is swept.
    """
    keys = list(dict.fromkeys(k for job in jobs for k in job))
    varying = [k for k in keys if len({job.get(k) for job in jobs}) > 1 or any(k not in job for job in jobs)]
    constant = {k: jobs[0][k] for k in keys if k not in varying}
    return varying, constant


def override_text(key: str, value: str) -> str:
    return f"~{key}" if value == DELETED else f"{key}={value}"


def _job_number(job_dir: Path) -> int | None:
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _read_result(job_dir: Path) -> dict | None:
    path = job_dir / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"status": "failed", "error": f"{path} is unreadable ({err}); see train.log beside it"}


def _order(metric: str):
    """Sort key: finished jobs best first (val_loss: lowest; any other metric: highest), then jobs still running
    or killed, then failed ones; ties and each group in job order."""
    sign = 1 if metric.endswith("loss") else -1

    def key(row: dict) -> tuple:
        group = {"ok": 0 if row[metric] is not None else 1, UNFINISHED: 2}.get(row["status"], 3)
        value = sign * row[metric] if group == 0 else 0.0
        return group, value, row["job"] if row["job"] is not None else math.inf, row["run_dir"]

    return key


def expected_jobs(sweep_dir: Path, dirs: list[Path]) -> int | None:
    """How many jobs the sweep launches: its grid's size (from multirun.yaml), or Optuna's n_trials (from a job's)."""
    if (sweep_dir / "multirun.yaml").is_file():
        hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
    elif dirs and (dirs[0] / ".hydra" / "hydra.yaml").is_file():
        hydra = OmegaConf.load(dirs[0] / ".hydra" / "hydra.yaml").hydra
    else:
        return None
    target = str(hydra.sweeper.get("_target_", ""))
    if target.endswith("OptunaSweeper"):
        return int(hydra.sweeper.n_trials)
    if not target.endswith("BasicSweeper") or not (sweep_dir / "multirun.yaml").is_file():
        return None
    params = hydra.sweeper.get("params") or {}
    lines = list(hydra.overrides.task) + [f"{k}={v}" for k, v in params.items()]
    count = 1
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_sweep_override():
            count *= len(list(override.sweep_string_iterator()))
    return count


def summarize(sweep_dir: Path) -> dict:
    """The sweep's summary: constant overrides, swept keys, and one row per job (ranked, then unfinished, then failed).

    Rows hold: rank (None unless finished ok), job, status (ok | failed | running/unfinished), the swept keys'
    values, best_epoch, epochs, the metrics of the best epoch, run_dir, error (its first line).
    """
    dirs = job_dirs(sweep_dir)
    overrides = [job_overrides(d) for d in dirs]
    varying, constant = swept_keys(overrides)
    results = [_read_result(d) for d in dirs]
    metric = next((r["sweep_metric"] for r in results if r and r.get("sweep_metric")), "val_acc")
    metrics = [metric] + [m for m in METRICS if m != metric]
    rows = []
    for job_dir, job, result in zip(dirs, overrides, results):
        result = result or {"status": UNFINISHED}
        best = result.get("best") or {}
        rows.append(
            {
                "rank": None,
                "job": _job_number(job_dir),
                "status": result.get("status", "?"),
                **{k: job.get(k) for k in varying},
                "best_epoch": result.get("best_epoch"),
                "epochs": result.get("epochs"),
                **{m: best.get(m) for m in metrics},
                "run_dir": str(job_dir),
                "error": (result.get("error") or "").split("\n")[0],
            }
        )
    rows.sort(key=_order(metric))
    for rank, row in enumerate((r for r in rows if r["status"] == "ok" and r[metric] is not None), 1):
        row["rank"] = rank
    return {
        "sweep_dir": str(sweep_dir),
        "sweep_metric": metric,
        "better": "lower" if metric.endswith("loss") else "higher",
        "jobs": len(rows),
        "expected_jobs": expected_jobs(sweep_dir, dirs),
        "failed": sum(r["status"] not in ("ok", UNFINISHED) for r in rows),
        "unfinished": [r["job"] for r in rows if r["status"] == UNFINISHED],
        "constant": constant,
        "varying": varying,
        "metrics": metrics,
        "rows": rows,
    }


def columns(summary: dict) -> list[str]:
    return [
        "rank",
        "job",
        *summary["varying"],
        "status",
        "best_epoch",
        "epochs",
        *summary["metrics"],
        "run_dir",
        "error",
    ]


def headline(summary: dict) -> str:
    line = f"sweep summary ({summary['jobs']} jobs, {summary['failed']} failed"
    if summary["unfinished"]:
        line += f", {len(summary['unfinished'])} running/unfinished"
    if summary["expected_jobs"] and summary["expected_jobs"] > summary["jobs"]:
        line += f", {summary['expected_jobs'] - summary['jobs']} not started"
    return line + f"), ranked by {summary['sweep_metric']} ({summary['better']} first)"


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _short(text: str | None) -> str | None:
    """A long float as Optuna samples it (0.0020059560245279666) in 4 digits; the CSV and JSON keep it whole."""
    try:
        return f"{float(text):.4g}" if text is not None and len(text) > 8 else text
    except ValueError:
        return text


def markdown(summary: dict) -> str:
    """The table under a headline and the constant overrides (given once, since every job had them)."""
    shown = [c for c in columns(summary) if c != "run_dir"]
    short = [{**row, **{k: _short(row[k]) for k in summary["varying"]}} for row in summary["rows"]]
    constant = " ".join(override_text(k, v) for k, v in summary["constant"].items())
    lines = [
        f"**{headline(summary)}**",
        "",
        f"constant: `{constant}`" if constant else "constant: (none)",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in short]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> dict:
    """summary.csv (one header row, then the jobs), summary.md and summary.json into the sweep folder."""
    summary = summarize(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(summary))
        writer.writeheader()
        writer.writerows(summary["rows"])
    (sweep_dir / "summary.md").write_text(markdown(summary))
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report_problems(summary: dict) -> None:
    for row in summary["rows"]:
        if row["status"] == UNFINISHED:
            print(
                f"job {row['job']} has not finished (running, or killed before writing result.json): {row['run_dir']}",
                file=sys.stderr,
            )
        elif row["status"] != "ok":
            print(f"job {row['job']} failed: {row['error']} (see {row['run_dir']}/train.log)", file=sys.stderr)


class SweepSummary(Callback):
    """Hydra callback: after the last job of a multirun, summarize every job; exit 1 when any of them failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # Runs in the launching process: the one `python train.py -m` started, also for joblib and SLURM jobs.
        from geektime.distributed import launch_rank

        sweep_dir = Path(config.hydra.sweep.dir)
        if launch_rank() != 0 or not sweep_dir.is_dir():
            return
        summary = write_summary(sweep_dir)
        print(f"\n{markdown(summary)}\nwritten: {sweep_dir / 'summary.md'}, summary.csv, summary.json")
        report_problems(summary)
        # A job that died without a result.json (a killed joblib worker) did not finish either.
        bad = summary["failed"] + len(summary["unfinished"])
        if bad:
            # Hydra's callbacks swallow exceptions but not SystemExit: the launching process ends here, with
            # every job run and summarized, and its exit code tells a script or CI that the sweep is not clean.
            print(
                f"error: {bad} of {summary['jobs']} sweep jobs failed or did not finish (see above); "
                f"the others are ranked in {sweep_dir / 'summary.md'}",
                file=sys.stderr,
            )
            sys.exit(EXIT_FAILED_JOBS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geektime.sweep",
        description="Rebuild a sweep's summary.csv / summary.md / summary.json (also of a killed or running "
        "sweep) and print it. Exit code: 0, or 1 when a job failed, 2 on a usage error.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder, e.g. checkpoints/multirun/<date>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(
            f"error: {args.sweep_dir} is not a folder; give a sweep folder such as checkpoints/multirun/<date>",
            file=sys.stderr,
        )
        return 2
    if not job_dirs(args.sweep_dir):
        print(
            f"error: {args.sweep_dir} holds no job folders (sub-folders with .hydra/ or result.json); "
            "give the folder `python train.py -m` printed as its sweep folder",
            file=sys.stderr,
        )
        return 2
    summary = write_summary(args.sweep_dir)
    print(markdown(summary))
    print(f"written: {args.sweep_dir / 'summary.md'}, summary.csv, summary.json")
    report_problems(summary)
    return EXIT_FAILED_JOBS if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
