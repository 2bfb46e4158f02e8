"""Chunk plans for long videos: which frames each DA3 forward sees, which chunk's forward a frame's
windowed statistics and per-frame outputs come from, and the longest chunk that fits in memory.

Chunks are half-open frame ranges ``[start, stop)``. With ``step = chunk − overlap`` chunk ``i``
starts at ``i · step`` (the scheme of DA3-Streaming's chunking), until one reaches the clip's end;
that last chunk is extended back to the full length, ``[T − chunk, T)``, so every forward has the
same size (same memory, same statistics regime) and the last overlap is at least ``overlap``
frames instead of a last chunk of a handful of frames aligned on little evidence.

Centrality of frame ``f`` in chunk ``[s, e)``: its distance to the nearest chunk edge,
``min(f − s, e − 1 − f)``. The chunk that *owns* a frame's per-frame outputs
(depth, pose, masks, pictures) is the most central one (the earliest on ties), so the seam
between consecutive chunks lies in the middle of their overlap and each chunk owns one contiguous
run of frames.

Windowed statistics (``gram.window=offsets``): reference frame ``f`` takes its sources
``f + o`` (offsets ``o``; those outside the clip are dropped), so the forward it is computed in
must contain the smallest interval holding ``f`` and its sources, at most
``[f + lo, f + hi]`` with ``lo = min(0, offsets)``, ``hi = max(0, offsets)``. Every such interval
fits in some chunk when every overlap is at least ``hi − lo`` frames (for
``±2, ±4, ±6``: 12, twice the largest offset, not the offset itself): take the last chunk
starting at or before the interval's start; if it ends inside the interval, the next chunk
starts at most ``overlap`` frames before that end, i.e. at or before the interval's start too.
Among the chunks holding the whole window the most central one is chosen (the owner whenever
it holds the window). A clip that is one chunk needs no overlap.

Forwards over chunks (the predict stage): a stage that taps the forward
(:class:`vggt4d.stage.ForwardTap`) takes part in a chunked run through :class:`ChunkedTap`: it is
told before every chunk's forward which chunk runs (:class:`ChunkStep`) and keeps the rows its
frames take from that chunk (:class:`FrameRows` for per-frame results). A tap whose result
depends on the whole clip (statistics over every frame) asks for ``sweeps=2``: every chunk is
run again after the first sweep (only up to the last block the tap needs).

Plain index arithmetic written here: no library plans overlapping chunks with these rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vggt4d.errors import UserError
from vggt4d.resources import GIB, estimate_forward_memory
from vggt4d.stage import ForwardTap


@dataclass(frozen=True)
class ChunkPlan:
    """Chunks ``[start, stop)`` of a ``num_frames`` clip and the owner of every frame."""

    num_frames: int
    chunk: int
    overlap: int
    ranges: tuple[tuple[int, int], ...]
    owner: np.ndarray  # (T,) int64: index of the chunk that owns the frame's per-frame outputs

    def __len__(self) -> int:
        return len(self.ranges)

    def frames(self, i: int) -> range:
        """Frames of chunk ``i``."""
        return range(*self.ranges[i])

    def shared_frames(self, i: int) -> range:
        """Frames chunk ``i`` shares with chunk ``i + 1`` (the alignment's overlap)."""
        return range(self.ranges[i + 1][0], self.ranges[i][1])

    def owned_frames(self, i: int) -> range:
        """The contiguous run of frames whose per-frame outputs chunk ``i`` provides."""
        owned = np.flatnonzero(self.owner == i)
        return range(int(owned[0]), int(owned[-1]) + 1) if len(owned) else range(0)


def plan_chunks(num_frames: int, chunk: int, overlap: int) -> ChunkPlan:
    """Chunks of ``chunk`` frames, consecutive ones sharing at least ``overlap`` frames.

    A clip of at most ``chunk`` frames is one chunk. Otherwise chunk ``i`` is
    ``[i · step, i · step + chunk)`` with ``step = chunk − overlap`` until one would reach the
    end, and the last is ``[T − chunk, T)`` (see the module docstring).
    """
    if num_frames < 1:
        raise UserError(f"a chunk plan needs at least one frame, got {num_frames}")
    if chunk < 2:
        raise UserError(f"chunk length {chunk} is too short: a DA3 forward needs at least 2 "
                        f"frames")
    if num_frames > chunk and not 1 <= overlap < chunk:
        raise UserError(f"chunk overlap {overlap} must be at least 1 (consecutive chunks are "
                        f"aligned on shared frames) and below the chunk length {chunk}")
    if num_frames <= chunk:
        ranges = [(0, num_frames)]
    else:
        step = chunk - overlap
        starts = [*range(0, num_frames - chunk, step), num_frames - chunk]
        ranges = [(start, start + chunk) for start in starts]
    frames = np.arange(num_frames)
    owner = _most_central(frames, frames, frames, ranges)
    return ChunkPlan(num_frames=num_frames, chunk=chunk, overlap=overlap, ranges=tuple(ranges),
                     owner=owner)


def _most_central(frames: np.ndarray, first: np.ndarray, last: np.ndarray,
                  ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """(F,) int64: for each frame, the most central chunk (the earliest on ties) among those
    containing ``[first, last]`` (all (F,)); −1 where none does.

    Centrality of a frame in ``[s, e)``: ``min(f − s, e − 1 − f)``.
    """
    starts, stops = (np.array(side, dtype=np.int64) for side in zip(*ranges, strict=True))
    f = frames[:, None]
    holds = (starts <= first[:, None]) & (last[:, None] < stops)
    centrality = np.where(holds, np.minimum(f - starts, stops - 1 - f), -1)
    best = np.argmax(centrality, axis=1)  # the first maximum: the earliest chunk on ties
    return np.where(holds.any(axis=1), best, -1).astype(np.int64)


def window_span(offsets: Sequence[int]) -> tuple[int, int]:
    """``(lo, hi) = (min(0, offsets), max(0, offsets))``: a reference frame's window relative to
    it, the frame itself included."""
    return min([0, *offsets]), max([0, *offsets])


def window_chunks(plan: ChunkPlan, offsets: Sequence[int]) -> np.ndarray:
    """(T,) int64: for every reference frame, the most central chunk containing its whole
    clip-truncated window ``{f} ∪ {f + o}``.

    Refuses (one line) a plan of several chunks whose overlap is below the window's span
    ``hi − lo`` (the requirement is derived in the module docstring).
    """
    lo, hi = window_span(offsets)
    if len(plan) > 1 and plan.overlap < hi - lo:
        raise UserError(f"chunk overlap {plan.overlap} is too small for gram offsets "
                        f"{list(offsets)}: every frame's window must fit in one chunk; set the "
                        f"overlap to at least {hi - lo}")
    frames = np.arange(plan.num_frames)
    members = frames[:, None] + np.array([0, *offsets], dtype=np.int64)  # (T, 1 + offsets)
    inside = (members >= 0) & (members < plan.num_frames)
    first = np.where(inside, members, plan.num_frames).min(axis=1)
    last = np.where(inside, members, -1).max(axis=1)
    return _most_central(frames, first, last, plan.ranges)


def auto_chunk_length(limit_bytes: int, estimate_fn: Callable[[int], int], num_frames: int,
                      minimum: int = 2) -> int:
    """The largest chunk length ``n`` in ``[minimum, num_frames]`` with
    ``estimate_fn(n) ≤ limit_bytes``, by bisection (``estimate_fn``: bytes of one forward over
    ``n`` frames, non-decreasing in ``n``).

    ``minimum`` is the shortest usable chunk (``overlap + 1``, or more for windowed statistics;
    a shorter clip is one chunk); a device where even that does not fit is refused with the
    estimate.
    """
    shortest = min(minimum, num_frames)
    need = estimate_fn(shortest)
    if need > limit_bytes:
        raise UserError(f"even a chunk of {shortest} frames needs about {need / GIB:.1f} GiB but "
                        f"{limit_bytes / GIB:.1f} GiB is available; lower process_res or the "
                        f"chunk overlap, or choose a smaller model")
    fits, too_long = shortest, num_frames + 1
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if estimate_fn(middle) <= limit_bytes:
            fits = middle
        else:
            too_long = middle
    return fits


def forward_bytes(*, captured_bytes_per_frame: int = 0, **network) -> Callable[[int], int]:
    """``frames ↦`` total bytes of one hooked forward by
    :func:`vggt4d.resources.estimate_forward_memory` (``network``: its keyword arguments other
    than ``frames`` and ``captured_bytes``), for :func:`auto_chunk_length`."""
    def estimate(frames: int) -> int:
        return estimate_forward_memory(frames=frames, captured_bytes=captured_bytes_per_frame
                                       * frames, **network).total
    return estimate


def resolve_plan(num_frames: int, length: int, overlap: int, auto: bool = False,
                 estimate_fn: Callable[[int], int] | None = None, limit_bytes: int = 0,
                 minimum: int = 2) -> ChunkPlan | None:
    """The chunk plan of a clip of ``num_frames`` frames, or None when it is one forward.

    ``length`` frames per chunk (0: no chunks); with ``auto`` the longest chunk
    :func:`auto_chunk_length` allows under ``limit_bytes`` (capped by ``length`` when > 0), at
    least ``max(minimum, overlap + 1)`` frames (``estimate_fn``: bytes of a forward over
    ``n`` frames). A clip no longer than the chunk is one forward.
    """
    if auto:
        cap = min(length, num_frames) if length else num_frames
        length = auto_chunk_length(limit_bytes, estimate_fn, cap, max(minimum, overlap + 1))
    if not length or num_frames <= length:
        return None
    return plan_chunks(num_frames, length, overlap)


@dataclass(frozen=True)
class ChunkStep:
    """Which forward of a chunked run is about to start: chunk ``index`` of ``plan`` in sweep
    ``sweep`` (0: the forward whose outputs are kept; 1: the second sweep of
    :attr:`ChunkedTap.sweeps` = 2)."""

    plan: ChunkPlan
    index: int
    sweep: int = 0

    @property
    def frames(self) -> range:
        """The chunk's frames in the clip; local index ``f − frames.start``."""
        return self.plan.frames(self.index)

    @property
    def owned(self) -> range:
        """The frames whose per-frame outputs this chunk provides (clip indices)."""
        return self.plan.owned_frames(self.index)

    def local(self, frames: Sequence[int] | range) -> np.ndarray:
        """(F,) int64 positions of clip ``frames`` in this chunk's forward."""
        return np.asarray(frames, dtype=np.int64) - self.frames.start


@dataclass
class ChunkedTap(ForwardTap):
    """A :class:`~vggt4d.stage.ForwardTap` that can run over chunks: ``start_chunk(step)``
    before every chunked forward; ``sweeps`` forwards per chunk (2: whole-clip statistics, the
    second sweep only reaching the tap's last block); ``check_plan(plan)`` refuses a plan it
    cannot use (raise :class:`UserError`), before the model is loaded."""

    start_chunk: Callable[[ChunkStep], None] | None = None
    sweeps: int = 1
    check_plan: Callable[[ChunkPlan], None] | None = None


def chunk_ready(tap: Any) -> bool:
    """Whether a forward tap can take part in a chunked run."""
    return getattr(tap, "start_chunk", None) is not None


class FrameRows:
    """A per-frame tap result (frames first) gathered over chunked forwards: each frame's rows
    from the chunk that owns it; without chunks, the one forward's result as it is."""

    def __init__(self) -> None:
        self.step: ChunkStep | None = None
        self.value: Any = None

    def start(self, step: ChunkStep) -> None:
        self.step = step

    def put(self, rows: Any) -> None:
        """``rows``: (F, ...) of the current forward's F frames (a tensor or an array)."""
        if self.step is None:
            self.value = rows
            return
        if self.value is None:
            self.value = rows.new_empty((self.step.plan.num_frames, *rows.shape[1:])) \
                if hasattr(rows, "new_empty") else np.empty(
                    (self.step.plan.num_frames, *rows.shape[1:]), rows.dtype)
        owned, first = self.step.owned, self.step.frames.start
        self.value[owned.start:owned.stop] = rows[owned.start - first:owned.stop - first]
