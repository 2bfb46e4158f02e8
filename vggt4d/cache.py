"""Content-addressed cache of expensive stage outputs (the DA3 forward and what is computed in it).

An entry is the directory ``<root>/<stage>/<key>/`` holding the stage's output files; it is made
complete in a temporary directory and renamed into place, so readers see a whole entry or none,
and a file lock per entry makes concurrent sweep jobs (joblib, Slurm arrays on a shared file
system) wait for the one computing it instead of computing it again. The key hashes everything
that affects the files (inputs, the relevant config, package versions), so a run that changes
only downstream settings hits it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from vggt4d.io import current_umask, link_or_copy


def content_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (bytes are hashed first)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes | bytearray | memoryview):
            digest.update(hashlib.sha256(part).digest())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        """An inter-process lock for one entry (concurrent sweep jobs compute it once)."""
        path = self.root / stage / f".{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def has(self, stage: str, key: str, names: Iterable[str]) -> bool:
        entry = self.entry(stage, key)
        return all((entry / name).is_file() for name in names)

    def restore(self, stage: str, key: str, names: Iterable[str], out_dir: Path) -> None:
        """Place the cached files of an entry into ``out_dir``."""
        for name in names:
            link_or_copy(self.entry(stage, key) / name, out_dir / name)

    def store(self, stage: str, key: str, names: Iterable[str], out_dir: Path) -> None:
        """Copy ``names`` from ``out_dir`` into a new entry; an existing entry is kept."""
        entry = self.entry(stage, key)
        if entry.exists():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; cluster jobs share it
        try:
            for name in names:
                link_or_copy(out_dir / name, tmp / name)
            os.rename(tmp, entry)
        except OSError:
            if not entry.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
