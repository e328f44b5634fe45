"""Tiny bounded HTTP calls from the guard to its worker (readiness, warm-up, diagnosis)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass

# Enough of an error body to recognise a worker's own words; an answer is never buffered whole.
_BODY_LIMIT = 4096

NO_ANSWER = "no_answer"  # nothing within the bound (timeout or refused)
CLOSED = "closed"  # the worker accepted the request and closed without a status line


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
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read(_BODY_LIMIT))
    except http.client.RemoteDisconnected:
        return Answer(None, failure=CLOSED)
    except (ConnectionResetError, BrokenPipeError):
        return Answer(None, failure=CLOSED)
    except (OSError, http.client.HTTPException):
        return Answer(None, failure=NO_ANSWER)
    finally:
        conn.close()


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
