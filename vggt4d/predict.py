"""The DA3 forward: processed frames in, depth / confidence / cameras out, Q/K to consumers.

``prediction.npz`` holds, for T frames at the processing size (H, W):
depth (T, H, W) float32; conf (T, H, W) float32 — DA3's ``1 + exp(x)``, so always ≥ 1;
extrinsics (T, 3, 4) world-to-camera (OpenCV); intrinsics (T, 3, 3) in processing-size pixels;
frames (T, H, W, 3) uint8, the processed frames; grid (2,) the patch grid (h, w);
sky (T, H, W) float32, present only for models with a sky head (da3mono/da3metric, and the
nested model through its metric branch): DA3 calls a pixel sky when this is ≥ 0.3.
The mono and metric models have no camera head: they predict neither cameras nor a confidence,
so conf, extrinsics and intrinsics are absent (``None``) for them (``model.camera_head``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vggt4d import __version__
from vggt4d.cache import content_key
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
from vggt4d.io import write_npz
from vggt4d.model import (
    build_network,
    check_depth_table,
    depth_table,
    head_features,
    load_weights,
    parameter_count,
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


@dataclass
class Prediction:
    depth: np.ndarray
    conf: np.ndarray | None
    extrinsics: np.ndarray | None
    intrinsics: np.ndarray | None
    frames: np.ndarray
    grid: tuple[int, int]
    sky: np.ndarray | None = None

    def save(self, path: Path) -> Path:
        arrays = {name: value for name in ("depth", "frames", *OPTIONAL_OUTPUTS)
                  if (value := getattr(self, name)) is not None}
        return write_npz(path, {"grid": np.asarray(self.grid, np.int64), **arrays})

    @classmethod
    def load(cls, path: Path) -> Prediction:
        with np.load(path) as data:
            return cls(depth=data["depth"], frames=data["frames"],
                       grid=tuple(int(v) for v in data["grid"]),
                       **{name: data.get(name) for name in OPTIONAL_OUTPUTS})


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
    """A tqdm bar advanced by each backbone block of the hooked network."""
    blocks = hooked_backbone(net, hooked_network).pretrained.blocks
    with tqdm(total=len(blocks), desc="DA3 blocks", unit="block", disable=not enabled,
              leave=False) as bar:
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


def forward_identity(ctx, frames: np.ndarray, device: torch.device,
                     dtype: torch.dtype) -> list:
    """Everything a DA3 forward's result depends on: frames, model, weights, dtype, device type,
    package versions (the start of every forward's cache key)."""
    from importlib.metadata import version

    model = ctx.cfg.model
    weights = model.weights
    if weights == "random":
        weights = f"random(seed={ctx.cfg.seed})"
    elif Path(weights).expanduser().exists():
        path = Path(weights).expanduser().resolve()
        weights = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    return [hashlib.sha256(frames.tobytes()).hexdigest(), frames.shape, model.name, weights,
            model.ref_view_strategy, str(dtype), device.type, version("depth-anything-3"),
            __version__]


def check_clip_memory(ctx, empty: nn.Module, num_frames: int, size: tuple[int, int],
                      dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a forward of ``num_frames`` frames of ``size = (H, W)`` that does not fit the
    device (or ``memory_limit_gb``), from the estimate alone; ``empty`` is the network built
    on the meta device."""
    model = ctx.cfg.model
    height, width = size
    estimate = estimate_forward_memory(
        num_params=parameter_count(empty), frames=num_frames, height=height, width=width,
        embed_dim=depth_table(empty, model.hooked_network)["embed_dim"],
        head_features=head_features(model.name), dtype=dtype,
    )
    limit = ctx.cfg.memory_limit_gb * GIB if ctx.cfg.memory_limit_gb else available_bytes(device)
    check_memory(estimate, int(limit), f"{model.name} on {num_frames} frames at {width}x{height}")


def prepare_network(ctx, frames: np.ndarray, device: torch.device, dtype: torch.dtype,
                    what: str) -> nn.Module:
    """Refuse clips that do not fit the device (before loading anything), then build the
    network with its weights on ``device``."""
    model = ctx.cfg.model
    check_clip_memory(ctx, build_network(model.name, empty=True), len(frames),
                      frames.shape[1:3], dtype, device)
    weights_path = resolve_weights(model.weights)
    torch.manual_seed(ctx.cfg.seed)
    net = build_network(model.name)
    if weights_path is not None:
        load_weights(net, weights_path, model.name)
    log.info("%s: %s (%s weights) on %s, %s", what, model.name, model.weights, device,
             str(dtype).removeprefix("torch."))
    return net.to(device)


def job_device(ctx) -> tuple[torch.device, torch.dtype]:
    """The device and dtype this job's forwards run on (``device``/``dtype`` resolved; sweep
    job n takes GPU n mod count)."""
    device = resolve_device(ctx.cfg.device, ctx.job.num)
    return device, resolve_dtype(ctx.cfg.dtype, device)


class PredictStage(Stage):
    """DA3 forward on the processed frames → ``prediction.npz`` (cached by inputs and model)."""

    name = "predict"
    requires = ("processed_frames",)
    provides = ("prediction",)

    def check(self, ctx) -> None:
        """Depth table against the network (built empty), device and dtype, and whether the
        clip fits the device — from the frames' metadata, before any frame is decoded."""
        model = ctx.cfg.model
        empty = build_network(model.name, empty=True)
        check_depth_table(model, empty)
        device, dtype = job_device(ctx)
        info = probe_clip(ctx.cfg.data, ctx.cfg.process_res)
        for tap in forward_taps(ctx):
            if tap.check_frames is not None:
                tap.check_frames(info.num_frames)
        check_clip_memory(ctx, empty, info.num_frames, info.size, dtype, device)

    def outputs(self, ctx) -> tuple[str, ...]:
        """``prediction.npz`` and the files of the other stages' forward taps."""
        return ("prediction.npz", *(name for tap in forward_taps(ctx) for name in tap.files))

    def cache_key(self, ctx) -> str:
        frames: np.ndarray = ctx.artifacts["processed_frames"]
        device, dtype = job_device(ctx)
        return content_key(*forward_identity(ctx, frames, device, dtype),
                           [tap.key for tap in forward_taps(ctx)])

    def run(self, ctx) -> None:
        model = ctx.cfg.model
        frames: np.ndarray = ctx.artifacts["processed_frames"]
        device, dtype = job_device(ctx)
        taps = forward_taps(ctx)
        net = prepare_network(ctx, frames, device, dtype, "predict")
        qk_taps = [tap for tap in taps if tap.on_qk is not None]
        token_taps = [tap for tap in taps if tap.on_tokens is not None]

        def on_qk(capture: BlockQK) -> None:
            for tap in qk_taps:
                if capture.layer in tap.qk_layers:
                    tap.on_qk(capture)

        def on_tokens(tokens: BlockTokens) -> None:
            for tap in token_taps:
                if tokens.layer in tap.token_layers:
                    tap.on_tokens(tokens)

        prediction = run_forward(
            net, frames, device=device, dtype=dtype,
            hooked_network=model.hooked_network, ref_view_strategy=model.ref_view_strategy,
            on_qk=on_qk if qk_taps else None,
            qk_layers=sorted(set().union(*(tap.qk_layers for tap in qk_taps))),
            on_tokens=on_tokens if token_taps else None,
            token_layers=sorted(set().union(*(tap.token_layers for tap in token_taps))),
        )
        prediction.save(ctx.out_dir / "prediction.npz")
        for tap in taps:
            tap.save(ctx.out_dir)
        ctx.artifacts["prediction"] = prediction

    def load(self, ctx) -> None:
        ctx.artifacts["prediction"] = Prediction.load(ctx.out_dir / "prediction.npz")
