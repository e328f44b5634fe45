"""Real-device mode's choice of backend for a pytest session, and its safety net.

``realdevice`` (the drive and the judge) and ``realmetal`` (Metal's limits and ceiling)
do not know of each other's session needs; this module picks the squeeze for the device
here and gives everything back at session teardown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_metaloom.matrix import realdevice, realmetal


def release_everything() -> None:
    """Session teardown (Ctrl-C and SIGTERM end there too): every helper stopped, every
    lowered ceiling put back. Both are tried even if one fails."""
    from pytest_metaloom.server import headroom

    realdevice._SESSION_HELPER = None
    try:
        headroom.release_all()
    finally:
        realmetal.restore_all()


def plan_for(settings: Any, model: str | Path | None) -> tuple[Any, Any]:
    """The plan and the squeeze a ``--metal-oom --metaloom-real-device`` item runs."""
    from pytest_metaloom.inject.faults import FaultSpecError, parse_size

    backend = realdevice.device_backend()
    words = settings.metaloom_turn_words or realdevice.TURN_WORDS.get(backend, 120)
    text = settings.metaloom_headroom or "3GiB"
    try:
        headroom = parse_size(str(text), {"active": 0, "peak": 0, "limit": 0})
    except FaultSpecError as exc:
        raise realdevice.RealDeviceError(
            f"--metaloom-headroom={text!r} is not a size: {exc.problem} (e.g. '3GiB', '512MiB')"
        ) from None
    plan = realdevice.RealDevicePlan(
        headroom=headroom,
        turn_words=words,
        max_turns=realdevice.DEFAULT_MAX_TURNS,
        deadline=max(settings.metaloom_deadline, 60.0 if backend == "cuda" else 0.0),
    )
    if backend == "cuda":
        return plan, realdevice.CudaPressure(realdevice.session_helper(), plan)
    sysctl = realmetal.sysctl_limit_mb(model) if settings.metaloom_sysctl else None
    return plan, realmetal.MetalPressure(realmetal.DEFAULT_WIRED, realmetal.DEFAULT_MEMORY, sysctl)
