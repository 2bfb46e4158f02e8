"""What a pipeline stage is: the artifacts it reads and provides, and the four calls the runner
makes (:mod:`vggt4d.pipeline` composes them).

A stage declares every artifact it reads: ``requires`` (the runner adds their providers) and
``optional`` (used when a stage of the job provides them, which then runs first). During each
call a stage sees only those artifacts (:class:`vggt4d.pipeline.ArtifactView`), so an
undeclared read fails at once instead of silently depending on the order of the list. Every
method derives what it needs from the context; none relies on another having run first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vggt4d.hook import QKConsumer, TokenConsumer


class Stage:
    """Base of every stage: uncached, nothing to check, restoring means running again."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()

    def reads(self, cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) artifacts for this run's config; by default the class's."""
        return self.requires, self.optional

    def check(self, ctx) -> None:
        """Validate what this stage will need; raise :class:`vggt4d.errors.UserError`. Runs for
        every stage before any stage runs, so it loads nothing heavy and reads no artifact."""

    def cache_key(self, ctx) -> str | None:
        """Key of this stage's result (its :meth:`outputs`) given its inputs; None = not
        cached."""
        return None

    def outputs(self, ctx) -> tuple[str, ...]:
        """Files (relative to the job directory) that make up a cached result."""
        return ()

    def run(self, ctx) -> None:
        """Compute, write the outputs into ``ctx.out_dir``, put ``provides`` into artifacts."""
        raise NotImplementedError

    def load(self, ctx) -> None:
        """Put ``provides`` into artifacts from outputs already in ``ctx.out_dir``."""
        self.run(ctx)


@dataclass
class ForwardTap:
    """What a stage needs from inside the DA3 forward (a stage's ``forward_tap(ctx)``).

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
