"""In-server half of the injector.

``bootstrap/`` holds the ``sitecustomize`` the harness puts on the server's
``PYTHONPATH``; ``runtime`` is what it installs. Nothing here imports pytest.
"""

from pathlib import Path

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "bootstrap"
