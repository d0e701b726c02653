"""Class-conditional diffusion on Fashion-MNIST, sized for a 2-core CPU: the recipe (how fast a small UNet trains
here, and after how many steps the project's Fashion-MNIST classifier recognises its guided samples).

    python benchmarks/diffusion.py recipe [--minutes 25] [--channels 16 32 32] [--batch 128] [--lr 1e-3]
        → benchmarks/results/diffusion_recipe.(md|json) and diffusion_recipe.png (a sample grid, one row a class)

Data: the 60,000 training images in [−1, 1], padded to 32×32. Model: excise.diffusion.conditional_unet (null
class for classifier-free guidance, labels dropped for 10 % of samples), Adam, batch --batch, constant lr, grad
norm clipped to 1. After every epoch: 20 samples per class by DDIM (25 steps, guidance 2, seed 0), classified by
the original model of the fmnist-smallcnn-class protocol (seed 0; trained or read from the cache). Stops when
every class is recognised in ≥ 80 % of its samples, or after --minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "excise-out" / "diffusion"
MEAN, STD = 0.2860, 0.3530  # excise's Fashion-MNIST normalisation


def to_unit(x):  # excise's normalised Fashion-MNIST → [−1, 1], padded to 32×32
    return torch.nn.functional.pad((x * STD + MEAN) * 2 - 1, (2, 2, 2, 2), value=-1.0)


def to_classifier(x):  # generated [−1, 1] 32×32 → the classifier's input
    return (((x[:, :, 2:30, 2:30] + 1) / 2) - MEAN) / STD


def classifier():
    from excise.protocol import load_protocol, prepare, setup_for

    proto = load_protocol("fmnist-smallcnn-class")
    return prepare(setup_for(proto, 0), with_oracle=False, progress=False).original


def grid(images, rows: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6))
    for ax, im in zip(axes.flat, images):
        ax.imshow(((im[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def recipe(args) -> int:
    from torch.utils.data import DataLoader, TensorDataset

    from excise.data import load_fashion_mnist
    from excise.diffusion import DiffusionTask, conditional_unet, sample
    from excise.evaluation.generative import classifier_outputs, recognised_share
    from excise.training import TrainRecipe, train

    torch.set_num_threads(args.threads)
    ds = load_fashion_mnist("train")
    x, y = to_unit(ds.x), ds.targets
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    clf = classifier()
    torch.manual_seed(0)
    model = conditional_unet((1, 32, 32), 10, channels=tuple(args.channels), groups=8)
    task = DiffusionTask(seed=0, null_class=10, cond_drop=0.1)
    log, t0 = [], time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)

    def measure(epoch: int) -> bool:
        train_s = time.perf_counter() - t0 - sum(r["eval_seconds"] for r in log)
        t1 = time.perf_counter()
        images, labels = sample(model, list(range(10)), 20, steps=25, guidance=2.0, seed=0)
        probs, _ = classifier_outputs(clf, to_classifier(images))
        share = recognised_share(probs.argmax(-1), labels)
        row = {"epoch": epoch, "steps": epoch * len(loader), "train_seconds": round(train_s, 1),
               "eval_seconds": round(time.perf_counter() - t1, 1), "mean_share": sum(share.values()) / 10,
               "min_share": min(share.values()), "shares": share}
        log.append(row)
        print(json.dumps(row), flush=True)
        torch.save(model.state_dict(), WORK / "recipe.pt")
        grid(images[::2], 10, RESULTS / "diffusion_recipe.png")
        done = row["min_share"] >= 80.0 or time.perf_counter() - t0 > args.minutes * 60
        return done

    rec = TrainRecipe(epochs=1000, lr=args.lr, optimizer="adam", weight_decay=0.0, schedule="constant",
                      batch_size=args.batch, clip_grad_norm=1.0)
    train(model, loader, rec, task, seed=0, progress=False, after_epoch=measure)
    params = sum(p.numel() for p in model.parameters())
    step_s = log[-1]["train_seconds"] / max(log[-1]["steps"], 1)
    data = {"command": "python benchmarks/diffusion.py recipe " + " ".join(sys.argv[2:]),
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, CPU only",
            "channels": args.channels, "params": params, "batch": args.batch, "lr": args.lr,
            "seconds_per_step": step_s, "epochs": log}
    (RESULTS / "diffusion_recipe.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# Class-conditional diffusion on Fashion-MNIST: the recipe on this machine", "",
             f"Written by `{data['command']}` ({data['machine']}). UNet channels {tuple(args.channels)} "
             f"({params:,} parameters), batch {args.batch}, Adam lr {args.lr}; {step_s:.3f} s a training step. "
             "Recognised: % of 20 guided samples per class (DDIM 25 steps, guidance 2, seed 0) that the "
             "fmnist-smallcnn-class original (seed 0) calls that class.", "",
             "| epoch | steps | training seconds | recognised, mean | worst class | per class (0–9) |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in log:
        lines.append(f"| {r['epoch']} | {r['steps']} | {r['train_seconds']:.0f} | {r['mean_share']:.1f} | "
                     f"{r['min_share']:.0f} | {' '.join(f'{v:.0f}' for v in r['shares'].values())} |")
    lines += ["", "![samples, one row a class](diffusion_recipe.png)", ""]
    (RESULTS / "diffusion_recipe.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recipe")
    r.add_argument("--minutes", type=float, default=25)
    r.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32])
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    return recipe(args)


if __name__ == "__main__":
    sys.exit(main())
