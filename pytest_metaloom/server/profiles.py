"""Server profiles: what metaloom needs to know to start, probe and judge one MLX server.

A profile is a small TOML file. The built-in ones (``profile_data/*.toml``) cover
``mlx_lm`` (the default), ``rapid-mlx``, ``vllm-mlx`` and ``mlx-openai-server``; a
downstream project passes the path of its own file to ``--metaloom-server``::

    name = "my-server"
    command = ["{python}", "-m", "my_server", "--model", "{model}", "--port", "{port}"]
    paths = ["batched"]

Everything else has a default. The profile also says which witnesses the server can
give (:meth:`ServerProfile.unproven`), so a verdict never claims what no witness shows.
No pytest, no mlx here.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the 3.10 backport
    import tomli as tomllib

__all__ = ["DEFAULT", "ProfileError", "ServerProfile", "builtin_names", "load_profile"]

DATA_DIR = Path(__file__).resolve().parent / "profile_data"
DEFAULT = "mlx_lm"
PATHS = ("sequential", "batched")
PROMPT_CACHES = ("mlx_lm", "own", "none")
PLACEHOLDERS = ("{python}", "{host}", "{port}", "{model}")


class ProfileError(ValueError):
    """A profile name that does not exist or a profile file that is not valid."""


@dataclass(frozen=True)
class ServerProfile:
    """One server: command template, probes, request shape, evidence, quirks."""

    name: str
    description: str = ""
    # None: the mlx_lm.server of the interpreter running pytest
    command: tuple[str, ...] | None = None
    install: str = ""
    ready_path: str = "/health"
    health_path: str = "/health"
    endpoint: str = "/v1/chat/completions"
    send_model: bool = False
    paths: tuple[str, ...] = PATHS
    activate_on: tuple[str, ...] = ()
    cached_tokens: bool = False
    prompt_cache: str = "none"
    start_timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    quirks: tuple[str, ...] = ()
    source: str = "built-in"

    def server_env(self) -> dict[str, str]:
        """Environment for the server: the profile's own plus the activation modules."""
        env = dict(self.env)
        if self.activate_on:
            env["METALOOM_ACTIVATE_ON"] = ",".join(self.activate_on)
        return env

    @property
    def sites(self) -> tuple[str, ...]:
        """Sites a fault can be placed at: ``cache`` only where mlx-lm's cache runs."""
        if self.prompt_cache == "mlx_lm":
            return ("prefill", "decode", "cache")
        return ("prefill", "decode")

    def request_fields(self, model: Any) -> dict[str, Any]:
        """Fields every request body must carry for this server (its request shape)."""
        return {"model": str(model)} if self.send_model and model is not None else {}

    def unproven(self) -> dict[str, str]:
        """Evidence no run against this server can produce, each with the reason."""
        out: dict[str, str] = {}
        if not self.cached_tokens and self.prompt_cache != "mlx_lm":
            out["cache_reset"] = (
                f"{self.name} reports no usage.prompt_tokens_details.cached_tokens and keeps "
                + (
                    "its own prompt cache"
                    if self.prompt_cache == "own"
                    else "no prompt cache metaloom can read"
                )
                + ", so neither a client nor a server-side witness of a cache reset exists"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": list(self.command) if self.command else None,
            "ready_path": self.ready_path,
            "health_path": self.health_path,
            "endpoint": self.endpoint,
            "paths": list(self.paths),
            "cached_tokens": self.cached_tokens,
            "prompt_cache": self.prompt_cache,
            "source": self.source,
        }


_FIELDS = {
    "name": str,
    "description": str,
    "command": list,
    "install": str,
    "ready_path": str,
    "health_path": str,
    "endpoint": str,
    "send_model": bool,
    "paths": list,
    "activate_on": list,
    "cached_tokens": bool,
    "prompt_cache": str,
    "start_timeout": (int, float),
    "env": dict,
    "quirks": list,
}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.toml"))


def load_profile(spec: str | Path | None) -> ServerProfile:
    """A built-in profile by name (None: ``mlx_lm``), or a TOML file by path."""
    spec = DEFAULT if spec in (None, "") else str(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ProfileError(
                f"server profile file {spec} does not exist; pass a built-in name "
                f"({', '.join(builtin_names())}) or the path of a .toml profile"
            )
        return parse_profile(path.read_text(encoding="utf-8"), source=str(path))
    builtin = DATA_DIR / f"{spec}.toml"
    if not builtin.is_file():
        close = difflib.get_close_matches(spec, builtin_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ProfileError(
            f"unknown server profile {spec!r}{hint} (built-in: {', '.join(builtin_names())}; "
            "or pass the path of your own .toml profile)"
        )
    return parse_profile(builtin.read_text(encoding="utf-8"), source="built-in")


def parse_profile(text: str, *, source: str = "<string>") -> ServerProfile:
    """Validate a profile's TOML text; every error names the key and the fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"server profile {source} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ProfileError(f"server profile {source}: unknown key {key!r}{hint}")
        wants_bool = _FIELDS[key] is bool
        if isinstance(value, bool) != wants_bool or not isinstance(value, _FIELDS[key]):
            raise ProfileError(
                f"server profile {source}: {key!r} must be {_type_name(_FIELDS[key])}, "
                f"not {type(value).__name__}"
            )
    if not data.get("name"):
        raise ProfileError(f"server profile {source}: 'name' is required")
    command = data.get("command")
    if command is not None:
        if not command or not all(isinstance(p, str) and p for p in command):
            raise ProfileError(
                f"server profile {source}: 'command' must be a non-empty list of strings"
            )
        if not any("{port}" in p for p in command):
            raise ProfileError(
                f"server profile {source}: 'command' has no {{port}} placeholder; metaloom "
                "picks a free port per server, so put {port} (and {host}) where the server "
                "takes them"
            )
    elif data["name"] != DEFAULT:
        raise ProfileError(f"server profile {source}: 'command' is required")
    paths = tuple(data.get("paths", PATHS))
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise ProfileError(
            f"server profile {source}: 'paths' must name some of {', '.join(PATHS)} (got {bad})"
        )
    cache = data.get("prompt_cache", "none")
    if cache not in PROMPT_CACHES:
        raise ProfileError(
            f"server profile {source}: 'prompt_cache' must be one of {', '.join(PROMPT_CACHES)}"
        )
    for key in ("ready_path", "health_path", "endpoint"):
        if key in data and not str(data[key]).startswith("/"):
            raise ProfileError(f"server profile {source}: {key!r} must start with '/'")
    return ServerProfile(
        name=data["name"],
        description=data.get("description", ""),
        command=tuple(command) if command is not None else None,
        install=data.get("install", ""),
        ready_path=data.get("ready_path", "/health"),
        health_path=data.get("health_path", "/health"),
        endpoint=data.get("endpoint", "/v1/chat/completions"),
        send_model=data.get("send_model", False),
        paths=paths,
        activate_on=tuple(data.get("activate_on", ())),
        cached_tokens=data.get("cached_tokens", False),
        prompt_cache=cache,
        start_timeout=float(data["start_timeout"]) if "start_timeout" in data else None,
        env={str(k): str(v) for k, v in data.get("env", {}).items()},
        quirks=tuple(data.get("quirks", ())),
        source=source,
    )


def _type_name(kind: Any) -> str:
    names = {str: "a string", list: "a list", bool: "true or false", dict: "a table"}
    return names.get(kind, "a number")
