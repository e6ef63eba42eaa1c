"""The failures a user can fix, and the one tuple of them that entry points turn into a message.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what would."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says what it holds and what to do."""


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN or infinite loss); the message names the epoch and the fix."""


class SelectionError(ConfigError):
    """No checkpoint meets the floors asked for; the message names the best that was reached."""


class RunFolderError(ConfigError):
    """A run folder that holds another run; the message says how to continue or replace it."""


# What an entry point reports as one line: each says what to fix. (ValueError subclasses raised elsewhere for
# user input — bad images, prediction txt format, selection floors — derive from ConfigError or are listed here.)
EXPECTED_FAILURES = (ConfigError, CheckpointError, NonFiniteLossError, OSError)
