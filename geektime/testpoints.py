"""Named points in a run where a fault test can have the process signal itself, deterministically.

`GEEKTIME_SIGNAL_AT=<point>:<n>[:<SIGNAL>][,...]` sends SIGNAL (default SIGKILL) to this process the n-th time
it reaches <point>: `train_step` (after each optimizer step), `checkpoint_write` (a checkpoint's temp file is
written and synced, not yet renamed into place). Unset, as in every real run, `reached` is a dict lookup.
"""

from __future__ import annotations

import functools
import os
import signal
from collections import Counter

_counts: Counter = Counter()


@functools.cache
def _plan() -> dict[str, tuple[int, int]]:
    plan = {}
    for item in filter(None, os.environ.get("GEEKTIME_SIGNAL_AT", "").split(",")):
        point, count, *name = item.split(":")
        plan[point] = (int(count), getattr(signal, name[0] if name else "SIGKILL"))
    return plan


def reached(point: str) -> None:
    if point not in _plan():
        return
    _counts[point] += 1
    count, signum = _plan()[point]
    if _counts[point] == count:
        os.kill(os.getpid(), signum)
