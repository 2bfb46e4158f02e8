"""Stage composition: order the stages by what they read, check them all, then run or restore
each.

:func:`resolve` adds the providers of every required artifact and orders the stages so that each
runs after the providers of everything it reads, optional reads included (a stage listed too
early is moved, never run without its inputs). :func:`execute` checks every stage before any
runs (nothing heavy is loaded before all checks pass), then runs each stage — or restores its
verified cached result when its ``cache_key`` is stored — letting it see only the artifacts it
declared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vggt4d.cache import Cache
from vggt4d.config import RunConfig
from vggt4d.errors import UserError
from vggt4d.stage import ForwardTap, Stage

log = logging.getLogger("vggt4d")


@dataclass(frozen=True)
class JobInfo:
    """How Hydra launched this job: run name from the overrides, group = sweep id (multirun)."""

    name: str = "default"
    group: str | None = None
    num: int = 0
    """Index of the job in its sweep (0 for a single run)."""


class UndeclaredArtifact(RuntimeError):
    """A stage read or wrote an artifact it did not declare (a programming error)."""


class ArtifactView(Mapping):
    """The artifacts one stage may see: reading an undeclared one, or writing one the stage
    does not provide, is a programming error caught at once."""

    def __init__(self, store: dict[str, Any], stage: Stage, readable: frozenset[str]) -> None:
        self._store, self._stage, self._readable = store, stage, readable

    def __getitem__(self, name: str) -> Any:
        if name not in self._readable:
            raise UndeclaredArtifact(f"stage {self._stage.name} reads '{name}' without "
                                     f"declaring it")
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        if name not in self._readable:
            raise UndeclaredArtifact(f"stage {self._stage.name} asks for '{name}' without "
                                     f"declaring it")
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._store if name in self._readable)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self._stage.provides:
            raise UndeclaredArtifact(f"stage {self._stage.name} writes '{name}', which it does "
                                     f"not provide")
        self._store[name] = value


@dataclass
class Context:
    """What a stage sees during one job: config, output directory, cache and artifacts."""

    cfg: RunConfig
    out_dir: Path
    cache: Cache
    artifacts: Any = field(default_factory=dict)
    stages: tuple[Stage, ...] = ()
    """The job's resolved stages (the predict stage collects their forward taps)."""
    job: JobInfo = field(default_factory=JobInfo)
    timings: dict[str, float] = field(default_factory=dict)

    def has_stage(self, name: str) -> bool:
        return any(stage.name == name for stage in self.stages)

    def view(self, stage: Stage) -> Context:
        """This context as ``stage`` sees it: only its declared artifacts."""
        required, optional = stage.reads(self.cfg)
        readable = frozenset(required) | frozenset(optional) | frozenset(stage.provides)
        return replace(self, artifacts=ArtifactView(self.artifacts, stage, readable))


def forward_taps(ctx: Context) -> list[ForwardTap]:
    """The taps of every stage of the job that defines ``forward_tap(ctx)``."""
    taps = (stage.forward_tap(ctx) for stage in ctx.stages if hasattr(stage, "forward_tap"))
    return [tap for tap in taps if tap is not None]


def resolve(requested: list[str], available: dict[str, type[Stage]],
            cfg: RunConfig) -> list[Stage]:
    """Instantiate the requested stages and the providers of what they require, ordered so that
    every stage follows the providers of everything it reads (required or optional). Ties keep
    the order of ``available``; a cycle or an artifact nobody provides is a :class:`UserError`.
    """
    provider = {artifact: name for name, cls in available.items() for artifact in cls.provides}
    chosen: dict[str, Stage] = {}

    def add(name: str) -> None:
        if name in chosen:
            return
        chosen[name] = available[name]()
        for artifact in chosen[name].reads(cfg)[0]:
            if artifact not in provider:
                raise UserError(f"stage {name} needs '{artifact}', which no stage provides")
            add(provider[artifact])

    for name in requested:
        add(name)
    after: dict[str, set[str]] = {}
    for name, stage in chosen.items():
        required, optional = stage.reads(cfg)
        after[name] = {provider[a] for a in (*required, *optional)
                       if provider.get(a) in chosen and provider[a] != name}
    rank = {name: index for index, name in enumerate(available)}
    ordered: list[str] = []
    while len(ordered) < len(chosen):
        ready = [name for name in chosen if name not in ordered and after[name] <= set(ordered)]
        if not ready:
            stuck = sorted(set(chosen) - set(ordered))
            raise UserError(f"pipeline stages {stuck} read each other's results in a circle; "
                            f"remove one of them from the pipeline")
        ordered.append(min(ready, key=rank.__getitem__))
    listed = [name for name in ordered if name in requested]
    if listed != [name for name in dict.fromkeys(requested)]:
        log.info("pipeline: running %s in the order of what each reads", ", ".join(listed))
    return [chosen[name] for name in ordered]


def execute(stages: list[Stage], ctx: Context) -> None:
    """Check every stage, then run (or restore from the cache) each in order."""
    ctx.stages = tuple(stages)
    for stage in stages:
        stage.check(ctx.view(stage))
    for stage in stages:
        start = time.perf_counter()
        run_or_restore(stage, ctx.view(stage))
        ctx.timings[stage.name] = round(time.perf_counter() - start, 3)
        log.debug("%s: %.2f s", stage.name, ctx.timings[stage.name])


def run_or_restore(stage: Stage, ctx: Context) -> None:
    """Run a stage, or restore its cached files when its key is stored and they verify."""
    key = stage.cache_key(ctx)
    if key is None:
        stage.run(ctx)
        return
    names = stage.outputs(ctx)
    if ctx.cache.reuse_or_compute(stage.name, key, names, ctx.out_dir, lambda: stage.run(ctx)):
        _reused(stage, ctx, key, names)


def _reused(stage: Stage, ctx: Context, key: str, names: tuple[str, ...]) -> None:
    stage.load(ctx)
    log.info("%s: reused cached result %s (%s), skipped", stage.name, key,
             ", ".join(names) if len(names) <= 4 else f"{len(names)} files")
