"""Result files: written atomically (complete or absent, never half-written), byte-identical
for identical inputs, and every write failure reported as one line.

A failure to write a job's output (unwritable folder, full disk) raises :class:`OutputError`,
a :class:`vggt4d.errors.UserError` naming the path and what to do; the runner prints it, ends
``run.log`` with it and exits non-zero. Cache writes do not come through here (see
:mod:`vggt4d.cache`): they may fail without costing a result.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vggt4d.errors import UserError

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""Fixed member time of ``.npz`` archives (NumPy writes the current time: bytes would vary)."""


class OutputError(UserError):
    """A job output could not be written."""


def describe_os_error(err: OSError) -> str:
    """What went wrong and what to do, in words, for the common I/O failures."""
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        return "the disk is full: free space there or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable: choose a writable folder"
    if err.errno == errno.ENOENT:
        return "the folder cannot be created there: choose an existing, writable location"
    return err.strerror or type(err).__name__


def output_error(path: Path, err: OSError) -> OutputError:
    """The one-line error for a failed job output (hint: ``hydra.run.dir=...``)."""
    return OutputError(f"cannot write {path}: {describe_os_error(err)} "
                       f"(output folder: set hydra.run.dir=..., or hydra.sweep.dir=... "
                       f"for sweeps)")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    An :class:`OSError` becomes :class:`OutputError`; the temporary file never stays behind.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                            suffix=".tmp")
        os.close(handle)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are shared
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path


def scratch_array(folder: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> np.memmap:
    """A zero-filled array backed by a nameless temporary file in ``folder`` (gone once the last
    view of it is dropped): a long clip's full-resolution maps then live in pages the system
    can write out, not in the process's anonymous memory. The file's space is reserved at
    once, so a full disk is one :class:`OutputError` here instead of a crash while writing.
    """
    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".scratch.") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                handle.truncate(size)  # file systems that cannot reserve space
            return np.memmap(handle, dtype=dtype, mode="r+", shape=tuple(shape))
    except OSError as err:
        raise output_error(folder / ".scratch", err) from None


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, content: Any) -> Path:
    """``content`` as indented JSON (keys in the order given), atomically."""
    text = json.dumps(content, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` that ``np.load`` reads, byte-identical for identical arrays:
    members in the given order, each stamped with a fixed time."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                             allowZip64=True) as archive:
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue())

    return atomic_write(path, write)


def write_safetensors(path: Path, tensors: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Tensors and their description as ``.safetensors``, byte-identical for identical
    inputs: the metadata is one JSON string with sorted keys under the key ``vggt4d`` (the
    format's own metadata map has no fixed order)."""
    from safetensors.torch import save_file

    header = None if metadata is None else {
        "vggt4d": json.dumps(metadata, sort_keys=True, default=str)}
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=header))


def read_safetensors(path: Path) -> dict:
    """The tensors of a ``.safetensors`` file (CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def safetensors_metadata(path: Path) -> dict:
    """The description written by :func:`write_safetensors` (empty when there is none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return json.loads(header["vggt4d"]) if "vggt4d" in header else {}
