"""Real-device mode's choice of backend for a pytest session, and what that session squeezed.

``realdevice`` (the drive and the judge) and ``realmetal`` (Metal's limits and ceiling)
do not know of each other's session needs; this module picks the squeeze for the device
here, and :class:`DeviceSession` keeps what one session squeezed with (its headroom helper,
the ceilings it lowered) so that the session's teardown gives back those and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_metaloom.matrix import realdevice, realmetal


class DeviceSession:
    """What one pytest session squeezes with, owned by its state (``config.stash``).

    An in-process pytester run is a session of its own, with its own ``DeviceSession``:
    its teardown stops its own helper and restores its own ceilings, never the outer
    session's. The process-wide registries (``headroom.release_all``,
    ``realmetal.restore_all``) remain only the ``atexit`` safety net of a dying process.
    """

    def __init__(self, helper_command: Sequence[str] | None = None) -> None:
        self.helper_command = list(helper_command) if helper_command else None
        self._helper: Any = None
        self.ceilings: set[realmetal.WiredLimit] = set()
        """Ceilings lowered for this session and not yet put back."""

    def helper(self) -> Any:
        """The session's headroom helper, made on first use (starting PyTorch on the GPU
        costs seconds, so every item of the session shares one)."""
        if self._helper is None:
            from pytest_metaloom.server.headroom import HeadroomHelper

            self._helper = HeadroomHelper(self.helper_command)
        return self._helper

    @property
    def has_helper(self) -> bool:
        """Whether a helper was made (none is until a CUDA item needs one)."""
        return self._helper is not None

    def release(self) -> None:
        """Session teardown (Ctrl-C and SIGTERM end there too): this session's helper
        stopped, this session's lowered ceilings put back. Each is tried even if another
        fails; the first failure is raised afterwards (a ceiling left low must be told)."""
        first: Exception | None = None
        helper, self._helper = self._helper, None
        if helper is not None:
            try:
                helper.stop()
            except Exception as exc:
                first = exc
        for ceiling in list(self.ceilings):
            try:
                ceiling.restore()
                self.ceilings.discard(ceiling)
            except Exception as exc:  # keep going: the others must still be restored
                first = first or exc
        if first is not None:
            raise first


def plan_for(settings: Any, model: str | Path | None, session: DeviceSession) -> tuple[Any, Any]:
    """The plan and the squeeze a ``--metal-oom --metaloom-real-device`` item runs."""
    from pytest_metaloom.options import TURN_WORDS
    from pytest_metaloom.units import SizeError, parse_size

    backend = realdevice.device_backend()
    words = settings.metaloom_turn_words or TURN_WORDS.get(backend, TURN_WORDS["metal"])
    text = settings.metaloom_headroom
    try:
        headroom = parse_size(str(text))
    except SizeError as exc:
        raise realdevice.RealDeviceError(
            f"--metaloom-headroom={text!r} is not a size: {exc.problem} (e.g. '3GiB', '512MiB')"
        ) from None
    plan = realdevice.RealDevicePlan(
        headroom=headroom,
        turn_words=words,
        max_turns=realdevice.max_turns(settings),
        deadline=max(settings.metaloom_deadline, 60.0 if backend == "cuda" else 0.0),
    )
    if backend == "cuda":
        return plan, realdevice.CudaPressure(session.helper(), plan)
    sysctl = realmetal.sysctl_limit_mb(model) if settings.metaloom_sysctl else None
    pressure = realmetal.MetalPressure(
        realmetal.DEFAULT_WIRED, realmetal.DEFAULT_MEMORY, sysctl, ceilings=session.ceilings
    )
    return plan, pressure
