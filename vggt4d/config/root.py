"""The top level of the run configuration: every group's schema composed, registered with Hydra,
and the checks that types cannot express.

Each group's schema lives in its own module of this package and holds that group's defaults, the
only place they are written (``conf/config.yaml`` lists the groups and Hydra's own settings).
Choices are enums, so Hydra rejects a misspelt value when it composes the config, naming the
allowed ones. :func:`validate` then checks ranges and cross-group rules and returns the typed
:class:`RunConfig` that every stage works on.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from vggt4d.config.chunk import ChunkConfig
from vggt4d.config.cluster import ClusterConfig
from vggt4d.config.data import DataConfig, DatasetData, ImagesData, SyntheticData, VideoData
from vggt4d.config.eval import EvalConfig
from vggt4d.config.export import ExportConfig
from vggt4d.config.gram import GramConfig
from vggt4d.config.latent import LatentConfig
from vggt4d.config.logger import LoggerConfig
from vggt4d.config.maps import MapsConfig
from vggt4d.config.masks import MasksConfig
from vggt4d.config.model import (
    CUE_BANDS,
    GIANT_DEPTH,
    BandsConfig,
    ModelConfig,
    band_layers,
    check_bands,
    default_bands,
    scale_band,
    scale_layer,
)
from vggt4d.config.points import PointsConfig
from vggt4d.config.refine import RefineConfig
from vggt4d.config.second_pass import LayerRule, SecondPassConfig
from vggt4d.config.temporal import TemporalConfig
from vggt4d.config.viz import VizConfig
from vggt4d.errors import UserError

log = logging.getLogger(__name__)

PATCH_SIZE = 14
"""DA3 patch size in pixels: processing sizes are multiples of it."""

MAX_SEED = 2**32 - 1
"""Largest seed every consumer accepts (NumPy and scikit-learn take 32-bit seeds)."""


class StageName(StrEnum):
    """Stages the runner composes, in their natural order."""

    predict = "predict"
    gram = "gram"
    temporal = "temporal"
    maps = "maps"
    masks = "masks"
    second_pass = "second_pass"
    refine = "refine"
    viz = "viz"
    eval = "eval"
    latent = "latent"
    export = "export"
    log = "log"


class Dtype(StrEnum):
    """``auto`` = bf16 on CUDA, fp32 elsewhere."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DEFAULT_PIPELINE = [StageName.predict, StageName.gram, StageName.maps, StageName.masks,
                    StageName.viz, StageName.eval, StageName.latent, StageName.log]


@dataclass
class RunConfig:
    """One job: ``python -m vggt4d.run [group=option] [key=value ...]``."""

    model: ModelConfig = MISSING
    data: Any = MISSING
    """One of :class:`ImagesData`, :class:`VideoData`, :class:`SyntheticData`,
    :class:`DatasetData` (``data=``)."""
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    """Long videos as overlapping DA3 forwards aligned into one world (off by default)."""
    bands: BandsConfig = field(default_factory=default_bands)
    gram: GramConfig = field(default_factory=GramConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    second_pass: SecondPassConfig = field(default_factory=SecondPassConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    points: PointsConfig = field(default_factory=lambda: PointsConfig(seed=II("seed")))
    latent: LatentConfig = field(default_factory=lambda: LatentConfig(seed=II("seed")))
    export: ExportConfig = field(default_factory=lambda: ExportConfig(seed=II("seed")))
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: list[StageName] = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    """Stages to run; the providers of what they read are added and everything is ordered by
    what each stage reads (:func:`vggt4d.pipeline.resolve`)."""
    layer_depth: int | None = None
    """Depth the layer numbers in bands, gram/maps/viz/second-pass layers are written for
    (presets use the 40-block giant's); null = the model's own."""
    process_res: int = 504
    """Longest side of the processed frames, rounded to a multiple of 14."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1, ..."""
    dtype: Dtype = Dtype.auto
    seed: int = 0
    """Seeds random weights, the synthetic scene and every sampling step (0 ≤ seed < 2³²)."""
    cache_dir: str = II("oc.env:VGGT4D_CACHE_DIR,outputs/cache")
    """Cached DA3 forwards and statistics, shared by runs and sweeps."""
    memory_limit_gb: float | None = None
    """Plan forwards for this much memory; null = what the device has."""


def register_configs() -> None:
    """Register the schemas that ``conf/`` extends (``defaults: [*_schema]``)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="data", name="images_schema", node=ImagesData)
    store.store(group="data", name="video_schema", node=VideoData)
    store.store(group="data", name="synthetic_schema", node=SyntheticData)
    store.store(group="data", name="dataset_schema", node=DatasetData)
    store.store(group="logger", name="logger_schema", node=LoggerConfig)


def round_process_res(process_res: int) -> int:
    """Nearest multiple of the patch size, ties rounded up as the frames' sides are
    (:func:`vggt4d.frames.processing_size`); at least one patch; warns when it changes."""
    if process_res < PATCH_SIZE:
        raise UserError(f"process_res={process_res} is too small: use at least {PATCH_SIZE}")
    rounded = max(PATCH_SIZE, (process_res + PATCH_SIZE // 2) // PATCH_SIZE * PATCH_SIZE)
    if rounded != process_res:
        log.warning("process_res=%d is not a multiple of %d; using %d", process_res,
                    PATCH_SIZE, rounded)
    return rounded


LAYER_LISTS = (("gram", "layers"), ("maps", "std_layers"), ("viz", "layers"),
               ("second_pass", "layers"), ("temporal", "layers"))
"""Settings that hold block numbers (besides the bands)."""


def layer_lists(run: RunConfig) -> list[tuple[str, str]]:
    """The :data:`LAYER_LISTS` that hold DA3 block numbers in this run (the second pass's
    layers are VGGT layers under ``layer_rule=vggt``)."""
    vggt_layers = run.second_pass.layer_rule == LayerRule.vggt
    return [(section, key) for section, key in LAYER_LISTS
            if not (section == "second_pass" and vggt_layers)]


def _check_layer_lists(run: RunConfig, num_blocks: int, what: str) -> None:
    for section, key in layer_lists(run):
        values = list(getattr(getattr(run, section), key))
        bad = [layer for layer in values if not 0 <= layer < num_blocks]
        if bad:
            raise UserError(f"{section}.{key}={values}: layers {bad} are outside {what} "
                            f"0-{num_blocks - 1}")


def map_layers_to_model(run: RunConfig) -> None:
    """Rewrite layer numbers given for ``layer_depth`` blocks to the model's depth (in place).

    Bands written for the 40-block giant keep their fractions of depth (:func:`scale_band`);
    other depths and single layers map by :func:`scale_layer`.
    """
    depth, blocks = run.layer_depth, run.model.num_blocks
    if depth is None:
        return
    if depth < 1:
        raise UserError(f"layer_depth={depth} must be a positive number of blocks (or null)")
    check_bands(run.bands, CUE_BANDS, depth, prefix=f"bands (written for layer_depth={depth})")
    _check_layer_lists(run, depth, f"layer_depth={depth}'s blocks")
    if depth == blocks:
        return
    for name in CUE_BANDS:
        band = getattr(run.bands, name)
        scaled = scale_band((band[0], band[1]), blocks) if depth == GIANT_DEPTH else (
            scale_layer(band[0], depth, blocks), scale_layer(band[1], depth, blocks))
        setattr(run.bands, name, list(scaled))
    for section, key in layer_lists(run):
        owner = getattr(run, section)
        setattr(owner, key, sorted({scale_layer(i, depth, blocks) for i in getattr(owner, key)}))
    log.info("layer numbers written for %d blocks mapped to %s's %d: bands %s", depth,
             run.model.name, blocks, {name: getattr(run.bands, name) for name in CUE_BANDS})


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[tuple[str, list]]:
    """Keys of ``node`` that ``schema`` (a dataclass) has no field for, with the field names of
    their level (a ``+key=value`` override adds keys Hydra does not check)."""
    names = [f.name for f in fields(schema)]
    found = []
    for key in node:
        if key not in names:
            found.append((f"{prefix}{key}", names))
            continue
        child = node._get_node(key)
        kind = next(f.type for f in fields(schema) if f.name == key)
        child_schema = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
        if isinstance(child, DictConfig) and is_dataclass(child_schema) and kind != "Any":
            found += unknown_keys(child, child_schema, f"{prefix}{key}.")
    return found


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg, RunConfig)
    if not unknown:
        return
    key, names = unknown[0]
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1)
    hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}? " \
        if close else ""
    raise UserError(f"unknown setting '{key}' (added with '+'): vggt4d has no such key; {hint}"
                    f"the settings are listed in README.md (Configuration)")


def _to_object(cfg: DictConfig) -> RunConfig:
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise UserError(f"{key} is required: set it on the command line, e.g. {key}=...") from None
    except ValidationError as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{err.full_key or 'config'}: {reason}") from None


def validate(cfg: DictConfig) -> RunConfig:
    """Turn a composed config into the checked :class:`RunConfig`; raises :class:`UserError`
    (one line) on the first bad value. Loads nothing heavy."""
    hydra_free = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) \
        if "hydra" in cfg else cfg
    _refuse_unknown_keys(hydra_free)
    run = _to_object(hydra_free)
    if not 0 <= run.seed <= MAX_SEED:
        raise UserError(f"seed={run.seed} must be in [0, {MAX_SEED}] (a 32-bit seed)")
    if not run.pipeline:
        raise UserError("pipeline=[] runs nothing: list stages, e.g. pipeline=[predict,gram,maps,"
                        "masks] (the default runs " + ", ".join(DEFAULT_PIPELINE) + ")")
    run.model.check()
    if not isinstance(run.data, DataConfig):
        raise UserError("data must be one of data=images, data=video, data=synthetic, "
                        "data=dataset")
    run.data.check()
    map_layers_to_model(run)
    check_bands(run.bands, CUE_BANDS, run.model.num_blocks)
    _check_layer_lists(run, run.model.num_blocks, "this model's blocks")
    for group in (run.gram, run.maps, run.masks, run.refine, run.second_pass, run.viz, run.eval,
                  run.points, run.latent, run.export, run.chunk, run.cluster):
        group.check()
    run.process_res = round_process_res(run.process_res)
    if run.memory_limit_gb is not None and not run.memory_limit_gb > 0:
        raise UserError(f"memory_limit_gb={run.memory_limit_gb} must be > 0 (or null = device)")
    return run


def cue_bands(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """The blocks of each cue band as configured (``maps.global_only`` applied)."""
    return band_layers(run.bands, run.model.global_blocks if run.maps.global_only else None)
