"""The DA3 forward: processed frames in, depth / confidence / cameras out, Q/K to consumers.

``prediction.npz`` holds, for T frames at the processing size (H, W):
depth (T, H, W) float32; conf (T, H, W) float32 — DA3's ``1 + exp(x)``, so always ≥ 1;
extrinsics (T, 3, 4) world-to-camera (OpenCV); intrinsics (T, 3, 3) in processing-size pixels;
frames (T, H, W, 3) uint8, the processed frames; grid (2,) the patch grid (h, w);
sky (T, H, W) float32, present only for models with a sky head (da3mono/da3metric, and the
nested model through its metric branch): DA3 calls a pixel sky when this is ≥ 0.3.
The mono and metric models have no camera head: they predict neither cameras nor a confidence,
so conf, extrinsics and intrinsics are absent (``None``) for them (``model.camera_head``).

Long videos (``chunk.length`` / ``chunk.auto``, :mod:`vggt4d.chunks`): the clip is split into
overlapping chunks, each one hooked DA3 forward. Chunk ``k + 1``'s world is mapped into chunk
``k``'s by the similarity fitted on the point maps of their shared frames
(:func:`vggt4d.align.overlap_correspondences`: confidence-weighted, Huber-robust; dynamic pixels
left out when the masks are known, as in the second pass — the first pass knows none, so there
the robust loss alone keeps moving pixels from pulling the fit), and the maps are chained into
the first chunk's world: depth ``× s``, cameras by :func:`vggt4d.align.transform_extrinsics`,
intrinsics unchanged. Every frame's depth, confidence, camera, sky and the taps' per-frame
results come from the chunk that owns it (the most central one). ``chunks.json`` records the
plan, each overlap's fitted similarity and residual report, and a summary (also in
``metrics.json`` under ``chunks``).

Memory: a chunked prediction is never held whole. Each member of ``prediction.npz`` is written
as a ``.npy`` file beside it, rows by chunk (``os.pwrite`` at the row's offset: nothing is
mapped, so no page of it counts in the process's memory), then the archive is assembled member
by member in blocks — the same bytes as :func:`vggt4d.io.write_npz` of the whole arrays.
:meth:`Prediction.load` maps the archive's stored members copy-on-write (``np.memmap`` at each
member's data offset, found with :mod:`zipfile` and :mod:`numpy.lib.format`'s header readers:
NumPy maps ``.npy`` files but not members of an ``.npz``), so readers page in only the frames
they touch; in-place edits stay private to the process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vggt4d import __version__
from vggt4d.align import (
    Sim3,
    align_overlap,
    overlap_correspondences,
    transform_depth,
    transform_extrinsics,
)
from vggt4d.cache import content_key
from vggt4d.chunks import ChunkPlan, ChunkStep, chunk_ready, forward_bytes, resolve_plan
from vggt4d.demo_weights import DEMO_WEIGHTS, plant
from vggt4d.errors import UserError
from vggt4d.frames import normalize, probe_clip
from vggt4d.hook import (
    PATCH_SIZE,
    BlockQK,
    BlockTokens,
    KeyMask,
    QKConsumer,
    TokenConsumer,
    capture_attention,
    hooked_backbone,
)
from vggt4d.io import ZIP_EPOCH, atomic_write, write_json, write_npz
from vggt4d.model import (
    build_network,
    check_depth_table,
    load_weights,
    memory_arguments,
    resolve_weights,
)
from vggt4d.pipeline import forward_taps
from vggt4d.resources import (
    GIB,
    available_bytes,
    check_memory,
    estimate_forward_memory,
    resolve_device,
    resolve_dtype,
)
from vggt4d.stage import Stage

log = logging.getLogger(__name__)


OPTIONAL_OUTPUTS = ("conf", "extrinsics", "intrinsics", "sky")
"""Prediction fields that only some models have (module docstring)."""

MEMBERS = ("depth", "frames", *OPTIONAL_OUTPUTS)
"""Per-frame members of ``prediction.npz``, in file order (after ``grid``)."""

CHUNKS_REPORT = "chunks.json"


@dataclass
class Prediction:
    depth: np.ndarray
    conf: np.ndarray | None
    extrinsics: np.ndarray | None
    intrinsics: np.ndarray | None
    frames: np.ndarray
    grid: tuple[int, int]
    sky: np.ndarray | None = None
    alignment: dict | None = None
    """A chunked prediction's ``chunks.json`` (None: one forward); not part of the npz."""

    def save(self, path: Path) -> Path:
        arrays = {name: value for name in MEMBERS if (value := getattr(self, name)) is not None}
        return write_npz(path, {"grid": np.asarray(self.grid, np.int64), **arrays})

    @classmethod
    def load(cls, path: Path, alignment: dict | None = None) -> Prediction:
        """The arrays of ``prediction.npz`` mapped from the file (module docstring)."""
        data = read_npz(path)
        return cls(depth=data["depth"], frames=data["frames"],
                   grid=tuple(int(v) for v in data["grid"]), alignment=alignment,
                   **{name: data.get(name) for name in OPTIONAL_OUTPUTS})


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of an ``.npz``: stored (uncompressed) ones as copy-on-write memory maps,
    compressed ones read whole (``np.load``)."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            handle.seek(info.header_offset + 26)  # local header: name and extra field lengths
            name_length, extra_length = struct.unpack("<HH", handle.read(4))
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            if dtype.hasobject:
                raise UserError(f"{path}: member {name} holds Python objects; not a vggt4d "
                                f"prediction")
            arrays[name] = (np.zeros(shape, dtype) if not np.prod(shape) else
                            np.memmap(path, dtype=dtype, mode="c", offset=handle.tell(),
                                      shape=shape, order="F" if fortran else "C"))
    return arrays


class NpzWriter:
    """An uncompressed ``.npz`` written row block by row block (module docstring): the same
    bytes as :func:`vggt4d.io.write_npz` of the finished arrays, written atomically by
    :meth:`finish`; the member files live in ``.<name>.parts/`` beside it until then.

    ``members``: name → (shape, dtype), in file order. Use as a context manager: the parts are
    removed however the block ends.
    """

    def __init__(self, path: Path, members: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.path = Path(path)
        self.parts = self.path.parent / f".{self.path.name}.parts"
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(parents=True)
        self.layout: dict[str, tuple[Path, int, int, np.dtype]] = {}
        for name, (shape, dtype) in members.items():
            part = self.parts / f"{name}.npy"
            header = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=shape)
            offset = header.offset
            del header  # only the header and the file's length were wanted
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            self.layout[name] = (part, offset, row_bytes, np.dtype(dtype))

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *_: object) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)

    def write(self, name: str, start: int, rows: np.ndarray) -> None:
        """Rows ``start, start + 1, …`` of member ``name`` (cast to its dtype)."""
        part, offset, row_bytes, dtype = self.layout[name]
        view = memoryview(np.ascontiguousarray(rows, dtype=dtype)).cast("B")
        position = offset + start * row_bytes
        with open(part, "r+b") as handle:
            while len(view):
                written = os.pwrite(handle.fileno(), view, position)
                view, position = view[written:], position + written

    def finish(self) -> Path:
        """Assemble the archive atomically (members stored, fixed time, in order)."""
        def assemble(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                 allowZip64=True) as archive:
                for name, (part, *_rest) in self.layout.items():
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
                    info.external_attr = 0o644 << 16
                    info.file_size = part.stat().st_size  # as writestr: decides ZIP64 alike
                    with open(part, "rb") as source, archive.open(info, "w") as target:
                        shutil.copyfileobj(source, target, 8 * 1024 * 1024)

        return atomic_write(self.path, assemble)


@contextlib.contextmanager
def sky_capture(net: nn.Module):
    """Yield a dict that receives ``"sky"`` (B, S, H, W) from the nested model's metric branch,
    whose sky map DA3 uses internally but does not return."""
    captured: dict[str, torch.Tensor] = {}
    metric = getattr(net, "da3_metric", None)
    if metric is None:
        yield captured
        return

    def keep_sky(_module: nn.Module, _inputs: object, output: dict) -> None:
        if "sky" in output:
            captured["sky"] = output["sky"]

    handle = metric.register_forward_hook(keep_sky)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def block_progress(net: nn.Module, hooked_network: str, enabled: bool):
    """A tqdm bar advanced by each backbone block of the hooked network, on a terminal only (a
    bar redrawn into a pipe or a log file would run into the next line)."""
    blocks = hooked_backbone(net, hooked_network).pretrained.blocks
    with tqdm(total=len(blocks), desc="DA3 blocks", unit="block",
              disable=None if enabled else True, leave=False) as bar:
        def advance(*_: object) -> None:
            bar.update(1)

        handles = [block.register_forward_hook(advance) for block in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@torch.inference_mode()
def run_forward(
    net: nn.Module,
    frames: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype,
    hooked_network: str = "",
    ref_view_strategy: str = "saddle_balanced",
    on_qk: QKConsumer | None = None,
    qk_layers: Sequence[int] | None = None,
    on_tokens: TokenConsumer | None = None,
    token_layers: Sequence[int] | None = None,
    key_mask: KeyMask | None = None,
    progress: bool = True,
) -> Prediction:
    """Run DA3 on processed uint8 frames ``(T, H, W, 3)`` (sides multiples of 14).

    With ``on_qk`` / ``on_tokens`` the attention Q/K / block tokens of the chosen blocks of
    ``hooked_network`` are captured, and ``key_mask`` hides tokens' keys and values in its
    blocks (:func:`vggt4d.hook.capture_attention`).
    """
    height, width = frames.shape[1:3]
    images = normalize(frames).to(device)[None]
    hooked = on_qk is not None or on_tokens is not None or key_mask is not None
    hooks = (capture_attention(net, on_qk, hooked_network=hooked_network, layers=qk_layers,
                               on_tokens=on_tokens, token_layers=token_layers,
                               key_mask=key_mask)
             if hooked else contextlib.nullcontext())
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with hooks, autocast, block_progress(net, hooked_network, progress), \
            sky_capture(net) as metric_branch:
        output = net(images, extrinsics=None, intrinsics=None, export_feat_layers=[],
                     ref_view_strategy=ref_view_strategy)
    sky = output.get("sky", metric_branch.get("sky"))

    def numpy(name: str) -> np.ndarray | None:
        """The output ``name`` of the clip, ``None`` when the model has no such head (DA3's
        output is an addict ``Dict``: a missing key reads as an empty ``Dict``, not a tensor)."""
        value = output.get(name)
        return value[0].float().cpu().numpy() if isinstance(value, torch.Tensor) else None

    extrinsics = numpy("extrinsics")
    return Prediction(
        depth=numpy("depth"),
        conf=numpy("depth_conf"),
        extrinsics=None if extrinsics is None else extrinsics[:, :3, :4],
        intrinsics=numpy("intrinsics"),
        frames=frames,
        grid=(height // PATCH_SIZE, width // PATCH_SIZE),
        sky=None if sky is None else sky[0].float().cpu().numpy(),
    )


class _SweepDone(Exception):
    """Ends a second-sweep forward once the last block its taps need has been reported."""


def tap_consumers(taps: Sequence, stop_after: int | None = None) -> dict:
    """:func:`run_forward`'s ``on_qk``/``qk_layers``/``on_tokens``/``token_layers`` that hand
    every block's Q/K and tokens to the taps that asked for them; with ``stop_after`` the
    forward is ended (:class:`_SweepDone`) once that block has been handed over."""
    qk_taps = [tap for tap in taps if tap.on_qk is not None]
    token_taps = [tap for tap in taps if tap.on_tokens is not None]

    def on_qk(capture: BlockQK) -> None:
        for tap in qk_taps:
            if capture.layer in tap.qk_layers:
                tap.on_qk(capture)
        if capture.layer == stop_after:
            raise _SweepDone

    def on_tokens(tokens: BlockTokens) -> None:
        for tap in token_taps:
            if tokens.layer in tap.token_layers:
                tap.on_tokens(tokens)
        if tokens.layer == stop_after:
            raise _SweepDone

    return {"on_qk": on_qk if qk_taps else None,
            "qk_layers": sorted(set().union(*(tap.qk_layers for tap in qk_taps))),
            "on_tokens": on_tokens if token_taps else None,
            "token_layers": sorted(set().union(*(tap.token_layers for tap in token_taps)))}


@dataclass(frozen=True)
class AlignSettings:
    """How consecutive chunks are aligned (:func:`vggt4d.align.align_overlap`; ``max_points``
    correspondences per overlap at most)."""

    mode: str = "sim3"
    huber_delta: float = 0.1
    iterations: int = 5
    max_points: int = 1_000_000


@dataclass
class _Shared:
    """A chunk's own maps of the frames it shares with the next chunk, and its similarity into
    the first chunk's world."""

    frames: range
    depth: np.ndarray
    conf: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    to_first: Sim3


def _keep_shared(prediction: Prediction, step: ChunkStep, to_first: Sim3) -> _Shared | None:
    """Copies of the maps chunk ``step.index`` shares with the next chunk (None: the last)."""
    if step.index + 1 == len(step.plan):
        return None
    shared = step.plan.shared_frames(step.index)
    rows = slice(shared.start - step.frames.start, shared.stop - step.frames.start)
    return _Shared(shared, *(np.array(getattr(prediction, name)[rows]) for name in
                             ("depth", "conf", "extrinsics", "intrinsics")), to_first)


def _align_chunk(previous: _Shared, prediction: Prediction, step: ChunkStep,
                 exclude: np.ndarray | None, settings: AlignSettings) -> tuple[Sim3, dict]:
    """Chunk ``step.index``'s similarity into the first chunk's world, fitted on the frames it
    shares with the previous chunk, and the overlap's report."""
    shared = previous.frames
    rows = slice(0, len(shared))  # a chunk starts with the frames it shares with the previous
    corr = overlap_correspondences(
        previous.depth, previous.conf, previous.extrinsics, previous.intrinsics,
        prediction.depth[rows], prediction.conf[rows], prediction.extrinsics[rows],
        prediction.intrinsics[rows],
        exclude=None if exclude is None else np.asarray(exclude[shared.start:shared.stop]),
        max_points=settings.max_points)
    pairwise, report = align_overlap(corr, settings.mode, settings.huber_delta,
                                     settings.iterations)
    to_first = previous.to_first.compose(pairwise)
    entry = {"chunks": [step.index - 1, step.index], "frames": [shared.start, shared.stop],
             "candidates": corr.candidates, "conf_threshold": corr.threshold,
             "alignment": report.as_dict(), "pairwise": pairwise.as_dict(),
             "to_first": to_first.as_dict()}
    log.info("predict: chunk %d (frames %d-%d) aligned on %d shared frames: rms %.4f, median "
             "%.4f, inliers %.1f%% of %d points (scale %.4g to the first chunk)", step.index,
             step.frames.start, step.frames.stop - 1, len(shared), report.rms, report.median,
             100 * report.inlier_fraction, report.points, to_first.scale)
    if report.inlier_fraction < LOW_INLIERS:
        log.warning("predict: only %.0f%% of the overlap of chunks %d and %d agrees after "
                    "alignment: the seam at frame %d may show; use a longer chunk.overlap",
                    100 * report.inlier_fraction, step.index - 1, step.index, shared.start)
    return to_first, entry


LOW_INLIERS = 0.5
"""An overlap whose inlier fraction (weight within the Huber δ) is below this gets a warning."""


def _members(prediction: Prediction, num_frames: int) -> dict:
    """:class:`NpzWriter` members of a whole-clip prediction shaped like one chunk's."""
    members = {"grid": ((2,), np.dtype(np.int64))}
    for name in MEMBERS:
        value = getattr(prediction, name)
        if value is not None:
            members[name] = ((num_frames, *value.shape[1:]), value.dtype)
    return members


def _write_owned(writer: NpzWriter, prediction: Prediction, step: ChunkStep,
                 to_first: Sim3) -> None:
    """The owned frames' rows of chunk ``step.index``, brought into the first chunk's world."""
    owned = step.owned
    rows = slice(owned.start - step.frames.start, owned.stop - step.frames.start)
    for name in MEMBERS:
        value = getattr(prediction, name)
        if value is None:
            continue
        value = value[rows]
        if name == "depth":
            value = transform_depth(value, to_first)
        elif name == "extrinsics":
            value = transform_extrinsics(value, to_first)
        writer.write(name, owned.start, value)


def alignment_summary(overlaps: list[dict]) -> dict:
    """Worst and mean residuals over the overlaps of a chunked prediction (relative to each
    overlap's scene scale, :class:`vggt4d.align.AlignmentReport`)."""
    if not overlaps:
        return {"overlaps": 0}
    reports = [entry["alignment"] for entry in overlaps]
    return {"overlaps": len(overlaps),
            "max_rms": max(r["rms"] for r in reports),
            "mean_rms": float(np.mean([r["rms"] for r in reports])),
            "max_median": max(r["median"] for r in reports),
            "min_inlier_fraction": min(r["inlier_fraction"] for r in reports),
            "scale_to_first": [min(e["to_first"]["scale"] for e in overlaps),
                               max(e["to_first"]["scale"] for e in overlaps)]}


def predict_chunks(net: nn.Module, frames: np.ndarray, plan: ChunkPlan, path: Path, *,
                   device: torch.device, dtype: torch.dtype, hooked_network: str = "",
                   ref_view_strategy: str = "saddle_balanced", taps: Sequence = (),
                   align: AlignSettings = AlignSettings(), key_mask: KeyMask | None = None,
                   exclude: np.ndarray | None = None, progress: bool = True) -> dict:
    """DA3 over the chunks of ``plan``, aligned into the first chunk's world and written to
    ``path`` as ``prediction.npz`` (module docstring); returns the ``chunks.json`` report.

    ``taps``: :class:`vggt4d.chunks.ChunkedTap` objects, told each chunk before its forward;
    those with ``sweeps = 2`` see every chunk again after the first sweep, whose forwards end at
    their last block. ``key_mask`` (whole clip) hides tokens as in :func:`run_forward`;
    ``exclude`` (T, H, W) bool leaves pixels (dynamic ones) out of the alignment.
    """
    sweeps = max([1, *(tap.sweeps for tap in taps)])
    forwards = sweeps * len(plan)
    overlaps: list[dict] = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=forwards, desc="DA3 chunks", unit="forward",
                                       disable=not progress, leave=False))
        writer: NpzWriter | None = None
        previous: _Shared | None = None
        for sweep in range(sweeps):
            active = [tap for tap in taps if tap.sweeps > sweep]
            consumers = tap_consumers(
                active, stop_after=max(consumers_layers(active)) if sweep else None)
            for index, (start, stop) in enumerate(plan.ranges):
                step = ChunkStep(plan, index, sweep)
                for tap in active:
                    tap.start_chunk(step)
                chunk_mask = None if key_mask is None else KeyMask(key_mask.drop[start:stop],
                                                                   key_mask.layers)
                try:
                    prediction = run_forward(
                        net, frames[start:stop], device=device, dtype=dtype,
                        hooked_network=hooked_network, ref_view_strategy=ref_view_strategy,
                        key_mask=chunk_mask, progress=False, **consumers)
                except _SweepDone:
                    prediction = None
                bar.update(1)
                if sweep:
                    continue
                if writer is None:
                    writer = stack.enter_context(NpzWriter(path, _members(prediction,
                                                                          plan.num_frames)))
                    writer.write("grid", 0, np.asarray(prediction.grid, np.int64))
                    to_first = Sim3.identity()
                else:
                    to_first, entry = _align_chunk(previous, prediction, step, exclude, align)
                    overlaps.append(entry)
                _write_owned(writer, prediction, step, to_first)
                previous = _keep_shared(prediction, step, to_first)
                del prediction
        writer.finish()
    return {"num_frames": plan.num_frames, "chunk": plan.chunk, "overlap": plan.overlap,
            "ranges": [list(r) for r in plan.ranges],
            "owned": [[plan.owned_frames(i).start, plan.owned_frames(i).stop]
                      for i in range(len(plan))],
            "align": asdict(align),
            "excluded": "given pixels (dynamic masks)" if exclude is not None else
            "none (no masks yet: the Huber loss down-weights moving pixels)",
            "sweeps": sweeps, "forwards": forwards, "overlaps": overlaps,
            "summary": alignment_summary(overlaps)}


def consumers_layers(taps: Sequence) -> set[int]:
    """Every block some tap of ``taps`` reads (Q/K or tokens)."""
    return set().union(*(tap.qk_layers | tap.token_layers for tap in taps))


def forward_identity(ctx, frames: np.ndarray, device: torch.device,
                     dtype: torch.dtype) -> list:
    """Everything a DA3 forward's result depends on: frames, model, weights, dtype, device type,
    package versions and, for a chunked clip, the chunks and their alignment (the start of every
    forward's cache key; unchanged for a clip of one forward)."""
    from importlib.metadata import version

    model = ctx.cfg.model
    weights = model.weights
    if weights == "random":
        weights = f"random(seed={ctx.cfg.seed})"
    elif Path(weights).expanduser().exists():
        path = Path(weights).expanduser().resolve()
        weights = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    identity = [hashlib.sha256(np.ascontiguousarray(frames)).hexdigest(), frames.shape,
                model.name, weights, model.ref_view_strategy, str(dtype), device.type,
                version("depth-anything-3"), __version__]
    plan = chunk_plan(ctx, len(frames), frames.shape[1:3])
    if plan is not None:
        identity.append({"chunks": [list(r) for r in plan.ranges],
                         "align": asdict(align_settings(ctx))})
    return identity


def check_clip_memory(ctx, num_frames: int, size: tuple[int, int], dtype: torch.dtype,
                      device: torch.device) -> None:
    """Refuse a forward of ``num_frames`` frames of ``size = (H, W)`` that does not fit the
    device (or ``memory_limit_gb``), from the estimate alone."""
    model = ctx.cfg.model
    height, width = size
    estimate = estimate_forward_memory(**memory_arguments(model), frames=num_frames,
                                       height=height, width=width, dtype=dtype)
    check_memory(estimate, memory_limit(ctx, device),
                 f"{model.name} on {num_frames} frames at {width}x{height}")


def memory_limit(ctx, device: torch.device) -> int:
    """Bytes a forward may use: ``memory_limit_gb``, else what the device has free (measured
    once per process and device, so every stage of a job plans chunks alike)."""
    if ctx.cfg.memory_limit_gb:
        return int(ctx.cfg.memory_limit_gb * GIB)
    return _free_bytes(str(device))


@functools.cache
def _free_bytes(device: str) -> int:
    return int(available_bytes(torch.device(device)))


def forward_estimate(model, size: tuple[int, int], dtype: torch.dtype) -> Callable[[int], int]:
    """``frames ↦`` bytes of one forward of ``model`` at ``size = (H, W)``
    (:func:`vggt4d.resources.estimate_forward_memory`)."""
    return forward_bytes(**memory_arguments(model), height=size[0], width=size[1], dtype=dtype)


def chunk_plan(ctx, num_frames: int, size: tuple[int, int]) -> ChunkPlan | None:
    """The chunks of this job's clip of ``num_frames`` frames at ``size`` (``chunk.*``), or
    None when the clip is one forward."""
    settings = ctx.cfg.chunk
    if not settings.enabled:
        return None
    device, dtype = job_device(ctx)
    if not settings.auto:
        return resolve_plan(num_frames, settings.length, settings.overlap)
    return resolve_plan(num_frames, settings.length, settings.overlap, True,
                        forward_estimate(ctx.cfg.model, size, dtype), memory_limit(ctx, device))


def align_settings(ctx) -> AlignSettings:
    """The ``chunk.*`` alignment settings."""
    settings = ctx.cfg.chunk
    return AlignSettings(str(settings.align), settings.huber_delta, settings.iterations,
                         settings.max_points)


def check_chunking(ctx, plan: ChunkPlan, taps: Sequence) -> None:
    """Refuse a chunked job whose model has no cameras or whose taps cannot run over chunks."""
    model = ctx.cfg.model
    if not model.camera_head:
        raise UserError(f"chunk.length/chunk.auto: chunks are aligned on DA3's cameras and "
                        f"confidence, which {model.name} does not predict; set chunk.length=0 "
                        f"chunk.auto=false or choose a model with a camera head")
    for tap in taps:
        if not chunk_ready(tap):
            raise UserError(f"{', '.join(tap.files)} cannot be computed over chunks yet; set "
                            f"chunk.length=0 chunk.auto=false for this pipeline")
        if tap.check_plan is not None:
            tap.check_plan(plan)


def prepare_network(ctx, frames: np.ndarray, device: torch.device, dtype: torch.dtype,
                    what: str, forward_frames: int | None = None) -> nn.Module:
    """Refuse forwards that do not fit the device (before loading anything), then build the
    network with its weights on ``device``; ``forward_frames``: frames per forward (default
    the whole clip)."""
    model = ctx.cfg.model
    check_clip_memory(ctx, forward_frames or len(frames), frames.shape[1:3], dtype, device)
    weights_path = resolve_weights(model.weights)
    torch.manual_seed(ctx.cfg.seed)
    net = build_network(model.name)
    if model.weights == DEMO_WEIGHTS:
        plant(net)
    elif weights_path is not None:
        load_weights(net, weights_path, model.name)
    log.info("%s: %s (%s weights) on %s, %s", what, model.name, model.weights, device,
             str(dtype).removeprefix("torch."))
    return net.to(device)


def job_device(ctx) -> tuple[torch.device, torch.dtype]:
    """The device and dtype this job's forwards run on (``device``/``dtype`` resolved; sweep
    job n takes GPU n mod count)."""
    device = resolve_device(ctx.cfg.device, ctx.job.num)
    return device, resolve_dtype(ctx.cfg.dtype, device)


def predict_to_file(ctx, frames: np.ndarray, path: Path, what: str, *, taps: Sequence = (),
                    key_mask: KeyMask | None = None,
                    exclude: np.ndarray | None = None) -> Prediction:
    """DA3 on this job's processed ``frames`` (T, H, W, 3), written to ``path``: one forward, or
    the chunks of ``chunk.*`` aligned into one world (module docstring; ``exclude`` (T, H, W)
    bool: pixels left out of the alignment, e.g. the dynamic masks). The chunk report goes to
    ``chunks.json`` beside ``path`` (``<stem>.chunks.json`` for another name than
    ``prediction.npz``) and into :attr:`Prediction.alignment`."""
    model = ctx.cfg.model
    device, dtype = job_device(ctx)
    plan = chunk_plan(ctx, len(frames), frames.shape[1:3])
    net = prepare_network(ctx, frames, device, dtype, what,
                          None if plan is None else plan.chunk)
    common = {"device": device, "dtype": dtype, "hooked_network": model.hooked_network,
              "ref_view_strategy": model.ref_view_strategy, "key_mask": key_mask}
    if plan is None:
        prediction = run_forward(net, frames, **common, **tap_consumers(taps))
        prediction.save(path)
        return prediction
    check_chunking(ctx, plan, taps)
    log.info("%s: %d frames in %d chunks of %d (overlap %d, %s alignment)", what, len(frames),
             len(plan), plan.chunk, plan.overlap, ctx.cfg.chunk.align)
    report = predict_chunks(net, frames, plan, path, taps=taps, align=align_settings(ctx),
                            exclude=exclude, **common)
    del net
    write_json(chunk_report_path(path), report)
    summary = report["summary"]
    log.info("%s: %d overlaps aligned, rms residual max %.4f mean %.4f, inliers >= %.1f%%",
             what, summary["overlaps"], summary["max_rms"], summary["mean_rms"],
             100 * summary["min_inlier_fraction"])
    return Prediction.load(path, alignment=report)


def chunk_report_path(path: Path) -> Path:
    """``chunks.json`` beside ``prediction.npz`` (``<stem>.chunks.json`` for other names)."""
    path = Path(path)
    return path.with_name(CHUNKS_REPORT if path.name == "prediction.npz"
                          else f"{path.stem}.{CHUNKS_REPORT}")


def load_prediction(path: Path) -> Prediction:
    """A prediction written by :func:`predict_to_file`, with its chunk report when it has one."""
    report = chunk_report_path(path)
    alignment = json.loads(report.read_text()) if report.is_file() else None
    return Prediction.load(path, alignment=alignment)


class PredictStage(Stage):
    """DA3 forward on the processed frames → ``prediction.npz`` (cached by inputs and model;
    ``chunks.json`` too for a chunked clip)."""

    name = "predict"
    requires = ("processed_frames",)
    provides = ("prediction",)
    output = "prediction.npz"

    def check(self, ctx) -> None:
        """Depth table against the network (built empty), device and dtype, and whether the
        clip (or one chunk of it) fits the device — from the frames' metadata, before any frame
        is decoded."""
        model = ctx.cfg.model
        empty = build_network(model.name, empty=True)
        check_depth_table(model, empty)
        device, dtype = job_device(ctx)
        info = probe_clip(ctx.cfg.data, ctx.cfg.process_res)
        taps = forward_taps(ctx)
        for tap in taps:
            if tap.check_frames is not None:
                tap.check_frames(info.num_frames)
        plan = chunk_plan(ctx, info.num_frames, info.size)
        if plan is not None:
            check_chunking(ctx, plan, taps)
        check_clip_memory(ctx, info.num_frames if plan is None else plan.chunk, info.size,
                          dtype, device)

    def outputs(self, ctx) -> tuple[str, ...]:
        """``prediction.npz`` (and ``chunks.json`` when chunked) and the files of the other
        stages' forward taps."""
        frames: np.ndarray = ctx.artifacts["processed_frames"]
        chunked = chunk_plan(ctx, len(frames), frames.shape[1:3]) is not None
        return (self.output, *((CHUNKS_REPORT,) if chunked else ()),
                *(name for tap in forward_taps(ctx) for name in tap.files))

    def cache_key(self, ctx) -> str:
        frames: np.ndarray = ctx.artifacts["processed_frames"]
        device, dtype = job_device(ctx)
        return content_key(*forward_identity(ctx, frames, device, dtype),
                           [tap.key for tap in forward_taps(ctx)])

    def run(self, ctx) -> None:
        taps = forward_taps(ctx)
        prediction = predict_to_file(ctx, ctx.artifacts["processed_frames"],
                                     ctx.out_dir / self.output, "predict", taps=taps)
        for tap in taps:
            tap.save(ctx.out_dir)
        ctx.artifacts["prediction"] = prediction

    def load(self, ctx) -> None:
        ctx.artifacts["prediction"] = load_prediction(ctx.out_dir / self.output)
