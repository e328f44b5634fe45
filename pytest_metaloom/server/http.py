"""Plain HTTP to a server under test: one bounded request, its status and body.

Everything that only needs "what status, what body" goes through here (the server's
readiness and health probes and warm-up, the fixtures, the guard's probes of its worker,
downstream helpers such as ``judge.workload.health``), on ``requests``. What
arrived on the wire and when (the verdict's evidence) is observed by ``judge/workload.py``
on a real HTTP parser instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests

__all__ = ["HttpError", "get_status", "request"]


class HttpError(OSError):
    """No HTTP answer (refused, reset, timed out, or not HTTP at all); the message says which."""


def request(
    url: str,
    method: str = "GET",
    body: Mapping[str, Any] | None = None,
    *,
    data: bytes | str | None = None,
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request with ``timeout`` on connecting and on every read; returns (status, body).

    ``body`` is sent as JSON; ``data`` as it is (give its ``Content-Type`` in ``headers``).

    No proxies or netrc from the environment (the servers are on loopback), no redirects,
    no kept-alive connection (a killed server must not leave a stale one behind).
    Raises :class:`HttpError` (an ``OSError``) when nothing usable came back.
    """
    with requests.Session() as session:
        session.trust_env = False
        try:
            response = session.request(
                method,
                url,
                json=body,
                data=data,
                headers={"Connection": "close", **(headers or {})},
                timeout=(timeout, timeout),
                allow_redirects=False,
            )
            return response.status_code, response.content
        except requests.RequestException as exc:
            raise HttpError(f"no HTTP answer from {method} {url}: {_why(exc)}") from exc


def get_status(url: str, *, timeout: float = 2.0) -> int | None:
    """Status of ``GET url``, or None when nothing answered within ``timeout``."""
    try:
        return request(url, timeout=timeout)[0]
    except HttpError:
        return None


def _why(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed ({exc.__class__.__name__}: {exc})"
    return f"{exc.__class__.__name__}: {exc}"
