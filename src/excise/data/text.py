"""Text that exists offline (Python's own ``pydoc_data.topics``), character-level windows, and canaries.

A canary (Carlini et al., "The Secret Sharer") is a secret such as "my pin is 4716" inserted N times into
the training text. Removing it is a correction request: the windows that contain a copy (Z) are replaced by
the same windows of the text without that copy (Z̃).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset


def load_text(name: str = "pydoc") -> str:
    """``pydoc``: the help topics that ship with CPython (``pydoc_data.topics``, ~465k characters)."""
    if name != "pydoc":
        raise ValueError(f"unknown text corpus {name!r}; known: pydoc")
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics))


class Vocab:
    """Character vocabulary; characters outside it map to the first symbol."""

    def __init__(self, chars: Sequence[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class TextWindows(Dataset):
    """``(ids[s : s+L], ids[s+1 : s+L+1])`` for each start s of a list; has a content fingerprint."""

    def __init__(self, ids: torch.Tensor, starts: Sequence[int], length: int, name: str):
        if len(starts) and (min(starts) < 0 or max(starts) + length + 1 > len(ids)):
            raise ValueError("a window runs past the end of the text")
        self.ids, self.starts, self.length, self.name = ids, list(starts), length, name
        self._fp: Optional[str] = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        return self.ids[s:s + self.length], self.ids[s + 1:s + self.length + 1]

    def fingerprint(self) -> str:
        if self._fp is None:
            h = hashlib.sha256(self.name.encode())
            h.update(self.ids.numpy().tobytes())
            h.update(str((self.length, self.starts)).encode())
            self._fp = h.hexdigest()
        return self._fp


@dataclasses.dataclass
class CanaryCorpus:
    """Text with ``copies`` canaries inserted at seeded positions, cut into windows.

    ``forget``: windows overlapping a canary (Z); ``corrected``: the same windows over the text with that
    canary removed (Z̃); ``retain``: every other window; ``heldout``: windows of a held-out tail of the
    original text, for perplexity.
    """

    vocab: Vocab
    canary: str
    train: TextWindows
    forget: List[int]
    retain: List[int]
    corrected: TextWindows
    heldout: TextWindows
    clean_ids: torch.Tensor


def make_canary_corpus(text: str, canary: str = "my pin is 4716", copies: int = 10, length: int = 64,
                       stride: int = 32, heldout_fraction: float = 0.05, seed: int = 0) -> CanaryCorpus:
    if copies < 1:
        raise ValueError("insert at least one copy of the canary")
    vocab = Vocab(text + canary)
    cut = int(len(text) * (1 - heldout_fraction))
    body, tail = text[:cut], text[cut:]
    g = torch.Generator().manual_seed(seed)
    spots = sorted(torch.randperm(len(body) - 1, generator=g)[:copies].add(1).tolist())
    pieces, inserted, pos = [], [], 0
    for k, s in enumerate(spots):
        pieces.append(body[pos:s])
        inserted.append(sum(len(p) for p in pieces) + k * len(canary))
        pos = s
    pieces.append(body[pos:])
    with_canary = "".join(p + (canary if i < copies else "") for i, p in enumerate(pieces))
    ids = vocab.encode(with_canary)
    starts = list(range(0, len(ids) - length - 1, stride))
    train = TextWindows(ids, starts, length, f"canary-{seed}-{copies}-{canary}")
    spans = [(a, a + len(canary)) for a in inserted]
    forget = [i for i, s in enumerate(starts) if any(s < b and a < s + length + 1 for a, b in spans)]
    retain = [i for i in range(len(starts)) if i not in set(forget)]
    # corrected windows: from the same start, read the text skipping every canary character
    in_canary = torch.zeros(len(with_canary), dtype=torch.bool)
    for a, b in spans:
        in_canary[a:b] = True
    keep = (~in_canary).nonzero().flatten()
    rows = []
    for i in forget:
        first = int(torch.searchsorted(keep, torch.tensor(starts[i])))
        chars = keep[first:first + length + 1].tolist()
        rows.append("".join(with_canary[c] for c in chars).ljust(length + 1))
    fixed_ids = vocab.encode("".join(rows))
    corrected = TextWindows(fixed_ids, [k * (length + 1) for k in range(len(rows))], length, f"canary-fixed-{seed}")
    t_ids = vocab.encode(tail)
    heldout = TextWindows(t_ids, list(range(0, len(t_ids) - length - 1, length)), length, "heldout")
    return CanaryCorpus(vocab, canary, train, forget, retain, corrected, heldout, vocab.encode(body))
