"""What a cached result costs a sweep job: restoring (and storing) the DA3 forward and its Gram
statistics of the band-sweep clip (da3-small, 12 frames 504x378) as verified copies
(:class:`vggt4d.cache.Cache`: a copy-on-write clone where the file system has one, else a byte
copy, SHA-256 checked against the manifest) versus hard links to the entry (the earlier design,
reproduced here with ``os.link``: no bytes moved, nothing checked, the job's file is the
cache's). ``python -m bench.cache_restore`` prints JSON; medians of ``repeats`` interleaved
repetitions with a warm page cache.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from vggt4d.cache import MANIFEST, Cache, _clone


def forward_entry(root: Path) -> tuple[Path, tuple[str, ...]]:
    """Run predict + gram once into ``root``'s cache; the entry and its file names."""
    from vggt4d.run import run_job

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=da3-small", "model.weights=random",
                                           "logger=none", "pipeline=[predict,gram]",
                                           f"cache_dir={root / 'cache'}"])
    run_job(cfg, root / "first")
    entry = next(p.parent for p in (root / "cache" / "predict").rglob(MANIFEST))
    names = tuple(json.loads((entry / MANIFEST).read_text())["files"])
    return entry, names


def link_restore(entry: Path, names: tuple[str, ...], out_dir: Path) -> None:
    """The earlier restore: each file hard-linked beside its target, then renamed into place."""
    for name in names:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.link.tmp")
        os.link(entry / name, tmp)
        os.replace(tmp, target)


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def benchmark(repeats: int = 15) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("VGGT4D_BENCH_DIR")) as scratch:
        root = Path(scratch)
        entry, names = forward_entry(root)
        stage, key = entry.parent.name, entry.name
        cache = Cache(entry.parent.parent)
        size = sum((entry / name).stat().st_size for name in names)
        copies, links, stores, link_stores = [], [], [], []
        for i in range(repeats):
            copies.append(timed(lambda i=i: cache.restore(stage, key, names, root / f"c{i}")))
            links.append(timed(lambda i=i: link_restore(entry, names, root / f"l{i}")))
            target = Cache(root / f"store{i}")
            stores.append(timed(lambda t=target: t.store(stage, key, names, root / "first")))
            link_stores.append(timed(lambda i=i: link_restore(root / "first", names,
                                                              root / f"ls{i}")))
        megabytes = size / 1e6

        def figures(times: list[float]) -> dict[str, float]:
            median = statistics.median(times)
            return {"median_ms": round(median * 1e3, 2),
                    "ms_per_mb": round(median * 1e3 / megabytes, 3)}

        return {"files": list(names), "entry_mb": round(megabytes, 2), "repeats": repeats,
                "copy_on_write_clone": _clone(entry / names[0], root / "probe"),
                "restore_verified_copy": figures(copies), "restore_hard_link": figures(links),
                "store_verified_copy": figures(stores), "store_hard_link": figures(link_stores)}


if __name__ == "__main__":
    print(json.dumps(benchmark(), indent=2))
