"""Run methods on a protocol over seeds and collect a Report; everything expensive is cached.

A protocol (TOML): dataset, arch (+ [arch_kwargs]), [recipe], forget (a ForgetSpec string), val_fraction,
seeds, importance_batch, and [methods.LABEL] tables (optional ``method`` and ``preset`` keys, the rest
hyperparameters). Originals and oracles come from the checkpoint cache; each method's row is cached under
the hash of (original weights, split, method, hyperparameters, excise version), so re-running an unchanged
protocol finishes from cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .. import __version__
from ..evaluation.evaluate import metrics_from_predictions, model_predictions
from ..evaluation.metrics import applicable
from ..evaluation.report import ORACLE, Report
from ..storage import cache_key, cached_row, state_hash
from ..protocol import load_protocol, require_classification, setup_for
from ..types import resolve_device

def _protocol_identity(proto: Dict[str, Any], seeds: Sequence[int], split_hashes: Dict[int, str], data_fp: str):
    # ``search`` narrows what ``excise tune`` searches; it changes no row, so it is not part of the identity
    body = {k: v for k, v in proto.items() if k not in ("methods", "description", "seeds", "data_root", "search")}
    return {**body, "seeds": list(seeds), "split_hashes": {str(k): v for k, v in split_hashes.items()},
            "data_fingerprint": data_fp}


def _loaders(prep) -> Dict[str, Any]:
    return {k: prep.loaders[k] for k in ("forget", "retain", "val", "test", "test_forget", "test_retain", "corrected")
            if k in prep.loaders}


def run_bench(protocol: str | Dict[str, Any], methods: Optional[Sequence[str]] = None,
              seeds: Optional[int | Sequence[int]] = None,
              progress: bool = True, out: Optional[str | Path] = None, device: Any = None,
              tuned: Any = None) -> Report:
    """Run the protocol's methods (or ``methods``, labels of the protocol or registered names) on its first
    ``seeds`` seeds (an int), or on the listed seeds of the protocol (a list), and return the finalized Report (also saved to ``out`` when given).

    ``device``: where models are trained and edited (default CPU; see :func:`excise.resolve_device`). A method
    that diverges (raises FloatingPointError) gets a row with ``diverged`` set instead of metrics, and the
    run goes on with the next method.

    ``tuned``: ``True`` for the tuned tables shipped with excise, or a table file / folder written by
    ``excise tune``: each method label found there runs with its tuned values over the protocol's entry."""
    from .. import unlearn
    from ..methods import get_method
    from ..protocol import prepare

    proto = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    device = resolve_device(device)
    if seeds is None or isinstance(seeds, int):
        seed_list = list(proto["seeds"])[: seeds] if seeds else list(proto["seeds"])
    else:
        seed_list = list(seeds)
        unknown = [s for s in seed_list if s not in proto["seeds"]]
        if unknown or not seed_list:
            raise ValueError(f"seeds {unknown or seed_list} are not among the protocol's seeds {proto['seeds']}")
    table = {k: dict(v) for k, v in (proto["methods"] or {}).items()}
    labels = list(methods) if methods else list(table)
    tuned_facts, hit = None, []
    if tuned is not None and tuned is not False:
        from ..tuned import carried_entries, load_tuned, tuned_table_path

        where = None if tuned is True else tuned
        values = load_tuned(proto["name"], where)
        hit = [lb for lb in labels if lb in values]
        for lb in hit:
            table[lb] = {**table.get(lb, {}), **values[lb]}
        src = where if where is not None else tuned_table_path(proto["name"]).name + " (shipped)"
        carried = carried_entries(proto["name"], where)
        searched = [lb for lb in hit if lb not in carried]
        tuned_facts = {"source": str(src), "searched": searched, "carried": {lb: carried[lb] for lb in hit if lb in carried},
                       "default": [lb for lb in labels if lb not in hit]}
    rows_by_seed, split_hashes, fp = {}, {}, ""
    for seed in seed_list:
        if proto.get("task") == "diffusion":  # a generator, scored on what it generates
            from ..diffusion.bench import diffusion_rows

            rows_by_seed[seed], split_hashes[seed], fp = diffusion_rows(
                proto, seed, labels, table, hit, progress, device, None if out is None else Path(out))
            continue
        prep = prepare(setup_for(proto, seed), progress=progress, device=device)
        split_hashes[seed], fp = prep.splits.hash, prep.train_ds.fingerprint()
        loaders = _loaders(prep)
        # a row cached before a metric that applies here was registered lacks it: that set is in every key
        metrics = applicable(loaders)
        o_hash = state_hash(prep.original)
        r_hash = state_hash(prep.oracle)
        oracle_preds: Dict[str, Any] = {}  # the oracle's pass over every split, made once a row needs it: a
        # run that finds its rows in the cache (one method per call, say) costs no model pass at all

        def oracle_predictions():
            if not oracle_preds:
                oracle_preds.update(model_predictions(prep.oracle, loaders))
            return oracle_preds

        def eval_row(model_preds):
            return metrics_from_predictions(model_preds, oracle_predictions(), seed=seed)

        def made(meta, digest):  # which model a row evaluated, and how it was trained (when recorded)
            return {"model_hash": digest, **{k: v for k, v in (meta or {}).items() if k in ("torch", "device", "threads")}}

        rows = [
            {"method": "original", "seed": seed, **made(prep.original_meta, o_hash), **cached_row(
                cache_key(kind="eval", model=o_hash, oracle=r_hash, split=prep.splits.hash, v=__version__,
                          metrics=metrics),
                lambda: {**eval_row(model_predictions(prep.original, loaders)), "seconds": None})},
            {"method": ORACLE, "seed": seed, **made(prep.oracle_meta, r_hash), **cached_row(
                cache_key(kind="eval", model=r_hash, oracle=r_hash, split=prep.splits.hash, v=__version__,
                          metrics=metrics),
                lambda: {**eval_row(oracle_predictions()), "seconds": prep.oracle_meta["train_seconds"]})},
        ]
        request = prep.request()
        for label in labels:
            entry = dict(table.get(label, {}))
            name = entry.pop("method", label)
            preset = entry.pop("preset", None)

            def compute(name=name, preset=preset, entry=entry):
                try:
                    res = unlearn(prep.original, request, name, preset=preset, progress=progress, **entry)
                    one_off = None
                    if res.counters.importance_cache_misses:
                        # The importance on D (or D̃) was computed on first use and is cached now: it is a
                        # one-off per model, so the row is timed on a second run that loads it, and the
                        # first computation is reported apart.
                        one_off = {"importance_ref_seconds": res.timings.get("importance_ref"),
                                   "first_run_seconds": res.seconds}
                        res = unlearn(prep.original, request, name, preset=preset, progress=progress, **entry)
                    preds = model_predictions(res.model, loaders)  # raises too on non-finite outputs
                except FloatingPointError as err:  # a divergence: record it, run the rest
                    return {"diverged": str(err), "seconds": None}
                row = eval_row(preds)
                row.update(seconds=res.seconds, timings=res.timings, counters=res.counters.as_dict(),
                           hparams=res.hparams, info={k: v for k, v in res.info.items() if not isinstance(v, dict)})
                if one_off is not None:
                    row["one_off"] = one_off
                if res.warnings:  # what the post-checks found (excise.checks)
                    row["warnings"] = res.warnings
                if res.mask is not None:
                    row["selected_fraction"] = res.mask.fraction(prep.original)
                    row["selected_per_layer"] = {k: float(v.float().mean()) for k, v in res.mask.items()}
                return row

            rev = get_method(name).revision  # a method whose behaviour changed does not reuse older rows
            key = cache_key(kind="method", model=o_hash, split=prep.splits.hash, method=name, preset=preset,
                            hparams=entry, v=__version__, metrics=metrics, **({"rev": rev} if rev else {}))
            rows.append({"method": label, "seed": seed, **cached_row(key, compute), **({"revision": rev} if rev else {}),
                         **({"tuned": True} if label in hit else {})})
        rows_by_seed[seed] = rows
    report = Report(_protocol_identity(proto, seed_list, split_hashes, fp))
    for seed in seed_list:
        for r in rows_by_seed[seed]:
            report.rows.append(r)
    report.facts["seeds_total"] = len(proto["seeds"])
    if tuned_facts:
        report.facts["tuned"] = tuned_facts
    if proto.get("task") != "diffusion":
        report.notes.append("mia_svc_confidence fits its SVC on a seeded random subset of the retain set as large as "
                            "its non-members (the attack's definition): the test set, or on full-class forgetting the "
                            "other classes' test samples (SalUn's roles, which TA follows; TA_all in the JSON keeps the "
                            "whole test set); mia_loss_cv subsamples the larger of forget / test to the smaller "
                            "(seeded). Every other number uses every sample.")
    report.finalize()
    if out is not None:
        report.save(out)
    return report


def evaluate(model, protocol: str | Dict[str, Any], seed: Optional[int] = None, name: str = "model",
             progress: bool = True, oracle=None, device: Any = None) -> Report:
    """Score a user's model against the protocol's retrain oracle for the same split and seed. The oracle is
    fetched from the training cache (trained, with a progress bar, if missing) unless ``oracle`` is given.
    Returns a finalized Report with the ``original``, ``retrain`` and ``name`` rows."""
    from ..protocol import prepare

    proto = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    require_classification(proto, "excise evaluate")
    seed = proto["seeds"][0] if seed is None else seed
    prep = prepare(setup_for(proto, seed), progress=progress, with_oracle=oracle is None, device=resolve_device(device))
    if oracle is not None:
        prep.oracle, prep.oracle_meta = oracle, {"train_seconds": None}
    loaders = _loaders(prep)
    oracle_preds = model_predictions(prep.oracle, loaders)
    report = Report(_protocol_identity(proto, [seed], {seed: prep.splits.hash}, prep.train_ds.fingerprint()))
    report.add("original", seed, metrics_from_predictions(model_predictions(prep.original, loaders), oracle_preds, seed))
    report.add(ORACLE, seed, metrics_from_predictions(oracle_preds, oracle_preds, seed),
               seconds=prep.oracle_meta["train_seconds"])
    report.add(name, seed, metrics_from_predictions(model_predictions(model, loaders), oracle_preds, seed))
    return report.finalize()
