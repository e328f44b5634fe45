"""What the runtime wraps: MLX's evaluation and synchronisation points, and the few
``mlx_lm.server`` hooks that tell requests and tokens apart.

Only calls where MLX can raise are wrapped: ``mx.eval``, ``mx.async_eval``,
``mx.synchronize``, ``mx.array.item`` and ``mx.array.tolist``. NumPy conversion goes
through the buffer protocol, which a Python wrapper cannot intercept; mlx-lm's serving
paths never convert to NumPy. The prompt cache's Python bookkeeping
(``LRUPromptCache.fetch_nearest_cache``/``insert_cache``) evaluates nothing and is not
hooked: a deep copy of an ``mx.array`` allocates nothing.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

from . import timing
from .state import REQUEST_ATTR, REQUEST_HEADER

if TYPE_CHECKING:
    from .state import Runtime


def _wrap(rt: Runtime, op: str, real: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not rt.hot:
            return real(*args, **kwargs)
        return timing.evaluate(rt, op, real, args, kwargs, sys._getframe(1))

    wrapper.__name__ = getattr(real, "__name__", op)
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = getattr(real, "__doc__", None)
    return wrapper


def patch_mlx(rt: Runtime) -> None:
    """Wrap the evaluation and synchronisation points of ``mlx.core``."""
    mx = rt.mx
    for op in ("eval", "async_eval", "synchronize"):
        setattr(mx, op, _wrap(rt, op, getattr(mx, op)))
    for op in ("item", "tolist"):
        setattr(mx.array, op, _wrap(rt, op, getattr(mx.array, op)))


def patch_server(rt: Runtime, server: Any) -> None:
    """Hook request identity, activity and token counts in ``mlx_lm.server``."""
    rg_cls, handler_cls = server.ResponseGenerator, server.APIHandler
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
            setattr(request, REQUEST_ATTR, rid)
        try:
            return orig_handle(self, request, stop_words)
        finally:
            rt.request_end(rid)

    rg_cls.__init__ = __init__
    rg_cls._tokenize = _tokenize
    handler_cls.handle_completion = handle_completion

    base_response = server.Response

    class Response(base_response):  # type: ignore[misc, valid-type]
        """Counts generated tokens; otherwise the stock response record."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            rt.tokens += 1

    server.Response = Response
    rt.emit("patched", module=server.__name__)
