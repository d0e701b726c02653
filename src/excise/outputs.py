"""Output folders written as a unit: checked before any work, filled in a staging folder, renamed once.

A run's files (model, mask, split file, results) land together or not at all: a run killed half-way leaves
the previous contents of ``--out`` as they were (and a hidden staging folder beside it), never a mix of two
runs. An output folder that would hold, or replace, one of the run's inputs is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .types import _umask

MARKER = ".excise-output"  # written into every output folder: "excise wrote this"


class OutputFolder:
    """``--out`` for one run. :meth:`check` (before any work) refuses an ``out`` that is a file, that would hold
    or replace an input, or that is not empty (unless ``overwrite``, or ``replace_own`` and the folder holds
    an earlier excise output). :meth:`staging` is the folder to write into; :meth:`commit` puts it in place."""

    def __init__(self, out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 replace_own: bool = False):
        self.out = Path(out)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.overwrite = overwrite
        self.replace_own = replace_own
        self._staging: Optional[Path] = None

    def check(self) -> "OutputFolder":
        out = self.out.resolve()
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder")
        for given in self.inputs:
            p = given.resolve()
            if p == out or out in p.parents:
                raise ValueError(f"--out {self.out} holds the input {given}: writing the output there would replace "
                                 "it; choose another folder")
        if out.exists() and any(out.iterdir()):
            own = self.replace_own and (out / MARKER).exists()
            if not (self.overwrite or own):
                raise ValueError(f"--out {self.out} is not empty; choose an empty or new folder, or pass --overwrite "
                                 "to replace its contents")
        return self

    @property
    def staging(self) -> Path:
        from . import distributed

        if not distributed.is_main():  # under torch.distributed rank 0 writes the folder; the others' writes
            # return without touching the disk (types.atomic_write_bytes)
            return self.out.resolve().parent / f".{self.out.name}.rank{distributed.rank()}.unused"
        if self._staging is None:
            out = self.out.resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
            os.chmod(self._staging, 0o777 & ~_umask())
        return self._staging

    def commit(self) -> Path:
        """Move the staging folder into place (the old contents, if any, are removed after the rename). Under
        torch.distributed rank 0 does, and every rank returns once it has."""
        from . import distributed

        with distributed.main_writes() as write:
            if write:
                return self._commit()
        return self.out.resolve()

    def _commit(self) -> Path:
        out = self.out.resolve()
        stage = self.staging
        (stage / MARKER).write_text("written by excise as one unit\n")
        self.check()  # the folder may have changed while the run worked
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old)
        self._staging = None
        return out

    def abort(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
