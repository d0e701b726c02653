"""``excise tune``: search a method's hyperparameters on a protocol, carry or re-check a tuned entry."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List


def _parse_hparams(items, method: str) -> Dict[str, Any]:
    from .methods.registry import parse_hparams

    return parse_hparams(items, method)


def cmd_tune(args) -> int:
    from .tuning import tune, write_tuned
    from .types import atomic_write_bytes

    if args.recheck:
        return _recheck(args)
    if args.carry_from:
        return _carry(args)
    seed = args.seed[0] if args.seed and len(args.seed) == 1 else args.seed
    res = tune(args.method, args.protocol, budget=args.budget, seed=seed, floor=args.floor,
               floor_ref=args.floor_ref, storage=args.storage, device=args.device, progress=not args.quiet,
               fixed=_parse_hparams(args.hp, args.method) if args.hp else None, timeout=args.timeout, check=args.check,
               start=_starts(args))
    print(res.summary())
    o, b = res.oracle_metrics, res.best_metrics
    print("validation metrics   " + "  ".join(f"{k:>10s}" for k in o))
    for name, m in (("oracle", o), ("original", res.original_metrics), ("best", b)):
        print(f"{name:20s} " + "  ".join(f"{m.get(k, float('nan')):10.2f}" for k in o))
    feasible = res.best_value < 100
    if not feasible:
        print("warning: no trial met the utility floor (or every trial diverged)", file=sys.stderr)
    out = Path(args.out)
    atomic_write_bytes(out / f"{res.protocol}.{res.method}.json", json.dumps(res.to_dict(), indent=1).encode())
    print(f"wrote {out / f'{res.protocol}.{res.method}.json'} (every trial)")
    if args.write is not None:
        if not res.complete:
            print(f"not written into the tuned table: {res.n_trials} of {args.budget} trials (resume to finish)")
            return 0
        if not feasible:
            print("error: nothing written into the tuned table", file=sys.stderr)
            return 1
        path = write_tuned(res, None if args.write is True else args.write)
        print(f"wrote the tuned values into {path}")
    return 0


def _starts(args) -> List[Dict[str, Any]]:
    """``--start NAME=VALUE,NAME=VALUE`` (repeatable) and ``--start-tuned`` (the searched values that the tuned
    table holds for the method now) as starting points for ``tune``."""
    from .bench import load_protocol
    from .methods import get_method
    from .tuned import load_tuned
    from .tuning import search_space

    starts = [_parse_hparams(item.split(","), args.method) for item in args.start or []]
    if args.start_tuned:
        proto = load_protocol(args.protocol)
        table = None if args.write in (None, True) else args.write
        entry = load_tuned(proto["name"], table).get(args.method)
        if entry is None:
            print(f"--start-tuned: the tuned table holds no {args.method} entry for {proto['name']}; "
                  "searching without it", file=sys.stderr)
        else:
            space = search_space(proto, args.method, get_method(args.method))
            starts.append({k: v for k, v in entry.items() if k in space})
    return starts


def _carry(args) -> int:
    from .tuning import carry_tuned

    if args.recheck or args.seed or args.hp or args.storage or args.timeout or args.start or args.start_tuned \
            or args.check is not None:
        raise SystemExit("error: --carry-from copies another protocol's tuned entry without a search; the search "
                         "options do not apply")
    table = None if args.write in (None, True) else args.write
    path = carry_tuned(args.method, args.carry_from, args.protocol, table=table)
    print(f"carried the {args.method} entry of {args.carry_from} into {path} (not searched on {args.protocol}: "
          "`excise tune` there replaces it)")
    return 0


def _recheck(args) -> int:
    from .tuning import check_tuned, record_check
    from .types import atomic_write_bytes

    if args.seed or args.hp or args.storage or args.timeout:
        raise SystemExit("error: --recheck re-scores the table's entry as it was tuned (its seeds, the protocol's "
                         "fixed values); --seed, --hp, --storage and --timeout do not apply")
    table = None if args.write in (None, True) else args.write
    res = check_tuned(args.method, args.protocol, rel=args.check or 0.01, table=table, floor=args.floor,
                      floor_ref=args.floor_ref, device=args.device, progress=not args.quiet)
    verdict = "FRAGILE" if res["fragile"] else "stable"
    rec = "" if res["recorded"] is None else f" (recorded when tuned: {res['recorded']:.2f})"
    print(f"{res['method']} on {res['protocol']}: tuned values {res['values']} score {res['value']:.2f}{rec}")
    if res.get("same_models") is False:
        print("  note: these originals are not the ones the entry was tuned on (trained again: another device "
              "or CPU thread count gives other bits), so the two objectives need not match")
    for r in res["runs"]:
        print(f"  x{r['scale']:.4g}: {r['value']:.2f}")
    print(f"{verdict} at ±{res['rel'] * 100:g} %: the objective moves by {res['shift']:.2f} (tolerance {res['tolerance']})"
          + (f"; {res['note']}" if res.get("note") else ""))
    out = Path(args.out) / f"{res['protocol']}.{res['method']}.check.json"
    atomic_write_bytes(out, json.dumps(res, indent=1).encode())
    print(f"wrote {out}")
    if args.write is not None:
        print(f"recorded the check in {record_check(res, table)}")
    return 0
