"""Progress bars on long work (tqdm), or the iterable itself when they are off."""

from __future__ import annotations


def progress(iterable, enabled: bool, desc: str, unit: str = "batch"):
    """``iterable`` wrapped in a transient tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, leave=False)
