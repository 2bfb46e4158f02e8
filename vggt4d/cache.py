"""Content-addressed cache of expensive stage outputs (the DA3 forward and what is computed in it).

An entry is the directory ``<root>/<stage>/<key>/``: the stage's output files and, written last,
``manifest.json`` with each file's size and SHA-256. It is filled in a temporary directory and
renamed into place, so an entry is either complete or absent; the key hashes everything that
affects the files (inputs, the relevant config, package versions).

A result a user can edit never shares storage with the cache: restoring copies each file into
the job directory (a copy-on-write clone where the file system offers one), hashing it on the
way, and a file whose size or checksum differs from the manifest makes the entry corrupt — one
warning naming it, the entry is removed where possible, and the stage runs again. Entries are
immutable, so reading one needs no lock and works on a read-only cache. Computing an entry takes
a per-entry file lock, so concurrent sweep jobs (joblib, Slurm arrays on a shared file system)
wait for the one computing it instead of computing it again. A cache that cannot be written
(read-only, full) costs nothing but the reuse: one warning naming the path, and the job goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from vggt4d.io import current_umask, describe_os_error, output_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHUNK = 8 * 1024 * 1024
FICLONE = 0x40049409
"""Linux ioctl: make the target a copy-on-write clone of the source (btrfs, XFS, ...)."""


def content_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (bytes and NumPy arrays are hashed first,
    an array by its bytes in C order: no copy of a contiguous one, e.g. a memory map)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
        if isinstance(part, bytes | bytearray | memoryview | np.ndarray):
            digest.update(hashlib.sha256(part).digest())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _clone(source: Path, target: Path) -> bool:
    """Make ``target`` a copy-on-write clone of ``source``; False where unsupported."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        return False


def copy_checked(source: Path, target: Path) -> tuple[int, str]:
    """Copy ``source`` to ``target`` (its own storage: a clone or a byte copy) and return the
    size and SHA-256 of the bytes that ``target`` holds."""
    if _clone(source, target):
        return target.stat().st_size, file_digest(target)
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class CorruptEntry(Exception):
    """A cache entry whose files do not match its manifest."""


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._warned: set[str] = set()

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[bool]:
        """Hold the entry's inter-process lock; yields False (no lock) where the cache cannot
        be written — the caller then computes without storing."""
        path = self.root / stage / f".{key}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path))
            lock.acquire()
        except (OSError, Timeout) as err:
            self._warn_once(f"cache {self.root} cannot be written ({describe_os_error(err)}): "
                            f"results are computed but not stored")
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def reuse_or_compute(self, stage: str, key: str, names: tuple[str, ...], out_dir: Path,
                         compute: Callable[[], None]) -> bool:
        """Restore the entry's ``names`` into ``out_dir`` when it is stored and verifies (True),
        else ``compute()`` them there and store them (False). Parallel jobs wanting the same
        key wait on its lock for the first one, then reuse its result."""
        if self.restore(stage, key, names, out_dir):
            return True
        with self.lock(stage, key) as locked:
            if locked and self.restore(stage, key, names, out_dir):
                return True
            compute()
            if locked:
                self.store(stage, key, names, out_dir)
        return False

    def _manifest(self, entry: Path, names: tuple[str, ...]) -> dict | None:
        """The entry's manifest when it lists exactly ``names``; None when the entry is absent;
        raises :class:`CorruptEntry` when it is unusable."""
        if not entry.is_dir():
            return None
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except FileNotFoundError:
            raise CorruptEntry("no manifest (an interrupted or older write)") from None
        except (OSError, ValueError) as err:
            raise CorruptEntry(f"unreadable manifest ({err})") from None
        files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
        if manifest.get("version") != MANIFEST_VERSION or set(files) != set(names):
            raise CorruptEntry("its manifest lists other files")
        return files

    def restore(self, stage: str, key: str, names: Iterable[str], out_dir: Path) -> bool:
        """Copy a verified entry's files into ``out_dir``; False when there is no usable entry
        (a corrupt one is reported, removed where possible, and its copies deleted)."""
        names = tuple(names)
        entry = self.entry(stage, key)
        restored: list[Path] = []
        try:
            files = self._manifest(entry, names)
            if files is None:
                return False
            for name in names:
                target = out_dir / name
                restored.append(target)
                self._restore_file(entry / name, target, files[name])
        except CorruptEntry as err:
            for path in restored:
                path.unlink(missing_ok=True)
            self._discard(entry, str(err))
            return False
        return True

    def _restore_file(self, source: Path, target: Path, expected: dict) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                                suffix=".tmp")
            os.close(handle)
        except OSError as err:
            raise output_error(target, err) from None
        tmp = Path(tmp_name)
        try:
            size, digest = copy_checked(source, tmp)
            if (size, digest) != (expected.get("size"), expected.get("sha256")):
                what = (f"{size} bytes, the manifest says {expected.get('size')}"
                        if size != expected.get("size") else "its SHA-256 differs")
                raise CorruptEntry(f"{source.name} differs from its manifest ({what})")
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, target)
        except FileNotFoundError:
            raise CorruptEntry(f"{source.name} is missing") from None
        except OSError as err:
            if source.exists() and not os.access(source, os.R_OK):
                raise CorruptEntry(f"{source.name} is unreadable ({err})") from None
            raise output_error(target, err) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _discard(self, entry: Path, reason: str) -> None:
        """Report a corrupt entry and move it out of the way (kept when the cache is
        read-only)."""
        try:
            aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.corrupt."))
            os.rename(entry, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)
            action = "removed; recomputing"
        except OSError:
            action = "left in place (the cache is not writable); recomputing without it"
        log.warning("cache entry %s is corrupt (%s): %s", entry, reason, action)

    def store(self, stage: str, key: str, names: Iterable[str], out_dir: Path) -> None:
        """Copy ``names`` from ``out_dir`` into a new entry with its manifest; an existing entry
        is kept. Call it holding the entry's :meth:`lock`: the half-filled folders a killed
        writer left for this key are removed first. A failure only warns: the job's own files
        are complete."""
        names = tuple(names)
        entry = self.entry(stage, key)
        if entry.exists():
            return
        tmp: Path | None = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            for stale in entry.parent.glob(f".{key}.*"):  # only the lock's holder stores, so
                if stale.is_dir():  # these are from a writer killed while filling the entry
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; cluster jobs share it
            files = {}
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                size, digest = copy_checked(out_dir / name, tmp / name)
                files[name] = {"size": size, "sha256": digest}
            manifest = {"version": MANIFEST_VERSION, "stage": stage, "key": key, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(tmp, entry)
        except OSError as err:
            if not entry.exists():
                self._warn_once(f"cache: cannot store {stage} result in {entry.parent} "
                                f"({describe_os_error(err)}); the job goes on without storing")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
