"""Registry of unlearning methods. A method is ``fn(model, request, ctx, **hparams) -> UnlearningResult``.

Each entry carries excise's defaults (chosen so that the shipped protocols actually forget) and named
presets, e.g. ``preset="paper"`` for the published hyperparameters, kept for parity.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Dict, Optional

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


_METHODS: Dict[str, MethodSpec] = {}

# The methods excise is built around (find the few parameters that carry the forget data, edit only those);
# every other registered method but ``retrain`` is a baseline to compare them with.
SELECTIVE = ("ssd", "lfssd", "assd", "scissorhands", "saps")


def register(name: str, defaults: Dict[str, Any], presets: Optional[Dict[str, Dict[str, Any]]] = None,
             summary: str = "", space: Optional[Dict[str, Any]] = None, revision: int = 0):
    """Register ``fn`` under ``name``. ``space``: hyperparameter → :class:`Real` / :class:`Int` / :class:`Choice`,
    the ranges the tuner searches (each must be one of ``defaults``). ``revision``: raise it when the same
    hyperparameters start to do something different (:attr:`MethodSpec.revision`)."""
    space = dict(space or {})
    unknown = set(space) - set(defaults)
    if unknown:
        raise ValueError(f"{name}: search space names {sorted(unknown)} that are not hyperparameters")

    def deco(fn):
        _METHODS[name] = MethodSpec(name, fn, dict(defaults), dict(presets or {}),
                                    summary or (fn.__doc__ or "").strip().split("\n")[0], space, revision)
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
    """Collects wall time per phase."""

    def __init__(self):
        self.phases: Dict[str, float] = {}

    def phase(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self_inner.t0

        return _Ctx()


@dataclasses.dataclass
class Context:
    """What a method may use besides its hyperparameters: counters, a phase timer, the importance cache."""

    counters: Counters
    timer: Timer
    importance_cache: Any
    progress: bool = False


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
    return out


def as_request(request_or_loaders: Any) -> UnlearningRequest:
    if isinstance(request_or_loaders, UnlearningRequest):
        return request_or_loaders
    if isinstance(request_or_loaders, dict):
        return UnlearningRequest(**request_or_loaders)
    raise TypeError("pass an UnlearningRequest or a dict with keys forget / retain / train / task")


def unlearn(model: nn.Module, request_or_loaders: Any, method: str = "ssd", preset: Optional[str] = None,
            progress: bool = False, importance_cache: Any = None, **hparams) -> UnlearningResult:
    """Run an unlearning method on a copy of ``model`` and return the result (the caller's model is untouched).

    ``request_or_loaders``: an :class:`UnlearningRequest` or a dict ``{"forget": loader, "retain": loader,
    "train": loader, "task": task}``. ``preset``: a named set of hyperparameters (e.g. ``"paper"``).
    Remaining keyword arguments override the method's hyperparameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from ..importance.cache import default_cache

    spec = get_method(method)
    request = as_request(request_or_loaders)
    hp = resolve_hparams(spec, preset, hparams)
    ctx = Context(Counters(), Timer(), importance_cache if importance_cache is not None else default_cache(), progress)
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = spec.fn(work, request, ctx, **hp)
    result.seconds = time.perf_counter() - t0
    bad = [n for n, t in list(result.model.named_parameters()) + list(result.model.named_buffers())
           if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:  # a method whose own checks missed a divergence: no caller should evaluate (or ship) this model
        raise FloatingPointError(f"{method}: the edited model has non-finite values in {', '.join(bad[:5])}"
                                 f"{' …' if len(bad) > 5 else ''}; lower its step size")
    result.method, result.hparams = method, hp
    result.timings = dict(ctx.timer.phases)
    result.counters = ctx.counters
    return result
