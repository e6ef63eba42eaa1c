"""Scale out: 2 processes under torchrun (gloo, CPU), joblib sweeps, the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, make_folders, run_script

TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
DDP = [*TINY, "trainer.epochs=2"]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*TWO_PROCESSES, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def metrics_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One 2-process run of 2 epochs in the default run folder, started from an empty working folder."""
    root = tmp_path_factory.mktemp("ddp")
    train_dir, val_dir = make_folders(root / "data")
    work = root / "work"
    work.mkdir()
    data = [f"data.train_dir={train_dir}", f"data.val_dir={val_dir}"]
    proc = torchrun(*DDP, *data, cwd=work)
    return {"root": root, "work": work, "data": data, "val_dir": val_dir, "proc": proc}


@pytest.mark.slow
def test_two_processes_write_one_run_folder_from_rank_0(ddp):
    work, proc = ddp["work"], ddp["proc"]
    assert [p.name for p in work.iterdir()] == ["checkpoints"]  # no train.log or .hydra/ of another rank
    runs = list((work / "checkpoints").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in run.glob("*.pth")) == ["epoch_001.pth", "epoch_002.pth", "last.pth"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.pth*"))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one event file: rank 0's
    assert len(list((run / "tb" / "hparams").iterdir())) == 1  # and one HParams session
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "result.json").is_file()
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    log = (run / "train.log").read_text()
    assert log.count("batch 4 x 2 process(es), 1 thread(s) each") == 1
    assert log.count("epoch 2/2") == 1
    assert proc.stdout.count("epoch 2/2") == 1  # the other rank says nothing
    state = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model


@pytest.mark.slow
def test_two_process_val_metrics_equal_a_single_process_evaluation_of_the_checkpoints(ddp, tmp_path):
    run = next((ddp["work"] / "checkpoints").iterdir())
    run_script("evaluate.py", f"checkpoint={run}", f"out_dir={tmp_path}", "trainer.threads=1")
    rows = metrics_rows(run)
    for row in rows:
        name = f"epoch_{int(row['epoch']):03d}"
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert float(row["val_acc"]) == pytest.approx(report["accuracy"], abs=1e-5)
        for cls, figures in report["per_class"].items():
            assert float(row[f"{cls}_precision"]) == pytest.approx(figures["precision"], abs=1e-5), (name, cls)
            assert float(row[f"{cls}_recall"]) == pytest.approx(figures["recall"], abs=1e-5), (name, cls)
        ckpt = torch.load(run / f"{name}.pth", map_location="cpu", weights_only=True)
        assert ckpt["metrics"]["confusion"] == report["confusion_matrix"]
        # val loss: the checkpoint in this one process, through the training code's own evaluation
        assert single_process_val_loss(ckpt) == pytest.approx(float(row["val_loss"]), rel=1e-4)
    assert len(rows) == 2


def single_process_val_loss(ckpt: dict) -> float:
    from omegaconf import OmegaConf

    from geektime.data import InputNormalizer, build_data
    from geektime.engine import evaluate
    from geektime.models import build_model

    torch.set_num_threads(1)
    cfg = OmegaConf.create(ckpt["config"])
    data = build_data(cfg)
    model = build_model(OmegaConf.merge(cfg.model, {"pretrained": False}), len(data.classes), data.image_size)
    model.load_state_dict(ckpt["model"])
    model.to(memory_format=torch.channels_last)
    normalizer = InputNormalizer(cfg.model.normalization, torch.device("cpu"), channels_last=True)
    return evaluate(
        model,
        data.val_loader,
        torch.nn.CrossEntropyLoss(),
        normalizer,
        torch.device("cpu"),
        data.classes,
        show_progress=False,
    )["val_loss"]


@pytest.mark.slow
def test_resume_under_torchrun_continues_like_a_straight_run(ddp):
    straight = next((ddp["work"] / "checkpoints").iterdir())
    run = ddp["root"] / "resumed"  # the straight run as it was after epoch 1
    run.mkdir()
    for name in ("epoch_001.pth", "metrics.csv"):
        shutil.copy(straight / name, run / name)
    shutil.copy(straight / "epoch_001.pth", run / "last.pth")
    proc = torchrun(f"trainer.resume={run}", cwd=ddp["work"])
    assert proc.stdout.count("resuming from") == 1
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    for got, want in zip(metrics_rows(run), metrics_rows(straight)):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key
    resumed = torch.load(run / "last.pth", map_location="cpu", weights_only=True)["model"]
    expected = torch.load(straight / "last.pth", map_location="cpu", weights_only=True)["model"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_side_by_side_and_summarizes_them(tmp_path, folders):
    train_dir, val_dir = folders
    sweep = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith(("trainer.threads", "optimizer.lr"))]
    proc = run_script(
        "train.py",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=0.01,0.003",
        *args,
        "trainer.epochs=1",
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    assert "optimizer.lr:0.01" in jobs[0].name and "optimizer.lr:0.003" in jobs[1].name
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared by hydra.launcher.n_jobs=2 jobs
    for job in jobs:
        assert json.loads((job / "result.json").read_text())["status"] == "ok"
        assert (job / "epoch_001.pth").is_file()
        assert f"batch 4 x 1 process(es), {threads} thread(s) each" in (job / "train.log").read_text()
    with (sweep / "summary.csv").open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert sorted((r["job"], r["status"]) for r in summary) == [("0", "ok"), ("1", "ok")]
    assert (sweep / "summary.md").is_file() and "sweep summary (2 jobs, 0 failed)" in proc.stdout


def compose_train(*overrides: str):
    """train.yaml as Hydra composes it for a run, hydra's own config included (in this process: fast)."""
    from hydra import compose, initialize_config_dir

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.slow
def test_submitit_slurm_launcher_composes_without_a_cluster():
    out = run_script(
        "train.py",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=90",
        "model=efficientnet_b3",
        "optimizer.lr=0.01",
        "--cfg",
        "all",
    ).stdout
    assert "name: efficientnet_b3" in out and "lr: 0.01" in out
    for line in (
        "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "partition: gpu",
        "gpus_per_node: 4",
        "timeout_min: 90",
        "_target_: geektime.sweep.SweepSummary",
    ):
        assert re.search(rf"^ *{re.escape(line)}$", out, re.M), line


def test_our_slurm_launcher_config_runs_one_process_per_gpu():
    from hydra.utils import instantiate

    cfg = compose_train(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.timeout_min=600",
    )
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (
        "gpu",
        8,
        8,
        600,
    )
    built = instantiate(launcher)  # what `-m` would submit with (submitting needs a cluster)
    assert type(built).__name__ == "SlurmLauncher" and built.params["tasks_per_node"] == 8
    assert cfg.hydra.callbacks.sweep_summary._target_ == "geektime.sweep.SweepSummary"


def test_ranks_other_than_0_get_no_run_folder_hydra_files_or_log_file(monkeypatch, tmp_path):
    from omegaconf import open_dict

    monkeypatch.chdir(tmp_path)  # resolving rank 0's run folder creates it
    rank0 = compose_train()
    with open_dict(rank0):
        rank0.hydra.runtime.output_dir = str(tmp_path / "run")
    assert rank0.hydra.output_subdir == ".hydra" and rank0.hydra.run.dir.startswith("checkpoints/")
    assert list(rank0.hydra.job_logging.root.handlers) == ["console", "file"]
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    rank1 = compose_train()
    with open_dict(rank1):
        rank1.hydra.runtime.output_dir = str(tmp_path / "run")
    assert rank1.hydra.output_subdir is None and rank1.hydra.run.dir == "."
    assert rank1.hydra.job_logging.root.level == "WARNING"
    assert list(rank1.hydra.job_logging.root.handlers) == ["console", "none"]


@pytest.mark.slow
def test_a_staged_fine_tune_crosses_its_phase_boundary_under_torchrun(tmp_path, folders):
    """Issue 14: 2 gloo processes, the frozen phase then the unfrozen one (DDP wrapped again at the boundary):
    each epoch's checkpoint records its phase, the body learns after the boundary, and both epochs are saved once."""
    run = tmp_path / "run"
    data = [f"data.train_dir={folders[0]}", f"data.val_dir={folders[1]}"]
    proc = torchrun(*DDP, *data, "finetune=staged", "finetune.freeze_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "frozen phase" in log and "unfrozen phase" in log
    first, second = (torch.load(run / f"epoch_00{e}.pth", weights_only=True) for e in (1, 2))
    assert (first["phase"], second["phase"]) == ("frozen", "unfrozen")
    weights = [k for k in first["model"] if k.startswith("layer1.") and k.endswith("weight")]
    assert weights and any(not torch.equal(first["model"][k], second["model"][k]) for k in weights)
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
