"""Registry of unlearning methods. A method is ``fn(model, request, ctx, **hparams) -> UnlearningResult``.

The registry imports no method: each method file registers itself, and ``excise.methods`` imports the built-in
ones (so importing ``excise.methods.registry``, which imports its package first, finds them registered).
``excise.unlearn`` (``excise/api.py``) runs a registered method.

Each entry carries excise's defaults (chosen so that the shipped protocols actually forget) and named
presets, e.g. ``preset="paper"`` for the published hyperparameters, kept for parity.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..types import Counters


@dataclasses.dataclass(frozen=True)
class Real:
    """A tunable float in [low, high] (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Int:
    """A tunable integer in [low, high]."""

    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A tunable choice among ``options``."""

    options: tuple

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.options))


_KINDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


@dataclasses.dataclass(frozen=True)
class Param:
    """A hyperparameter's declared type and valid values, checked before any work.

    ``kind``: bool, int, float or str (a float also takes an int). ``low`` / ``high``: bounds, inclusive unless
    ``low_open`` / ``high_open``. ``options``: the allowed values. ``nullable``: None is allowed. ``special``:
    extra accepted strings (e.g. ``"auto"``). ``other``: further accepted Python types (e.g. a Scope object)."""

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    options: Optional[tuple] = None
    nullable: bool = False
    special: tuple = ()
    other: tuple = ()
    validate: Optional[Callable[[Any], Any]] = None  # a further check of a non-None value; raises ValueError
    text: Optional[str] = None  # what describe() says, when the fields above do not say it well

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        parts = [_KINDS.get(self.kind, "a value")]
        if self.options is not None:
            parts = ["one of " + ", ".join(map(repr, self.options))]
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '≤'} "
            hi = "" if self.high is None else f" {'<' if self.high_open else '≤'} {self.high:g}"
            parts.append(f"with {lo}value{hi}")
        for sp in self.special:
            parts.append(f"or {sp!r}")
        if self.nullable:
            parts.append("or None")
        return " ".join(parts)

    def check(self, method: str, name: str, value: Any) -> Any:
        """Return ``value`` (an int promoted to float for a float parameter) or raise a ValueError naming both."""
        import math

        def bad(why: str = ""):
            return ValueError(f"{method}: hyperparameter {name} must be {self.describe()}, got {value!r}{why}")

        if value is None:
            if self.nullable:
                return value
            raise bad()
        if isinstance(value, str) and value in self.special:
            return value
        if self.other and isinstance(value, self.other):
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad()
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad()
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            value = float(value)
            if math.isnan(value):
                raise bad()
        elif not isinstance(value, self.kind):
            raise bad()
        if self.options is not None and value not in self.options:
            raise bad()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad()
        if self.validate is not None:
            try:
                self.validate(value)
            except ValueError as e:
                raise ValueError(f"{method}: hyperparameter {name}: {e}") from None
        return value

    def parse(self, method: str, name: str, text: str) -> Any:
        """A command-line string as this parameter's type (``--hp NAME=VALUE``), then :meth:`check`."""
        t = text.strip()
        if self.nullable and t.lower() in ("none", "null"):
            return None
        if t in self.special:
            return t
        try:
            if self.kind is bool:
                low = t.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value: Any = low in ("true", "1", "yes")
            elif self.kind is int:
                value = int(t)
            elif self.kind is float:
                value = float(t)
            elif self.kind is str:
                value = t
            else:  # undeclared, default None: a JSON value (number, list, ...) or the bare string
                import json

                try:
                    value = json.loads(t)
                except json.JSONDecodeError:
                    value = t
        except ValueError:
            raise ValueError(f"{method}: hyperparameter {name} must be {self.describe()}, "
                             f"got {text!r}") from None
        return self.check(method, name, value)


def infer_param(default: Any) -> Param:
    """The declaration of an undeclared hyperparameter: the type of its default (None: any value)."""
    for kind in (bool, int, float, str):
        if type(default) is kind:
            return Param(kind)
    return Param(object, nullable=True)


POS = Param(float, low=0.0, low_open=True)  # a positive number
NONNEG = Param(float, low=0.0)  # a non-negative number
UNIT = Param(float, low=0.0, high=1.0)  # a number in [0, 1]
FRACTION = Param(float, low=0.0, high=1.0, low_open=True)  # a share of the parameters in (0, 1]
COUNT = Param(int, low=1)  # a positive count
MAYBE_COUNT = Param(int, low=1, nullable=True)  # a positive count, or None (no limit)
MOMENTUM = Param(float, low=0.0, high=1.0, high_open=True)
SEED = Param(int)


def _check_scope(value: Any) -> None:
    import re

    from ..selection import Scope

    if isinstance(value, str):
        for pattern in Scope.parse(value).include:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a regular expression ({e})") from None


def scope_param() -> Param:
    """``scope``: None, a Scope, or its command-line form (all, no-norm, weights, pattern:REGEX)."""
    from ..selection import Scope

    return Param(str, nullable=True, other=(Scope,), validate=_check_scope,
                 text="a Scope, one of all, no-norm, weights, pattern:REGEX, or None")


@dataclasses.dataclass
class MethodSpec:
    name: str
    fn: Callable
    defaults: Dict[str, Any]
    presets: Dict[str, Dict[str, Any]]
    summary: str
    space: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what ``excise.tune`` searches
    # Raised when the method's behaviour at the same hyperparameters changes: it keys cached benchmark rows and
    # names tuning studies, so results measured before the change are not reused (0: never changed).
    revision: int = 0
    params: Dict[str, Param] = dataclasses.field(default_factory=dict)  # declared types and ranges
    # (hyperparameter, +1 or -1): the one knob whose larger values forget more (+1) or less (-1), searched in
    # its ``space`` range by oracle-free calibration (excise.calibration); None: the method cannot be calibrated
    strength: Optional[Tuple[str, int]] = None
    # the Task names (Task.name) the method applies to; None: any task whose loss it can differentiate
    tasks: Optional[Tuple[str, ...]] = None

    def applies_to(self, task) -> bool:
        return self.tasks is None or getattr(task, "name", None) in self.tasks

    def param(self, name: str) -> Param:
        return self.params.get(name) or infer_param(self.defaults.get(name))


_METHODS: Dict[str, MethodSpec] = {}

# The methods excise is built around (find the few parameters that carry the forget data, edit only those);
# every other registered method but ``retrain`` is a baseline to compare them with.
SELECTIVE = ("ssd", "lfssd", "assd", "scissorhands", "saps")


def register(name: str, defaults: Dict[str, Any], presets: Optional[Dict[str, Dict[str, Any]]] = None,
             summary: str = "", space: Optional[Dict[str, Any]] = None, revision: int = 0,
             params: Optional[Dict[str, Param]] = None, strength: Optional[Tuple[str, int]] = None,
             tasks: Optional[Tuple[str, ...]] = None):
    """Register ``fn`` under ``name``. ``space``: hyperparameter → :class:`Real` / :class:`Int` / :class:`Choice`,
    the ranges the tuner searches (each must be one of ``defaults``). ``revision``: raise it when the same
    hyperparameters start to do something different (:attr:`MethodSpec.revision`). ``params``: hyperparameter
    → :class:`Param`, its type and valid values (undeclared ones take their default's type); every value is
    checked before the method runs, and ``--hp`` strings are parsed by it. ``strength``: ``(hyperparameter,
    +1 | -1)``, the knob calibration moves (larger forgets more: +1; less: -1), one of ``space``. ``tasks``:
    the Task names it applies to (None: any)."""
    space, params = dict(space or {}), dict(params or {})
    if strength is not None and (strength[0] not in space or strength[1] not in (1, -1)):
        raise ValueError(f"{name}: strength must be (a hyperparameter of the search space, +1 or -1), got {strength}")
    for what, names in (("search space", space), ("params", params)):
        unknown = set(names) - set(defaults)
        if unknown:
            raise ValueError(f"{name}: {what} names {sorted(unknown)} that are not hyperparameters")
    for hp, value in defaults.items():  # a declaration that rejects the method's own default is a bug
        (params.get(hp) or infer_param(value)).check(name, hp, value)

    def deco(fn):
        _METHODS[name] = MethodSpec(name, fn, dict(defaults), dict(presets or {}),
                                    summary or (fn.__doc__ or "").strip().split("\n")[0], space, revision, params,
                                    strength, None if tasks is None else tuple(tasks))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def available() -> Dict[str, str]:
    return {n: s.summary for n, s in sorted(_METHODS.items())}


def calibratable() -> List[str]:
    """The registered methods that declare a strength knob (``excise.calibration`` can search it)."""
    return sorted(n for n, s in _METHODS.items() if s.strength is not None)


class Timer:
    """Collects wall time per phase. A phase that runs inside another counts for itself only (its time is
    taken off the enclosing phase), so the phases add up to at most the total."""

    def __init__(self):
        self.phases: Dict[str, float] = {}
        self._open: list = []  # [name, start, time of the nested phases] of each phase still running

    def phase(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                timer._open.append([name, time.perf_counter(), 0.0])

            def __exit__(self_inner, *exc):
                _, t0, nested = timer._open.pop()
                spent = time.perf_counter() - t0
                timer.phases[name] = timer.phases.get(name, 0.0) + spent - nested
                if timer._open:
                    timer._open[-1][2] += spent

        return _Ctx()


@dataclasses.dataclass
class Context:
    """What a method may use besides its hyperparameters: counters, a phase timer, the importance cache."""

    counters: Counters
    timer: Timer
    importance_cache: Any
    progress: bool = False
    memo: Optional[Dict[Any, Any]] = None  # within one calibration: what the trials may share (forget importance)

    def cached(self, model, loader, estimator: str, compute: Callable, options: Optional[Dict[str, Any]] = None,
               data_key: Optional[str] = None, task: Any = None) -> Tuple[Any, str]:
        """``(scores, status)`` from the importance cache (computed on a miss), the hit or miss counted."""
        scores, status = self.importance_cache.get_or_compute(model, loader, estimator, compute, options,
                                                              data_key=data_key, task=task)
        if status == "hit":
            self.counters.importance_cache_hits += 1
        elif status == "miss":
            self.counters.importance_cache_misses += 1
        return scores, status

    @staticmethod
    def reshuffled(loader, batch_size: int, seed: int):
        """A DataLoader over ``loader``'s dataset, reshuffled every epoch in an order fixed by ``seed``."""
        from torch.utils.data import DataLoader

        from ..training import seeded_loader

        if not isinstance(loader, DataLoader):
            raise ValueError(f"this method reshuffles its data and needs a DataLoader, got {type(loader).__name__}")
        return seeded_loader(loader.dataset, None, batch_size, shuffle=True, seed=seed)

    @staticmethod
    def eligible(model, scope: Any) -> Optional[set]:
        """The names of the parameters a method may edit: those of ``scope`` (a Scope or its expression), or
        None (every trainable parameter) when ``scope`` is None."""
        from ..selection import Scope

        if scope is None:
            return None
        return (scope if isinstance(scope, Scope) else Scope.parse(scope)).names(model)


def resolve_hparams(spec: MethodSpec, preset: Optional[str], hparams: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(spec.defaults)
    if preset is not None:
        if preset not in spec.presets:
            raise ValueError(f"{spec.name} has no preset {preset!r}; presets: {sorted(spec.presets) or 'none'}")
        out.update(spec.presets[preset])
    unknown = set(hparams) - set(out)
    if unknown:
        raise ValueError(f"{spec.name} does not take {sorted(unknown)}; its hyperparameters: {sorted(out)}")
    out.update(hparams)
    return {k: spec.param(k).check(spec.name, k, v) for k, v in out.items()}


def parse_hparam(method: str, name: str, text: str) -> Any:
    """A ``--hp NAME=VALUE`` string parsed by the hyperparameter's declared type (an error names both)."""
    spec = get_method(method)
    if name not in spec.defaults:
        raise ValueError(f"{method} does not take {name!r}; its hyperparameters: {sorted(spec.defaults)}")
    return spec.param(name).parse(method, name, text)


def parse_hparams(items: Optional[Sequence[str]], method: str) -> Dict[str, Any]:
    """``NAME=VALUE`` strings, each value parsed by the method's declared type for NAME (an error names both)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--hp takes NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_hparam(method, k.strip(), v)
    return out
