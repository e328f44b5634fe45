"""metaloom-guard: a supervising front that survives worker aborts and wedges one process up.

On mlx < 0.32 a Metal command-buffer OOM aborts ``mlx_lm.server`` from a thread Python never
sees; no in-process handler can answer the request. The guard owns the port, answers 503 for the
dead worker and restarts it (which resets the prompt cache by construction). On mlx >= 0.32 most
memory failures wedge the server instead (alive, its generation loop dead): the guard proves that
from the worker's own answers and log and replaces it the same way.
"""

from pytest_metaloom.guard.app import Guard, guard_command
from pytest_metaloom.guard.causes import Cause, classify_exit
from pytest_metaloom.guard.config import GuardConfig, GuardConfigError

__all__ = ["Cause", "Guard", "GuardConfig", "GuardConfigError", "classify_exit", "guard_command"]
