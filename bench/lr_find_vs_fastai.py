"""Record fastai 2.8's own lr suggestions on lr_find curves, as fixtures for tests/test_lr_find.py.

Run once with a Python that has fastai 2.8 (a bench-only virtualenv that reuses this project's torch):

    python3 -m venv /tmp/fastai_venv
    python3 -c "import site; print(site.getsitepackages()[0])" > $(/tmp/fastai_venv/bin/python -c \
        "import site; print(site.getsitepackages()[0])")/system_site.pth
    /tmp/fastai_venv/bin/pip install 'fastai==2.8.*'
    /tmp/fastai_venv/bin/python bench/lr_find_vs_fastai.py [name=run_dir_of_lr_find ...]

Writes tests/data/lr_find/<name>.npz (lrs, smoothed losses, num_it) for the synthetic curves and for each
given lr_find run folder, and tests/data/lr_find/fastai.json: for every curve the step each of fastai's
valley, slide, minimum, steep reads its lr at (null where fastai raises), after the trimming and NaN cut of
fastai's `Learner.lr_find`. Prints ours beside fastai's. The arrays go to fastai as float64 tensors, so
both sides compare the same numbers (fastai's own recorder would hold float32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geektime.lr_find import SmoothedLoss, read_csv, suggest, sweep_lrs  # noqa: E402 (after the sys.path line)

OUT = REPO / "tests" / "data" / "lr_find"
RULES = ("valley", "slide", "minimum", "steep")


def synthetic() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Curve shapes a sweep can give: name -> (lrs, smoothed losses, num_it)."""
    rng = np.random.default_rng(0)
    lrs = sweep_lrs(1e-7, 10.0, 100)
    x = np.log10(lrs)
    curves = {}
    curves["monotone"] = (lrs, 0.5 + 1.5 * np.exp(-np.arange(100) / 40), 100)
    u_shape = 0.4 + 0.08 * (x + 2.5) ** 2
    curves["u_shaped"] = (lrs, u_shape, 100)
    plateau = np.full(100, 0.7)
    plateau[55:70] = np.linspace(0.7, 0.3, 15)
    plateau[70:] = 0.3 + 0.02 * np.arange(30) ** 1.5
    curves["plateau"] = (lrs, plateau, 100)
    nan_tail = u_shape.copy()
    nan_tail[48:] = np.nan  # a NaN loss: the moving average stays NaN from there (fastai records on)
    curves["nan_tail"] = (lrs, nan_tail, 100)
    smoother = SmoothedLoss()  # raw losses with noise, smoothed as a sweep does
    raw = 0.7 - 0.5 / (1 + np.exp(-(x + 3.5) * 3)) + 0.9 * np.clip(x + 1, 0, None) ** 2 + rng.normal(0, 0.05, 100)
    curves["noisy"] = (lrs, np.array([smoother.update(v) for v in raw]), 100)
    short = sweep_lrs(1e-7, 10.0, 20)  # 13 points after trimming: slide cannot run, valley wraps to the end
    curves["short_wrap"] = (
        short,
        np.array([9, 9, 5, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21.0]),
        20,
    )
    return curves


def recorded(spec: str) -> tuple[str, tuple[np.ndarray, np.ndarray, int]]:
    name, run_dir = spec.split("=", 1)
    lrs, _, smoothed = read_csv(Path(run_dir) / "lr_find.csv")
    num_it = json.loads((Path(run_dir) / "lr_find.json").read_text())["num_it"]
    return name, (lrs, smoothed, num_it)


def fastai_steps(lrs: np.ndarray, losses: np.ndarray, num_it: int) -> dict[str, int | None]:
    """The step of the recorded curve each fastai rule reads its lr at, as `Learner.lr_find` calls them."""
    from fastai.callback import schedule

    start = num_it // 10
    t_lrs, t_losses = torch.tensor(lrs[start:-5]), torch.tensor(losses[start:-5])
    nan_idxs = torch.nonzero(torch.isnan(t_losses.view(-1)))
    if len(nan_idxs) > 0:
        t_lrs, t_losses = t_lrs[: min(nan_idxs)], t_losses[: min(nan_idxs)]
    steps = {}
    for rule in RULES:
        try:
            _, (point_lr, _) = getattr(schedule, rule)(t_lrs, t_losses, num_it)
        except (IndexError, RuntimeError, ValueError):
            steps[rule] = None
            continue
        hits = np.flatnonzero(t_lrs.numpy() == float(point_lr))
        assert len(hits) == 1, (rule, point_lr)
        steps[rule] = start + int(hits[0])
    return steps


def main(argv: list[str]) -> int:
    import fastai

    OUT.mkdir(parents=True, exist_ok=True)
    curves = synthetic()
    curves.update(recorded(spec) for spec in argv)
    answers, agree = {"fastai_version": fastai.__version__, "curves": {}}, True
    for name, (lrs, losses, num_it) in curves.items():
        np.savez(OUT / f"{name}.npz", lrs=lrs, smoothed=losses, num_it=num_it)
        theirs = fastai_steps(lrs, losses, num_it)
        _, ours = suggest(lrs, losses, num_it)
        answers["curves"][name] = theirs
        agree &= ours == theirs
        print(f"{name:12s} {len(lrs):4d} steps  fastai {theirs}\n{'':23s}ours   {ours}")
    (OUT / "fastai.json").write_text(json.dumps(answers, indent=2) + "\n")
    print("all equal" if agree else "DIFFERENT")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
