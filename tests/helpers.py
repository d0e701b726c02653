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
