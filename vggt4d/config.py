"""Structured configs for the Hydra tree in ``conf/`` and their semantic validation.

Hydra validates keys and types at compose time against the dataclasses registered here (a typo'd
key or a wrong type fails with Hydra's own message). :func:`validate` then checks what types cannot
express (known model, bands inside the network, sizes) and returns plain dataclass objects, so every
stage after start-up works on typed, checked values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from vggt4d.errors import UserError
from vggt4d.latent import LatentSettings
from vggt4d.points import PointsSettings
from vggt4d.refine import RefineSettings
from vggt4d.synthetic import SyntheticConfig

log = logging.getLogger(__name__)

PATCH_SIZE = 14
"""DA3 patch size in pixels: processing sizes are multiples of it."""

GIANT_BANDS = {"shallow": (1, 5), "middle": (6, 15), "deep": (18, 21)}
"""The user's layer bands for the 40-block DA3-giant (0-indexed, inclusive)."""

GIANT_DEPTH = 40

KNOWN_STAGES = (
    "predict", "gram", "maps", "masks", "refine", "second_pass", "viz", "eval", "latent", "log",
)
"""Stages the runner knows, in pipeline order."""


def scale_band(band: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    """Map a 40-block band to a network of ``num_blocks`` blocks at the same fraction of depth.

    The band is the half-open block interval ``[a, b + 1)`` of the giant; scaled by
    ``num_blocks / 40`` and floored it becomes ``[floor(a·n/40), floor((b+1)·n/40) − 1]``, kept at
    least one block wide. Consecutive giant bands stay disjoint and in order after scaling.
    """
    first, last = band
    start = math.floor(first * num_blocks / GIANT_DEPTH)
    end = max(start, math.floor((last + 1) * num_blocks / GIANT_DEPTH) - 1)
    return start, end


@dataclass
class BandsConfig:
    """Layer bands of the VGGT4D cues: 0-indexed backbone blocks, inclusive ``[first, last]``."""

    shallow: list[int] = field(default_factory=lambda: list(GIANT_BANDS["shallow"]))
    middle: list[int] = field(default_factory=lambda: list(GIANT_BANDS["middle"]))
    deep: list[int] = field(default_factory=lambda: list(GIANT_BANDS["deep"]))


@dataclass
class ModelConfig:
    """One DA3 variant and the depth table of the network whose attention is hooked.

    ``hooked_network`` is the attribute path from the DA3 network to the ``DepthAnything3Net``
    whose backbone is hooked: empty for plain variants, ``da3`` (the any-view giant) for the
    nested model, so no statistics are computed in its metric network.
    """

    name: str = MISSING
    preset: str = MISSING
    num_blocks: int = MISSING
    embed_dim: int = MISSING
    num_heads: int = MISSING
    head_dim: int = 64
    alt_start: int = -1
    global_blocks: list[int] = field(default_factory=list)
    out_layers: list[int] = field(default_factory=list)
    patch_start_idx: int = 1
    hooked_network: str = ""
    camera_head: bool = True
    """Whether the hooked network predicts cameras and a depth confidence (the mono and metric
    models predict depth, and sky, only)."""
    weights: str = MISSING
    ref_view_strategy: str = "saddle_balanced"
    bands: BandsConfig = field(default_factory=BandsConfig)


@dataclass
class ImagesData:
    """A folder of jpg/png frames, sorted by file name."""

    source: str = "images"
    path: str = MISSING
    stride: int = 1
    max_frames: int = 0


@dataclass
class VideoData:
    """A video file decoded by imageio-ffmpeg (no system ffmpeg needed), resampled to ``fps``."""

    source: str = "video"
    path: str = MISSING
    fps: float = 10.0
    max_frames: int = 0


@dataclass
class SyntheticData(SyntheticConfig):
    """The project's own rendered scene with ground truth (see :mod:`vggt4d.synthetic`)."""

    source: str = "synthetic"


@dataclass
class GramConfig:
    """Gram statistics of Q/K (see :mod:`vggt4d.gram` for the definitions)."""

    layers: list[int] = field(default_factory=list)
    """Blocks to compute; empty = every block of the hooked network."""
    window: str = "all"
    offsets: list[int] = field(default_factory=lambda: [-6, -4, -2, 2, 4, 6])
    include_self: bool = True
    scale: bool = False
    variance: str = "pairs"
    heads: str = "mean"
    engine: str = "moments"
    chunk_size: int = 1024
    pairs: list[str] = field(default_factory=lambda: ["qq", "kk", "qk"])
    special_tokens: str = "model"
    """``model``: strip ``model.patch_start_idx`` tokens; ``auto``: search 0–16 (checked)."""


@dataclass
class MapsConfig:
    """Easi3R maps and VGGT4D cues (see :mod:`vggt4d.maps`)."""

    band_mode: str = "mean_of_layers"
    global_only: bool = False
    """Keep only the global (cross-frame) blocks of each band, as VGGT4D uses VGGT's."""
    normalize: str = "minmax"
    percentiles: list[float] = field(default_factory=lambda: [5.0, 95.0])
    normalize_scope: str = "frame"
    """``frame`` (each frame on its own, VGGT4D) or ``sequence`` (all frames together)."""
    shallow_form: str = "official"
    deep_form: str = "official"
    """``official`` S·(1 − V) or ``inverted`` 1 − (1 − V)·S (the user's first full script)."""
    fusion: str = "product"
    mix_inv_similarity: bool = False
    """Average the fused map with 1 − S^QK over ``std_layers`` (the user's fused scripts)."""
    std_layers: list[int] = field(default_factory=list)
    """Layers of the 1 − S^QK map; empty = all band layers."""


@dataclass
class MasksConfig:
    """From the fused map to binary masks (see :mod:`vggt4d.masks`)."""

    kmeans: bool = False
    kmeans_clusters: int = 64
    temporal_sigma: float = 0.0
    """Gaussian over frames (in frames) of the patch-level map."""
    spatial_sigma: float = 0.0
    """Gaussian over patches of the patch-level map (3×3 taps for σ 0.5)."""
    upsample: str = "bilinear"
    guide: str = "rgb"
    guided_radius: float = 0.02
    """Guided-filter box radius as a fraction of the frame's longer side."""
    guided_eps: float = 1e-4
    morph_before: list[str] = field(default_factory=list)
    """Grey morphology on the soft map before the guided filter, e.g. ``["open:3"]``."""
    morph_after: list[str] = field(default_factory=list)
    """Grey morphology on the soft map after the guided filter, e.g. ``["close:7"]``."""
    binarize: str = "multi_otsu"
    threshold: float = 0.5
    low: float = 0.3
    high: float = 0.6
    empty_below_mean: float = 0.0
    """Frames whose soft map averages below this get an empty mask."""
    empty_below_max: float = 0.0
    """Frames whose soft map never reaches this get an empty mask."""


@dataclass
class SecondPassConfig:
    """The second masked DA3 pass (see :mod:`vggt4d.second_pass`)."""

    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Blocks whose dynamic keys/values are hidden (VGGT4D: 0-4; the user's scripts: 1-8)."""
    patch_rule: str = "any"
    """A patch is dynamic when ``any`` pixel is (VGGT4D) or by ``area`` (> area_fraction)."""
    area_fraction: float = 0.1


@dataclass
class VizConfig:
    """Pictures and videos (see :mod:`vggt4d.pictures`)."""

    layers: list[int] = field(default_factory=list)
    """Layers whose per-frame map PNGs are written; empty = the first block of each band."""
    cmap: str = "jet"
    power: float = 1.0
    """Map values are raised to this power before colouring (the user's heatmaps: 1.5)."""
    blur: float = 0.0
    """Gaussian blur of the upsampled maps, σ as a fraction of the frame width (user: 0.02)."""
    videos: bool = True
    fps: float = 10.0
    sheet_frames: list[int] = field(default_factory=list)
    """Frames that get a per-statistic contact sheet of all layers; empty = the middle frame."""


@dataclass
class EvalConfig:
    """Mask evaluation against ground truth (DAVIS definitions, see :mod:`vggt4d.evaluate`)."""

    gt_path: str = ""
    """A folder of ground-truth mask PNGs for real clips; the synthetic scene brings its own."""
    bound_th: float = 0.008
    empty_score: float = 1.0


@dataclass
class LoggerConfig:
    """Experiment tracking (``logger=wandb`` | ``logger=none``, see :mod:`vggt4d.tracking`)."""

    kind: str = "wandb"
    mode: str = "offline"
    project: str = "vggt4d"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    background: bool = True
    """Write the run from a background thread (overlaps the next sweep job)."""


@dataclass
class ClusterConfig:
    """Resources of one sweep job for ``hydra/launcher=slurm`` (and ``local``, joblib)."""

    partition: str = "gpu"
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int = 64
    time_limit_min: int = 120
    array_parallelism: int = 8
    local_jobs: int = 1
    """Parallel jobs of ``hydra/launcher=local``: one per GPU when several (device=auto gives
    job n the GPU n mod count)."""


@dataclass
class RunConfig:
    """Top level of ``conf/config.yaml``."""

    model: ModelConfig = MISSING
    data: Any = MISSING
    bands: BandsConfig = field(default_factory=BandsConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    refine: RefineSettings = field(default_factory=RefineSettings)
    second_pass: SecondPassConfig = field(default_factory=SecondPassConfig)
    points: PointsSettings = field(default_factory=PointsSettings)
    latent: LatentSettings = field(default_factory=LatentSettings)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    layer_depth: int | None = None
    """Depth the layer numbers in bands, gram/maps/viz layers are written for (presets use the
    40-block giant's); null = the model's own. Other depths are mapped by :func:`scale_band`."""
    process_res: int = 504
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    pipeline: list[str] = field(default_factory=lambda: list(KNOWN_STAGES))
    cache_dir: str = "outputs/cache"
    memory_limit_gb: float | None = None


DTYPES = ("auto", "fp32", "bf16", "fp16")
REF_VIEW_STRATEGIES = ("first", "middle", "saddle_balanced", "saddle_sim_range")
PRESETS = ("vit_small", "vit_base", "vit_large", "vit_giant2")


def register_configs() -> None:
    """Register the schemas that the YAML files in ``conf/`` extend (``defaults: [*_schema]``)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="data", name="images_schema", node=ImagesData)
    store.store(group="data", name="video_schema", node=VideoData)
    store.store(group="data", name="synthetic_schema", node=SyntheticData)
    store.store(group="logger", name="logger_schema", node=LoggerConfig)


register_configs()


def round_process_res(process_res: int) -> int:
    """Nearest multiple of the patch size (at least one patch); warns when it changes."""
    if process_res < PATCH_SIZE:
        raise UserError(f"process_res={process_res} is too small: use at least {PATCH_SIZE}")
    rounded = max(PATCH_SIZE, round(process_res / PATCH_SIZE) * PATCH_SIZE)
    if rounded != process_res:
        log.warning("process_res=%d is not a multiple of %d; using %d", process_res,
                    PATCH_SIZE, rounded)
    return rounded


def check_bands(bands: BandsConfig, num_blocks: int, prefix: str = "bands") -> None:
    """Each band is ``[first, last]`` with ``0 <= first <= last < num_blocks``."""
    for name in ("shallow", "middle", "deep"):
        band = list(getattr(bands, name))
        if len(band) != 2 or not 0 <= band[0] <= band[1] < num_blocks:
            raise UserError(
                f"{prefix}.{name}={band} is not a band of this model: give [first, last] with "
                f"0 <= first <= last <= {num_blocks - 1} (0-indexed blocks, inclusive)"
            )


def band_layers(bands: BandsConfig,
                global_blocks: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Band name → the blocks it spans; with ``global_blocks``, only those (a band holding none
    takes the first global block after its start, or the last one)."""
    layers = {}
    for name in ("shallow", "middle", "deep"):
        first, last = getattr(bands, name)
        span = tuple(range(first, last + 1))
        if global_blocks:
            chosen = tuple(i for i in span if i in global_blocks)
            later = [i for i in global_blocks if i >= first] or [max(global_blocks)]
            span = chosen or (later[0],)
        layers[name] = span
    return layers


def cue_bands(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """The blocks of each cue band as configured (``maps.global_only`` applied)."""
    return band_layers(run.bands, run.model.global_blocks if run.maps.global_only else None)


def require_cameras(model: ModelConfig, stage: str) -> None:
    """Raise :class:`UserError` when ``stage`` needs DA3's cameras and ``model`` predicts none."""
    if not model.camera_head:
        raise UserError(f"{stage} needs camera poses, but {model.name} predicts depth only (no "
                        f"camera head): use da3-small, da3-base, da3-large, da3-giant or "
                        f"da3nested-giant-large, or remove {stage} from the pipeline")


def _check_layers(name: str, layers: list[int], num_blocks: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_blocks]
    if bad:
        raise UserError(f"{name}={list(layers)}: layers {bad} are outside this model's blocks "
                        f"0-{num_blocks - 1}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name}='{value}' is not one of {', '.join(allowed)}")


def _check_stages(run: RunConfig) -> None:
    blocks = run.model.num_blocks
    check_bands(run.bands, blocks)
    _check_layers("gram.layers", run.gram.layers, blocks)
    _check_layers("maps.std_layers", run.maps.std_layers, blocks)
    _check_layers("viz.layers", run.viz.layers, blocks)
    _check_choice("gram.special_tokens", run.gram.special_tokens, ("model", "auto"))
    _check_choice("maps.band_mode", run.maps.band_mode, ("mean_of_layers", "exact"))
    _check_choice("maps.normalize", run.maps.normalize, ("minmax", "percentile"))
    _check_choice("maps.shallow_form", run.maps.shallow_form, ("official", "notes"))
    _check_choice("maps.fusion", run.maps.fusion, ("product", "sum"))
    _check_choice("maps.normalize_scope", run.maps.normalize_scope, ("frame", "sequence"))
    _check_choice("maps.deep_form", run.maps.deep_form, ("official", "inverted"))
    _check_choice("masks.upsample", run.masks.upsample, ("bilinear", "guided"))
    low, high = run.maps.percentiles if len(run.maps.percentiles) == 2 else (1, 0)
    if not 0 <= low < high <= 100:
        raise UserError(f"maps.percentiles={list(run.maps.percentiles)} must be [low, high] "
                        f"with 0 <= low < high <= 100")
    if run.maps.band_mode == "exact" and run.gram.engine == "chunked":
        log.info("maps.band_mode=exact computes band statistics with gram.engine=chunked")
    for key in ("morph_before", "morph_after"):
        for step in getattr(run.masks, key):
            op, _, size = step.partition(":")
            if op not in ("open", "close", "dilate", "erode") or not size.isdigit():
                raise UserError(f"masks.{key} entry '{step}' must be op:size with op in open, "
                                f"close, dilate, erode (e.g. close:7)")
    if run.masks.kmeans_clusters < 1:
        raise UserError(f"masks.kmeans_clusters={run.masks.kmeans_clusters} must be >= 1")
    if not 0 <= run.masks.guided_radius < 1:
        raise UserError(f"masks.guided_radius={run.masks.guided_radius} is a fraction of the "
                        f"frame's longer side: use 0 <= r < 1 (the user's scripts: 0.01-0.02)")
    if run.viz.fps <= 0:
        raise UserError(f"viz.fps={run.viz.fps} must be > 0")
    _check_choice("logger.kind", run.logger.kind, ("wandb", "none"))
    _check_choice("logger.mode", run.logger.mode, ("offline", "online", "disabled"))


def scale_layer(layer: int, depth: int, num_blocks: int) -> int:
    """A single block of a ``depth``-block network at the same fraction of a ``num_blocks`` one."""
    return min(num_blocks - 1, math.floor(layer * num_blocks / depth))


def map_layers_to_model(run: RunConfig) -> None:
    """Rewrite layer numbers given for ``layer_depth`` blocks to the model's depth (in place)."""
    depth, blocks = run.layer_depth, run.model.num_blocks
    if depth is None or depth == blocks:
        return
    if depth < 1:
        raise UserError(f"layer_depth={depth} must be a positive number of blocks (or null)")
    for name in ("shallow", "middle", "deep"):
        band = getattr(run.bands, name)
        scaled = scale_band((band[0], band[1]), blocks) if depth == GIANT_DEPTH else (
            scale_layer(band[0], depth, blocks), scale_layer(band[1], depth, blocks))
        setattr(run.bands, name, list(scaled))
    for section, key in (("gram", "layers"), ("maps", "std_layers"), ("viz", "layers"),
                         ("second_pass", "layers")):
        owner = getattr(run, section)
        setattr(owner, key, sorted({scale_layer(i, depth, blocks) for i in getattr(owner, key)}))
    log.info("layer numbers written for %d blocks mapped to %s's %d: bands %s", depth,
             run.model.name, blocks, [run.bands.shallow, run.bands.middle, run.bands.deep])


def _check_model(model: ModelConfig) -> None:
    from depth_anything_3.registry import MODEL_REGISTRY

    if model.name not in MODEL_REGISTRY:
        raise UserError(
            f"unknown model.name '{model.name}'; known: {', '.join(MODEL_REGISTRY)}"
        )
    if model.preset not in PRESETS:
        raise UserError(f"model.preset='{model.preset}' is not one of {', '.join(PRESETS)}")
    if model.ref_view_strategy not in REF_VIEW_STRATEGIES:
        raise UserError(
            f"model.ref_view_strategy='{model.ref_view_strategy}' is not one of "
            f"{', '.join(REF_VIEW_STRATEGIES)}"
        )
    check_bands(model.bands, model.num_blocks)


def _check_data(data: Any) -> None:
    if isinstance(data, SyntheticData):
        data.validate()
    elif isinstance(data, ImagesData | VideoData):
        if data.max_frames < 0:
            raise UserError(f"data.max_frames={data.max_frames} must be >= 0 (0 = all frames)")
        if isinstance(data, ImagesData) and data.stride < 1:
            raise UserError(f"data.stride={data.stride} must be >= 1")
        if isinstance(data, VideoData) and not data.fps > 0:
            raise UserError(f"data.fps={data.fps} must be > 0")
    else:
        raise UserError("data must be one of data=images, data=video, data=synthetic")


def validate(cfg: DictConfig) -> RunConfig:
    """Turn a composed config into checked dataclasses; raises :class:`UserError` on bad values."""
    try:
        run: RunConfig = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise UserError(f"{key} is required: set it on the command line, e.g. {key}=...") from None
    except ValidationError as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{err.full_key or 'config'}: {reason}") from None
    _check_model(run.model)
    _check_data(run.data)
    map_layers_to_model(run)
    _check_stages(run)
    run.process_res = round_process_res(run.process_res)
    if run.dtype not in DTYPES:
        raise UserError(f"dtype='{run.dtype}' is not one of {', '.join(DTYPES)}")
    unknown = [stage for stage in run.pipeline if stage not in KNOWN_STAGES]
    if unknown:
        raise UserError(f"unknown pipeline stage(s) {unknown}; known: {', '.join(KNOWN_STAGES)}")
    if run.memory_limit_gb is not None and not run.memory_limit_gb > 0:
        raise UserError(f"memory_limit_gb={run.memory_limit_gb} must be > 0 (or null = device)")
    return run
