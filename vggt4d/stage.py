"""Defaults shared by stages (the protocol itself is :class:`vggt4d.pipeline.Stage`)."""

from __future__ import annotations


class UncachedStage:
    """Base of stages cheap enough to run in every job: nothing cached, nothing to check beyond
    the config's own validation, and restoring means running again."""

    files: tuple[str, ...] = ()

    def check(self, ctx) -> None:
        """Nothing to check beyond :func:`vggt4d.config.validate`."""

    def cache_key(self, ctx) -> None:
        return None

    def load(self, ctx) -> None:
        self.run(ctx)
