"""File-system faults for the tests: real ones where the machine allows, simulated ones always.

Real: a tiny ``tmpfs`` (a disk that fills: ``ENOSPC``) and a read-only bind mount (``EROFS``)
need ``mount``, which root has here and in CI; elsewhere those tests skip with the reason.
Simulated: :func:`refuse_writes` makes every attempt to create, open for writing, rename or
remove a file under chosen folders fail with a given errno, through a Python audit hook
(``sys.addaudithook``), so the code under test meets the same ``OSError`` as on a real disk
without being patched. :data:`INJECT` runs ``python -m vggt4d.run`` with such faults, configured
by the environment variable ``VGGT4D_TEST_FAULTS`` (JSON ``[[folder, errno, name_part], ...]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink",
                "os.truncate", "shutil.rmtree")

FaultRule = tuple[str, int, str]
"""A folder, the errno to raise under it, and a part of the file name it applies to ("" =
every file)."""

_RULES: list[FaultRule] = []


def _writes(event: str, args: tuple) -> list[str]:
    """The paths an audit event would create, change or remove."""
    if event == "open":
        path, mode, flags = args
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                   else bool((flags or 0) & WRITE_FLAGS))
        return [os.fsdecode(path)] if writing and isinstance(path, str | bytes) else []
    if event in WRITE_EVENTS:
        return [os.fsdecode(a) for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
    return []


def _hook(event: str, args: tuple) -> None:
    if not _RULES:
        return
    for path in _writes(event, args):
        full = os.path.abspath(path)
        for folder, code, part in _RULES:
            if (full == folder or full.startswith(folder + os.sep)) and part in full:
                raise OSError(code, os.strerror(code), path)


sys.addaudithook(_hook)


@contextlib.contextmanager
def refuse_writes(*rules: FaultRule) -> Iterator[None]:
    """Writes under each rule's folder fail with its errno while the block runs."""
    _RULES.extend((os.path.abspath(folder), code, part) for folder, code, part in rules)
    try:
        yield
    finally:
        _RULES.clear()


def refuse_writes_from_env() -> None:
    """Install the rules of ``VGGT4D_TEST_FAULTS`` for the rest of the process."""
    _RULES.extend((folder, code, part) for folder, code, part
                  in json.loads(os.environ["VGGT4D_TEST_FAULTS"]))


INJECT = ("import runpy, sys; from tests.filesystems import refuse_writes_from_env; "
          "refuse_writes_from_env(); sys.argv[0] = 'vggt4d.run'; "
          "runpy.run_module('vggt4d.run', run_name='__main__')")
"""``python -c INJECT overrides...``: the runner with the faults of ``VGGT4D_TEST_FAULTS``."""


def fault_env(*rules: FaultRule) -> dict[str, str]:
    return {"VGGT4D_TEST_FAULTS": json.dumps([[str(f), c, p] for f, c, p in rules])}


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("real file-system faults need root (mount); the simulated variant runs")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount not permitted here ({result.stderr.strip()}); the simulated variant "
                    f"runs")


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tiny_disk(path: Path, size_kib: int) -> Iterator[Path]:
    """A ``tmpfs`` of ``size_kib`` KiB mounted at ``path`` (created): writing more fills it."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kib}k", "vggt4d-test", str(path))
    try:
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (an existing folder) bind-mounted read-only onto itself."""
    _mount("--bind", "-o", "ro", str(path), str(path))
    try:
        probe = path / ".probe"
        with contextlib.suppress(OSError):
            probe.touch()
        if probe.exists():
            probe.unlink()
            pytest.skip("this kernel ignores read-only bind mounts; the simulated variant runs")
        yield path
    finally:
        _unmount(path)
