"""Console entry points (`geektime-train`, `geektime-evaluate`, `geektime-lr-find`, and the top-level scripts).

Each composes its config with Hydra from our conf/, runs its task, and turns the failures a user can fix
(errors.EXPECTED_FAILURES) into one clear message and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from geektime.errors import EXPECTED_FAILURES

log = logging.getLogger("geektime")


def _report(err: BaseException) -> None:
    log.error("%s", err)
    print(f"error: {err}", file=sys.stderr)


def _run_hydra(config_name: str, task: Callable[[DictConfig], object]):
    """Compose `conf/<config_name>.yaml` with the command line and run `task` on it."""
    import hydra

    from geektime.config import find_conf_dir, register_resolvers

    register_resolvers()
    # The many objects torch and Hydra create at import live for the whole process: keep them out of
    # every garbage collection (shorter pauses, no sweep over them at exit, less copy-on-write in workers).
    gc.freeze()
    return hydra.main(version_base="1.3", config_path=str(find_conf_dir()), config_name=config_name)(task)()


def _train_task(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from geektime.runs import discard_if_unused
    from geektime.train import main

    try:
        return main(cfg)
    except EXPECTED_FAILURES as err:
        _report(err)
        logging.shutdown()  # closes train.log, so that a failed start can take its folder away
        discard_if_unused(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)
    except KeyboardInterrupt:  # the log has said where a resume starts; a traceback would only bury that
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def _evaluate_task(cfg: DictConfig) -> None:
    from geektime.evaluate import main

    try:
        main(cfg)
    except EXPECTED_FAILURES as err:
        _report(err)
        sys.exit(2)


def _lr_find_task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from geektime.lr_find import main
    from geektime.runs import discard_if_unused

    try:
        main(cfg)
    except EXPECTED_FAILURES as err:
        _report(err)
        logging.shutdown()
        discard_if_unused(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)
    except KeyboardInterrupt:  # nothing to save: the model was never changed on disk
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def train():
    return _run_hydra("train", _train_task)


def evaluate():
    return _run_hydra("evaluate", _evaluate_task)


def lr_find():
    return _run_hydra("lr_find", _lr_find_task)
