"""Write results to a temp dir beside the target and rename at the end: a failure leaves nothing half-written,
and nothing the user owns is replaced without overwrite=True."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moefy.errors import MoefyError


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MoefyError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MoefyError(f"output {out} exists and is not a directory")


@contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.moefy-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.moefy-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
