"""How the guard answers a request its worker failed, from what it could prove about the worker.

One table, shared by the non-stream answer (a status line) and the SSE error event:

| worker                               | answer                                       | worker   |
|--------------------------------------|----------------------------------------------|----------|
| died                                 | 503 ``worker_died``, code = named cause       | restarted|
| wedged (its own words)               | 503 ``worker_wedged`` (500 if its log shows a | replaced |
|                                      | non-memory error behind it)                   |          |
| wedged, request never reached a loop | sent to the next worker within the queue time | replaced |
| serving, log shows an out-of-memory  | 503 ``worker_failed``, code = kind            | replaced |
| serving, log shows a GPU failure     | 503 ``worker_failed``, code = kind            | kept     |
| serving, log shows another error     | 500 ``server_error`` (``internal_error``)     | kept     |
| serving, no evidence                 | 502 ``empty_response`` (proven healthy)       | kept     |
| unknown (checks ran out of time)     | 503 ``worker_failed`` (500 for a non-memory   | kept     |
|                                      | error in its log)                             |          |

A worker that survived an out-of-memory error still holds the memory (prompt cache) it had, so
it is replaced: the next request starts on empty caches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pytest_metaloom.guard import diagnose
from pytest_metaloom.guard.causes import Cause, forced_cause
from pytest_metaloom.guard.evidence import LogFailure


def error_body(kind: str, message: str, code: str, **extra: Any) -> bytes:
    """The structured error both the status answer and the SSE error event carry."""
    err: dict[str, Any] = {"message": message, "type": kind, "code": code}
    err.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps({"error": err}).encode()


def cause_error(cause: Cause | None) -> bytes:
    """The error for a worker that died (or that the guard ended) under a request."""
    if cause is None:
        return error_body(
            "worker_died", "worker connection closed before the response was complete", "unknown"
        )
    kind = "worker_wedged" if cause.kind == "wedged" else "worker_died"
    return error_body(
        kind,
        f"{cause.describe()}; the request was not completed, retry it",
        cause.kind,
        exit_code=cause.exit_code,
        signal=cause.signal,
    )


@dataclass(frozen=True)
class Reply:
    """What to tell the client; ``retry`` means it may instead go to the next worker."""

    status: int
    body: bytes
    retry_after: bool = True
    retry: bool = False
    cause: Cause | None = None  # set when the guard ends the worker for this failure

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"} if self.retry_after else {}


def death_reply(cause: Cause | None) -> Reply:
    return Reply(503, cause_error(cause))


def _internal(failure: LogFailure, what: str) -> Reply:
    return Reply(
        500,
        error_body(
            "server_error",
            f"the worker failed this request: {failure.error} ({what})",
            "internal_error",
        ),
        retry_after=False,
    )


def decide(health: diagnose.Health, failure: LogFailure | None, *, said_wedged: bool) -> Reply:
    """The answer for a request a live worker failed; ``failure`` is what its log showed since.

    ``said_wedged``: the worker answered this request with its own word that its loop is gone.
    """
    if health.state == diagnose.WEDGED or said_wedged:
        evidence = health.evidence if health.state == diagnose.WEDGED else "it answered "
        if health.state != diagnose.WEDGED:
            evidence += f"'generation thread died' ({health.evidence})"
        if failure is not None:
            evidence += f"; its log: {failure.summary()}"
        cause = forced_cause("wedged", evidence)
        if failure is None:
            # nothing failed while this request was in the worker: it never reached a loop
            body = cause_error(cause)
            return Reply(503, body, retry=said_wedged, cause=cause)
        if not failure.device_failure:
            reply = _internal(failure, "the worker is wedged and is being replaced")
            return Reply(500, reply.body, retry_after=True, cause=cause)
        return Reply(
            503,
            error_body(
                "worker_wedged",
                f"{cause.describe()}; the request was not completed, retry it",
                "wedged",
                error_kind=failure.kind,
            ),
            cause=cause,
        )
    if failure is not None and failure.is_oom:
        cause = forced_cause(
            failure.kind, f"it survived {failure.summary()}; replaced to release its memory"
        )
        return Reply(
            503,
            error_body(
                "worker_failed",
                f"the worker ran out of memory on this request ({failure.error}); it is being "
                "restarted with empty caches, retry the request",
                failure.kind,
            ),
            cause=cause,
        )
    if failure is not None and not failure.device_failure:
        return _internal(failure, health.evidence)
    if failure is not None:
        return Reply(
            503,
            error_body(
                "worker_failed",
                f"the worker failed this request: {failure.error}; retry it",
                failure.kind,
            ),
        )
    if health.state == diagnose.SERVING:
        return Reply(
            502,
            error_body(
                "bad_gateway",
                f"worker closed the connection without a response, though it is healthy "
                f"({health.evidence})",
                "empty_response",
            ),
            retry_after=False,
        )
    return Reply(
        503,
        error_body(
            "worker_failed",
            f"worker closed the connection without a response and could not be shown healthy "
            f"({health.evidence}); retry it",
            "empty_response",
        ),
    )
