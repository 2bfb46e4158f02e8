"""``gram.*``: the Gram statistics of Q/K computed inside the DA3 forward (:mod:`vggt4d.gram`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError


class Window(StrEnum):
    """Source frames of reference frame t: every frame, what the block attends (t alone in a
    per-frame block, every frame in a global one), or t + each of ``offsets``."""

    all = "all"
    attended = "attended"
    offsets = "offsets"


class Variance(StrEnum):
    """``pairs``: unbiased variance over all (source frame, source token) pairs; ``spatial``:
    VGGT4D's unbiased std over source tokens of the window-averaged similarities."""

    pairs = "pairs"
    spatial = "spatial"


class Heads(StrEnum):
    mean = "mean"
    keep = "keep"


class Engine(StrEnum):
    """``moments``: exact closed forms; ``chunked``: streamed similarity blocks (reference)."""

    moments = "moments"
    chunked = "chunked"


class Pair(StrEnum):
    qq = "qq"
    kk = "kk"
    qk = "qk"


class SpecialTokens(StrEnum):
    """``model``: strip ``model.patch_start_idx`` leading tokens; ``auto``: search 0–16."""

    model = "model"
    auto = "auto"


@dataclass
class GramConfig:
    """What the statistics are computed over and how (definitions in :mod:`vggt4d.gram`)."""

    layers: list[int] = field(default_factory=list)
    """Blocks to compute; empty = every block of the hooked network."""
    window: Window = Window.all
    offsets: list[int] = field(default_factory=lambda: [-6, -4, -2, 2, 4, 6])
    include_self: bool = True
    """Add frame t to its own window (``all``/``offsets``), or remove it."""
    scale: bool = False
    """Multiply ⟨x, y⟩ by 1/√d (the AnyDynamics research scripts); VGGT4D does not."""
    variance: Variance = Variance.pairs
    heads: Heads = Heads.mean
    engine: Engine = Engine.moments
    chunk_size: int = 1024
    """Tokens per similarity block of the ``chunked`` engine."""
    pairs: list[Pair] = field(default_factory=lambda: [Pair.qq, Pair.kk, Pair.qk])
    special_tokens: SpecialTokens = SpecialTokens.model

    def check(self) -> None:
        if not self.pairs or len(set(self.pairs)) != len(self.pairs):
            raise UserError(f"gram.pairs={[str(p) for p in self.pairs]} must be a non-empty "
                            f"list of distinct pairs from qq, kk, qk")
        if self.chunk_size < 1:
            raise UserError(f"gram.chunk_size={self.chunk_size} must be >= 1")
        if self.window == Window.offsets and not self.offsets and not self.include_self:
            raise UserError("gram.offsets is empty and gram.include_self=false: no source frames")
