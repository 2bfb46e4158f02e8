"""Gram statistics of attention Q/K, computed while DA3 runs (VGGT4D §3.2; docs/method.md).

For a reference frame t, patch p, and X, Y ∈ {Q, K} the similarities with every source patch p'
of every source frame s ∈ W(t) are g(t,p,s,p') = c·⟨X_t,p , Y_s,p'⟩, with heads averaged
(c = scale / heads on head-concatenated vectors) or kept (per head, c = scale); scale is 1/√d
(the AnyDynamics research scripts) or 1 (VGGT4D). From them, per (t, p):
- ``mean``: mean over (s, p') of g;
- ``var`` with variance ``pairs``: unbiased variance over all (s, p') pairs (the research
  scripts' Var(QKᵀ));
- ``var`` with variance ``spatial``: VGGT4D's unbiased *standard deviation* over p' of
  mean_s g(t,p,s,p') (heads and window frames averaged first).

Two engines give the same numbers:
- ``moments`` (default): exact closed forms. mean = c·⟨x, μ_W⟩ and var = c²·xᵀΣ_W x·n/(n−1), with
  μ_W, Σ_W the mean and covariance of the source vectors (for ``spatial``: of the window-averaged
  source vectors ȳ_p'). Costs O(N·D²) and memory O(D²) per window, no N×N matrix.
- ``chunked``: the research scripts' method — similarity blocks of ``chunk_size`` reference ×
  source tokens, reduced into per-token running (count, mean, M2) with Chan's parallel merge
  in float64.
:func:`dense_statistics` builds the full similarity matrix in float64: the reference for tests.

Across the chunks of a long video (``chunk.*``, :mod:`vggt4d.chunks`) each chunk is its own DA3
forward, so Q and K of different chunks come from different attention contexts; per reference
frame t:
- ``offsets``: the statistics of the chunk that holds t's whole window
  (:func:`vggt4d.chunks.window_chunks`, the most central one): exactly those of a forward over
  that chunk, for chunks at least as long as the window. A single forward over the whole clip
  differs only through the context DA3's global blocks saw (the chunk instead of the clip).
- ``attended``: what the block attended in t's chunk (the owner): t alone in per-frame blocks,
  the owner chunk's frames in global ones.
- ``all`` (whole video): μ and Σ (or, for ``spatial``, the frame-averaged ȳ_p') over the source
  vectors of *every* frame of the clip, each frame's taken from the chunk that owns it, and the
  reference vectors x of t from its owner too. The moments are accumulated over a first sweep of
  the chunks (float64 sums of y and yyᵀ, O(D²) per layer, independent of T; :class:`VideoMoments`)
  and the quadratic forms are evaluated in a second sweep (the chunks' forwards again, each
  stopped after the last block needed), so no Q/K is kept between chunks. With one forward
  over the clip the formulas are the same; only x and y differ by their chunk context.
  The ``chunked`` engine needs every source pair at once and is refused for ``all`` over chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from vggt4d.chunks import ChunkedTap, ChunkPlan, ChunkStep, window_chunks
from vggt4d.config.gram import Engine, GramConfig, Heads, Pair, SpecialTokens, Window
from vggt4d.config.maps import BandMode
from vggt4d.config.root import cue_bands
from vggt4d.errors import UserError
from vggt4d.hook import BlockQK
from vggt4d.io import read_safetensors, write_safetensors
from vggt4d.stage import Stage

PAIRS = tuple(Pair)
STATS = ("mean", "var")
MAX_SPECIAL_TOKENS = 16
REFERENCE_BATCH = 8
"""Reference frames per quadratic-form batch: bounds the moments engine's extra memory."""


def source_windows(num_frames: int, window: str, offsets: Sequence[int], include_self: bool,
                   is_global: bool) -> list[tuple[int, ...]]:
    """Source frames W(t) of every reference frame t, truncated at the clip's ends.

    ``all``: every frame; ``attended``: what the block attends (its own frame in a per-frame
    block, every frame in a global block; ``include_self`` does not apply); ``offsets``: t + o for
    each offset. ``include_self`` adds or removes t itself for ``all`` and ``offsets``.
    """
    windows = []
    for t in range(num_frames):
        if window == Window.attended:
            windows.append(tuple(range(num_frames)) if is_global else (t,))
            continue
        if window == Window.all:
            frames = set(range(num_frames))
        else:
            frames = {t + o for o in offsets if 0 <= t + o < num_frames}
        frames = frames | {t} if include_self else frames - {t}
        if not frames:
            raise UserError(
                f"gram window {window} {list(offsets)} leaves frame {t} of a "
                f"{num_frames}-frame clip without source frames; use smaller offsets, "
                f"gram.include_self=true or gram.window=all"
            )
        windows.append(tuple(sorted(frames)))
    return windows


def special_token_count(tokens_per_frame: int, grid: tuple[int, int],
                        patch_start_idx: int | None) -> int:
    """Leading special tokens per frame: the model's ``patch_start_idx``, checked against the
    grid, or (None) the research scripts' search — drop 0–16 leading tokens until the rest fit
    the grid."""
    patches = grid[0] * grid[1]
    if patch_start_idx is not None:
        if tokens_per_frame - patch_start_idx != patches:
            raise UserError(
                f"{tokens_per_frame} tokens per frame minus patch_start_idx={patch_start_idx} do "
                f"not fit the {grid[0]}x{grid[1]} patch grid; set gram.special_tokens=auto"
            )
        return patch_start_idx
    for count in range(MAX_SPECIAL_TOKENS + 1):
        if tokens_per_frame - count == patches:
            return count
    raise UserError(f"no count of 0-{MAX_SPECIAL_TOKENS} special tokens leaves the "
                    f"{grid[0]}x{grid[1]} grid from {tokens_per_frame} tokens per frame")


def group_heads(x: Tensor, heads: str) -> Tensor:
    """(T, H, P, d) → (T, G, P, D): one group of head-concatenated vectors (D = H·d, ``mean``)
    or one group per head (``keep``)."""
    if heads == Heads.keep:
        return x
    frames, num_heads, patches, dim = x.shape
    return x.permute(0, 2, 1, 3).reshape(frames, 1, patches, num_heads * dim)


def similarity_factor(num_heads: int, head_dim: int, *, scale: bool, heads: str,
                      layers: int = 1) -> float:
    """c in g = c·⟨x, y⟩: 1/√d when scaled, averaged over heads (``mean``) and band layers."""
    factor = 1 / math.sqrt(head_dim) if scale else 1.0
    return factor / (layers * (num_heads if heads == Heads.mean else 1))


def _group_windows(windows: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    grouped: dict[tuple[int, ...], list[int]] = {}
    for t, window in enumerate(windows):
        grouped.setdefault(window, []).append(t)
    return grouped


class _FrameMoments:
    """Shifted first and second moments of each source frame, (G, D) and (G, D, D) in float64.

    Shifting by one fixed vector per group before squaring keeps the covariance accurate when
    the mean is large compared with the spread; frames are kept in a small cache because
    neighbouring offset windows share most of their frames.
    """

    def __init__(self, y: Tensor, cache_frames: int = 16) -> None:
        self.y = y
        self.shift = y[0].mean(dim=1, keepdim=True)  # (G, 1, D)
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.cache_frames = cache_frames

    def frame(self, s: int) -> tuple[Tensor, Tensor]:
        if s not in self.cache:
            centred = self.y[s] - self.shift
            moments = (centred.sum(dim=1).double(),
                       (centred.transpose(1, 2) @ centred).double())
            if not self.cache_frames:
                return moments
            if len(self.cache) >= self.cache_frames:
                self.cache.pop(next(iter(self.cache)))
            self.cache[s] = moments
        return self.cache[s]

    def window(self, frames: Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """Mean (G, D) and population covariance (G, D, D) of all patches of ``frames``."""
        first = torch.zeros_like(self.shift[:, 0], dtype=torch.float64)
        second = torch.zeros(first.shape + first.shape[-1:], dtype=torch.float64,
                             device=first.device)
        for s in frames:
            frame_first, frame_second = self.frame(s)
            first += frame_first
            second += frame_second
        count = len(frames) * self.y.shape[2]
        mean = first / count
        cov = second / count - mean[:, :, None] * mean[:, None, :]
        return mean + self.shift[:, 0].double(), cov, count


def _spatial_moments(y: Tensor, frames: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Mean (G, D) and population covariance over p' (G, D, D) of ȳ_p' = mean_s y_s,p'."""
    averaged = y[list(frames)].mean(dim=0)  # (G, P, D)
    mean = averaged.mean(dim=1, keepdim=True)
    centred = averaged - mean
    cov = (centred.transpose(1, 2) @ centred).double() / averaged.shape[1]
    return mean[:, 0].double(), cov, averaged.shape[1]


def moments_statistics_shared(xs: Sequence[Tensor], y: Tensor,
                              windows: Sequence[tuple[int, ...]], *, factor: float,
                              variance: str) -> list[tuple[Tensor, Tensor]]:
    """:func:`moments_statistics` of several X against one Y: the window moments of Y (the
    expensive part) are computed once for all of them (QK and KK share K's). ``xs`` hold one
    row per window, ``y`` the frames the windows index."""
    outputs = _empty_outputs(xs)
    grouped = _group_windows(windows)
    # frames are shared between windows only when there are several (offset windows)
    pair_moments = (_FrameMoments(y, cache_frames=16 if len(grouped) > 1 else 0)
                    if variance == "pairs" else None)
    for window, refs in grouped.items():
        if pair_moments is not None:
            mu, cov, count = pair_moments.window(window)
        else:
            mu, cov, count = _spatial_moments(y, window)
        _apply_window(xs, outputs, refs, mu, cov, count, factor=factor, variance=variance)
    return outputs


def _empty_outputs(xs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(mean, var) buffers (R, G, P) float32 for each of ``xs`` (R, G, P, D)."""
    return [(x.new_empty(x.shape[:3], dtype=torch.float32),
             x.new_empty(x.shape[:3], dtype=torch.float32)) for x in xs]


def _apply_window(xs: Sequence[Tensor], outputs: list[tuple[Tensor, Tensor]],
                  refs: Sequence[int], mu: Tensor, cov: Tensor, count: int, *, factor: float,
                  variance: str) -> None:
    """Mean c·⟨x, μ⟩ and var c²·xᵀΣx·n/(n−1) (its square root for ``spatial``) of the rows
    ``refs`` of each of ``xs`` into ``outputs``, from one window's μ (G, D), Σ (G, D, D)."""
    mu, cov = mu.to(torch.float32), cov.to(torch.float32)
    correction = factor**2 * count / max(count - 1, 1)
    for x, (mean_out, var_out) in zip(xs, outputs, strict=True):
        for batch in range(0, len(refs), REFERENCE_BATCH):
            batch_refs = list(refs[batch:batch + REFERENCE_BATCH])
            xb = x[batch_refs]  # (R, G, P, D)
            mean_out[batch_refs] = (factor * torch.einsum("rgpd,gd->rgp", xb, mu)).float()
            unbiased = ((xb @ cov[None]) * xb).sum(-1).clamp_min(0) * correction
            var_out[batch_refs] = (unbiased if variance == "pairs"
                                   else unbiased.sqrt()).float()


class VideoMoments:
    """The window ``all`` over the chunks of a long video (module docstring): moments of the
    source vectors of every frame, added chunk by chunk (each frame once).

    ``pairs``: shifted float64 sums of y and yyᵀ (G, D) and (G, D, D) over all source vectors
    (the shift, the first added frame's mean, keeps the covariance accurate as in
    :class:`_FrameMoments`); ``spatial``: the float64 sum over frames of y (G, P, D).
    """

    def __init__(self, variance: str) -> None:
        self.variance = variance
        self.shift: Tensor | None = None
        self.first: Tensor | None = None
        self.second: Tensor | None = None
        self.count = 0
        self.frames = 0

    def _frame(self, y: Tensor) -> tuple[Tensor, Tensor]:
        centred = y - self.shift
        return centred.sum(dim=1).double(), (centred.transpose(1, 2) @ centred).double()

    def add(self, y: Tensor) -> None:
        """Source vectors (F, G, P, D) of F more frames."""
        if self.shift is None:
            self.shift = y[0].mean(dim=1, keepdim=True)
            sums = (y.shape[1], y.shape[2], y.shape[3]) if self.variance != "pairs" else None
            self.first = y.new_zeros(sums or self.shift[:, 0].shape, dtype=torch.float64)
            self.second = y.new_zeros(self.first.shape + y.shape[-1:], dtype=torch.float64) \
                if sums is None else None
        for frame in y:
            if self.variance == "pairs":
                first, second = self._frame(frame)
                self.first += first
                self.second += second
            else:
                self.first += frame.double()
        self.count += y.shape[0] * y.shape[2]
        self.frames += y.shape[0]

    def window(self, without: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """Mean (G, D), population covariance (G, D, D) and count of the whole clip's sources,
        optionally ``without`` one frame's (G, P, D) vectors (``include_self=false``)."""
        patches = self.count // self.frames
        if self.variance != "pairs":
            total, frames = self.first, self.frames
            if without is not None:
                total, frames = total - without.double(), frames - 1
            averaged = (total / frames).float()  # ȳ_p' (G, P, D)
            mean = averaged.mean(dim=1, keepdim=True)
            centred = averaged - mean
            return mean[:, 0].double(), (centred.transpose(1, 2) @ centred).double() / patches, \
                patches
        first, second, count = self.first, self.second, self.count
        if without is not None:
            own_first, own_second = self._frame(without)
            first, second, count = first - own_first, second - own_second, count - patches
        mean = first / count
        cov = second / count - mean[:, :, None] * mean[:, None, :]
        return mean + self.shift[:, 0].double(), cov, count

    def statistics(self, xs: Sequence[Tensor], y: Tensor, *, factor: float,
                   include_self: bool) -> list[tuple[Tensor, Tensor]]:
        """Mean and var (R, G, P) of the rows of each of ``xs`` (R, G, P, D) against the whole
        clip's sources; ``y`` (R, G, P, D): the same frames' own source vectors, left out of
        their windows when not ``include_self``."""
        outputs = _empty_outputs(xs)
        if include_self:
            _apply_window(xs, outputs, range(len(y)), *self.window(), factor=factor,
                          variance=self.variance)
            return outputs
        for row in range(len(y)):
            _apply_window(xs, outputs, [row], *self.window(y[row]), factor=factor,
                          variance=self.variance)
        return outputs


def moments_statistics(x: Tensor, y: Tensor, windows: Sequence[tuple[int, ...]], *,
                       factor: float, variance: str) -> tuple[Tensor, Tensor]:
    """Closed-form statistics. x, y: (T, G, P, D) → mean, var: (T, G, P) float32.

    mean = c·⟨x, μ_W⟩; ``pairs``: var = c²·xᵀΣ_W x·n/(n−1) over n = |W|·P source vectors;
    ``spatial``: std = c·√(xᵀ Cov_p'(ȳ) x · P/(P−1)) with ȳ averaged over the window frames.
    """
    return moments_statistics_shared([x], y, windows, factor=factor, variance=variance)[0]


def _merge(state: tuple[Tensor, Tensor, Tensor], block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al. parallel update of (count, mean, M2) with a block of samples on the last axis."""
    count, mean, m2 = state
    block = block.double()
    block_count = block.shape[-1]
    block_mean = block.mean(-1)
    block_m2 = ((block - block_mean[..., None]) ** 2).sum(-1)
    total = count + block_count
    delta = block_mean - mean
    mean = mean + delta * (block_count / total)
    m2 = m2 + block_m2 + delta**2 * (count * block_count / total)
    return total, mean, m2


def chunked_statistics(x: Tensor, y: Tensor, windows: Sequence[tuple[int, ...]], *,
                       factor: float, variance: str, chunk_size: int = 1024
                       ) -> tuple[Tensor, Tensor]:
    """Streamed statistics: similarity blocks of ``chunk_size`` × ``chunk_size`` tokens merged
    into running per-token moments; nothing larger than one block is ever formed."""
    frames, groups, patches, _dim = x.shape
    mean_out = x.new_empty((frames, groups, patches), dtype=torch.float32)
    var_out = torch.empty_like(mean_out)
    for window, refs in _group_windows(windows).items():
        sources = [y[s] for s in window] if variance == "pairs" else [y[list(window)].mean(0)]
        for t in refs:
            for start in range(0, patches, chunk_size):
                queries = x[t, :, start:start + chunk_size]  # (G, C, D)
                zeros = queries.new_zeros(queries.shape[:2], dtype=torch.float64)
                state = (0, zeros, zeros.clone())
                for source in sources:
                    for first in range(0, patches, chunk_size):
                        block = factor * (queries @ source[:, first:first + chunk_size].mT)
                        state = _merge(state, block)
                count, mean, m2 = state
                var = m2 / max(count - 1, 1)
                stop = start + queries.shape[1]
                mean_out[t, :, start:stop] = mean.float()
                var_out[t, :, start:stop] = (var if variance == "pairs" else var.sqrt()).float()
    return mean_out, var_out


def dense_statistics(x: Tensor, y: Tensor, windows: Sequence[tuple[int, ...]], *,
                     factor: float, variance: str) -> tuple[Tensor, Tensor]:
    """Reference: the full float64 similarity matrix of each reference frame, then torch's own
    mean / var / std. Memory O(P·|W|·P): for tests and small benchmarks only."""
    x, y = x.double(), y.double()
    means, variances = [], []
    for t, window in enumerate(windows):
        sims = factor * torch.einsum("gpd,sgqd->gpsq", x[t], y[list(window)])  # (G, P, S, P)
        means.append(sims.mean(dim=(2, 3)))
        if variance == "pairs":
            variances.append(sims.flatten(2).var(dim=2))
        else:
            variances.append(sims.mean(dim=2).std(dim=2))
    return torch.stack(means).float(), torch.stack(variances).float()


def layer_statistics(q: Tensor, k: Tensor, windows: Sequence[tuple[int, ...]], *,
                     factor: float, pairs: Sequence[str], heads: str, variance: str,
                     engine: str = Engine.moments, chunk_size: int = 1024,
                     refs: Sequence[int] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and var (R, G, P) of each of ``pairs`` from patch Q, K (T, H, P, d) for the
    reference frames ``refs`` (default all T; ``windows`` one per reference frame)."""
    vectors = {"q": group_heads(q.float(), heads), "k": group_heads(k.float(), heads)}
    rows = list(range(len(q))) if refs is None else list(refs)
    results = {}
    for source in "qk":
        chosen = [pair for pair in pairs if pair[1] == source]
        if not chosen:
            continue
        xs = [vectors[pair[0]][rows] for pair in chosen]
        if engine == Engine.chunked:
            stats = [chunked_statistics(x, vectors[source], windows, factor=factor,
                                        variance=variance, chunk_size=chunk_size)
                     for x in xs]
        else:
            stats = moments_statistics_shared(xs, vectors[source], windows, factor=factor,
                                              variance=variance)
        results.update(zip(chosen, stats, strict=True))
    return results


def stat_key(pair: str, stat: str, layer: int) -> str:
    """Key of a per-layer map in ``gram_stats.safetensors``."""
    return f"{pair}.{stat}.L{layer:02d}"


def band_key(pair: str, stat: str, band: str) -> str:
    """Key of a band map computed in ``exact`` mode (layers averaged before the statistics)."""
    return f"{pair}.{stat}.band_{band}"


def _as_maps(values: Tensor, grid: tuple[int, int], heads: str) -> Tensor:
    """(T, G, P) → (T, h, w) when heads are averaged, (T, H, h, w) when kept; float32 on CPU."""
    maps = values.reshape(values.shape[0], values.shape[1], *grid).cpu()
    return maps[:, 0] if heads == Heads.mean else maps


def config_windows(settings: GramConfig, num_frames: int,
                   is_global: bool) -> list[tuple[int, ...]]:
    """:func:`source_windows` of the ``gram`` settings."""
    return source_windows(num_frames, settings.window, settings.offsets, settings.include_self,
                          is_global)


@dataclass
class GramCollector:
    """Q/K consumer for :func:`vggt4d.hook.capture_attention`: statistics of each selected
    layer as the forward reaches it, plus ``exact`` band statistics once a band's last layer ran.

    ``patch_start_idx`` None searches the special-token count (see :func:`special_token_count`).
    Over the chunks of a long video (:meth:`start_chunk` before each forward) every frame's rows
    come from the chunk the module docstring names; ``maps`` then hold the whole clip's frames.
    """

    settings: GramConfig
    layers: frozenset[int]
    patch_start_idx: int | None = 1
    exact_bands: dict[str, tuple[int, ...]] = field(default_factory=dict)
    maps: dict[str, Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    step: ChunkStep | None = None
    _band_buffers: dict[int, tuple[Tensor, Tensor, bool]] = field(default_factory=dict)
    _bands_done: set[str] = field(default_factory=set)
    _video: dict[tuple[int | str, str], VideoMoments] = field(default_factory=dict)
    _plan_windows: dict[str, object] = field(default_factory=dict)

    def start_chunk(self, step: ChunkStep) -> None:
        """The next forward is chunk ``step.index`` of ``step.plan`` (sweep ``step.sweep``)."""
        if self.step is None or self.step.plan is not step.plan:
            self._plan_windows.clear()
            if self.settings.window == Window.offsets:
                self._plan_windows["chunk"] = window_chunks(step.plan, self.settings.offsets)
                self._plan_windows["windows"] = config_windows(self.settings,
                                                               step.plan.num_frames, False)
        self.step = step
        self._bands_done.clear()  # every forward computes its bands again
        self._band_buffers.clear()

    def check_plan(self, plan: ChunkPlan) -> None:
        """Refuse chunks these statistics cannot be computed over (before DA3 runs)."""
        if self.settings.window == Window.offsets:
            window_chunks(plan, self.settings.offsets)
        if self.settings.window == Window.all and self.settings.engine == Engine.chunked:
            raise UserError("gram.engine=chunked cannot compute gram.window=all over chunks "
                            "(it needs every source token at once): use gram.engine=moments")

    def __call__(self, capture: BlockQK) -> None:
        needed_by_band = any(capture.layer in band for band in self.exact_bands.values())
        if capture.layer not in self.layers and not needed_by_band:
            return
        q, k = self._patches(capture)
        if capture.layer in self.layers:
            self._compute(q, k, capture.is_global, self._factor(q.shape[1], q.shape[-1]),
                          capture.layer,
                          lambda pair, stat: stat_key(pair, stat, capture.layer))
        if needed_by_band:
            self._band_buffers[capture.layer] = (q, k, capture.is_global)
            self._finish_bands()

    def _factor(self, num_heads: int, head_dim: int, layers: int = 1) -> float:
        return similarity_factor(num_heads, head_dim, scale=self.settings.scale,
                                 heads=self.settings.heads, layers=layers)

    def _patches(self, capture: BlockQK) -> tuple[Tensor, Tensor]:
        layout = capture.layout
        q, k = capture.q, capture.k
        for name, tensor in (("Q", q), ("K", k)):
            if not torch.isfinite(tensor).all():
                raise UserError(f"non-finite values (NaN/inf) in {name} of layer "
                                f"{capture.layer}; try dtype=fp32 or another checkpoint")
        start = special_token_count(layout.tokens_per_frame, layout.grid, self.patch_start_idx)
        self.grid = layout.grid
        # bf16/fp16 forwards: the statistics are sums over thousands of products, so fp32 here
        return q[:, :, start:].float(), k[:, :, start:].float()

    def _compute(self, q: Tensor, k: Tensor, is_global: bool, factor: float, name: int | str,
                 key) -> None:
        """Statistics of one layer (or band ``name``) of the current forward."""
        step = self.step
        if step is None:
            self._store(q, k, config_windows(self.settings, len(q), is_global), factor, key)
        elif self.settings.window == Window.all:
            self._video_statistics(q, k, factor, name, key)
        else:
            refs, windows = self._chunk_windows(step, is_global)
            self._store(q, k, windows, factor, key, refs)

    def _chunk_windows(self, step: ChunkStep, is_global: bool
                       ) -> tuple[list[int], list[tuple[int, ...]]]:
        """The reference frames this chunk provides (positions in its forward) and their source
        windows there (``offsets``: clip windows, which the chunk holds; ``attended``: what the
        block attended)."""
        first = step.frames.start
        if self.settings.window == Window.offsets:
            refs = np.flatnonzero(self._plan_windows["chunk"] == step.index)
            windows = self._plan_windows["windows"]
            return ([int(f) - first for f in refs],
                    [tuple(s - first for s in windows[f]) for f in refs])
        attended = config_windows(self.settings, len(step.frames), is_global)
        refs = [int(f) for f in step.local(step.owned)]
        return refs, [attended[r] for r in refs]

    def _video_statistics(self, q: Tensor, k: Tensor, factor: float, name: int | str,
                          key) -> None:
        """``window=all`` over chunks: add the owned frames' sources (first sweep) or take
        their statistics against the whole clip's moments (second sweep)."""
        settings, step = self.settings, self.step
        owned = slice(*(int(f) for f in step.local([step.owned.start, step.owned.stop])))
        vectors = {"q": group_heads(q[owned], settings.heads),
                   "k": group_heads(k[owned], settings.heads)}
        for source in "qk":
            chosen = [pair for pair in settings.pairs if pair[1] == source]
            if not chosen:
                continue
            moments = self._video.setdefault((name, source), VideoMoments(settings.variance))
            if step.sweep == 0:
                moments.add(vectors[source])
                continue
            stats = moments.statistics([vectors[pair[0]] for pair in chosen], vectors[source],
                                       factor=factor, include_self=settings.include_self)
            for pair, values in zip(chosen, stats, strict=True):
                self._put(key, pair, values, step.owned.start)

    def _store(self, q: Tensor, k: Tensor, windows, factor: float, key,
               refs: Sequence[int] | None = None) -> None:
        settings = self.settings
        for pair, values in layer_statistics(
                q, k, windows, factor=factor, pairs=settings.pairs, heads=settings.heads,
                variance=settings.variance, engine=settings.engine,
                chunk_size=settings.chunk_size, refs=refs).items():
            if self.step is None:
                self._put(key, pair, values)
            else:
                self._put(key, pair, values, [self.step.frames.start + r for r in refs])

    def _put(self, key, pair: str, values: tuple[Tensor, Tensor], rows=None) -> None:
        """Maps of ``values`` (mean, var) into ``maps``: whole (``rows`` None), or into the clip
        frames ``rows`` (a list, or the first of a run) of (T, …) maps."""
        for stat, value in zip(STATS, values, strict=True):
            maps = _as_maps(value, self.grid, self.settings.heads)
            if rows is None:
                self.maps[key(pair, stat)] = maps
                continue
            target = self.maps.get(key(pair, stat))
            if target is None:
                target = maps.new_zeros((self.step.plan.num_frames, *maps.shape[1:]))
                self.maps[key(pair, stat)] = target
            if isinstance(rows, int):
                target[rows:rows + len(maps)] = maps
            else:
                target[rows] = maps

    def _finish_bands(self) -> None:
        """Compute every band whose layers have all run in this forward, then drop buffers no
        band still needs.

        Band similarities average over layers and heads: the layers' Q/K are concatenated per
        head, so ⟨x, y⟩ sums over layers and the factor divides by their number.
        """
        for name, band in self.exact_bands.items():
            if name in self._bands_done or not all(i in self._band_buffers for i in band):
                continue
            parts = [self._band_buffers[layer] for layer in band]
            q = torch.cat([part[0] for part in parts], dim=-1)
            k = torch.cat([part[1] for part in parts], dim=-1)
            factor = self._factor(q.shape[1], parts[0][0].shape[-1], len(band))
            self._compute(q, k, all(part[2] for part in parts), factor, name,
                          lambda pair, stat, n=name: band_key(pair, stat, n))
            self._bands_done.add(name)
        pending = {layer for name, band in self.exact_bands.items()
                   if name not in self._bands_done for layer in band}
        for layer in set(self._band_buffers) - pending:
            del self._band_buffers[layer]


class GramStage(Stage):
    """Statistics computed inside the (cached) DA3 forward → ``gram_stats.safetensors``.

    One ``(T, h, w)`` float32 tensor per key ``{pair}.{stat}.L{layer:02d}`` (``(T, heads, h, w)``
    with ``gram.heads=keep``), plus ``{pair}.{stat}.band_{name}`` in ``maps.band_mode=exact``;
    the metadata (key ``vggt4d``, JSON) records how they were computed.
    """

    name = "gram"
    requires = ("prediction",)
    provides = ("gram_stats",)
    output = "gram_stats.safetensors"

    def forward_tap(self, ctx) -> ChunkedTap:
        cfg = ctx.cfg
        settings = cfg.gram
        layers = frozenset(settings.layers or range(cfg.model.num_blocks))
        exact = cue_bands(cfg) if cfg.maps.band_mode == BandMode.exact else {}
        patch_start = cfg.model.patch_start_idx \
            if settings.special_tokens == SpecialTokens.model else None
        collector = GramCollector(settings, layers, patch_start, exact)
        needed = layers | {layer for band in exact.values() for layer in band}
        metadata = {"model": cfg.model.name, "gram": asdict(settings),
                    "exact_bands": {k: list(v) for k, v in exact.items()}}

        def save(out_dir) -> None:
            chunks = {} if collector.step is None else {"chunks": {
                "ranges": [list(r) for r in collector.step.plan.ranges],
                "frames_from": "window_chunks" if settings.window == Window.offsets
                else "whole clip, two sweeps" if settings.window == Window.all else "owner"}}
            write_safetensors(out_dir / self.output, collector.maps,
                              {**metadata, "grid": list(collector.grid or ()), **chunks})

        def check_frames(num_frames: int) -> None:
            for is_global in (False, True):
                config_windows(settings, num_frames, is_global)

        return ChunkedTap(key={"gram": metadata, "layers": sorted(layers)},
                          files=(self.output,), save=save, on_qk=collector,
                          qk_layers=frozenset(needed), check_frames=check_frames,
                          start_chunk=collector.start_chunk, check_plan=collector.check_plan,
                          sweeps=2 if settings.window == Window.all else 1)

    def load(self, ctx) -> None:
        ctx.artifacts["gram_stats"] = read_safetensors(ctx.out_dir / self.output)

    run = load
