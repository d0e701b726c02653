"""Registry of unlearning methods. A method is ``fn(model, request, ctx, **hparams) -> UnlearningResult``.

Each entry carries excise's defaults (chosen so that the shipped protocols actually forget) and named
presets, e.g. ``preset="paper"`` for the published hyperparameters, kept for parity.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from ..types import Counters, UnlearningRequest, UnlearningResult


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

    def param(self, name: str) -> Param:
        return self.params.get(name) or infer_param(self.defaults.get(name))


_METHODS: Dict[str, MethodSpec] = {}

# The methods excise is built around (find the few parameters that carry the forget data, edit only those);
# every other registered method but ``retrain`` is a baseline to compare them with.
SELECTIVE = ("ssd", "lfssd", "assd", "scissorhands", "saps")


def register(name: str, defaults: Dict[str, Any], presets: Optional[Dict[str, Dict[str, Any]]] = None,
             summary: str = "", space: Optional[Dict[str, Any]] = None, revision: int = 0,
             params: Optional[Dict[str, Param]] = None, strength: Optional[Tuple[str, int]] = None):
    """Register ``fn`` under ``name``. ``space``: hyperparameter → :class:`Real` / :class:`Int` / :class:`Choice`,
    the ranges the tuner searches (each must be one of ``defaults``). ``revision``: raise it when the same
    hyperparameters start to do something different (:attr:`MethodSpec.revision`). ``params``: hyperparameter
    → :class:`Param`, its type and valid values (undeclared ones take their default's type); every value is
    checked before the method runs, and ``--hp`` strings are parsed by it. ``strength``: ``(hyperparameter,
    +1 | -1)``, the knob calibration moves (larger forgets more: +1; less: -1), one of ``space``."""
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
                                    strength)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def available() -> Dict[str, str]:
    _load_builtin()
    return {n: s.summary for n, s in sorted(_METHODS.items())}


def _load_builtin() -> None:
    from . import baselines, saps, scissorhands, ssd  # noqa: F401  (registers the built-in methods)


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


def as_request(request_or_loaders: Any) -> UnlearningRequest:
    if isinstance(request_or_loaders, UnlearningRequest):
        return request_or_loaders
    if isinstance(request_or_loaders, dict):
        return UnlearningRequest(**request_or_loaders)
    raise TypeError("pass an UnlearningRequest or a dict with keys forget / retain / train / task")


def unlearn(model: nn.Module, request_or_loaders: Any, method: str = "ssd", preset: Optional[str] = None,
            progress: bool = False, importance_cache: Any = None, checks: bool = True, calibrate: Any = False,
            **hparams) -> UnlearningResult:
    """Run an unlearning method on a copy of ``model`` and return the result (the caller's model is untouched).

    ``request_or_loaders``: an :class:`UnlearningRequest` or a dict ``{"forget": loader, "retain": loader,
    "train": loader, "task": task}``. ``preset``: a named set of hyperparameters (e.g. ``"paper"``).
    ``importance_cache``: an ImportanceCache, None for the process-wide one, False for none.
    Remaining keyword arguments override the method's hyperparameters.

    ``calibrate=True``: search the method's strength knob without a retrain oracle (:mod:`excise.calibration`),
    from the request's forget, retain and ``holdout`` data; a dict sets its options, e.g.
    ``calibrate={"trials": 6, "delta": 3.0}`` (at most 6 runs; utility may fall by 3 points; defaults 10 and 2).
    ``method="auto"``: calibrate the methods of ``excise.calibration.AUTO_METHODS``, cheapest first, and return
    the first that meets the forget target within the utility bound (else the best by the same ranking).

    Before any work the request and every hyperparameter are checked (a ``ValueError`` naming the method).
    With ``checks`` (default), the result is scored on fixed-size samples of the forget and retain loaders
    (``result.info["checks"]``); a result that changed nothing, forgot nothing, lost utility or collapsed
    issues an :class:`excise.checks.ExciseWarning` and lists it in ``result.warnings``.
    """
    from .. import calibration as cal
    from .. import checks as post
    from ..importance.cache import ImportanceCache, default_cache

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    request = as_request(request_or_loaders)
    if method == "auto":
        if hparams or preset:
            raise ValueError("method='auto' chooses each method's hyperparameters; pass none (or pick a method)")
        calibrate = calibrate or True
    names = cal.AUTO_METHODS if method == "auto" else (method,)
    specs = [get_method(n) for n in names]
    if method == "auto" and request.retain is None:
        raise ValueError("auto: calibration needs a retain loader (UnlearningRequest(retain=...))")
    plans = [(spec, resolve_hparams(spec, preset, hparams)) for spec in specs]
    for spec, hp in plans:
        post.validate_request(model, request, spec.name)
        if calibrate and spec.strength is None:
            raise ValueError(f"{spec.name}: declares no strength to calibrate; methods that do: "
                             f"{', '.join(cal.calibratable())}")
        if calibrate and isinstance(hp[spec.strength[0]], (str, bool)):
            raise ValueError(f"{spec.name}: calibration searches {spec.strength[0]} itself; it cannot start from "
                             f"{spec.strength[0]}={hp[spec.strength[0]]!r}")
    if importance_cache is False:
        importance_cache = ImportanceCache(memory=False)
    ctx = Context(Counters(), Timer(), importance_cache if importance_cache is not None else default_cache(), progress,
                  memo={} if calibrate else None)
    t0 = time.perf_counter()
    if not calibrate:
        spec, hp = plans[0]
        result = _execute(spec, model, request, ctx, hp)
    else:
        try:
            opts = cal.options(calibrate)
            evaluator = cal.prepare(model, request, opts["samples"])
        except cal.CalibrationError as e:
            raise cal.CalibrationError(f"{method}: {e}") from None
        tried = []
        for spec, hp in plans:
            ctx.memo = {}  # the forget importance of one method's trials, shared between them
            result = cal.calibrate(model, request, spec, hp, lambda h, spec=spec: _execute(spec, model, request, ctx, h),
                                   trials=opts["trials"], delta=opts["delta"], evaluator=evaluator)
            tried.append(result)
            if cal.good_enough(result):
                break
        if len(tried) > 1:
            result = min(tried, key=lambda r: cal._rank(cal.winner(r)))
            result.info["auto"] = {"tried": [r.method for r in tried], "chosen": result.method,
                                   "trials_run": {r.method: r.info["calibration"]["trials_run"] for r in tried}}
        elif method == "auto":
            result.info["auto"] = {"tried": [result.method], "chosen": result.method,
                                   "trials_run": {result.method: result.info["calibration"]["trials_run"]}}
    result.seconds = time.perf_counter() - t0
    result.timings = dict(ctx.timer.phases)
    result.counters = ctx.counters
    if checks:
        t1 = time.perf_counter()
        n = post.check_samples(ctx.counters.samples_seen)
        findings = post.post_check(result.method, model, result, post.probe(model, request, n))
        result.info["checks"]["seconds"] = time.perf_counter() - t1
        result.warnings = post.issue(findings)
    return result


def _execute(spec: MethodSpec, model: nn.Module, request: UnlearningRequest, ctx: Context,
             hp: Dict[str, Any]) -> UnlearningResult:
    """One run of ``spec`` on a copy of ``model``."""
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    method = spec.name
    try:
        result = spec.fn(work, request, ctx, **hp)
    except (ValueError, FloatingPointError) as e:  # name the method in every message of these plain kinds
        if type(e) in (ValueError, FloatingPointError) and not str(e).startswith(method):
            raise type(e)(f"{method}: {e}") from e
        raise
    result.seconds = time.perf_counter() - t0
    from .. import checks as post

    bad = post._non_finite(result.model)
    if bad:  # a method whose own checks missed a divergence: no caller should evaluate (or ship) this model
        raise FloatingPointError(f"{method}: the edited model has non-finite values in {', '.join(bad[:5])}"
                                 f"{' …' if len(bad) > 5 else ''}; lower its step size")
    result.method, result.hparams = method, dict(hp)
    return result
