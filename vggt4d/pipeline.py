"""Stages and their composition: each stage declares what it needs and what it provides.

The runner asks every stage to ``check`` the configuration first (nothing heavy is loaded before
all checks pass), adds the providers of missing inputs in front of the requested stages, and
reuses a cached result when a stage with output ``files`` returns a ``cache_key`` that is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from vggt4d.cache import Cache
from vggt4d.config import RunConfig
from vggt4d.hook import QKConsumer, TokenConsumer

log = logging.getLogger("vggt4d")


@dataclass(frozen=True)
class JobInfo:
    """How Hydra launched this job: run name from the overrides, group = sweep id (multirun)."""

    name: str = "default"
    group: str | None = None
    num: int = 0
    """Index of the job in its sweep (0 for a single run)."""


@dataclass
class Context:
    """What stages share during one job: config, output directory, cache and artifacts."""

    cfg: RunConfig
    out_dir: Path
    cache: Cache
    artifacts: dict[str, Any] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    job: JobInfo = field(default_factory=JobInfo)


@dataclass
class ForwardTap:
    """What a stage needs from inside the DA3 forward (see ``Stage.forward_tap``).

    The predict stage runs every tap in its one hooked forward, adds ``key`` to its cache key and
    ``files`` (written by ``save(out_dir)`` after the forward) to its cached outputs, so a cached
    forward serves every stage that tapped it.
    """

    key: dict[str, Any]
    files: tuple[str, ...]
    save: Callable[[Path], None]
    on_qk: QKConsumer | None = None
    qk_layers: frozenset[int] = frozenset()
    on_tokens: TokenConsumer | None = None
    token_layers: frozenset[int] = frozenset()
    check_frames: Callable[[int], None] | None = None
    """Called with the clip's frame count before the model is loaded (raise UserError)."""


class Stage(Protocol):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]
    provides: ClassVar[tuple[str, ...]]
    files: tuple[str, ...]
    """Output files (paths relative to the job directory) that make up a cached result; read
    after ``cache_key``, which may set them."""

    def check(self, ctx: Context) -> None:
        """Validate what this stage will need; raise :class:`UserError`. Loads nothing heavy."""

    def cache_key(self, ctx: Context) -> str | None:
        """Key of this stage's result (its ``files``) given its inputs, or None when it is not
        cached."""

    def run(self, ctx: Context) -> None:
        """Compute, write ``files`` into ``ctx.out_dir`` and put ``provides`` into artifacts."""

    def load(self, ctx: Context) -> None:
        """Put ``provides`` into artifacts from ``files`` already in ``ctx.out_dir``."""


def forward_taps(ctx: Context) -> list[ForwardTap]:
    """The taps of every stage of the job that defines ``forward_tap(ctx)``."""
    taps = (stage.forward_tap(ctx) for stage in ctx.stages if hasattr(stage, "forward_tap"))
    return [tap for tap in taps if tap is not None]


def resolve(requested: list[str], available: dict[str, type]) -> list[Stage]:
    """Instantiate the requested stages in order, preceded by the providers of their inputs."""
    provider = {artifact: name for name, cls in available.items() for artifact in cls.provides}
    ordered: list[str] = []

    def add(name: str) -> None:
        if name in ordered:
            return
        for artifact in available[name].requires:
            add(provider[artifact])
        ordered.append(name)

    for name in requested:
        add(name)
    return [available[name]() for name in ordered]


def execute(stages: list[Stage], ctx: Context) -> None:
    """Check every stage, then run (or restore from the cache) each in order."""
    ctx.stages = stages
    for stage in stages:
        stage.check(ctx)
    for stage in stages:
        start = time.perf_counter()
        run_or_restore(stage, ctx)
        log.debug("%s: %.2f s", stage.name, time.perf_counter() - start)


def run_or_restore(stage: Stage, ctx: Context) -> None:
    """Run a stage, or restore its cached files when its key is stored."""
    key = stage.cache_key(ctx)
    if key is None:
        stage.run(ctx)
        return
    # parallel sweep jobs with the same key wait here for the first one, then reuse it
    with ctx.cache.lock(stage.name, key):
        if ctx.cache.has(stage.name, key, stage.files):
            ctx.cache.restore(stage.name, key, stage.files, ctx.out_dir)
            stage.load(ctx)
            log.info("%s: reused cached result %s (%s), skipped", stage.name, key,
                     ", ".join(stage.files) if len(stage.files) <= 4
                     else f"{len(stage.files)} files")
            return
        stage.run(ctx)
        ctx.cache.store(stage.name, key, stage.files, ctx.out_dir)
