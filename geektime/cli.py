"""Console entry points (`geektime-train`, `geektime-evaluate`, and the top-level scripts): Hydra with our conf/.

Known failures (a wrong config value, an unusable checkpoint, a non-finite loss, a full disk) end with
one clear message and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import gc
import logging
import sys

import hydra
from omegaconf import DictConfig

from geektime.checkpoint import CheckpointError
from geektime.config import ConfigError, find_conf_dir, register_resolvers
from geektime.engine import NonFiniteLossError

register_resolvers()
CONF_DIR = str(find_conf_dir())
# The many objects torch and Hydra create at import live for the whole process: keep them out of
# every garbage collection (shorter pauses, no sweep over them at exit, less copy-on-write in workers).
gc.freeze()
log = logging.getLogger("geektime")


def _report(err: BaseException) -> None:
    log.error("%s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train(cfg: DictConfig) -> float:
    from geektime.train import main

    try:
        return main(cfg)
    except (ConfigError, CheckpointError, NonFiniteLossError, OSError) as err:
        _report(err)
    except KeyboardInterrupt:  # the log has said where a resume starts; a traceback would only bury that
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    from geektime.evaluate import main

    try:
        main(cfg)
    except (ValueError, OSError) as err:  # config, checkpoint, txt format, selection: all say what to fix
        _report(err)
