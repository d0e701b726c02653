"""The in-memory dataset every source returns: inputs and labels as tensors, class names, a content fingerprint."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """In-memory dataset of ``(x[i], y[i])`` pairs with class names and a content fingerprint.

    ``fine_targets`` keeps the original fine labels when ``targets`` were mapped to coarse ones.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], name: str,
                 fine_targets: Optional[torch.Tensor] = None, fine_classes: Optional[Sequence[str]] = None):
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x = x
        self.targets = y.long()
        self.classes = list(classes)
        self.name = name
        self.fine_targets = self.targets if fine_targets is None else fine_targets.long()
        self.fine_classes = self.classes if fine_classes is None else list(fine_classes)
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]

    @property
    def input_shape(self):
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the inputs, labels and fine labels (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.name.encode())
            for t in (self.x, self.targets, self.fine_targets):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def with_coarse_labels(self, coarse: dict) -> "ArrayDataset":
        """Map fine labels to coarse ones; ``coarse`` maps a coarse name to a list of fine class names."""
        lookup = torch.full((len(self.fine_classes),), -1, dtype=torch.long)
        for ci, (cname, members) in enumerate(coarse.items()):
            for m in members:
                if m not in self.fine_classes:
                    raise ValueError(f"coarse map names unknown class {m!r}")
                lookup[self.fine_classes.index(m)] = ci
        if (lookup < 0).any():
            missing = [self.fine_classes[i] for i in (lookup < 0).nonzero().flatten().tolist()]
            raise ValueError(f"coarse map leaves classes unassigned: {missing}")
        return ArrayDataset(self.x, lookup[self.fine_targets], list(coarse), self.name + "-coarse",
                            fine_targets=self.fine_targets, fine_classes=self.fine_classes)
