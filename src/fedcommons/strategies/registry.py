"""Strategies by name: built-ins, entry-point plugins, parameter checking.

Plugins are declared under the entry-point group ``fedcommons.strategies``; the entry
point's name is the strategy's name and its object is an :class:`Aggregator` subclass or
a function decorated with :func:`fedcommons.strategies.strategy`. A name claimed twice
(by two plugins, or by a plugin and a built-in) is refused with
:class:`DuplicateStrategyError` when used; ``strategies list`` shows the conflict.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points, packages_distributions, version
from typing import Any

from fedcommons.errors import (
    ConfigError,
    DuplicateStrategyError,
    StrategyParameterError,
    UnknownStrategyError,
)
from fedcommons.strategies.base import Aggregator
from fedcommons.strategies.fedavg import FedAdam, FedAvg
from fedcommons.strategies.fisher import FisherMerge
from fedcommons.strategies.lora import LoraExact
from fedcommons.strategies.mask_aligned import MaskAligned
from fedcommons.strategies.robust import Median, MultiKrum, TrimmedMean

ENTRY_POINT_GROUP = "fedcommons.strategies"

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class ParamSpec:
    """One strategy parameter: its name, type hint and default (``_MISSING``: required)."""

    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        """True when the parameter has no default."""
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        """The type hint as text, e.g. ``float | None``."""
        ann = self.annotation
        if ann is _MISSING:
            return "any"
        if isinstance(ann, type):
            return ann.__name__
        return str(ann).replace("typing.", "").replace("NoneType", "None")

    def describe(self) -> str:
        """``name: type = default``."""
        text = f"{self.name}: {self.type_name}"
        return text if self.required else f"{text} = {self.default!r}"


@dataclass
class StrategySpec:
    """A strategy the registry knows: class, parameters, origin."""

    name: str
    cls: type[Aggregator] | None
    origin: str
    params: dict[str, ParamSpec] = field(default_factory=dict)
    error: str = ""  # why it cannot be used (load failure, duplicate name)

    @property
    def reference(self) -> str:
        """The paper or reference the class declares."""
        return getattr(self.cls, "reference", "") if self.cls else ""

    @property
    def description(self) -> str:
        """The class's one-line description (or its docstring's first line)."""
        if self.cls is None:
            return ""
        text = getattr(self.cls, "description", "") or (self.cls.__doc__ or "")
        return text.strip().splitlines()[0] if text.strip() else ""


def as_aggregator_class(obj: object) -> type[Aggregator]:
    """The Aggregator class behind ``obj`` (a subclass, or a @strategy-decorated function)."""
    target = getattr(obj, "aggregator", obj)
    if isinstance(target, type) and issubclass(target, Aggregator):
        return target
    raise TypeError(
        f"{obj!r} is neither an Aggregator subclass nor a function decorated with "
        "@fedcommons.strategies.strategy"
    )


def param_specs(cls: type[Aggregator]) -> dict[str, ParamSpec]:
    """The parameters of ``cls``: its constructor's (or decorated function's) keywords."""
    fn = getattr(cls, "_strategy_function", None)
    target = fn if fn is not None else cls.__init__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = getattr(target, "__annotations__", {})
    specs: dict[str, ParamSpec] = {}
    params = list(inspect.signature(target).parameters.values())
    params = params[2:] if fn is not None else params[1:]  # (updates, base) / self
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        specs[p.name] = ParamSpec(p.name, hints.get(p.name, _MISSING), p.default)
    return specs


_BUILTIN_CLASSES: tuple[type[Aggregator], ...] = (
    FedAvg,
    FedAdam,
    FisherMerge,
    LoraExact,
    MaskAligned,
    Median,
    TrimmedMean,
    MultiKrum,
)
_LOCAL: dict[str, StrategySpec] = {
    c.name: StrategySpec(c.name, c, "built-in", param_specs(c)) for c in _BUILTIN_CLASSES
}
_PLUGINS: dict[str, StrategySpec] | None = None


def register_strategy(obj: object, name: str | None = None, *, origin: str = "local") -> str:
    """Register an Aggregator subclass or @strategy function in this process; return its name.

    Raises :class:`DuplicateStrategyError` if the name is taken (built-in, plugin or an
    earlier registration). Plugins in installed packages need no call: declare an entry
    point in the group ``fedcommons.strategies`` instead.
    """
    cls = as_aggregator_class(obj)
    key = name or getattr(cls, "name", None)
    if not key:
        raise ConfigError(f"{cls.__name__} has no 'name': pass name=...")
    existing = _all_specs().get(key)
    if existing is not None:
        raise DuplicateStrategyError(
            f"strategy name {key!r} is already taken by {existing.origin}"
            f"{' (' + existing.cls.__qualname__ + ')' if existing.cls else ''}"
        )
    _LOCAL[key] = StrategySpec(key, cls, origin, param_specs(cls))
    return key


def unregister_strategy(name: str) -> None:
    """Remove a strategy registered with :func:`register_strategy` (never a built-in)."""
    spec = _LOCAL.get(name)
    if spec is not None and spec.origin != "built-in":
        del _LOCAL[name]


def refresh_plugins() -> None:
    """Forget discovered plugins; the next lookup scans the entry points again."""
    global _PLUGINS
    _PLUGINS = None


def _origin(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return f"plugin {dist.metadata['Name']} {dist.version}"
    return f"plugin {ep.value}"


def _discover() -> dict[str, StrategySpec]:
    global _PLUGINS
    if _PLUGINS is not None:
        return _PLUGINS
    found: dict[str, StrategySpec] = {}
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        origin = _origin(ep)
        try:
            cls = as_aggregator_class(ep.load())
            spec = StrategySpec(ep.name, cls, origin, param_specs(cls))
        except Exception as exc:
            spec = StrategySpec(
                ep.name, None, origin, error=f"cannot load {ep.value}: {type(exc).__name__}: {exc}"
            )
        if ep.name in _LOCAL:
            spec.error = f"name is taken by {_LOCAL[ep.name].origin}; plugin refused"
            found[f"{ep.name} ({origin})"] = spec
            continue
        if ep.name in found:
            prior = found[ep.name]
            prior.error = f"name also claimed by {origin}; both refused"
            spec.error = f"name also claimed by {prior.origin}; both refused"
            found[f"{ep.name} ({origin})"] = spec
            continue
        found[ep.name] = spec
    _PLUGINS = found
    return found


def _all_specs() -> dict[str, StrategySpec]:
    specs = dict(_discover())
    specs.update(_LOCAL)  # built-ins and local registrations win every name
    return specs


def strategy_specs() -> list[StrategySpec]:
    """Every known strategy, usable or not (``error`` says why not), sorted by name."""
    return sorted(_all_specs().values(), key=lambda s: (s.name, s.origin))


def available_strategies() -> list[str]:
    """Names of the strategies that can be used."""
    return sorted(name for name, s in _all_specs().items() if not s.error and s.cls)


def get_spec(name: str) -> StrategySpec:
    """The spec of strategy ``name``; typed errors list the valid names."""
    spec = _all_specs().get(name)
    if spec is None:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; available: {', '.join(available_strategies())}"
        )
    if spec.error or spec.cls is None:
        if "claimed by" in spec.error or "taken by" in spec.error:
            raise DuplicateStrategyError(f"strategy {name!r}: {spec.error}")
        raise UnknownStrategyError(f"strategy {name!r} ({spec.origin}) is unusable: {spec.error}")
    return spec


def coerce_param(strategy: str, spec: ParamSpec, value: Any) -> Any:
    """Convert a run-config value (str, int, float, bool) to the parameter's type."""
    ann = spec.annotation
    options: tuple[Any, ...]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        options = typing.get_args(ann)
    else:
        options = (ann,)
    if type(None) in options and (value is None or str(value).lower() in {"none", "null", ""}):
        return None
    for kind in options:
        if kind is type(None):
            continue
        try:
            return _coerce_one(kind, value)
        except (TypeError, ValueError):
            continue
    raise StrategyParameterError(
        f"strategy {strategy!r}: parameter {spec.name!r} expects {spec.type_name}, got {value!r}"
    )


def _coerce_one(kind: Any, value: Any) -> Any:
    if kind is _MISSING or kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ValueError("not a bool")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError("bool is not an int")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not integral")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError("bool is not a float")
        return float(value)
    if kind is str:
        return str(value)
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    raise TypeError(f"cannot convert to {kind}")


def create_strategy(name: str, params: Mapping[str, Any] | None = None) -> Aggregator:
    """Instantiate strategy ``name`` with ``params``; typed errors name what is valid.

    Unknown names raise :class:`UnknownStrategyError` listing the available strategies;
    unknown or ill-typed parameters raise :class:`StrategyParameterError` listing the
    strategy's parameters with their types and defaults.
    """
    spec = get_spec(name)
    assert spec.cls is not None
    given = dict(params or {})
    valid = ", ".join(p.describe() for p in spec.params.values()) or "none"
    unknown = sorted(set(given) - set(spec.params))
    if unknown:
        raise StrategyParameterError(
            f"strategy {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {valid}"
        )
    missing = [p for p in spec.params.values() if p.required and p.name not in given]
    if missing:
        raise StrategyParameterError(
            f"strategy {name!r} needs {', '.join(p.name for p in missing)}; "
            f"valid parameters: {valid}"
        )
    kwargs = {k: coerce_param(name, spec.params[k], v) for k, v in given.items()}
    try:
        instance = spec.cls(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise StrategyParameterError(
            f"strategy {name!r} ({spec.origin}) rejected parameters {given}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    instance.origin = spec.origin
    if getattr(instance, "name", None) != name:
        instance.name = name  # type: ignore[misc]  # the registry name is what manifests record
    return instance


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return packages_distributions()


def strategy_code(aggregator: Aggregator) -> dict[str, str]:
    """Which code aggregated (manifests and merge metadata record it).

    ``origin`` (built-in, plugin, local), ``object`` (``module:qualname`` of the
    class or @strategy function) and, when an installed
    distribution provides that module, its ``package`` and ``version``
    (``importlib.metadata``).
    """
    cls = type(aggregator)
    target = getattr(cls, "_strategy_function", None) or cls
    origin = str(getattr(aggregator, "origin", "built-in"))
    kind = origin.split(" ", 1)[0] if origin.startswith(("plugin", "built-in")) else "local"
    out = {"origin": kind, "object": f"{target.__module__}:{target.__qualname__}"}
    parts = origin.split(" ")
    if kind == "plugin" and len(parts) == 3:  # "plugin <dist> <version>" from the entry point
        out["package"], out["version"] = parts[1], parts[2]
        return out
    packages = _distributions().get(target.__module__.split(".", 1)[0], [])
    if packages:
        out["package"] = packages[0]
        with contextlib.suppress(Exception):  # no version in the metadata: name only
            out["version"] = version(packages[0])
    return out
