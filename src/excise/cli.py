"""The ``excise`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .cli_tune import _parse_hparams, cmd_tune  # noqa: F401  (_parse_hparams: the tests')

DEMO_METHODS = ("ssd", "lfssd", "assd")


def _warn_lines(res) -> None:
    for w in res.warnings:
        print(f"warning: {w['message']}", file=sys.stderr)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


SHOWN = ("UA", "RA", "TA", "mia_lr_entropy")  # metrics of the demo / unlearn table (titles from the registry)
COLUMNS = [("method", "method")] + [(m, m) for m in SHOWN] + [("selected_pct", "selected %"), ("seconds", "seconds"),
                                                             ("speedup", "speed-up")]


def render_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of demo / unlearn rows."""
    from .evaluation.metrics import get_metric

    cols = [(k, get_metric(k).title if k in SHOWN else t) for k, t in COLUMNS]
    if any(r.get("corrected_acc") is not None for r in rows):  # a label-correction request
        cols.insert(2, ("corrected_acc", "acc. on Z with true labels"))
    head = "| " + " | ".join(title for _, title in cols) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_outputs(out: Path, rows: List[Dict[str, Any]], meta: Dict[str, Any], title: str) -> None:
    from .types import atomic_write_bytes

    atomic_write_bytes(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str).encode())
    md = [f"# {title}", "", render_table(rows), "",
          "UA = 100 − forget accuracy; RA / TA = retain / test accuracy (%; class forgetting: TA on the other",
          "classes' test samples, TA_all in results.json on all of them); MIA = % of the forget set that the",
          "SSD paper's attack (logistic regression on softmax entropy, retain vs test) calls member;",
          "seconds = the unlearning step alone (retrain: its training time); speed-up = retrain seconds / seconds.",
          "", "```", json.dumps(meta, indent=1, default=str), "```", ""]
    atomic_write_bytes(out / "results.md", "\n".join(md).encode())


def _row(name: str, metrics: Dict[str, float], seconds: Optional[float], retrain_s: Optional[float],
         selected: Optional[float] = None) -> Dict[str, Any]:
    r = {"method": name, **metrics, "seconds": seconds,
         "selected_pct": None if selected is None else 100.0 * selected}
    r["speedup"] = (retrain_s / seconds) if (seconds and retrain_s) else None
    return r


def _setup_from_args(args) -> "Any":
    from .data import ForgetSpec
    from .protocol import Setup
    from .training import TrainRecipe

    from .data import has_coarse

    spec = ForgetSpec.parse(args.forget, seed=args.seed)
    dataset = args.data
    if spec.kind == "subclass" and has_coarse(dataset):  # a sub-class request: the dataset's coarse labels
        dataset += "-coarse"
    arch_kwargs = {"width": args.width} if args.arch == "resnet18" else {}
    return Setup(dataset=dataset, arch=args.arch, arch_kwargs=arch_kwargs, recipe=TrainRecipe(epochs=args.epochs),
                 forget=spec, seed=args.seed, data_root=args.data_root)


def cmd_demo(args) -> int:
    from . import unlearn
    from .evaluation.summary import basic_metrics
    from .protocol import prepare
    from .storage import default_cache_dir, state_hash
    from .types import atomic_write_bytes

    from .outputs import OutputFolder

    setup = _setup_from_args(args)
    folder = OutputFolder(args.out, overwrite=args.overwrite, replace_own=True).check()
    hps = {name: _parse_hparams(args.hp, name) for name in args.methods}
    print(f"excise demo: {setup.dataset}, {setup.arch}, forget {setup.forget.label()}, seed {setup.seed}", flush=True)
    prep = prepare(setup, progress=not args.quiet, device=args.device)
    print(f"  original model: {'cache' if prep.cache_hits['original'] else 'trained'}; retrain oracle: "
          f"{'cache' if prep.cache_hits['oracle'] else 'trained'} ({prep.oracle_meta['train_seconds']:.1f} s to train)",
          flush=True)
    L = prep.loaders

    def metrics(model):
        return basic_metrics(model, L["forget"], L["retain"], L["test"], test_forget=L.get("test_forget"),
                             test_retain=L.get("test_retain"))

    def cached_metrics(model):
        """Metrics of the cached original / oracle, stored beside them (keyed by weights and split)."""
        path = default_cache_dir() / "metrics" / f"{state_hash(model)[:24]}-{prep.splits.hash[:16]}.json"
        if path.exists():
            return json.loads(path.read_text())
        m = metrics(model)
        atomic_write_bytes(path, json.dumps(m).encode())
        return m

    retrain_s = float(prep.oracle_meta["train_seconds"])
    rows = [_row("original", cached_metrics(prep.original), None, None),
            _row("retrain (oracle)", cached_metrics(prep.oracle), retrain_s, retrain_s)]
    request = prep.request()
    for name in args.methods:
        res = unlearn(prep.original, request, name, preset=args.preset, progress=not args.quiet, **hps[name])
        _warn_lines(res)
        row = _row(name, metrics(res.model), res.seconds, retrain_s, res.info.get("selected_fraction"))
        row["ref_importance_cache"] = res.info.get("ref_importance_cache")
        row["warnings"] = res.warnings
        rows.append(row)
    print()
    print(render_table(rows))
    meta = {"setup": {"dataset": setup.dataset, "arch": setup.arch, "forget": setup.forget.to_dict(),
                      "recipe": setup.recipe.to_dict(), "seed": setup.seed},
            "split_hash": prep.splits.hash, "sizes": prep.splits.sizes(), "preset": args.preset, "hparams": hps}
    try:
        write_outputs(folder.staging, rows, meta, "excise demo")
        prep.splits.save(folder.staging / "splits.json")
        out = folder.commit()
    finally:
        folder.abort()
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'splits.json'}")
    return 0


def cmd_unlearn(args) -> int:
    from . import unlearn
    from .evaluation import accuracy
    from .evaluation.summary import basic_metrics
    from .methods import get_method
    from .outputs import OutputFolder
    from .protocol import prepare
    from .training import load_state, read_state, save_state

    # everything that can be refused is refused before the data is loaded or a pass is made
    folder = OutputFolder(args.out, inputs=[args.model], overwrite=args.overwrite).check()
    auto = args.method == "auto"
    if auto and args.hp:
        raise ValueError("--method auto chooses each method's hyperparameters: drop --hp")
    if not auto:
        get_method(args.method)
    hp = {} if auto else _parse_hparams(args.hp, args.method)
    if args.trials is not None and args.trials < 1:
        raise ValueError(f"--trials must be ≥ 1, got {args.trials}")
    calibrate = (args.calibrate or auto or args.trials is not None) and (
        {"trials": args.trials} if args.trials is not None else True)
    read_state(args.model)
    setup = _setup_from_args(args)
    prep = prepare(setup, with_original=False, with_oracle=False, progress=not args.quiet, device=args.device)
    model = prep.build()
    try:
        load_state(model, args.model)
    except ValueError as e:
        raise ValueError(f"{e} (--arch {args.arch})") from None
    model.eval()
    request = prep.request()
    if calibrate:  # the validation split: data the original never trained on, what "unseen" looks like
        request = dataclasses.replace(request, holdout=prep.loaders["val"])
    res = unlearn(model, request, args.method, preset=args.preset, progress=not args.quiet, calibrate=calibrate, **hp)
    if calibrate:
        cal = res.info["calibration"]
        print(f"calibrated {res.method} ({cal['intent']}-like request, {cal['trials_run']} trials): "
              f"{cal['knob']} = {res.hparams[cal['knob']]}; {cal['why']}")
    _warn_lines(res)
    L = prep.loaders

    def metrics(m):
        out = basic_metrics(m, L["forget"], L["retain"], L["test"], test_retain=L.get("test_retain"))
        if "corrected" in L:  # relabel request: forget accuracy is agreement with the wrong labels
            out["corrected_acc"] = accuracy(m, L["corrected"])
        return out

    rows = [_row("before", metrics(model), None, None),
            _row(res.method, metrics(res.model), res.seconds, None, res.info.get("selected_fraction"))]
    rows[1]["warnings"] = res.warnings
    print(render_table(rows))
    try:  # every file into the staging folder, then one rename: the folder holds this run or the previous one
        stage = folder.staging
        save_state(res.model, stage / "model.safetensors")
        if res.mask is not None:
            res.mask.save(stage / "mask.safetensors")
        prep.splits.save(stage / "splits.json")
        write_outputs(stage, rows, {"model": str(args.model), "result": res.summary(), "split_hash": prep.splits.hash},
                      f"excise unlearn {res.method}")
        out = folder.commit()
    finally:
        folder.abort()
    print(f"\nwrote {out / 'model.safetensors'} (the input checkpoint is unchanged) and results in {out}")
    return 0


def cmd_bench(args) -> int:
    from .bench import list_protocols, run_bench

    if args.protocol == "list":
        print("\n".join(list_protocols()))
        return 0
    if args.seeds is not None and args.seed_list is not None:
        raise ValueError("give --seeds N or --seed S ..., not both")
    report = run_bench(args.protocol, methods=args.methods, seeds=args.seed_list or args.seeds,
                       progress=not args.quiet, out=args.out, device=args.device, tuned=args.tuned)
    print(report.to_markdown())
    cached = sum(1 for r in report.rows if r.get("from_cache"))
    print(f"{cached} of {len(report.rows)} rows came from the cache; wrote {args.out}/report.(md|json|csv) and plots")
    return 0


def cmd_evaluate(args) -> int:
    from .bench import evaluate, load_protocol
    from .protocol import require_classification, setup_for
    from .models import build_model
    from .data import load_dataset
    from .training import load_state
    from .types import resolve_device

    proto = load_protocol(args.protocol)
    require_classification(proto, "excise evaluate")
    setup = setup_for(proto, proto["seeds"][0] if args.seed is None else args.seed)
    train = load_dataset(setup.dataset, "train", setup.data_root)
    model = build_model(setup.arch, train.input_shape, train.num_classes, **setup.arch_kwargs)
    try:
        load_state(model, args.model)
    except ValueError as e:
        raise ValueError(f"{e} (the protocol's architecture {setup.arch})") from None
    device = resolve_device(args.device)
    report = evaluate(model.to(device), proto, seed=setup.seed, name=args.name, progress=not args.quiet, device=device)
    report.save(args.out)
    print(report.to_markdown())
    print(f"wrote {args.out}/report.(md|json|csv)")
    return 0


def _space_str(dim) -> str:
    if hasattr(dim, "options"):
        return "{" + ", ".join(map(str, dim.options)) + "}"
    return f"[{dim.low:g}, {dim.high:g}]" + (" log" if dim.log else "")


def cmd_leaderboard(args) -> int:
    from .bench.leaderboard_cli import main as leaderboard

    return leaderboard(args.args)


def cmd_datasets(args) -> int:
    from .data import dataset_names, get_dataset

    for name in dataset_names():
        base = name[:-len("-coarse")] if name.endswith("-coarse") else name
        try:
            spec = get_dataset(name)
        except ValueError:  # <name>-coarse: the dataset with its coarse labels
            spec = get_dataset(base)
            print(f"{name:22s} {base} with coarse labels: {', '.join(spec.coarse)} (for subclass:NAME requests)")
            continue
        print(f"{name:22s} {spec.summary}{'  (needs --data-root)' if spec.needs_root else ''}")
    print(f"{'package.module:function':22s} your own: function(split, root) returning an ArrayDataset, a pair of "
          "tensors (inputs, labels) or a dataset of (input, label) pairs")
    return 0


def cmd_methods(args) -> int:
    from .methods import available, get_method

    for name, summary in available().items():
        spec = get_method(name)
        presets = f"  presets: {', '.join(spec.presets)}" if spec.presets else ""
        print(f"{name:10s} {summary}\n{'':10s} defaults: {spec.defaults}{presets}")
        if spec.space:
            print(f"{'':10s} tuned over: " + ", ".join(f"{k} {_space_str(v)}" for k, v in spec.space.items()))
        if spec.strength is not None:
            knob, sign = spec.strength
            print(f"{'':10s} calibrate=True moves {knob} {_space_str(spec.space[knob])} "
                  f"({'larger' if sign > 0 else 'smaller'} forgets more)")
        if spec.params:
            print(f"{'':10s} valid: " + "; ".join(f"{k}: {p.describe()}" for k, p in spec.params.items()))
        if spec.tasks:
            print(f"{'':10s} tasks: {', '.join(spec.tasks)} only")
    return 0


def _common(p: argparse.ArgumentParser, forget_default: str = "class:9") -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="a registered dataset (excise datasets: fashion-mnist, digits, cifar10, cifar100 — cifar "
                        "needs --data-root) or your own as package.module:function (called with split, root)")
    p.add_argument("--data-root", default=None, help="folder of the dataset's files (default: the Debian package's)")
    p.add_argument("--arch", default="smallcnn", help="mlp | smallcnn | resnet18")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64 is the paper's; 16 suits a CPU)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the original and the oracle")
    p.add_argument("--forget", default=forget_default,
                   help="class:N | subclass:NAME (coarse labels) | random:FRACTION | indices:I,J,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None, help="named hyperparameters, e.g. 'paper' for the published ones")
    p.add_argument("--hp", action="append", metavar="NAME=VALUE", help="override a hyperparameter (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_arg(p)


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu | cuda | cuda:N | mps | auto (default: a CUDA GPU when there is one, else the CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="excise", description="Machine unlearning for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="Fashion-MNIST small CNN: forget a class with ssd / lfssd / assd vs retraining")
    _common(d)
    d.add_argument("--methods", "--method", nargs="+", default=list(DEMO_METHODS),
                   help="registered method names (see `excise methods`)")
    d.add_argument("--out", default="excise-out/demo",
                   help="output folder, written as a unit (replaces an earlier demo's output; else it must be empty)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    d.set_defaults(func=cmd_demo)
    u = sub.add_parser("unlearn", help="unlearn from a user's checkpoint (safetensors or a state dict)")
    _common(u)
    u.add_argument("--model", required=True, help="checkpoint: .safetensors, or a state dict (.pt, weights only)")
    u.add_argument("--method", default="ssd", help="a registered method (excise methods), or 'auto': the cheapest "
                   "that meets the oracle-free targets (implies --calibrate)")
    u.add_argument("--calibrate", action="store_true",
                   help="choose the method's strength without a retrain oracle (holdout: the validation split)")
    u.add_argument("--trials", type=int, default=None, help="calibration runs at most (default 10; implies --calibrate)")
    u.add_argument("--out", required=True, help="output folder, written as a unit; must be new or empty")
    u.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    u.set_defaults(func=cmd_unlearn)
    b = sub.add_parser("bench", help="run a protocol (shipped name or TOML path; 'list' lists them) and write a report")
    b.add_argument("protocol")
    b.add_argument("--methods", nargs="+", default=None, help="method labels of the protocol, or registered names")
    b.add_argument("--seeds", type=int, default=None, help="use the protocol's first N seeds")
    b.add_argument("--seed", type=int, nargs="+", default=None, dest="seed_list",
                   help="run only these seeds of the protocol (e.g. one process per seed; rows are cached)")
    b.add_argument("--out", default="excise-out/bench")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--tuned", nargs="?", const=True, default=None, metavar="TABLE",
                   help="use tuned hyperparameters: the tables shipped with excise, or a table file / folder "
                        "written by `excise tune --write PATH`")
    _device_arg(b)
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("tune", help="search a method's hyperparameters on a protocol's validation split against "
                                    "its retrain oracle (needs optuna)")
    t.add_argument("method")
    t.add_argument("protocol", help="shipped protocol name or TOML path")
    t.add_argument("--budget", type=int, default=20, help="finished trials the study should hold (resumes)")
    t.add_argument("--seed", type=int, nargs="+", default=None,
                   help="protocol seed(s) to tune on (default: its first); several: each trial's objective is the "
                        "mean over them")
    t.add_argument("--floor", type=float, default=None,
                   help="utility floor: validation accuracy at most this many points below the reference's")
    t.add_argument("--floor-ref", default="oracle", choices=("oracle", "original"))
    t.add_argument("--storage", default=None, help="Optuna journal file (default excise-out/tune/PROTOCOL/METHOD.journal)")
    t.add_argument("--hp", action="append", metavar="NAME=VALUE",
                   help="hold a hyperparameter at a value (repeatable; default: the protocol's entry)")
    t.add_argument("--write", nargs="?", const=True, default=None, metavar="TABLE",
                   help="write the best values into the protocol's tuned table (shipped with excise, or TABLE)")
    t.add_argument("--out", default="excise-out/tune", help="folder for the trials' JSON")
    t.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="start no new trial after this many seconds (the study resumes on the next call; "
                        "--write then waits until the budget is complete)")
    t.add_argument("--check", type=float, nargs="?", const=0.01, default=None, metavar="REL",
                   help="once the budget is complete, re-score the best values at (1 ± REL) x each continuous one "
                        "(default REL 0.01) and say whether the objective holds (two more runs)")
    t.add_argument("--start", action="append", metavar="NAME=VALUE,...",
                   help="a starting point tried once after the defaults (repeatable; names some or all of the "
                        "searched hyperparameters)")
    t.add_argument("--start-tuned", action="store_true",
                   help="try the values the tuned table holds for METHOD now (shipped, or --write TABLE) as a "
                        "starting point: e.g. when re-tuning after the method's revision was raised")
    t.add_argument("--recheck", action="store_true",
                   help="no search: re-score the tuned table's values for METHOD (shipped, or --write TABLE) on the "
                        "seeds they were tuned on, and at (1 ± --check REL); with --write, record the shift there")
    t.add_argument("--carry-from", default=None, metavar="SOURCE",
                   help="no search: copy METHOD's tuned entry on the protocol SOURCE into PROTOCOL's table (shipped, "
                        "or --write TABLE), marked as carried, for a protocol too costly to search; a later "
                        "`excise tune --write` there replaces it")
    t.add_argument("--quiet", action="store_true")
    _device_arg(t)
    t.set_defaults(func=cmd_tune)
    e = sub.add_parser("evaluate", help="score your own unlearned checkpoint against a protocol's retrain oracle")
    e.add_argument("--model", required=True)
    e.add_argument("--protocol", required=True)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--name", default="model")
    e.add_argument("--out", default="excise-out/evaluate")
    e.add_argument("--quiet", action="store_true")
    _device_arg(e)
    e.set_defaults(func=cmd_evaluate)
    m = sub.add_parser("methods", help="list the registered methods with their defaults and presets")
    m.set_defaults(func=cmd_methods)
    d = sub.add_parser("datasets", help="list the registered datasets (--data NAME; or package.module:function)")
    d.set_defaults(func=cmd_datasets)
    lb = sub.add_parser("leaderboard", add_help=False,
                        help="every method on every shipped protocol: tune | run | write | coverage | check "
                             "(excise leaderboard --help)")
    lb.add_argument("args", nargs=argparse.REMAINDER)
    lb.set_defaults(func=cmd_leaderboard)
    return parser


# what a user's input can cause: one line and exit code 2 (the traceback with --debug)
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["leaderboard"]:  # its own parser (argparse.REMAINDER would not pass a leading --help on)
        from .bench.leaderboard_cli import main as leaderboard

        return leaderboard(argv[1:])
    args = build_parser().parse_args(argv)
    from . import distributed

    # under torchrun: join the group; rank 0 prints and writes, the other ranks compute their share silently
    joined = distributed.init_from_env()
    quiet = open(os.devnull, "w") if not distributed.is_main() else None
    done = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet or sys.stdout):
            from .checks import ExciseWarning

            warnings.simplefilter("ignore", ExciseWarning)  # printed as one line each from result.warnings
            rc = args.func(args)
        done = True
        return rc
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}" if not joined else f"error (rank {distributed.rank()}): {e}", file=sys.stderr)
        return 2
    finally:
        if quiet is not None:
            quiet.close()
        if joined and done:  # after an error a rank leaves at once (torchrun stops the others): a shutdown
            distributed.shutdown()  # barrier would wait for ranks that may be elsewhere


if __name__ == "__main__":
    sys.exit(main())
