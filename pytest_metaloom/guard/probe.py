"""Tiny bounded HTTP calls from the guard to its worker (readiness, warm-up, watchdog)."""

from __future__ import annotations

import http.client


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
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
