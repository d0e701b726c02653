"""The two entry points: ``excise.unlearn`` runs a registered method (optionally calibrated, then checked) and
``excise.evaluate`` scores an unlearned model, on a user's loaders or a shipped protocol."""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from . import calibration as cal
from . import distributed
from . import checks as post
from .importance.cache import ImportanceCache, default_cache
from .methods.registry import Context, MethodSpec, Timer, get_method, resolve_hparams
from .tasks import model_device
from .types import Counters, UnlearningRequest, UnlearningResult


def evaluate(model: nn.Module, data: Any, oracle: Optional[nn.Module] = None, original: Optional[nn.Module] = None,
             task: Any = None, seed: Optional[int] = None, **protocol_kwargs) -> Any:
    """Score an unlearned model.

    Your own data: ``data`` is a dict of loaders (``forget``, ``retain``, ``test``; optional ``val``,
    ``test_forget``, ``test_retain``) — see :func:`excise.evaluation.evaluate.evaluate_loaders`; returns
    ``{"model": metrics, "original": …, "oracle": …, "gaps": …}`` for the models given. With no retrained
    ``oracle`` there are no gaps: compare with ``original`` (and see ``result.info["calibration"]``).

    A shipped protocol: ``data`` is its name or a protocol dict (``excise bench --list``); returns the Report of
    :func:`excise.bench.runner.evaluate` (the protocol's oracle, trained or read from the cache, unless given).
    """
    if isinstance(data, str) or (isinstance(data, dict) and "dataset" in data):
        from .bench.runner import evaluate as evaluate_protocol

        if original is not None or task is not None:
            raise TypeError("a shipped protocol brings its own original model and task")
        return evaluate_protocol(model, data, seed=seed, oracle=oracle, **protocol_kwargs)
    if protocol_kwargs:
        raise TypeError(f"evaluate on your own loaders takes no {sorted(protocol_kwargs)}")
    from .evaluation.evaluate import evaluate_loaders

    return evaluate_loaders(model, data, oracle=oracle, original=original, task=task, seed=seed or 0)


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
        if not spec.applies_to(request.task):
            raise ValueError(f"{spec.name} applies to {' / '.join(spec.tasks)} tasks, not to the request's "
                             f"{getattr(request.task, 'name', type(request.task).__name__)} task")
        post.validate_request(model, request, spec.name)
        if calibrate:
            cal.check_knob(spec, hp)
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


@contextlib.contextmanager
def _seeded(seed: Any, model: nn.Module) -> Iterator[None]:
    """For a method with a ``seed``: the global random generators seeded with it for the run, and the caller's
    states restored after. What a method draws from them — dropout masks while it trains, for one — then depends
    on its seed alone, not on what the caller's process drew before (the same call, the same model)."""
    if seed is None:
        yield
        return
    device = model_device(model)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _execute(spec: MethodSpec, model: nn.Module, request: UnlearningRequest, ctx: Context,
             hp: Dict[str, Any]) -> UnlearningResult:
    """One run of ``spec`` on a copy of ``model``."""
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    method = spec.name
    start_spread = distributed.broadcast_module(work)  # under torch.distributed every rank starts from rank 0's
    try:
        with _seeded(hp.get("seed"), work):
            result = spec.fn(work, request, ctx, **hp)
    except (ValueError, FloatingPointError) as e:  # name the method in every message of these plain kinds
        if type(e) in (ValueError, FloatingPointError) and not str(e).startswith(method):
            raise type(e)(f"{method}: {e}") from e
        raise
    if distributed.active():
        # every rank took the same steps on the same reduced gradients; rank 0's result is the one returned
        # everywhere, and how far the others had drifted (float summation, BatchNorm statistics of their parts)
        # is reported
        end_spread = distributed.broadcast_module(result.model)
        result.info["distributed"] = {"world_size": distributed.world(), "start_spread": start_spread,
                                      "end_spread": end_spread}
    result.seconds = time.perf_counter() - t0
    bad = post._non_finite(result.model)
    if bad:  # a method whose own checks missed a divergence: no caller should evaluate (or ship) this model
        raise FloatingPointError(f"{method}: the edited model has non-finite values in {', '.join(bad[:5])}"
                                 f"{' …' if len(bad) > 5 else ''}; lower its step size")
    result.method, result.hparams = method, dict(hp)
    return result
