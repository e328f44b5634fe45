"""Tiny bounded HTTP calls from the guard to its worker (readiness, warm-up, watchdog).

Plain status-only HTTP, so it goes through the one helper (``server/http.py``, requests).
"""

from __future__ import annotations

from pytest_metaloom.server.http import HttpError
from pytest_metaloom.server.http import request as http_request


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: str | None = None,
    timeout: float = 2.0,
    host: str = "127.0.0.1",
) -> int | None:
    """Status code of one request to the worker, or None if it did not answer within ``timeout``."""
    headers = {"Content-Type": "application/json"} if body is not None else None
    try:
        status, _ = http_request(
            f"http://{host}:{port}{path}", method, data=body, timeout=timeout, headers=headers
        )
    except HttpError:
        return None
    return status
