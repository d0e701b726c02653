"""One request's expensive parts in one process and in two (torch.distributed, gloo, torchrun).

    python benchmarks/distributed.py            # → benchmarks/results/distributed.(md|json)
    python benchmarks/distributed.py write      # re-render the .md from the .json (and the reading)

On 10,000 Fashion-MNIST training images (batch 256) for SmallCNN and ResNet-18 width 16: SSD's importance pass
(the per-sample gradient moments, and the paper's batch Fisher) and one epoch of data-parallel fine-tuning
(excise.edit.masked_sgd, SGD, BatchNorm statistics frozen) and of training (excise.training.train, Adam,
BatchNorm in train mode: each rank normalises its half of a batch by that half's statistics). Each configuration is launched
by ``torchrun --standalone --nproc_per_node=P`` with the machine's cores split between the processes (P=1 with
all threads, P=2 with half each), best of two timings, and the results compared with the one-process ones.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/distributed.py"
N = 10_000


def _best(fn, repeat=2):
    out, best = None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def worker(out_dir: str) -> None:
    from torch.utils.data import DataLoader, Subset

    from excise import distributed
    from excise.data import load_fashion_mnist
    from excise.edit import Schedule, masked_sgd
    from excise.importance import fisher, gradient_moments
    from excise.models import build_model
    from excise.tasks import ClassificationTask
    from excise.training import TrainRecipe, train

    distributed.init_from_env()
    ds = load_fashion_mnist("train")
    loader = DataLoader(Subset(ds, list(range(N))), batch_size=256)
    task = ClassificationTask()
    rows = []
    for arch, kw in (("smallcnn", {}), ("resnet18", {"width": 16})):
        torch.manual_seed(0)
        model = build_model(arch, (1, 28, 28), 10, **kw).eval()
        row = {"model": f"{arch}{'-w16' if kw else ''}"}
        distributed.barrier()
        row["moments"], (mean, second) = _best(lambda: gradient_moments(model, loader))
        row["batch_fisher"], fb = _best(lambda: fisher(model, loader, mode="batch"))

        def finetune():
            m = build_model(arch, (1, 28, 28), 10, **kw)
            m.load_state_dict(model.state_dict())
            # BatchNorm frozen (eval-mode statistics): a rank's part is normalised as the whole batch would be
            masked_sgd(m, loader, lambda b, s, t: task.loss(m, b),
                       Schedule(lr=0.01, epochs=1, momentum=0.9, norm_stats="freeze"), task=task)
            return m

        def training():
            m = build_model(arch, (1, 28, 28), 10, **kw)
            m.load_state_dict(model.state_dict())
            return train(m, loader, TrainRecipe(epochs=1, lr=1e-3, optimizer="adam", batch_size=256),
                         progress=False)

        row["finetune_epoch"], ft = _best(finetune)
        row["train_epoch"], tr = _best(training, 1)
        row["results"] = {"second": dict(second), "batch_fisher": dict(fb), "finetune": ft.state_dict(),
                          "train": tr.state_dict()}
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(row)
    torch.save({"rank": distributed.rank(), "world": distributed.world(), "threads": torch.get_num_threads(),
                "rows": rows}, Path(out_dir) / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


def launch(procs: int, threads: int, out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(Path(__file__).resolve()), "worker", str(out)]
    subprocess.run(cmd, check=True, env=env)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(procs)]


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-30))
               for k in b if b[k].is_floating_point())


def main() -> int:
    import tempfile

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, cores, Path(tmp) / "p1")
        two = launch(2, max(1, cores // 2), Path(tmp) / "p2")
    table = []
    for r1, r2a, r2b in zip(one[0]["rows"], two[0]["rows"], two[1]["rows"]):
        row = {"model": r1["model"]}
        for k in ("moments", "batch_fisher", "finetune_epoch", "train_epoch"):
            row[k] = {"1 process": r1[k], "2 processes": max(r2a[k], r2b[k])}
        row["peak_rss_mib"] = {"1 process": r1["peak_rss_mib"], "2 processes (each)": max(r2a["peak_rss_mib"],
                                                                                          r2b["peak_rss_mib"])}
        row["max_relative_difference"] = {k: _rel(r2a["results"][k], r1["results"][k]) for k in r1["results"]}
        table.append(row)
    machine = (f"{_cpu()}, {cores} cores; torch {torch.__version__}; gloo; 1 process × {cores} threads against "
               f"2 processes × {max(1, cores // 2)} threads")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"command": COMMAND, "machine": machine, "samples": N,
                                                          "rows": table}, indent=1) + "\n")
    write(table, machine)
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(table, machine) -> None:
    head = ["# One request across processes: torch.distributed (gloo) on this machine", "",
            f"Written by `{COMMAND}` ({machine}; CPU only, nothing else running). {N:,} Fashion-MNIST training "
            "images, batch 256; seconds, best of two (training: one run). Each configuration launched by "
            "`torchrun --standalone`.", "",
            "| model | work | 1 process (s) | 2 processes (s) | speed-up | largest relative difference from 1 process |",
            "|---|---|---:|---:|---:|---:|"]
    names = {"moments": ("importance: gradient moments (SSD default)", "second"),
             "batch_fisher": ("importance: batch Fisher (paper)", "batch_fisher"),
             "finetune_epoch": ("fine-tuning epoch (masked SGD, BatchNorm frozen)", "finetune"),
             "train_epoch": ("training epoch (Adam, BatchNorm in train mode)", "train")}
    for row in table:
        for k, (label, res) in names.items():
            a, b = row[k]["1 process"], row[k]["2 processes"]
            head.append(f"| {row['model']} | {label} | {a:.2f} | {b:.2f} | {a / b:.2f}× | "
                        f"{row['max_relative_difference'][res]:.1e} |")
    head += ["", "| model | peak memory, 1 process (MiB) | peak memory per process, 2 processes (MiB) |",
             "|---|---:|---:|"]
    for row in table:
        m = row["peak_rss_mib"]
        head.append(f"| {row['model']} | {m['1 process']:.0f} | {m['2 processes (each)']:.0f} |")
    reading = RESULTS.parent / "distributed_reading.md"
    text = "\n".join(head) + "\n"
    if reading.exists():
        text += "\n" + reading.read_text()
    (RESULTS / "distributed.md").write_text(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2])
        sys.exit(0)
    if sys.argv[1:2] == ["write"]:
        saved = json.loads((RESULTS / "distributed.json").read_text())
        write(saved["rows"], saved["machine"])
        sys.exit(0)
    sys.exit(main())
