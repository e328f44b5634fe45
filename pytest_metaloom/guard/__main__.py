"""``python -m pytest_metaloom.guard`` runs the guard CLI (used by ``guard_command``)."""

import sys

from pytest_metaloom.guard.cli import main

sys.exit(main())
