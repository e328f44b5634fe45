"""Tiny bounded HTTP calls from the guard to its worker (readiness, warm-up, diagnosis).

Plain status-and-body HTTP, so it goes through the one helper (``server/http.py``, requests);
what the guard adds is telling a worker that closed the connection unanswered from one that
did not answer in time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_metaloom.server.http import HttpError
from pytest_metaloom.server.http import request as http_request

# Enough of an answer to recognise a worker's own words (its error bodies are small).
_BODY_LIMIT = 4096

NO_ANSWER = "no_answer"  # nothing within the bound (timed out, refused)
CLOSED = "closed"  # the worker accepted the request and closed without a status line

_CLOSED_MARKS = ("Connection aborted", "RemoteDisconnected", "ConnectionResetError")


@dataclass(frozen=True)
class Answer:
    """One probe's result: ``status`` None when no status line came back (``failure`` says why)."""

    status: int | None
    body: bytes = b""
    failure: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def call(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: str | None = None,
    timeout: float = 2.0,
    host: str = "127.0.0.1",
) -> Answer:
    """One request to the worker, bounded by ``timeout``; never raises for a network failure."""
    headers = {"Content-Type": "application/json"} if body is not None else None
    try:
        status, content = http_request(
            f"http://{host}:{port}{path}", method, data=body, timeout=timeout, headers=headers
        )
    except HttpError as exc:
        why = f"{exc} {exc.__cause__!r}"
        closed = any(mark in why for mark in _CLOSED_MARKS) and "timed out" not in str(exc)
        return Answer(None, failure=CLOSED if closed else NO_ANSWER)
    return Answer(status, content[:_BODY_LIMIT])


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
    return call(port, path, method=method, body=body, timeout=timeout, host=host).status
