"""Small shared builders for the tests."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_cnn(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, num_classes))


def toy_loader(n=40, num_classes=3, batch_size=8, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    ds = TensorDataset(x, y) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class Attending(nn.Module):
    """A user model with a bare parameter (a positional embedding) and nn.MultiheadAttention, whose initialiser
    is ``_reset_parameters``: neither has ``reset_parameters()``."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.reshape(-1, 4, 8) + self.pos
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def per_sample_squares(model, x, y, wrap=lambda t: t):
    """(1/N) Σ_n (∇θ ℓ_n)², one ordinary backward per sample; ``wrap`` makes a sample's inputs what the model takes."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(wrap(x[i:i + 1])), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            out[n] += p.grad.pow(2) / len(x)
    return out
