"""``excise.evaluate``: one entry point for scoring an unlearned model, on a user's loaders or a shipped protocol."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


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
