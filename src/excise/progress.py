"""Progress bars on long work (tqdm), or the iterable itself when they are off."""

from __future__ import annotations


def progress(iterable, enabled: bool, desc: str, unit: str = "batch"):
    """``iterable`` wrapped in a transient tqdm bar when ``enabled`` — on rank 0 only under torch.distributed."""
    if not enabled:
        return iterable
    from . import distributed

    if not distributed.is_main():
        return iterable
    from tqdm.auto import tqdm

    try:
        total = len(iterable)
    except TypeError:  # a generator (a rank's shard of a loader): a bar without a total
        total = None
    return tqdm(iterable, desc=desc, unit=unit, leave=False, total=total)
