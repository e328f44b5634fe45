"""Fixtures, fixture factories and the per-session state (the pytest face of ``LiveServer``).

Everything a session holds (its settings, the servers it started, the matrix pool, the
real-device squeeze (headroom helper, lowered ceilings), the SIGTERM handler it
installed) lives on one :class:`SessionState` in ``config.stash``: an in-process
pytester run has its own config and so its own state, and never stops the outer
session's servers or releases the outer session's squeeze. Imports of mlx and the
server machinery happen inside the fixtures, so merely loading the plugin stays cheap.
"""

from __future__ import annotations

import contextlib
import signal
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_metaloom.config import Settings

METALOOM_FIXTURES = frozenset(
    {"mlx_server", "mlx_server_session", "mlx_server_factory", "metaloom_injector"}
)
"""Fixtures that start a server: a test using one is a live test (bounded by a timeout)."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


class SessionState:
    """What one pytest session (one ``Config``) of metaloom holds."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._settings: Settings | None = None
        self.servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.pool: Any = None
        self.records: list[dict[str, Any]] = []
        self._device: Any = None
        self.started_any = False
        self._sigterm_installed = False

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings.resolve(self._config.getoption, self._config.getini)
            except ValueError as exc:
                raise pytest.UsageError(f"metaloom: {exc}") from exc
        return self._settings

    def track(self, server: Any) -> Any:
        """Register a server this session started; from then on SIGTERM runs finalizers."""
        self.arm_sigterm()
        self.servers.add(server)
        self.started_any = True
        return server

    def owns(self, value: Any) -> bool:
        try:
            return value in self.servers
        except TypeError:  # unhashable fixture values
            return False

    def arm_sigterm(self) -> None:
        """pytest does not run finalizers on SIGTERM; turning it into an interrupt does.

        Installed only once the plugin is used (``--metal-oom`` or a server started), only
        from the main thread and only over the default action.
        """
        if self._sigterm_installed:
            return
        with contextlib.suppress(ValueError):  # not the main thread (embedded pytest)
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _raise_interrupt)
                self._sigterm_installed = True

    @property
    def device(self) -> Any:
        """This session's real-device squeeze (``backends.DeviceSession``), made on first use."""
        if self._device is None:
            from pytest_metaloom.matrix.backends import DeviceSession

            self._device = DeviceSession(self.settings.headroom_command)
        return self._device

    def stop_servers(self) -> None:
        """Stop every server this session started and that is still running."""
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                server.stop()

    def close(self) -> None:
        """End of the session (also after Ctrl-C, and SIGTERM, which ``arm_sigterm`` turns
        into one): the pool, the servers, this session's squeeze, the signal handler.

        A ceiling that could not be put back is raised at the end: it must not pass unseen.
        """
        if self.pool is not None:
            pool, self.pool = self.pool, None
            with contextlib.suppress(Exception):
                pool.close()
        self.stop_servers()
        if self.started_any:  # claims left by killed processes (tests that SIGKILL on purpose)
            from pytest_metaloom.server import ports

            with contextlib.suppress(Exception):
                ports.tidy()
        device, self._device = self._device, None
        try:
            if device is not None:
                device.release()  # its own helper and ceilings, never another session's
        finally:
            if self._sigterm_installed:
                with contextlib.suppress(ValueError):
                    if signal.getsignal(signal.SIGTERM) is _raise_interrupt:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self._sigterm_installed = False


STATE = pytest.StashKey[SessionState]()


def state_of(config: pytest.Config) -> SessionState:
    """This session's metaloom state (created on first use)."""
    state = config.stash.get(STATE, None)
    if state is None:
        state = config.stash[STATE] = SessionState(config)
    return state


def settings_of(config: pytest.Config) -> Settings:
    return state_of(config).settings


def _run_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    return factory.mktemp(f"metaloom-{name}", numbered=True)


def resolve_model(request: pytest.FixtureRequest, model: str | Path | None) -> Path | None:
    """Factory argument > --metaloom-model > the built-in tiny model."""
    settings = settings_of(request.config)
    if model is not None:
        return Path(model)
    if settings.model_path is not None:
        return settings.model_path
    if settings.metaloom_url:
        return None
    return request.getfixturevalue("tiny_model")


def start_server(
    request: pytest.FixtureRequest,
    *,
    model: str | Path | None = None,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    faults: str | None = None,
    limits: str | None = None,
    overlay: str | Path | None = None,
    guard: bool | None = None,
    name: str = "mlx-server",
    warmup: bool = True,
    server: str | None = None,
) -> Any:
    """Start a LiveServer configured from arguments > options > ini > defaults.

    ``server`` names a server profile (built-in name or .toml path) for this server only.
    """
    from pytest_metaloom.server.live import LiveServer
    from pytest_metaloom.server.profiles import load_profile

    state = state_of(request.config)
    settings = state.settings
    factory = request.getfixturevalue("tmp_path_factory")
    profile = load_profile(server) if server is not None else settings.profile
    if command is None:
        command = settings.server_command if server is None else profile.command
    live = LiveServer(
        run_dir=_run_dir(factory, name),
        model=resolve_model(request, model),
        command=command,
        server_args=[*settings.server_args, *server_args],
        env={**profile.server_env(), **(env or {})},
        faults=faults,
        limits=limits,
        overlay=overlay,
        guard=settings.metaloom_guard if guard is None else guard,
        url=settings.metaloom_url,
        name=name,
        start_timeout=max(settings.metaloom_start_timeout, profile.start_timeout or 0),
        ready_timeout=max(settings.metaloom_ready_timeout, profile.start_timeout or 0),
        stop_timeout=settings.metaloom_stop_timeout,
        warmup=warmup,
        request_fields=profile.request_fields(resolve_model(request, model)),
    )
    state.track(live)
    live.start()
    return live


def mlx_server_fixture(
    *,
    scope: str = "function",
    model: str | Path | None = None,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    faults: str | None = None,
    limits: str | None = None,
    name: str = "mlx-server",
    server: str | None = None,
) -> Callable[..., Any]:
    """Return a fixture that runs one configured server for the given scope.

    ``server`` is a server profile: a built-in name or the path of a profile .toml.

    Example (in a conftest.py)::

        from pytest_metaloom.fixtures import mlx_server_fixture
        quantized_server = mlx_server_fixture(scope="module", server_args=["--kv-bits", "8"])
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _fixture(request: pytest.FixtureRequest) -> Iterator[Any]:
        live = start_server(
            request,
            model=model,
            server_args=server_args,
            env=env,
            command=command,
            faults=faults,
            limits=limits,
            name=name,
            server=server,
        )
        try:
            yield live
        finally:
            live.stop()

    return _fixture


@pytest.fixture(scope="session")
def metaloom_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved metaloom settings of this session."""
    return settings_of(request.config)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The built-in offline tiny llama model (built once, cached across sessions)."""
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    return build_tiny_model(ModelSpec())


@pytest.fixture(scope="session")
def mlx_server_session(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One shared server for the session; ``mlx_server`` hands it out per test."""
    server = start_server(request, name="mlx-server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlx_server(mlx_server_session: Any) -> Iterator[Any]:
    """A live, healthy ``mlx_lm.server`` with nothing armed.

    The session's server is reused while it stays healthy; if a previous test killed
    or wedged it, it is restarted first. Faults armed by the test are disarmed after.
    """
    server = mlx_server_session
    if server.injector is not None and not _healthy(server):
        server.restart()
    yield server
    if server.injector is not None and server.is_alive():
        with contextlib.suppress(Exception):
            server.disarm()


def _healthy(server: Any) -> bool:
    from pytest_metaloom.server.http import get_status

    return server.is_alive() and get_status(server.url + "/health", timeout=5.0) == 200


@pytest.fixture
def mlx_server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start servers on demand inside a test; all are stopped when the test ends.

    ``mlx_server_factory(server_args=[...], faults="1*cmdbuf_oom(abort)", env={...})``
    """
    started: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("name", f"mlx-server-{len(started) + 1}")
        server = start_server(request, **kwargs)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.stop()


@pytest.fixture
def metaloom_injector(mlx_server: Any) -> Any:
    """The fault-injection control of ``mlx_server``: ``arm``, ``disarm``, ``events``..."""
    if mlx_server.injector is None:
        pytest.skip("the server comes from --metaloom-url; faults cannot be injected into it")
    return mlx_server.injector
