"""Component discovery through ``importlib.metadata`` entry points.

Every component (built-in or third-party) is an entry point in one of the groups
``densegrpo.<kind>``; its name is the component's name and its object a class with a
nested pydantic ``Config``. Discovery reads metadata only: nothing is imported until a
component is loaded, so listing plugins never pulls in torch-heavy dependencies.

``DENSEGRPO_DISABLE_PLUGIN_AUTOLOAD=1`` restricts discovery to the ``densegrpo``
distribution's own (built-in) entry points.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pydantic

from densegrpo.contracts.errors import (
    ConfigError,
    DuplicateComponentError,
    PluginImportError,
    UnknownComponentError,
)
from densegrpo.contracts.kinds import KINDS

GROUP_PREFIX = "densegrpo."
CORE_DISTRIBUTION = "densegrpo"
AUTOLOAD_SWITCH = "DENSEGRPO_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component: where it comes from and what it points to."""

    kind: str
    name: str
    package: str
    version: str
    target: str

    @property
    def builtin(self) -> bool:
        return self.package == CORE_DISTRIBUTION


_cache: dict[tuple[Any, ...], dict[str, dict[str, ComponentInfo]]] = {}
_manual: dict[str, dict[str, ComponentInfo]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownComponentError(
            f"unknown component kind '{kind}'; use one of: {', '.join(KINDS)}"
        )


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_SWITCH, "").strip().lower() in {"1", "true", "yes", "on"}


def _discover() -> dict[str, dict[str, ComponentInfo]]:
    key = (tuple(sys.path), _autoload_disabled())
    if key in _cache:
        return _cache[key]
    found: dict[str, dict[str, ComponentInfo]] = {kind: {} for kind in KINDS}
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        if _autoload_disabled() and dist_name.lower() != CORE_DISTRIBUTION:
            continue
        for entry in dist.entry_points:
            if not entry.group.startswith(GROUP_PREFIX):
                continue
            kind = entry.group[len(GROUP_PREFIX):]
            if kind not in KINDS:
                continue
            info = ComponentInfo(kind, entry.name, dist_name, dist.version or "?", entry.value)
            previous = found[kind].get(entry.name)
            if previous is None:
                found[kind][entry.name] = info
            elif previous.package.lower() != dist_name.lower():
                raise DuplicateComponentError(
                    f"{kind[:-1] if kind != 'policies' else 'policy'} '{entry.name}' is registered "
                    f"by two packages: {previous.package}=={previous.version} ({previous.target}) "
                    f"and {dist_name}=={info.version} ({info.target}); uninstall one of them"
                )
            # the same distribution seen twice (e.g. an editable install) is not a conflict
    _cache.clear()
    _cache[key] = found
    return found


def refresh() -> None:
    """Forget what was discovered (after installing a package into a running process)."""
    _cache.clear()
    importlib.invalidate_caches()


def register(kind: str, name: str, target: str | type, package: str = "<runtime>") -> None:
    """Register a component for this process only (tests and notebooks).

    ``target`` is a ``"module:attr"`` string or the class itself.
    """
    _check_kind(kind)
    if not isinstance(target, str):
        target = f"{target.__module__}:{target.__qualname__}"
    _manual[kind][name] = ComponentInfo(kind, name, package, "0", target)


def unregister(kind: str, name: str) -> None:
    """Remove a component added with :func:`register`."""
    _check_kind(kind)
    _manual[kind].pop(name, None)


def components(kind: str | None = None) -> list[ComponentInfo]:
    """Every registered component (of one kind, or all), sorted by kind then name."""
    kinds = KINDS if kind is None else (kind,)
    for k in kinds:
        _check_kind(k)
    discovered = _discover()
    out: list[ComponentInfo] = []
    for k in kinds:
        merged = {**discovered[k], **_manual[k]}
        out.extend(merged[name] for name in sorted(merged))
    return out


def available(kind: str) -> list[str]:
    """Names of the registered components of ``kind``, sorted."""
    return [info.name for info in components(kind)]


def info(kind: str, name: str) -> ComponentInfo:
    """The registration of ``name``; unknown names get a did-you-mean error."""
    _check_kind(kind)
    if ":" in name:
        return ComponentInfo(kind, name, "<reference>", "", name)
    for candidate in components(kind):
        if candidate.name == name:
            return candidate
    names = available(kind)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownComponentError(
        f"unknown {_singular(kind)} '{name}'; {hint}available: {', '.join(names) or 'none'} "
        f"(run `densegrpo plugins --kind {kind}` to list them, or pass 'module:attr')"
    )


def load_class(kind: str, name: str) -> type:
    """Import and return the class registered as ``name`` (or a ``"module:attr"`` reference)."""
    component = info(kind, name)
    module_name, _, attr = component.target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except ImportError as error:
        raise PluginImportError(
            f"{_singular(kind)} '{name}' from package {component.package} failed to import "
            f"({type(error).__name__}: {error}); reinstall that package or its dependencies"
        ) from error
    except AttributeError as error:
        raise PluginImportError(
            f"{_singular(kind)} '{name}' from package {component.package} points to "
            f"'{component.target}', which does not exist ({error})"
        ) from error
    if not isinstance(obj, type) or not hasattr(obj, "Config"):
        raise PluginImportError(
            f"{_singular(kind)} '{name}' ({component.target}) must be a class with a nested "
            "pydantic Config"
        )
    return obj


def validate_config(kind: str, name: str, config: dict[str, Any] | None = None) -> pydantic.BaseModel:
    """Validate ``config`` against the component's nested ``Config``; errors name the field."""
    cls = load_class(kind, name)
    try:
        return cls.Config.model_validate(config or {})
    except pydantic.ValidationError as error:
        raise ConfigError(format_validation_error(error, prefix=f"{_singular(kind)} '{name}' config")) from None


def load(kind: str, name: str, config: dict[str, Any] | pydantic.BaseModel | None = None) -> Any:
    """Build a ready component: ``load("rewards", "toy-geneval", {"mode": "strict"})``."""
    cls = load_class(kind, name)
    if isinstance(config, pydantic.BaseModel):
        validated = config
    else:
        validated = validate_config(kind, name, config)
    return cls(validated)


def format_validation_error(error: pydantic.ValidationError, prefix: str = "config") -> str:
    """One line: ``prefix: a.b: message (got 3); ...``."""
    parts = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        got = item.get("input")
        # a check across fields names its fields itself; echoing the whole section would bury it
        quiet = item["type"] in {"missing", "extra_forbidden"} or isinstance(got, dict)
        got_text = "" if quiet else f" (got {got!r})"
        parts.append(f"{path}: {message}{got_text}" if path else f"{message}{got_text}")
    return f"{prefix}: " + "; ".join(parts)


def _singular(kind: str) -> str:
    return {"policies": "policy"}.get(kind, kind[:-1])


__all__ = [
    "ComponentInfo",
    "available",
    "components",
    "info",
    "load",
    "load_class",
    "refresh",
    "register",
    "unregister",
    "validate_config",
]
