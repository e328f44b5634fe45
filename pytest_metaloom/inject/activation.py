"""Which process of a harness-started server runs the injector runtime, and when.

The harness puts the bootstrap on the ``PYTHONPATH`` of the whole process tree it
starts, so a wrapper (a shell script, ``metaloom-guard``), a server's front process
and its model process all see the same ``METALOOM_*`` variables. Only the process
that evaluates with MLX may run the runtime. That process is recognised by what it
does, not by which server it is; the first of these switches it on:

- ``mlx_lm.server`` is imported (the stock server);
- a model is loaded through mlx-lm (``mlx_lm.utils.load`` / ``load_model``);
- mlx-lm generation code is called (``generate_step``, ``stream_generate``,
  ``BatchGenerator``) -- for a server that loads weights its own way;
- a module named in ``METALOOM_ACTIVATE_ON`` is imported (a profile's own engine).

The control socket has one owner: a process switches on only while it holds an
exclusive ``flock`` on ``<control>.lock``. The lock dies with its process, so a model
process that a server restarts after a crash takes the socket over; a second live
contender stays inert and says so in the event log.

For servers without ``mlx_lm.server``'s hooks, :func:`_patch_generation` adds the
server-agnostic ones: request identity read from the prompt, generated-token counts
and the state of mlx-lm's ``LRUPromptCache`` where the server uses it.

Runs inside the server: standard library only at import time, never pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

CONFIG_VARS = ("METALOOM_FAULTS", "METALOOM_LIMITS", "METALOOM_EVENTS", "METALOOM_CONTROL")
ACTIVATE_ON_VAR = "METALOOM_ACTIVATE_ON"
_LOADERS = ("load", "load_model")
_STATE: dict[str, Any] = {"env": None, "runtime": None, "declined": False, "lock_fd": None}
_GUARD = threading.RLock()


def configured(env: Mapping[str, str] | None = None) -> bool:
    """True when the harness configured an injector for this process tree."""
    env = os.environ if env is None else env
    return any(env.get(v) for v in CONFIG_VARS)


def note(event: str, env: Mapping[str, str] | None = None, **fields: Any) -> None:
    """Append one event to the log without the runtime (for processes that stay inert)."""
    env = os.environ if env is None else env
    path = env.get("METALOOM_EVENTS")
    if not path:
        return
    record = {"t": time.time(), "pid": os.getpid(), "event": event, **fields}
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_APPEND | os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, (json.dumps(record, default=str) + "\n").encode())
        finally:
            os.close(fd)


def watch(env: Mapping[str, str] | None = None) -> None:
    """Called by the bootstrap: switch on later, in this process, if it evaluates with MLX."""
    env = dict(os.environ if env is None else env)
    _STATE["env"] = env
    note(
        "bootstrap",
        env,
        executable=sys.executable,
        argv=sys.argv[:4] if hasattr(sys, "argv") else [],
        ppid=os.getppid(),
    )
    from pytest_metaloom.inject.runtime.activation import PostImportFinder

    hooks: dict[str, Callable[[Any], None]] = {
        "mlx_lm.server": _server_imported,
        "mlx_lm.utils": _patch_loaders,
        "mlx_lm.generate": _patch_generation,
        "mlx_lm.models.cache": _patch_prompt_cache,
        "mlx_lm.tokenizer_utils": _patch_tokenizer,
    }
    for name in filter(None, (n.strip() for n in env.get(ACTIVATE_ON_VAR, "").split(","))):
        hooks[name] = lambda m, _n=name: activate(f"import {_n}")
    already = [n for n in hooks if n in sys.modules]
    sys.meta_path.insert(0, PostImportFinder({n: h for n, h in hooks.items() if n not in already}))
    for name in already:  # imported by an earlier sitecustomize or .pth file
        hooks[name](sys.modules[name])


def runtime() -> Any:
    """The active runtime of this process, or None while it is inert."""
    return _STATE["runtime"]


def activate(reason: str) -> Any:
    """Switch the runtime on in this process (once), if it can own the control socket."""
    with _GUARD:
        if _STATE["runtime"] is not None or _STATE["declined"]:
            return _STATE["runtime"]
        env = _STATE["env"] if _STATE["env"] is not None else dict(os.environ)
        if not configured(env):
            return None
        owner = _claim(env.get("METALOOM_CONTROL"))
        if owner is not None:
            _STATE["declined"] = True
            note("activation_declined", env, reason=reason, owner=owner)
            return None
        from pytest_metaloom.inject import runtime as rt_module

        rt = rt_module.install(env)
        _STATE["runtime"] = rt
        rt.emit("activated", reason=reason, argv=sys.argv[:4], ppid=os.getppid())
        return rt


def _claim(control: str | None) -> str | None:
    """Take the control lock; None when this process owns it, else who does."""
    if not control:
        return None
    import fcntl

    path = control + ".lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        return holder or "another process"
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _STATE["lock_fd"] = fd  # held until this process ends, whichever way
    return None


def _after_fork_in_child() -> None:
    """A forked child shares the parent's lock and socket: it must not act on either."""
    rt = _STATE["runtime"]
    if rt is None:
        return
    with contextlib.suppress(Exception):
        rt.points = []
        rt.pending = None
        rt.hot = False
    _STATE["runtime"] = None
    _STATE["declined"] = True
    note("activation_declined", _STATE["env"], reason="forked from the active process")


os.register_at_fork(after_in_child=_after_fork_in_child)

_PATCHED: list[tuple[Any, str, Any]] = []


def _replace(owner: Any, name: str, new: Any) -> None:
    """Install a generic hook, remembering the original so :func:`_restore` can undo it."""
    _PATCHED.append((owner, name, getattr(owner, name)))
    setattr(owner, name, new)


def _restore() -> None:
    """``mlx_lm.server`` has hooks of its own: its process runs mlx-lm exactly as shipped."""
    while _PATCHED:
        owner, name, original = _PATCHED.pop()
        setattr(owner, name, original)


def _server_imported(module: Any) -> None:
    _restore()
    activate("import mlx_lm.server")


# ---------------------------------------------------------------------- triggers


def _patch_loaders(module: Any) -> None:
    """A model loaded through mlx-lm means this process evaluates with MLX."""
    real_tokenizer = getattr(module, "load_tokenizer", None)
    if real_tokenizer is not None and not getattr(real_tokenizer, "_metaloom", False):

        def load_tokenizer(*args: Any, **kwargs: Any) -> Any:
            # servers that call load_model + load_tokenizer themselves (rapid-mlx) never go
            # through load(): the tokenizer that names requests is caught here instead
            tokenizer = real_tokenizer(*args, **kwargs)
            _STATE["tokenizer"] = tokenizer
            return tokenizer

        load_tokenizer._metaloom = True  # type: ignore[attr-defined]
        load_tokenizer.__doc__ = real_tokenizer.__doc__
        _replace(module, "load_tokenizer", load_tokenizer)
    for name in _LOADERS:
        real = getattr(module, name, None)
        if real is None or getattr(real, "_metaloom", False):
            continue

        def loader(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            result = _real(*args, **kwargs)
            rt = activate(f"mlx_lm.utils.{_name}")
            if rt is not None and _name == "load" and isinstance(result, tuple) and len(result) > 1:
                _STATE["tokenizer"] = result[1]
            return result

        loader._metaloom = True  # type: ignore[attr-defined]
        loader.__doc__ = real.__doc__
        loader.__name__ = name
        _replace(module, name, loader)


def _generic() -> Any:
    """The runtime, when this process relies on the generic hooks (not mlx_lm.server's)."""
    rt = _STATE["runtime"]
    if rt is None or "mlx_lm.server" in sys.modules:
        return None
    return rt


def _activate_from_generation(what: str) -> Any:
    if _STATE["runtime"] is None and not _STATE["declined"]:
        activate(what)
    return _generic()


def _patch_generation(module: Any) -> None:
    """Request identity and token counts around mlx-lm's shared generation code."""
    real_step = getattr(module, "generate_step", None)
    if real_step is not None:

        def generate_step(*args: Any, **kwargs: Any) -> Any:
            rt = _activate_from_generation("mlx_lm.generate.generate_step")
            inner = real_step(*args, **kwargs)  # the server's call, passed on untouched
            if rt is None:
                return inner
            return _sequential(rt, inner, args[0] if args else kwargs.get("prompt"))

        generate_step.__doc__ = real_step.__doc__
        _replace(module, "generate_step", generate_step)
    batch_cls = getattr(module, "BatchGenerator", None)
    if batch_cls is not None:
        _patch_batch_generator(batch_cls)


def _sequential(rt: Any, inner: Iterable[Any], prompt: Any) -> Any:
    rid = _request_start(rt, [_tokens(prompt)])[0]
    try:
        for item in inner:
            rt.tokens += 1
            yield item
    finally:
        rt.request_end(rid)


def _patch_batch_generator(cls: Any) -> None:
    real_init = cls.__init__
    # insert() goes through insert_segments() where it exists; servers call either
    insert_name = "insert_segments" if hasattr(cls, "insert_segments") else "insert"
    real_insert = getattr(cls, insert_name, None)
    real_remove = getattr(cls, "remove", None)
    step_name = "_next" if hasattr(cls, "_next") else "next"
    real_step = getattr(cls, step_name)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _activate_from_generation("mlx_lm.generate.BatchGenerator")
        real_init(self, *args, **kwargs)

    def insert(self: Any, *args: Any, **kwargs: Any) -> Any:
        uids = real_insert(self, *args, **kwargs)  # the server's call, passed on untouched
        rt = _generic()
        if rt is not None:
            try:
                prompts = args[0] if args else kwargs.get("prompts", kwargs.get("segments"))
                # a server that prefilled the prompt itself may insert only its last token,
                # with the whole prompt in all_tokens (fourth parameter)
                full = kwargs.get("all_tokens", args[3] if len(args) > 3 else None)
                if not full or len(full) != len(prompts):
                    full = [None] * len(prompts)
                ids = _request_start(
                    rt,
                    [
                        _tokens([*(f or []), *(_tokens(p) or [])])
                        for f, p in zip(full, prompts, strict=False)
                    ],
                )
                table = self.__dict__.setdefault("_metaloom_uids", {})
                table.update(zip(list(uids), ids, strict=False))
            except Exception as exc:  # identity is best effort: never break the server
                rt.emit("error", error=f"request identity at insert: {exc!r}")
        return uids

    def remove(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return real_remove(self, *args, **kwargs)
        finally:
            rt = _generic()
            table = self.__dict__.get("_metaloom_uids", {})
            if rt is not None:
                with contextlib.suppress(TypeError):
                    for uid in list(args[0] if args else kwargs.get("uids", ())):
                        rid = table.pop(uid, None)
                        if rid is not None:
                            rt.request_end(rid)

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_step(self, *args, **kwargs)
        rt = _generic()
        if rt is not None:
            table = self.__dict__.get("_metaloom_uids", {})
            for response in _responses(result):
                rt.tokens += 1
                if getattr(response, "finish_reason", None) is not None:
                    rid = table.pop(getattr(response, "uid", None), None)
                    if rid is not None:
                        rt.request_end(rid)
        return result

    _replace(cls, "__init__", __init__)
    if real_insert is not None:
        _replace(cls, insert_name, insert)
    if real_remove is not None:
        _replace(cls, "remove", remove)
    _replace(cls, step_name, step)


def _responses(result: Any) -> list[Any]:
    """Generated-token responses in whatever shape this mlx-lm's step returns."""
    items = result if isinstance(result, (list, tuple)) else [result]
    out: list[Any] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_responses(item))
        elif hasattr(item, "uid") and hasattr(item, "token"):
            out.append(item)
    return out


def _patch_prompt_cache(module: Any) -> None:
    """Server-side cache evidence where the server keeps mlx-lm's ``LRUPromptCache``."""
    cls = getattr(module, "LRUPromptCache", None)
    if cls is None:
        return
    real_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        _STATE["prompt_cache"] = self
        rt = _generic()
        if rt is not None and rt.response_generator is None:
            rt.response_generator = SimpleNamespace(prompt_cache=self)

    _replace(cls, "__init__", __init__)


# ---------------------------------------------------------------------- identity


def _tokens(prompt: Any) -> list[int] | None:
    """A prompt as a list of token ids (an ``mx.array``, a list, or segments of lists)."""
    try:
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if prompt and isinstance(prompt[0], list):  # segments
            prompt = [t for seg in prompt for t in seg]
        return [int(t) for t in prompt]
    except (TypeError, ValueError):
        return None


def _request_start(rt: Any, prompts: list[list[int] | None]) -> list[str]:
    """Name each new generation: an armed ``request=ID`` found in its prompt, else anon.

    A server without mlx_lm.server's hooks never sees the harness's request header in
    this code, but the harness puts the id into the affected prompt, so the prompt text
    (decoded only while such a filter is armed) names the request.
    """
    wanted = [p.request for p in list(rt.points) if getattr(p, "request", None)]
    if rt.response_generator is None and _STATE.get("prompt_cache") is not None:
        # cache_state() reads ``response_generator.prompt_cache``: point it at the server's
        rt.response_generator = SimpleNamespace(prompt_cache=_STATE["prompt_cache"])
    ids = []
    for tokens in prompts:
        rid = _find_request(wanted, tokens)
        if rid is None:
            with rt.lock:
                rt.anon += 1
                rid = f"anon-{rt.anon}"
        rt.request_start(SimpleNamespace(_metaloom_request_id=rid))
        ids.append(rid)
    return ids


def _patch_tokenizer(module: Any) -> None:
    """Note an armed request id seen in text the server tokenizes (see :func:`_claim_pending`)."""
    cls = getattr(module, "TokenizerWrapper", None)
    for name in ("apply_chat_template", "encode"):
        real = getattr(cls, name, None)
        if real is None:
            continue

        def wrapper(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            result = _real(self, *args, **kwargs)
            rt = _generic()
            if rt is not None and rt.points:
                wanted = [p.request for p in list(rt.points) if getattr(p, "request", None)]
                if wanted:
                    text = repr((args, kwargs.get("messages"), kwargs.get("conversation")))
                    pending = _STATE.setdefault("pending", [])
                    for rid in wanted:
                        if rid in text and rid not in pending:
                            pending.append(rid)
            return result

        wrapper.__name__ = name
        wrapper.__doc__ = real.__doc__
        _replace(cls, name, wrapper)


def _claim_pending(wanted: list[str]) -> str | None:
    """The oldest armed id whose text was tokenized but not yet generated.

    Some servers prefill the prompt themselves and hand mlx-lm only its last token, so
    the prompt cannot name the request there; the tokenization that came before can.
    """
    pending = _STATE.get("pending") or []
    while pending:
        rid = pending.pop(0)
        if rid in wanted:
            return rid
    return None


def _find_request(wanted: list[str], tokens: list[int] | None) -> str | None:
    tokenizer = _STATE.get("tokenizer")
    if not wanted:
        return None
    if tokens is None or tokenizer is None:
        return _claim_pending(wanted)
    try:
        text = tokenizer.decode(tokens)
    except Exception:
        return _claim_pending(wanted)
    for rid in wanted:
        # the cached prefix may have eaten the start of the id: its tail is unique enough
        if rid in text or (len(rid) >= 8 and rid[-8:] in text):
            with contextlib.suppress(ValueError):
                _STATE.get("pending", []).remove(rid)
            return rid
    return _claim_pending(wanted)
