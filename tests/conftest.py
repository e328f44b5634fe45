"""Shared fixtures for the project's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    return build_tiny_model(ModelSpec())
