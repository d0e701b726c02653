"""Reference architectures: an MLP, a small CNN and a CIFAR-style ResNet-18 with a width parameter."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers: list = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU-pool) and a two-layer head; 0.42 M parameters at 28×28."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 128):
        super().__init__()
        c_in, h, w = input_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = c2 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool); stage widths w, 2w, 4w, 8w."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        c_in = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class CharLSTM(nn.Module):
    """Character-level language model: embedding → LSTM → linear head over the vocabulary."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, embed: int = 64, hidden: int = 256,
                 layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out)
