"""pytest-metaloom: fault-injection tests for mlx_lm.server under Metal out-of-memory.

This module stays import-light on purpose: pytest imports the plugin on every run,
including runs that never pass ``--metal-oom``.
"""

__version__ = "0.1.0"
