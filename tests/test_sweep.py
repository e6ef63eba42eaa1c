"""Sweep summaries (swept keys as columns, ranking, killed and failed jobs), the exit code of a sweep with a
failed job, TensorBoard HParams (read back by TensorBoard, and shown in a browser), and the Optuna preset."""

from __future__ import annotations

import csv
import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, TINY, run_script, start_script
from geektime import sweep
from geektime.hparams import HPARAMS_DIR, METRICS, log_hparams, run_hparams


def make_job(sweep_dir: Path, num: int, overrides: list[str], result: dict | None) -> Path:
    """A job folder as Hydra and train.main leave it: .hydra/overrides.yaml, and result.json once it ended."""
    job = sweep_dir / f"{num}_job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (job / "result.json").write_text(json.dumps({"overrides": overrides, **result}))
    return job


def finished(val_acc: float, val_loss: float, metric: str = "val_acc", epoch: int = 2) -> dict:
    best = {
        "epoch": epoch,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "macro_precision": val_acc - 0.01,
        "macro_recall": val_acc + 0.01,
    }
    return {
        "status": "ok",
        "best_epoch": epoch,
        "best": best,
        "sweep_metric": metric,
        "value": best[metric],
        "epochs": 3,
    }


def failed(error: str) -> dict:
    return {"status": "failed", "error": error + "\nmore detail", "traceback": "Traceback ..."}


def rebuild_summary(sweep_dir: Path) -> subprocess.CompletedProcess:
    """`python -m geektime.sweep <dir>`, as a user runs it after the sweep."""
    return subprocess.run(
        [sys.executable, "-m", "geektime.sweep", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- overrides and swept keys ------------------------------------------------------------------------------


def test_override_syntax_plus_force_add_delete_and_canonical_values():
    parsed = sweep.parse_overrides(
        [
            "+trainer.note=abc",
            "++trainer.extra=2",
            "~scheduler.gamma",
            "optimizer.lr=1e-2",
            "transforms@val=letterbox",
            "data.image_size=[32, 32]",
        ]
    )
    assert parsed == {
        "trainer.note": "abc",
        "trainer.extra": "2",
        "scheduler.gamma": sweep.DELETED,
        "optimizer.lr": "0.01",
        "transforms@val": "letterbox",
        "data.image_size": "[32,32]",
    }
    assert sweep.override_text("scheduler.gamma", sweep.DELETED) == "~scheduler.gamma"


def test_keys_given_once_are_constant_and_swept_keys_vary():
    # python train.py -m model=resnet18 optimizer.lr=0.01,0.003 transforms=resize,letterbox +trainer.note=x
    jobs = [
        {"model": "resnet18", "optimizer.lr": lr, "transforms": t, "trainer.note": "x"}
        for lr in ("0.01", "0.003")
        for t in ("resize", "letterbox")
    ]
    varying, constant = sweep.swept_keys(jobs)
    assert varying == ["optimizer.lr", "transforms"]
    assert constant == {"model": "resnet18", "trainer.note": "x"}


def test_a_swept_key_with_one_value_repeated_is_constant_and_a_key_some_jobs_lack_varies():
    # optimizer.lr=0.01,1e-2 gives two jobs with the same lr: nothing to compare, so it is no column.
    jobs = [
        sweep.parse_overrides(["optimizer.lr=0.01", "data.batch_size=4"]),
        sweep.parse_overrides(["optimizer.lr=1e-2", "data.batch_size=8", "~scheduler.gamma"]),
    ]
    varying, constant = sweep.swept_keys(jobs)
    assert varying == ["data.batch_size", "scheduler.gamma"]
    assert constant == {"optimizer.lr": "0.01"}


def test_job_overrides_come_from_hydra_or_else_from_result_json(tmp_path):
    job = make_job(tmp_path, 0, ["optimizer.lr=0.01"], finished(0.9, 0.3))
    assert sweep.job_overrides(job) == {"optimizer.lr": "0.01"}
    shutil.rmtree(job / ".hydra")
    assert sweep.job_overrides(job) == {"optimizer.lr": "0.01"}


# --- summary: ranking, failed and unfinished jobs ----------------------------------------------------------


def test_summary_ranks_by_sweep_metric_with_failed_jobs_last(tmp_path):
    common = ["model=resnet18", "data.batch_size=4"]
    make_job(tmp_path, 0, [*common, "optimizer.lr=0.1"], failed("optimizer.lr=0.1 diverged"))
    make_job(tmp_path, 1, [*common, "optimizer.lr=0.01"], finished(0.80, 0.50))
    make_job(tmp_path, 2, [*common, "optimizer.lr=0.003"], finished(0.95, 0.40))
    make_job(tmp_path, 3, [*common, "optimizer.lr=0.001"], finished(0.80, 0.45))  # ties job 1: the earlier job first
    summary = sweep.write_summary(tmp_path)

    rows = read_csv(tmp_path / "summary.csv")
    assert list(rows[0]) == [
        "rank",
        "job",
        "optimizer.lr",
        "status",
        "best_epoch",
        "epochs",
        *METRICS,
        "run_dir",
        "error",
    ]
    assert [(r["rank"], r["job"], r["optimizer.lr"], r["status"]) for r in rows] == [
        ("1", "2", "0.003", "ok"),
        ("2", "1", "0.01", "ok"),
        ("3", "3", "0.001", "ok"),
        ("", "0", "0.1", "failed"),
    ]
    assert rows[3]["error"] == "optimizer.lr=0.1 diverged"  # its first line
    assert float(rows[0]["val_acc"]) == 0.95 and rows[0]["run_dir"] == str(tmp_path / "2_job")

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["constant"] == {"model": "resnet18", "data.batch_size": "4"} == summary["constant"]
    assert saved["varying"] == ["optimizer.lr"] and saved["failed"] == 1 and saved["unfinished"] == []

    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "**sweep summary (4 jobs, 1 failed), ranked by val_acc (higher first)**"
    assert md[2] == "constant: `model=resnet18 data.batch_size=4`"
    assert md[4].startswith("| rank | job | optimizer.lr | status |") and "run_dir" not in md[4]
    assert md[6].startswith("| 1 | 2 | 0.003 | ok | 2 | 3 | 0.9500 | 0.4000 |")
    assert md[-1].startswith("| - | 0 | 0.1 | failed |") and md[-1].endswith("| optimizer.lr=0.1 diverged |")


def test_val_loss_ranks_lowest_first(tmp_path):
    make_job(tmp_path, 0, ["optimizer.lr=0.1"], finished(0.9, 0.7, metric="val_loss"))
    make_job(tmp_path, 1, ["optimizer.lr=0.2"], finished(0.8, 0.2, metric="val_loss"))
    summary = sweep.summarize(tmp_path)
    assert [r["job"] for r in summary["rows"]] == [1, 0]
    assert summary["metrics"][0] == "val_loss" and summary["better"] == "lower"


def test_a_per_class_sweep_metric_gets_its_own_column_first(tmp_path):
    for num, recall in enumerate((0.5, 0.9)):
        result = finished(0.8, 0.3)
        result["best"]["walle_recall"] = recall
        result.update(sweep_metric="walle_recall", value=recall)
        make_job(tmp_path, num, [f"optimizer.lr=0.0{num + 1}"], result)
    summary = sweep.summarize(tmp_path)
    assert summary["metrics"] == ["walle_recall", *METRICS]
    assert [(r["job"], r["walle_recall"]) for r in summary["rows"]] == [(1, 0.9), (0, 0.5)]


def test_a_killed_sweep_is_summarized_afterwards_naming_the_unfinished_and_unstarted_jobs(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    # What Hydra's basic sweeper wrote when the sweep started: 3 learning rates x 2 transforms = 6 jobs.
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                    "overrides": {
                        "task": ["optimizer.lr=0.01,0.02,0.03", "transforms=resize,letterbox", "model=resnet18"]
                    },
                }
            }
        ),
        sweep_dir / "multirun.yaml",
    )
    make_job(sweep_dir, 0, ["optimizer.lr=0.01", "transforms=resize", "model=resnet18"], finished(0.7, 0.5))
    make_job(sweep_dir, 1, ["optimizer.lr=0.01", "transforms=letterbox", "model=resnet18"], finished(0.9, 0.4))
    make_job(sweep_dir, 2, ["optimizer.lr=0.02", "transforms=resize", "model=resnet18"], None)  # killed here

    assert sweep.main([str(sweep_dir)]) == 0
    out, err = capsys.readouterr()
    assert "sweep summary (3 jobs, 0 failed, 1 running/unfinished, 3 not started)" in out
    assert f"job 2 has not finished (running, or killed before writing result.json): {sweep_dir / '2_job'}" in err
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["rank"], r["job"], r["status"]) for r in rows] == [
        ("1", "1", "ok"),
        ("2", "0", "ok"),
        ("", "2", "running/unfinished"),
    ]
    assert json.loads((sweep_dir / "summary.json").read_text())["unfinished"] == [2]


def test_cli_exit_codes(tmp_path, capsys):
    assert sweep.main([str(tmp_path / "nope")]) == 2
    assert "error: " in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert sweep.main([str(tmp_path / "empty")]) == 2
    assert "holds no job folders" in capsys.readouterr().err
    make_job(tmp_path / "s", 0, ["optimizer.lr=-1"], failed("optimizer.lr=-1 must be > 0"))
    make_job(tmp_path / "s", 1, ["optimizer.lr=0.01"], finished(0.9, 0.3))
    assert sweep.main([str(tmp_path / "s")]) == sweep.EXIT_FAILED_JOBS
    assert "job 0 failed: optimizer.lr=-1 must be > 0" in capsys.readouterr().err


# --- HParams -----------------------------------------------------------------------------------------------


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_hparams_are_read_back_by_tensorboards_own_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    overrides = ["optimizer.lr=0.02", "transforms=letterbox", "data.image_size=[32,32]"]
    hparams = run_hparams(compose_train(*overrides), overrides)
    assert hparams["optimizer.lr"] == 0.02 and hparams["transforms"] == "letterbox"  # a number; a group's choice
    assert hparams["transforms.name"] == "letterbox" and hparams["data.image_size"] == "[32, 32]"
    best = {"val_acc": 0.875, "val_loss": 0.31, "macro_precision": 0.9, "macro_recall": math.nan}
    log_hparams(tmp_path, hparams, best, step=4)

    events = EventAccumulator(str(tmp_path / HPARAMS_DIR))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.02)
    assert start.hparams["transforms"].string_value == "letterbox"
    assert start.hparams["model.name"].string_value == "efficientnet_b0"
    assert metadata.SESSION_END_INFO_TAG in content
    assert sorted(events.Tags()["scalars"]) == ["best/macro_precision", "best/val_acc", "best/val_loss"]  # NaN: none
    [value] = events.Scalars("best/val_acc")
    assert value.step == 4 and value.value == pytest.approx(0.875)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hparams_page_texts(logdir: Path, expected: list[str], timeout: float = 90) -> list[str]:
    """Start TensorBoard on `logdir` (127.0.0.1), open its HPARAMS tab in headless Chromium and return every text
    on the page (shadow DOMs included) once all `expected` strings show, or what showed at the timeout."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    driver = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/environment", timeout=2)
                break
            except OSError:
                if board.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"TensorBoard did not start: {board.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1600,1000",
        ):
            options.add_argument(arg)
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
        )
        driver.get(f"http://127.0.0.1:{port}/#hparams")
        walk = """const out = [];
            function walk(n) {
              if (n.nodeName === 'STYLE' || n.nodeName === 'SCRIPT') return;
              if (n.shadowRoot) walk(n.shadowRoot);
              for (const c of n.childNodes) {
                if (c.nodeType === 3) { const s = c.textContent.trim(); if (s) out.push(s); } else walk(c);
              }
            }
            walk(document); return out;"""
        while True:
            texts = driver.execute_script(walk)
            if all(e in texts for e in expected) or time.monotonic() > deadline:
                return texts
            time.sleep(1)
    finally:
        if driver is not None:
            driver.quit()
        board.terminate()
        board.wait(timeout=30)


@pytest.mark.slow
def test_tensorboard_hparams_tab_lists_every_job_of_a_sweep_in_a_browser(tmp_path, folders):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    if not (shutil.which("chromedriver") or Path("/usr/bin/chromedriver").exists()):
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    train_dir, val_dir = folders
    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("optimizer.lr")]
    run_script(
        "train.py",
        "-m",
        *args,
        "optimizer.lr=0.01,0.02",
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2
    for job in jobs:
        assert list((job / HPARAMS_DIR).glob("events.out.tfevents.*")), f"train.py logged no HParams in {job}"

    trial_ids = [f"{job.name}/{HPARAMS_DIR}" for job in jobs]
    texts = hparams_page_texts(sweep_dir, trial_ids)
    assert "Number of matching session groups: 2" in texts
    for trial_id, lr in zip(trial_ids, (0.01, 0.02)):
        assert trial_id in texts, f"{trial_id} is not in the HParams table"
        # The table's first hparam column is the one that differs between the jobs: optimizer.lr.
        assert float(texts[texts.index(trial_id) + 1]) == pytest.approx(lr)


# --- real sweeps -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_job_lets_the_others_run_then_the_sweep_exits_1(tmp_path, folders):
    train_dir, val_dir = folders
    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("optimizer.lr")]
    proc = run_script(
        "train.py",
        "-m",
        *args,
        "optimizer.lr=-1,0.01",
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        check=False,
    )
    assert proc.returncode == sweep.EXIT_FAILED_JOBS, proc.stderr[-3000:]
    assert "error: 1 of 2 sweep jobs failed or did not finish" in proc.stderr and "Traceback" not in proc.stderr
    assert "sweep summary (2 jobs, 1 failed), ranked by val_acc (higher first)" in proc.stdout
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["rank"], r["job"], r["optimizer.lr"], r["status"]) for r in rows] == [
        ("1", "1", "0.01", "ok"),
        ("", "0", "-1", "failed"),
    ]
    assert "optimizer.lr" in rows[1]["error"]
    assert (Path(rows[0]["run_dir"]) / "epoch_001.pth").is_file()  # the job after the failed one ran
    assert "optimizer.lr" not in json.loads((sweep_dir / "summary.json").read_text())["constant"]
    # Rebuilt later it says the same and keeps the exit code.
    again = rebuild_summary(sweep_dir)
    assert again.returncode == sweep.EXIT_FAILED_JOBS and f"job 0 failed: {rows[1]['error']}" in again.stderr
    assert read_csv(sweep_dir / "summary.csv") == rows


@pytest.mark.slow
def test_a_sweep_killed_mid_job_is_summarized_afterwards(tmp_path, folders):
    train_dir, val_dir = folders
    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("optimizer.lr")]
    proc = start_script(
        "train.py",
        "-m",
        *args,
        "optimizer.lr=0.01",
        "trainer.epochs=1,40",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        log=tmp_path / "sweep.log",
    )
    try:
        deadline = time.monotonic() + 300
        while not any("epoch 1/40" in p.read_text() for p in sweep_dir.glob("1_*/train.log")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert not (sweep_dir / "summary.csv").exists()  # the launcher died before its callback

    done = rebuild_summary(sweep_dir)
    assert done.returncode == 0, done.stderr
    assert "sweep summary (2 jobs, 0 failed, 1 running/unfinished)" in done.stdout
    assert "job 1 has not finished" in done.stderr
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["rank"], r["job"], r["trainer.epochs"], r["status"]) for r in rows] == [
        ("1", "0", "1", "ok"),
        ("", "1", "40", "running/unfinished"),
    ]


@pytest.mark.slow
def test_optuna_preset_searches_lr_and_weight_decay_and_the_summary_ranks_its_trials(tmp_path, folders):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed: pip install -e '.[search]'"
    )
    train_dir, val_dir = folders
    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("optimizer.lr")]
    proc = run_script(
        "train.py",
        "-m",
        "hydra/sweeper=optuna_lr",
        "hydra.sweeper.n_trials=2",
        *args,
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["varying"] == ["optimizer.lr", "optimizer.weight_decay"]
    assert summary["jobs"] == summary["expected_jobs"] == 2 and summary["failed"] == 0
    for row in summary["rows"]:
        assert 1e-4 <= float(row["optimizer.lr"]) <= 0.3 and 1e-6 <= float(row["optimizer.weight_decay"]) <= 1e-3
        assert f"optimizer.lr:{row['optimizer.lr']}" in Path(row["run_dir"]).name  # the trial's job folder
    # Optuna's best trial is the summary's first row (maximize val_acc; ties: Optuna keeps the first trial too).
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(summary["rows"][0]["val_acc"])
    assert best.best_params["optimizer.lr"] == pytest.approx(float(summary["rows"][0]["optimizer.lr"]))
    assert "sweep summary (2 jobs, 0 failed), ranked by val_acc" in proc.stdout


@pytest.mark.slow
def test_an_optuna_trial_that_fails_is_recorded_and_the_search_goes_on(tmp_path, folders):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed: pip install -e '.[search]'"
    )
    train_dir, val_dir = folders
    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("optimizer.lr")]
    # A comma list on the command line is a categorical parameter for Optuna; with the seeded sampler
    # (trainer.seed=42) the three trials draw lr 0.01, -1 (refused by validation), 0.01.
    proc = run_script(
        "train.py",
        "-m",
        "hydra/sweeper=optuna_lr",
        "hydra.sweeper.n_trials=3",
        "optimizer.lr=-1,0.01",
        *args,
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        check=False,
    )
    assert proc.returncode == sweep.EXIT_FAILED_JOBS, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["jobs"] == 3 and summary["failed"] == 1
    assert [(r["optimizer.lr"], r["status"]) for r in summary["rows"]][-1] == ("-1", "failed")
    assert OmegaConf.load(sweep_dir / "optimization_results.yaml").best_params["optimizer.lr"] == 0.01
