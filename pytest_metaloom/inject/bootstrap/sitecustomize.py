"""metaloom bootstrap, loaded by ``site`` because the harness puts this directory first
on the server's ``PYTHONPATH``.

Python imports only one ``sitecustomize``, so this one first runs the next one on
``sys.path`` (an existing environment keeps working). Unless a ``METALOOM_*``
variable is set it does nothing else: no mlx import, no package import. When one is
set it only validates the configuration and leaves a watch (``inject/activation.py``):
the runtime switches on later, and only in the process that evaluates with MLX.
"""

import importlib.util
import os
import sys

_CONFIG_VARS = ("METALOOM_FAULTS", "METALOOM_LIMITS", "METALOOM_EVENTS", "METALOOM_CONTROL")


def _chain() -> None:
    """Execute the next ``sitecustomize`` found after this directory on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    seen_self = False
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        if folder == here:
            seen_self = True
            continue
        if not seen_self:
            continue
        for candidate in (
            os.path.join(folder, "sitecustomize.py"),
            os.path.join(folder, "sitecustomize", "__init__.py"),
        ):
            if os.path.isfile(candidate):
                name = "_metaloom_chained_sitecustomize"
                spec = importlib.util.spec_from_file_location(name, candidate)
                if spec is None or spec.loader is None:
                    return
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                return


def _die() -> None:
    """Exit 2 at once: ``site`` would print and swallow a SystemExit raised here."""
    sys.stderr.flush()
    os._exit(2)


def _main() -> None:
    try:
        _chain()
    except Exception as exc:  # an old environment's hook must not stop the server
        sys.stderr.write(f"metaloom: chained sitecustomize failed: {exc!r}\n")
    if not any(os.environ.get(v) for v in _CONFIG_VARS):
        return
    try:
        from pytest_metaloom.inject import activation, runtime
    except Exception as exc:  # a broken install must not leave a server running without us
        sys.stderr.write(
            f"metaloom: cannot import pytest_metaloom.inject ({exc}); put the directory "
            "that contains the pytest_metaloom package on PYTHONPATH after the bootstrap dir\n"
        )
        _die()
    try:
        runtime.check_env()  # a typo fails the server at once, with the cause
        activation.watch()
    except ValueError as exc:
        sys.stderr.write(f"metaloom: bad injector configuration: {exc}\n")
        _die()


_main()
