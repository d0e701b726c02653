"""What SSD's loader-invariant importance costs, and what it buys.

    python benchmarks/importance_cost.py        # → benchmarks/results/importance_cost.(md|json)
    python benchmarks/importance_cost.py --device cuda   # the cost table alone, on a GPU → importance_cost_cuda.*

1. Cost of one pass over 10,000 Fashion-MNIST training images (batch 256, eval mode, CPU threads as set) for
   SmallCNN and ResNet-18 width 16, against a training step's throughput (SGD, batch 256, train mode):
   the paper's batch-mode Fisher; excise's gradient moments (importance.gradient_moments, hooks); the per-sample
   Fisher through whole-model torch.func.vmap (the fallback route); BackPACK's SumGradSquared (optional).
   A first request pays one pass over D and one over D_f for either estimator.
2. Loader invariance on the test suite's committed SmallCNN (8,000 images, class 9 forgotten): entries selected
   by SSD at its default (subset) and by the paper's batch estimator, for loaders of batch 16, 64, 256 and shuffled.
3. Whether a seeded subsample of the retain set could stand for the full pass (mask agreement), on the committed
   SmallCNN and on the transfer benchmark's ResNet-18 (``--subsample-only`` re-runs this table alone).
4. The pass on sequence models — an LSTM, a GRU, a Transformer language model on Python's pydoc text
   (``--sequence-only`` re-runs this table alone).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/importance_cost.py"
N = 10_000


def _timed(fn, repeat=2):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best


def _train_pass(model, loader):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _backpack_pass(model, loader):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    m = extend(model.eval(), use_converter=True)
    lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
    for x, y in loader:
        with backpack(SumGradSquared()):
            lossf(m(x), y).backward()


def cost():
    import copy

    from excise.data import load_fashion_mnist
    from excise.importance import fisher, gradient_moments
    from excise.importance.common import trainable
    from excise.importance.per_sample import _vmapped
    from excise.models import build_model
    from excise.tasks import ClassificationTask

    ds = load_fashion_mnist("train")
    sub = Subset(ds, list(range(N)))
    loader = DataLoader(sub, batch_size=256)
    task = ClassificationTask()
    rows = []
    for arch, kw in (("smallcnn", {}), ("resnet18", {"width": 16})):
        torch.manual_seed(0)
        model = build_model(arch, (1, 28, 28), 10, **kw).eval()
        row = {"model": f"{arch}{'-w16' if kw else ''}", "samples": N}
        row["train_step"] = _timed(lambda: _train_pass(copy.deepcopy(model), loader), 1)
        row["batch_fisher"] = _timed(lambda: fisher(model, loader, mode="batch"))
        row["gradient_moments"] = _timed(lambda: gradient_moments(model, loader))

        def losses(out, b):
            return task.loss_from_output(out, task.targets(b), reduction="none")

        small = DataLoader(Subset(ds, list(range(N // 5))), batch_size=256)  # vmap is slow: a fifth, scaled
        row["vmap_per_sample"] = 5 * _timed(lambda: _vmapped(model, small, task, losses, "square",
                                                             trainable(model), None, False, "v"), 1)
        try:
            row["backpack_sum_grad_squared"] = _timed(lambda: _backpack_pass(copy.deepcopy(model), loader), 1)
        except (ImportError, AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as e:
            # BackPACK is optional and refuses some models: recorded in the table, not fatal
            row["backpack_sum_grad_squared"] = None
            row["backpack_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(row, flush=True)
    return rows


SEQ_WINDOWS, SEQ_LENGTH = 2048, 64


class UserGRU(nn.Module):
    """What a user might write for next-character prediction: embedding → GRU → linear head."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 256):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(vocab, embed), nn.GRU(embed, hidden, batch_first=True), \
            nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


class UserTransformer(nn.Module):
    """A small causal Transformer language model written with nn.TransformerEncoder."""

    def __init__(self, vocab: int, d: int = 128, layers: int = 2, length: int = SEQ_LENGTH):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True),
                                          layers)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, x):
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.body(h, mask=self.causal[:x.shape[1], :x.shape[1]], is_causal=True))


def sequence_cost():
    """The per-sample pass on sequence models (next-character prediction on Python's pydoc text, 2,048 windows of
    64 characters, batch 64): excise's character LSTM and a GRU (their recurrences written out; vmap cannot run
    the GRU) and a small Transformer (whole-model vmap: attention takes several inputs)."""
    import copy

    from excise.data.text import TextWindows, Vocab, load_text
    from excise.importance import fisher, gradient_moments
    from excise.importance.common import trainable
    from excise.importance.per_sample import _vmapped
    from excise.models import build_model
    from excise.tasks import LanguageModelTask

    text = load_text("pydoc")
    vocab = Vocab(text)
    ids = vocab.encode(text)
    starts = list(range(0, SEQ_WINDOWS * SEQ_LENGTH, SEQ_LENGTH))
    loader = DataLoader(TextWindows(ids, starts, SEQ_LENGTH, "pydoc"), batch_size=64)
    few = DataLoader(TextWindows(ids, starts[:SEQ_WINDOWS // 8], SEQ_LENGTH, "pydoc"), batch_size=64)
    task = LanguageModelTask()

    def losses(out, b):
        return task.loss_from_output(out, task.targets(b), reduction="none")

    rows = []
    for label, build in (("char_lstm (LSTM 64→256)", lambda: build_model("char_lstm", (SEQ_LENGTH,), len(vocab))),
                         ("user GRU (64→256)", lambda: UserGRU(len(vocab))),
                         ("user Transformer (2×128)", lambda: UserTransformer(len(vocab)))):
        torch.manual_seed(0)
        model = build().eval()
        row = {"model": label, "samples": SEQ_WINDOWS, "params": sum(p.numel() for p in model.parameters())}

        def train_pass(m=copy.deepcopy(model)):
            m.train()
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)
            for b in loader:
                opt.zero_grad()
                task.loss(m, b).backward()
                opt.step()

        row["train_step"] = _timed(train_pass, 1)
        row["batch_fisher"] = _timed(lambda: fisher(model, loader, task, mode="batch"))
        row["gradient_moments"] = _timed(lambda: gradient_moments(model, loader, task))
        try:  # whole-model vmap on an eighth, scaled
            row["vmap_per_sample"] = 8 * _timed(lambda: _vmapped(model, few, task, losses, "square",
                                                                 trainable(model), None, False, "v"), 1)
        except (RuntimeError, NotImplementedError) as e:  # vmap cannot run the model: recorded, not fatal
            row["vmap_per_sample"], row["vmap_error"] = None, f"{type(e).__name__}: {str(e)[:100]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def invariance():
    from checkpoints import fixture_setups, fmnist_small, load_prepared

    import excise

    prep = load_prepared(fixture_setups()[0], fmnist_small())
    req = prep.request()
    out = []
    for batch, shuffle in ((16, False), (64, False), (256, False), (256, True)):
        g = torch.Generator().manual_seed(1)

        def again(ld):
            return DataLoader(ld.dataset, batch_size=batch, shuffle=shuffle, generator=g if shuffle else None)

        r = excise.UnlearningRequest(forget=again(req.forget), retain=again(req.retain), train=again(req.train))
        row = {"batch": batch, "shuffled": shuffle}
        for label, hp in (("subset", {}), ("paper", {"preset": "paper"}), ("batch α=130", {"fisher_mode": "batch",
                                                                                         "alpha": 130.0})):
            res = excise.unlearn(prep.original, r, "ssd", importance_cache=False, checks=False, **hp)
            row[label] = {"selected": res.mask.count(),
                          "forget_acc": excise.evaluation.accuracy(res.model, req.forget)}
        out.append(row)
        print(row, flush=True)
    return out


SUB_ALPHAS = (30.0, 100.0)  # a calibrated α on the transfer benchmark's models, and the default


def _subsample_models():
    """(label, model, forget loader, retain loader): the test suite's committed SmallCNN (class 9), and the
    transfer benchmark's ResNet-18 width 16 trained with Adam (class 4; trained and cached by transfer.py)."""
    from checkpoints import fixture_setups, fmnist_small, load_prepared

    prep = load_prepared(fixture_setups()[0], fmnist_small())
    req = prep.request()
    yield "smallcnn (committed), class 9", prep.original, req.forget, req.retain
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import transfer

    name = "fmnist-resnet18w16-adam"
    cfg = transfer.SETTINGS[name]
    train, _ = cfg["data"]()
    pool, forget, retain, _ = transfer._split(train, "class:4", cfg["seed"])

    def loader(idx, shuffle=False):
        return DataLoader(Subset(train, idx), batch_size=256, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    model, _ = transfer._cached_model(f"{name}-original", cfg["model"], loader(pool, shuffle=True), cfg)
    yield "resnet18-w16 (transfer), class 4", model, loader(forget), loader(retain)


def subsample():
    """Could a seeded subsample of the retain set replace the full pass? Mask agreement with the full pass."""
    from excise import importance, selection

    out = []
    for label, model, forget, retain in _subsample_models():
        out += _subsample_rows(label, model, forget, retain, importance, selection)
    return out


def _subsample_rows(label, model, forget, retain, importance, selection):
    fm, fs = importance.gradient_moments(model, forget)
    full = importance.gradient_moments(model, retain)
    out = []
    n = len(retain.dataset)
    for fraction in (0.25, 0.5, 0.75, 1.0):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: int(n * fraction)].tolist()
        part = full if fraction == 1.0 else importance.gradient_moments(
            model, DataLoader(Subset(retain.dataset, idx), batch_size=256))
        for moments in part:  # estimates of the whole retain set's means: weigh them as its n samples
            moments.samples = n
        row = {"model": label, "fraction": fraction}
        for alpha in SUB_ALPHAS:
            masks = []
            for ref in (full, part):
                i_f, i_ref = importance.subset_importance(fm, fs, ref[0], ref[1])
                m = selection.ratio(i_f, i_ref, alpha)
                masks.append(torch.cat([v.flatten() for v in m.values()]))
            a, b = masks
            row[f"alpha {alpha:g}"] = {"selected_full": int(a.sum()), "selected": int(b.sum()),
                                       "jaccard": float((a & b).sum()) / max(float((a | b).sum()), 1.0),
                                       "agreement": float((a == b).float().mean())}
        out.append(row)
        print(row, flush=True)
    return out


def write(cost_rows, inv_rows, machine, sub_rows=(), seq_rows=()):
    import excise

    lines = ["# SSD's importance: cost of the loader-invariant estimator, and the invariance it buys", "",
             f"Written by `{COMMAND}` (excise {excise.__version__}; {machine['cpu']}, {machine['threads']} torch "
             f"threads, {machine['torch']}; CPU only, nothing else running). One pass over {N:,} Fashion-MNIST "
             "training images at batch 256; best of two runs (vmap: one run over a fifth, scaled ×5).", "",
             "| model | training step (s) | batch Fisher (paper) | gradient moments (default) | per-sample vmap | "
             "BackPACK SumGradSquared |", "|---|---:|---:|---:|---:|---:|"]
    for r in cost_rows:
        def cell(k):
            v = r.get(k)
            return "fails" if v is None else f"{v:.1f} s ({v / r['train_step']:.2f}×)"

        lines.append(f"| {r['model']} | {r['train_step']:.1f} | {cell('batch_fisher')} | {cell('gradient_moments')} "
                     f"| {cell('vmap_per_sample')} | {cell('backpack_sum_grad_squared')} |")
    lines += ["", "(×: seconds relative to one training pass over the same images.)", ""]
    if seq_rows:
        lines += [f"Sequence models, next-character prediction on Python's pydoc text ({SEQ_WINDOWS:,} windows of "
                  f"{SEQ_LENGTH} characters, batch 64; written by `{COMMAND} --sequence-only`; vmap: one run over an "
                  "eighth, scaled ×8; the default route: the LSTM's and the GRU's recurrences written out, whole-model "
                  "vmap for the Transformer, whose attention takes several inputs):", "",
                  "| model | parameters | training step (s) | batch Fisher (paper) | gradient moments (default) | "
                  "whole-model vmap |", "|---|---:|---:|---:|---:|---:|"]
        for r in seq_rows:
            def cell(k, r=r):
                v = r.get(k)
                return "fails" if v is None else f"{v:.1f} s ({v / r['batch_fisher']:.1f}× the batch Fisher)"

            lines.append(f"| {r['model']} | {r['params']:,} | {r['train_step']:.1f} | {r['batch_fisher']:.2f} s | "
                         f"{cell('gradient_moments')} | {cell('vmap_per_sample')} |")
        errs = [f"- {r['model']}: vmap {r['vmap_error']}" for r in seq_rows if r.get("vmap_error")]
        lines += ([""] + errs if errs else []) + [""]
    lines += [
              "Loader invariance, the test suite's committed SmallCNN (8,000 images, class 9 forgotten), "
              "entries selected of 421,834 and forget accuracy:", "",
              "| loader batch | shuffled | SSD default (subset, α = 100) | paper (batch, α = 10) | batch, α = 130 |",
              "|---:|---|---|---|---|"]
    for r in inv_rows:
        cells = [f"{r[k]['selected']:,}, {r[k]['forget_acc']:.1f} %" for k in ("subset", "paper", "batch α=130")]
        lines.append(f"| {r['batch']} | {'yes' if r['shuffled'] else 'no'} | " + " | ".join(cells) + " |")
    if sub_rows:
        a, b = SUB_ALPHAS
        lines += ["", "A seeded subsample of the retain set instead of all of it (masks compared with the full pass's; "
                  f"written by `{COMMAND} --subsample-only`): Jaccard index of the selected sets, and the share of "
                  "all entries on which the two masks agree.", "",
                  f"| model, request | retain fraction | α = {a:g}: selected (full) | Jaccard | agreement | "
                  f"α = {b:g}: selected (full) | Jaccard | agreement |", "|---|---:|---|---:|---:|---|---:|---:|"]
        for r in sub_rows:
            cells = []
            for k in (f"alpha {a:g}", f"alpha {b:g}"):
                e = r[k]
                cells += [f"{e['selected']:,} ({e['selected_full']:,})", f"{e['jaccard']:.3f}",
                          f"{100 * e['agreement']:.2f} %"]
            lines.append(f"| {r['model']} | {r['fraction']:.2f} | " + " | ".join(cells) + " |")
    errs = [f"- {r['model']}: BackPACK {r['backpack_error']}" for r in cost_rows if r.get("backpack_error")]
    if errs:
        lines += ["", "BackPACK:"] + errs
    reading = Path(__file__).with_name("importance_cost_reading.md")
    md = "\n".join(lines) + "\n" + ("\n" + reading.read_text() if reading.exists() else "")
    (RESULTS / "importance_cost.md").write_text(md)
    (RESULTS / "importance_cost.json").write_text(json.dumps(
        {"command": COMMAND, "machine": machine, "cost": cost_rows, "invariance": inv_rows,
         "subsample": list(sub_rows), "sequence": list(seq_rows)}, indent=1))
    print(md)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


def device_cost(device: str, n: int = N) -> None:
    """The cost table alone on an accelerator (``--device cuda``): synthetic images of Fashion-MNIST's shape (the
    cost does not depend on pixel values, and the data need not be installed there), every timing synchronised.
    Writes importance_cost_<device type>.(md|json)."""
    import copy

    from torch.utils.data import TensorDataset

    import excise
    from excise.importance import fisher, gradient_moments
    from excise.models import build_model

    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, repeat=3):
        fn()  # warm-up: kernels chosen, memory pooled
        best = None
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best or 1e9, time.perf_counter() - t0)
        return best

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    rows = []
    for arch, kw in (("smallcnn", {}), ("resnet18", {"width": 16}), ("resnet18", {"width": 64})):
        torch.manual_seed(0)
        model = build_model(arch, (1, 28, 28), 10, **kw).to(dev).eval()
        row = {"model": arch + (f"-w{kw['width']}" if kw else ""), "samples": n}
        for batch in (64, 256):
            loader = DataLoader(data, batch_size=batch)

            def train_pass():
                m = copy.deepcopy(model).train()
                opt = torch.optim.SGD(m.parameters(), lr=1e-3)
                for x, y in loader:
                    opt.zero_grad()
                    nn.functional.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
                    opt.step()

            row[f"b{batch}"] = {"train_step": timed(train_pass),
                                "batch_fisher": timed(lambda: fisher(model, loader, mode="batch")),
                                "gradient_moments": timed(lambda: gradient_moments(model, loader))}
        rows.append(row)
        print(row, flush=True)
    lines = [f"# SSD's importance on {name}: the loader-invariant estimator against the batch Fisher", "",
             f"Written by `{COMMAND} --device {device}` (excise {excise.__version__}; {name}; torch {torch.__version__})."
             f" One pass over {n:,} synthetic 1×28×28 images (the cost does not depend on pixel values); best of "
             "three synchronised runs after a warm-up.", "",
             "| model | loader batch | training step (s) | batch Fisher (paper) | gradient moments (default) | "
             "moments / batch Fisher |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for batch in (64, 256):
            c = r[f"b{batch}"]
            lines.append(f"| {r['model']} | {batch} | {c['train_step']:.2f} | {c['batch_fisher']:.2f} s "
                         f"({c['batch_fisher'] / c['train_step']:.2f}×) | {c['gradient_moments']:.2f} s "
                         f"({c['gradient_moments'] / c['train_step']:.2f}×) | "
                         f"{c['gradient_moments'] / c['batch_fisher']:.2f} |")
    lines += ["", "(×: seconds relative to one training pass over the same images.)"]
    stem = f"importance_cost_{dev.type}"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": f"{COMMAND} --device {device}", "device": name,
                                                      "torch": torch.__version__, "cost": rows}, indent=1))
    print("\n".join(lines))


def main():
    if "--device" in sys.argv:
        return device_cost(sys.argv[sys.argv.index("--device") + 1])
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cores": os.cpu_count()}
    partial = ("--write-only", "--subsample-only", "--sequence-only")
    if any(a in sys.argv for a in partial):  # one table re-run (or none), the others kept
        data = json.loads((RESULTS / "importance_cost.json").read_text())
        sub = subsample() if "--subsample-only" in sys.argv else data.get("subsample", ())
        seq = sequence_cost() if "--sequence-only" in sys.argv else data.get("sequence", ())
        return write(data["cost"], data["invariance"], data["machine"], sub, seq)
    cost_rows = cost()
    write(cost_rows, invariance(), machine, subsample(), sequence_cost())


if __name__ == "__main__":
    main()
