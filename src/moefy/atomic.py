"""Outputs that never cost the user data.

- An output is refused before any work when it exists (without overwrite), cannot be written, or is, contains or
  lies inside one of the run's inputs.
- While a run works, it holds a lock on its output path, so a second moefy run aimed there fails at once.
- Results go to a temp dir beside the target and are renamed into place at the end. With overwrite, the old output
  stays until the new one is complete; a directory that appeared at the target meanwhile is never replaced silently.
- Leftovers of a killed run (`.NAME.moefy-tmp-PID`, `.NAME.moefy-old-PID`) are reclaimed by the next run on that
  path: a half-swapped old output is put back, finished temp work is removed."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from moefy.errors import MoefyError

_held: dict[Path, int] = {}  # lock path -> nesting depth (flock conflicts with itself across two open() calls)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Fail now, not after the work, when nothing can be created beside `out` (read-only, /proc, not a dir)."""
    base = _nearest_existing(Path(out).absolute().parent)
    if not base.is_dir():
        raise MoefyError(f"cannot write {out}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moefy-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MoefyError(f"cannot write {out}: {exc.strerror or exc} in {base}") from None


def check_not_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside an input: --overwrite would destroy the input."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.exists():
            continue  # not a local path (a hub id, an alias): nothing of the user's to clobber
        source = path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise MoefyError(f"output {out} is, contains or lies inside the input {given}; choose another output")


def check_output(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = (), file: bool = False) -> None:
    """`file`: the output is one file (a GGUF), not a directory."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoefyError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() == file:
        raise MoefyError(f"output {out} exists and is {'a directory' if file else 'not a directory'}")
    check_not_input(out, inputs)
    check_writable(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reclaim(out: Path) -> None:
    """Tidy what a killed run left beside `out` (the caller holds the lock, so no live moefy run owns it)."""
    for kind in ("old", "tmp"):
        for left in sorted(out.parent.glob(f".{out.name}.moefy-{kind}-*")):
            pid = left.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                left.rename(out)  # killed between the two renames of a swap: the old output goes back
                print(f"moefy: restored {out} from an interrupted replacement ({left.name})", file=sys.stderr)
            else:
                shutil.rmtree(left, ignore_errors=True)
                print(f"moefy: removed {left.name}, left by an interrupted run", file=sys.stderr)


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold the lock on `out` for this run, and reclaim what a killed run left there."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.moefy-lock"
    if lock in _held:  # this process already holds it (a build that writes through atomic_output)
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MoefyError(f"another moefy run is writing {out}; wait for it or choose another output") from None
    _held[lock] = 1
    try:
        _reclaim(out)
        yield
    finally:
        del _held[lock]
        os.unlink(lock)  # while still locked: a waiting run then opens a fresh file
        os.close(fd)


def swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename finished work onto `out`; the old output (with overwrite) is removed only once the new one is there."""
    if out.exists() and not overwrite:
        raise MoefyError(f"output {out} appeared while this run was working; it was left untouched and this "
                         "run's result discarded (pass --overwrite to replace it)")
    if out.exists():
        old = out.parent / f".{out.name}.moefy-old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@contextmanager
def _working_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path | None], file: bool) -> Iterator[Path]:
    """Under the output lock, with every refusal checked first: a fresh temp dir beside `out`, removed afterwards."""
    check_writable(out)  # before the lock file is made beside it
    with claim(out):
        check_output(out, overwrite, inputs, file)  # after the claim, which may have put back an interrupted old output
        tmp = out.parent / f".{out.name}.moefy-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output(out: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """A temp dir to write into, renamed onto `out` when the block ends without error, under the output lock."""
    out = Path(out)
    with _working_dir(out, overwrite, inputs, file=False) as tmp:
        yield tmp
        swap_into_place(tmp, out, overwrite)


@contextmanager
def atomic_file(out: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """A temp path to write one file into; it replaces `out` only when the block ends without error. The temp file
    lives in a temp dir beside `out`, so a killed run's leftover is reclaimed like any other."""
    out = Path(out)
    with _working_dir(out, overwrite, inputs, file=True) as tmp:
        yield tmp / out.name
        if out.exists() and not overwrite:
            raise MoefyError(f"output {out} appeared while this run was working; it was left untouched and "
                             "this run's result discarded (pass --overwrite to replace it)")
        os.replace(tmp / out.name, out)
