"""In-server fault runtime: wraps MLX evaluation, decides when a fault fires, fires it.

Runs inside ``mlx_lm.server`` (installed by the bootstrap ``sitecustomize``). It must
never import pytest. The hot path (an ``mx.eval`` with nothing armed) costs one
attribute check; everything else (stack walks, memory counters) happens only
while a point is armed.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pytest_metaloom.inject import faults as F

REQUEST_HEADER = "X-Metaloom-Request-Id"
ABORT_THREAD_NAME = "com.Metal.CompletionQueueDispatch"
HANG_MAX_SECONDS = float(os.environ.get("METALOOM_HANG_MAX", "900"))
_ATTR = "_metaloom_request_id"

_SEQUENTIAL = {
    "generate_step",
    "speculative_generate_step",
    "stream_generate",
    "ResponseGenerator._serve_single",
}
_BATCHED_CLASSES = {"BatchGenerator", "GenerationBatch", "PromptProcessingBatch"}


def _locate(frame: Any) -> tuple[str, str | None]:
    """Site and path of the evaluation whose call stack starts at ``frame``."""
    site: str | None = None
    path: str | None = None
    while frame is not None and (site is None or path is None):
        code = frame.f_code
        qn = getattr(code, "co_qualname", code.co_name)
        if site is None:
            if "extract" in qn or qn.startswith("LRUPromptCache."):
                site = "cache"
            elif qn == "PromptProcessingBatch.prompt" or qn.endswith("._prefill"):
                site = "prefill"
            elif qn in ("GenerationBatch._step", "GenerationBatch.next"):
                site = "decode"
            elif qn == "generate_step":
                # Before the first ``_step`` on the prompt tail there is no ``y`` yet.
                site = "decode" if "y" in frame.f_locals else "prefill"
            elif qn == "speculative_generate_step":
                site = "decode"
        if path is None:
            if qn in _SEQUENTIAL:
                path = "sequential"
            elif qn.split(".")[0] in _BATCHED_CLASSES or qn == "ResponseGenerator._generate":
                path = "batched"
        frame = frame.f_back
    return site or "other", path


class _Point:
    """One armed point: its chain state, filters and resolved sizes."""

    def __init__(self, index: int, point: F.FaultPoint, rt: Runtime) -> None:
        self.index = index
        self.point = point
        self.chain = F.ChainState(point)
        self.sites = set(point.sites) if point.sites else None
        self.path = point.get("path")
        self.request = point.get("request")
        self.nth_eval = point.int_filter("nth_eval")
        self.after_evals = point.int_filter("after_evals")
        self.nth_request = point.int_filter("nth_request")
        self.after_requests = point.int_filter("after_requests")
        self.after_tokens = point.int_filter("after_tokens")
        self.wired: int | None = None
        self.memory: int | None = None
        self.resolved = not (point.get("wired") or point.get("memory"))
        self.request_base = rt.requests_started
        self.token_base = rt.tokens
        self.evals = 0

    def resolve(self, baselines: Mapping[str, int]) -> dict[str, int]:
        out = {}
        for key in ("wired", "memory"):
            text = self.point.get(key)
            if text is not None:
                value = F.parse_size(text, baselines)
                setattr(self, key, value)
                out[key] = value
        self.resolved = True
        return out

    def matches(self, rt: Runtime, ctx: _Ctx) -> bool:
        if not self.resolved or self.chain.exhausted:
            return False
        if self.request is not None and self.request not in rt.active:
            return False
        if self.nth_request is not None or self.after_requests is not None:
            ords = [o - self.request_base for o in rt.active.values()]
            if self.nth_request is not None and self.nth_request not in ords:
                return False
            if self.after_requests is not None and not any(o > self.after_requests for o in ords):
                return False
        if self.after_tokens is not None and rt.tokens - self.token_base <= self.after_tokens:
            return False
        if self.wired is not None and ctx.usage() <= self.wired:
            return False
        if self.sites is not None and ctx.site() not in self.sites:
            return False
        if self.path is not None and ctx.path() != self.path:
            return False
        self.evals += 1
        if self.nth_eval is not None and self.evals != self.nth_eval:
            return False
        return not (self.after_evals is not None and self.evals <= self.after_evals)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "spec": self.point.to_text(),
            "hits": self.chain.hits,
            "fired": self.chain.fired,
            "exhausted": self.chain.exhausted,
            "wired": self.wired,
            "memory": self.memory,
        }


class _Ctx:
    """Lazily computed facts about one evaluation (stack walk and counters cost)."""

    def __init__(self, rt: Runtime, frame: Any, site: str | None) -> None:
        self.rt = rt
        self.frame = frame
        self._site = site
        self._path: str | None = None
        self._located = False
        self._usage: int | None = None

    def _locate(self) -> None:
        if not self._located:
            site, self._path = _locate(self.frame)
            self._site = self._site or site
            self._located = True

    def site(self) -> str:
        if self._site is None:
            self._locate()
        return self._site or "other"

    def path(self) -> str | None:
        self._locate()
        return self._path

    def usage(self) -> int:
        if self._usage is None:
            self._usage = self.rt.mx.get_active_memory() + self.rt.mx.get_cache_memory()
        return self._usage


class _HookLoader(importlib.abc.Loader):
    """Runs the real loader, then a patch function on the fresh module."""

    def __init__(self, inner: Any, hook: Callable[[Any], None]) -> None:
        self._inner = inner
        self._hook = hook

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches a module right after it is imported, wherever the import comes from."""

    def __init__(self, hooks: dict[str, Callable[[Any], None]]) -> None:
        self.hooks = hooks
        self._busy: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.hooks or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookLoader(spec.loader, self.hooks[name])
        return spec


class Runtime:
    """All in-server injector state. One instance per process (``RUNTIME``)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import mlx.core as mx

        self.mx = mx
        self.env = env
        self.lock = threading.RLock()
        self.hot = False
        self.points: list[_Point] = []
        self.spec_text: str | None = None
        self.pending: tuple[str, dict[str, Any]] | None = None
        self.release = threading.Event()
        self.hanging = 0
        self.eval_index = 0
        self.tokens = 0
        self.requests_started = 0
        self.active: dict[str, int] = {}
        self.anon = 0
        self.response_generator: Any = None
        self.wired_limit: int | None = None
        self.memory_limit: int | None = None
        self.deferred_env: list[str] = []
        self.events_fd: int | None = None
        self.real_eval = mx.eval
        self.real_async_eval = mx.async_eval
        self.mlx_version = getattr(mx, "__version__", "0")
        self.semantics = env.get("METALOOM_SEMANTICS") or F.default_semantics(self.mlx_version)
        if self.semantics not in ("abort", "deferred"):
            raise ValueError(
                f"METALOOM_SEMANTICS={self.semantics!r} is not valid; use 'abort' or 'deferred'"
            )
        if env.get("METALOOM_EVENTS"):
            self.events_fd = os.open(
                env["METALOOM_EVENTS"], os.O_APPEND | os.O_CREAT | os.O_WRONLY, 0o644
            )

    # ------------------------------------------------------------------ events

    def emit(self, event: str, **fields: Any) -> None:
        """One ``os.write`` per JSON line, so lines stay whole and survive an abort."""
        if self.events_fd is None:
            return
        record = {"t": time.time(), "pid": os.getpid(), "event": event, **fields}
        data = (json.dumps(record, default=str) + "\n").encode()
        with contextlib.suppress(OSError):
            os.write(self.events_fd, data)

    def memory(self) -> dict[str, int]:
        mx = self.mx
        return {
            "active": mx.get_active_memory(),
            "cache": mx.get_cache_memory(),
            "peak": mx.get_peak_memory(),
        }

    def cache_state(self) -> dict[str, int] | None:
        rg = self.response_generator
        pc = getattr(rg, "prompt_cache", None) if rg is not None else None
        if pc is None:
            return None
        try:
            return {"sequences": len(pc), "bytes": int(pc.nbytes)}
        except Exception:  # the generation thread may be tearing it down
            return None

    def baselines(self) -> dict[str, int]:
        mem = self.memory()
        limit = 0
        with contextlib.suppress(Exception):
            info = self.mx.device_info()
            limit = int(info.get("max_recommended_working_set_size", 0))
        if not limit:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"active": mem["active"] + mem["cache"], "peak": mem["peak"], "limit": limit}

    # ------------------------------------------------------------------ arming

    def _refresh_hot(self) -> None:
        self.hot = bool(self.points) or self.pending is not None

    def arm(self, text: str, *, defer_sizes: bool = False) -> dict[str, Any]:
        spec = F.parse_spec(text)
        with self.lock:
            self.points = [_Point(i, p, self) for i, p in enumerate(spec.points)]
            self.spec_text = spec.to_text()
            self.release.clear()
            sizes = {} if defer_sizes else self._resolve_points()
            self._refresh_hot()
        self.emit(
            "armed",
            spec=self.spec_text,
            sizes=sizes,
            deferred_sizes=defer_sizes and any(not p.resolved for p in self.points),
            semantics_default=self.semantics,
        )
        return {"spec": self.spec_text, "points": len(self.points), "sizes": sizes}

    def _resolve_points(self) -> dict[str, dict[str, int]]:
        base = self.baselines()
        out: dict[str, dict[str, int]] = {}
        for p in self.points:
            if p.resolved:
                continue
            got = p.resolve(base)
            out[str(p.index)] = got
            if "wired" in got or "memory" in got:
                self.apply_limits(wired=got.get("wired"), memory=got.get("memory"), source="arm")
        return out

    def disarm(self) -> dict[str, Any]:
        with self.lock:
            summary = [p.summary() for p in self.points]
            self.points = []
            self.spec_text = None
            self._refresh_hot()
            self.release.set()
        fired = sum(p["fired"] for p in summary)
        self.emit("disarmed", points=summary, fired=fired)
        return {"points": summary, "fired": fired, "hits": sum(p["hits"] for p in summary)}

    def apply_limits(
        self,
        wired: int | None = None,
        memory: int | None = None,
        *,
        source: str = "control",
    ) -> dict[str, Any]:
        """Set the real MLX limits (accepted, not enforced, on the CPU backend)."""
        result: dict[str, Any] = {"source": source}
        for key, value, setter in (
            ("wired", wired, self.mx.set_wired_limit),
            ("memory", memory, self.mx.set_memory_limit),
        ):
            if value is None:
                continue
            try:
                previous = setter(int(value))
                result[key] = {"value": int(value), "previous": previous, "accepted": True}
                setattr(self, f"{key}_limit", int(value))
            except (ValueError, RuntimeError) as exc:
                result[key] = {"value": int(value), "accepted": False, "error": str(exc)}
        self.emit("limits", **result)
        return result

    def limits_from_text(self, text: str, source: str) -> dict[str, Any]:
        values = self.parse_limits(text)
        base = self.baselines()
        return self.apply_limits(
            **{k: F.parse_size(v, base) for k, v in values.items()}, source=source
        )

    @staticmethod
    def parse_limits(text: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = part.partition("=")
            if not eq or key.strip() not in ("wired", "memory"):
                raise ValueError(
                    f"METALOOM_LIMITS part {part!r} is not valid; expected wired=SIZE or "
                    "memory=SIZE, e.g. 'wired=0.8*limit,memory=16GiB'"
                )
            F.parse_size(value.strip(), {"active": 0, "peak": 0, "limit": 0})
            values[key.strip()] = value.strip()
        return values

    # ------------------------------------------------------------------ requests

    def request_start(self, request: Any) -> None:
        rid = getattr(request, _ATTR, None)
        if rid is None or rid in self.active:
            return
        with self.lock:
            self.requests_started += 1
            self.active[rid] = self.requests_started
            deferred, self.deferred_env = self.deferred_env, []
        for what in deferred:
            self._apply_deferred(what)
        self.emit(
            "request_start",
            request_id=rid,
            ordinal=self.active.get(rid),
            cache=self.cache_state(),
            memory=self.memory(),
        )

    def _apply_deferred(self, what: str) -> None:
        try:
            if what == "limits":
                self.limits_from_text(self.env["METALOOM_LIMITS"], source="env")
            else:
                with self.lock:
                    sizes = self._resolve_points()
                self.emit("armed", spec=self.spec_text, sizes=sizes, resolved=True)
        except Exception as exc:
            self.emit("error", error=f"{what}: {exc}")

    def request_end(self, rid: str) -> None:
        with self.lock:
            self.active.pop(rid, None)
        self.emit("request_end", request_id=rid, cache=self.cache_state(), memory=self.memory())

    # ------------------------------------------------------------------ evaluation

    def raise_pending(self) -> None:
        """A deferred command-buffer error surfaces at the next synchronization point."""
        with self.lock:
            pending, self.pending = self.pending, None
            self._refresh_hot()
        if pending is None:
            return
        text, info = pending
        site, path = _locate(sys._getframe(2))
        self.emit(
            "raised",
            point=info["point"],
            kind=info["kind"],
            site=site,
            path=path,
            request_ids=sorted(self.active),
            thread=threading.current_thread().name,
            eval_index=self.eval_index,
            message=text,
        )
        raise RuntimeError(text)

    def evaluate(self, real: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self.pending is not None:
            self.raise_pending()
        result = real(*args, **kwargs)
        self.boundary(sys._getframe(1), None)
        return result

    def boundary(self, frame: Any, site: str | None) -> None:
        """Count a hit on every matching point; fire the first term that fires."""
        with self.lock:
            if not self.points:
                return
            self.eval_index += 1
            ctx = _Ctx(self, frame, site)
            chosen: tuple[_Point, F.Term] | None = None
            for p in self.points:
                if p.matches(self, ctx):
                    term = p.chain.hit()
                    if term is not None and chosen is None:
                        chosen = (p, term)
        if chosen is not None:
            self.fire(chosen[0], chosen[1], ctx)

    def fire(self, point: _Point, term: F.Term, ctx: _Ctx) -> None:
        kind = term.kind
        assert kind is not None
        semantics = term.resolved_semantics(self.semantics)
        text = F.message(kind, semantics, **dict(term.params)) if kind.template else ""
        mem = self.memory()
        info = {
            "point": point.index,
            "kind": kind.name,
            "family": kind.family,
            "semantics": semantics,
            "site": ctx.site(),
            "path": ctx.path(),
            "request_ids": sorted(self.active),
            "thread": threading.current_thread().name,
            "memory": mem,
            "usage": mem["active"] + mem["cache"],
            "wired_limit": point.wired if point.wired is not None else self.wired_limit,
            "eval_index": self.eval_index,
            "tokens": self.tokens,
            "message": text,
        }
        self.emit("fired", **info)
        if kind.family == "hang":
            self._hang()
        elif kind.family == "command_buffer" and semantics == "abort":
            self._abort(text)
        elif kind.family == "command_buffer":
            with self.lock:
                self.pending = (text, info)
                self._refresh_hot()
        else:
            raise RuntimeError(text)

    def _hang(self) -> None:
        with self.lock:
            self.hanging += 1
        try:
            if not self.release.wait(HANG_MAX_SECONDS):
                self.emit("error", error=f"hang released by its {HANG_MAX_SECONDS:g}s bound")
        finally:
            with self.lock:
                self.hanging -= 1

    def _abort(self, text: str) -> None:
        """Die like the Metal completion handler: on another thread, uncatchably."""
        line = (F.abort_line(text) + "\n").encode()

        def die() -> None:
            with contextlib.suppress(OSError):
                os.write(2, line)
            os.abort()

        t = threading.Thread(target=die, name=ABORT_THREAD_NAME, daemon=True)
        t.start()
        t.join(10.0)

    # ------------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "spec": self.spec_text,
                "points": [p.summary() for p in self.points],
                "pending": self.pending[0] if self.pending else None,
                "hanging": self.hanging,
                "eval_index": self.eval_index,
                "tokens": self.tokens,
                "requests_started": self.requests_started,
                "active_requests": sorted(self.active),
                "semantics_default": self.semantics,
                "mlx_version": self.mlx_version,
            }

    def snapshot(self) -> dict[str, Any]:
        return {
            "memory": self.memory(),
            "cache": self.cache_state(),
            "wired_limit": self.wired_limit,
            "memory_limit": self.memory_limit,
            "baselines": self.baselines(),
        }

    def handle(self, req: Mapping[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        try:
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
            if op == "arm":
                return {"ok": True, **self.arm(str(req.get("spec", "")))}
            if op == "disarm":
                return {"ok": True, **self.disarm()}
            if op == "status":
                return {"ok": True, **self.status()}
            if op == "snapshot":
                return {"ok": True, **self.snapshot()}
            if op == "limits":
                base = self.baselines()
                vals = {
                    k: (req[k] if isinstance(req[k], int) else F.parse_size(str(req[k]), base))
                    for k in ("wired", "memory")
                    if req.get(k) is not None
                }
                return {"ok": True, **self.apply_limits(**vals)}
        except (ValueError, TypeError) as exc:
            self.emit("error", op=op, error=str(exc))
            return {"ok": False, "error": str(exc)}
        ops = "arm, disarm, status, snapshot, limits, ping"
        return {"ok": False, "error": f"unknown op {op!r}; expected one of {ops}"}

    def serve_control(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(8)
        threading.Thread(
            target=self._control_loop, args=(srv,), name="metaloom-control", daemon=True
        ).start()

    def _control_loop(self, srv: socket.socket) -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5.0)
                try:
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    try:
                        req = json.loads(data.decode() or "{}")
                        reply = self.handle(req if isinstance(req, dict) else {})
                    except json.JSONDecodeError as exc:
                        reply = {"ok": False, "error": f"control request is not JSON: {exc}"}
                    conn.sendall((json.dumps(reply, default=str) + "\n").encode())
                except OSError:
                    continue


RUNTIME: Runtime | None = None


# ---------------------------------------------------------------------- patches


def _patch_mlx(rt: Runtime) -> None:
    mx = rt.mx
    real_eval, real_async = rt.real_eval, rt.real_async_eval

    def eval(*args: Any, **kwargs: Any) -> Any:  # noqa: A001 - mirrors mx.eval
        if not rt.hot:
            return real_eval(*args, **kwargs)
        return rt.evaluate(real_eval, args, kwargs)

    def async_eval(*args: Any, **kwargs: Any) -> Any:
        if not rt.hot:
            return real_async(*args, **kwargs)
        return rt.evaluate(real_async, args, kwargs)

    eval.__doc__ = real_eval.__doc__
    async_eval.__doc__ = real_async.__doc__
    mx.eval = eval
    mx.async_eval = async_eval


def _patch_server(rt: Runtime, server: Any) -> None:
    """Hook request identity, activity, token counts and cache boundaries in mlx_lm.server."""
    rg_cls, handler_cls, cache_cls = (
        server.ResponseGenerator,
        server.APIHandler,
        server.LRUPromptCache,
    )
    orig_init, orig_tokenize = rg_cls.__init__, rg_cls._tokenize
    orig_handle = handler_cls.handle_completion

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        rt.response_generator = self
        orig_init(self, *args, **kwargs)

    def _tokenize(self: Any, tokenizer: Any, request: Any, args: Any) -> Any:
        rt.request_start(request)
        return orig_tokenize(self, tokenizer, request, args)

    def handle_completion(self: Any, request: Any, stop_words: Any) -> Any:
        rid = self.headers.get(REQUEST_HEADER) if self.headers is not None else None
        if not rid:
            with rt.lock:
                rt.anon += 1
                rid = f"anon-{rt.anon}"
        with contextlib.suppress(AttributeError):
            setattr(request, _ATTR, rid)
        try:
            return orig_handle(self, request, stop_words)
        finally:
            rt.request_end(rid)

    rg_cls.__init__ = __init__
    rg_cls._tokenize = _tokenize
    handler_cls.handle_completion = handle_completion

    for name in ("fetch_nearest_cache", "insert_cache"):
        orig = getattr(cache_cls, name)

        def boundary(self: Any, *args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            if rt.hot:
                rt.boundary(sys._getframe(1), "cache")
            return _orig(self, *args, **kwargs)

        boundary.__name__ = name
        setattr(cache_cls, name, boundary)

    base_response = server.Response

    class Response(base_response):  # type: ignore[misc, valid-type]
        """Counts generated tokens; otherwise the stock response record."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            rt.tokens += 1

    server.Response = Response
    rt.emit("patched", module=server.__name__)


def check_env(env: Mapping[str, str] | None = None) -> None:
    """Validate ``METALOOM_FAULTS`` and ``METALOOM_LIMITS`` without importing mlx."""
    from pytest_metaloom.inject.faults import parse_size, parse_spec

    env = os.environ if env is None else env
    if env.get("METALOOM_FAULTS"):
        parse_spec(env["METALOOM_FAULTS"])
    for part in filter(None, (env.get("METALOOM_LIMITS") or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("wired", "memory"):
            raise ValueError(
                f"bad METALOOM_LIMITS entry {part!r}; expected wired=SIZE and/or memory=SIZE"
            )
        parse_size(value.strip(), {"active": 1, "peak": 1, "limit": 1})


def install_when_server_imported(env: Mapping[str, str] | None = None) -> None:
    """Install the runtime only in the process that imports ``mlx_lm.server``.

    The environment is inherited by every process in between (a shell wrapper, a
    supervisor such as metaloom-guard): those must stay inert, import no mlx and bind
    no control socket, so the harness always talks to the real server.
    """
    env = dict(os.environ if env is None else env)
    if "mlx_lm.server" in sys.modules:
        install(env)
        return
    sys.meta_path.insert(0, _PostImportFinder({"mlx_lm.server": lambda m: install(env)}))


def install(env: Mapping[str, str] | None = None) -> Runtime:
    """Install the runtime once; configure it from ``METALOOM_*`` variables."""
    global RUNTIME
    if RUNTIME is not None:
        return RUNTIME
    env = dict(os.environ if env is None else env)
    rt = Runtime(env)
    limits = env.get("METALOOM_LIMITS")
    faults = env.get("METALOOM_FAULTS")
    if limits:
        rt.parse_limits(limits)  # fail now, with the cause, not at the first request
    _patch_mlx(rt)
    if "mlx_lm.server" in sys.modules:
        _patch_server(rt, sys.modules["mlx_lm.server"])
    else:
        sys.meta_path.insert(
            0, _PostImportFinder({"mlx_lm.server": lambda m: _patch_server(rt, m)})
        )
    RUNTIME = rt
    info: dict[str, Any] = {"mlx_version": rt.mlx_version, "semantics_default": rt.semantics}
    with contextlib.suppress(Exception):
        info["backend"] = str(rt.mx.default_device())
        info["metal"] = bool(rt.mx.metal.is_available())
    rt.emit("started", **info)
    if faults:
        rt.arm(faults, defer_sizes=True)
        if any(not p.resolved for p in rt.points):
            rt.deferred_env.append("faults")
    if limits:
        rt.deferred_env.append("limits")
    if env.get("METALOOM_CONTROL"):
        rt.serve_control(env["METALOOM_CONTROL"])
    return rt
