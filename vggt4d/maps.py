"""Easi3R-style attention maps and VGGT4D's dynamic cues from the Gram statistics.

All maps are ``(T, h, w)`` at patch resolution. Every statistic is normalised per frame before it
enters a formula, as in VGGT4D: ``N(x) = (x − min) / (max − min + 1e-6)`` (``minmax``) or, with
``percentile``, clipped to the [p_lo, p_hi] percentiles first. A constant frame normalises to 0
everywhere (nothing in it stands out), never to NaN.

Easi3R maps of one layer (from QKᵀ): similarity N(S), inv_similarity 1 − N(S), variance N(V),
stability 1 − N(V).
VGGT4D cues over bands (VGGT4D §3.2, its official code): w_shallow = (1 − N(S^KK))·N(V^QK)
(the AnyDynamics notes' form 1 − N(S^KK)·N(V^QK) as ``shallow_form=notes``), w_middle =
1 − N(S^QQ), w_deep = N(S^QQ[deep])·(1 − N(V^QQ[deep_var])) — VGGT4D takes the deep cue's mean
and spread over different layer sets (VGGT: S^QQ over 17–21, V^QQ over 18–19), so ``deep_var``
is its own band (default: the ``deep`` band); fused Dyn = N(w_shallow·w_middle·w_deep).
A band's statistic is the mean of its layers' statistics (``mean_of_layers``) or the statistic of
the layer-averaged similarities (``exact``, the official order, computed in the forward).
Options for the AnyDynamics research scripts: ``normalize_scope=sequence`` (one normalisation
for the whole clip), ``deep_form=inverted`` (w_deep = 1 − N(S^QQ)·(1 − N(V^QQ))),
``fusion=sum``, ``mix_inv_similarity`` (the fused map averaged with 1 − N(S^QK)), and
``cue=query_cosine`` (the "hooks" script: Dyn = N(1 − mean query cosine across frames), from
:mod:`vggt4d.temporal` instead of the Gram statistics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from vggt4d.config.gram import Pair
from vggt4d.config.maps import (
    BandMode,
    Cue,
    DeepForm,
    Fusion,
    MapsConfig,
    Normalize,
    NormalizeScope,
    ShallowForm,
)
from vggt4d.config.root import cue_bands
from vggt4d.errors import UserError
from vggt4d.gram import band_key, stat_key
from vggt4d.io import write_safetensors
from vggt4d.stage import Stage
from vggt4d.temporal import query_cosine_cue

log = logging.getLogger(__name__)

EPS = 1e-6
EASI3R_MAPS = ("similarity", "inv_similarity", "variance", "stability")
CUES = ("w_shallow", "w_middle", "w_deep")


def normalize(maps: Tensor, method: str = Normalize.minmax,
              percentiles: tuple[float, float] = (5.0, 95.0),
              scope: str = NormalizeScope.frame) -> Tensor:
    """Normalisation of ``(T, h, w)`` maps to [0, 1] per frame (or over the whole ``sequence``);
    constant frames → 0."""
    rows = maps.shape[0] if scope == NormalizeScope.frame else 1
    flat = maps.reshape(rows, -1).double()
    if method == Normalize.percentile:
        bounds = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], dtype=flat.dtype)
        low, high = torch.quantile(flat, bounds, dim=1, keepdim=True)
        flat = torch.minimum(torch.maximum(flat, low), high)
    else:
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low + EPS)).reshape(maps.shape).float()


@dataclass(frozen=True)
class Normalizer:
    """:func:`normalize` with fixed settings, applied to every statistic and cue."""

    method: str = Normalize.minmax
    percentiles: tuple[float, float] = (5.0, 95.0)
    scope: str = NormalizeScope.frame

    def __call__(self, maps: Tensor) -> Tensor:
        return normalize(maps, self.method, self.percentiles, self.scope)


def per_frame_maps(stats: dict[str, Tensor], key: str) -> Tensor:
    """A statistic as ``(T, h, w)``: statistics kept per head are averaged over heads."""
    value = stats[key]
    return value.mean(dim=1) if value.ndim == 4 else value


def band_statistic(stats: dict[str, Tensor], pair: str, stat: str, band: str,
                   layers: tuple[int, ...], mode: str) -> Tensor:
    """Raw band statistic: mean over the band's per-layer maps, or the ``exact`` band map."""
    if mode == BandMode.exact:
        return per_frame_maps(stats, band_key(pair, stat, band))
    return torch.stack([per_frame_maps(stats, stat_key(pair, stat, layer))
                        for layer in layers]).mean(dim=0)


def easi3r_maps(stats: dict[str, Tensor], layer: int,
                norm: Normalizer = Normalizer()) -> dict[str, Tensor]:
    """similarity, inv_similarity, variance, stability of one layer's QKᵀ statistics."""
    similarity = norm(per_frame_maps(stats, stat_key("qk", "mean", layer)))
    variance = norm(per_frame_maps(stats, stat_key("qk", "var", layer)))
    return {"similarity": similarity, "inv_similarity": 1 - similarity,
            "variance": variance, "stability": 1 - variance}


def vggt4d_cues(stats: dict[str, Tensor], bands: dict[str, tuple[int, ...]], *,
                norm: Normalizer = Normalizer(), band_mode: str = BandMode.mean_of_layers,
                shallow_form: str = ShallowForm.official,
                deep_form: str = DeepForm.official) -> dict[str, Tensor]:
    """w_shallow, w_middle, w_deep (formulas in the module docstring); ``bands`` maps
    shallow, middle, deep and deep_var to their blocks."""

    def band(pair: str, stat: str, name: str) -> Tensor:
        return norm(band_statistic(stats, pair, stat, name, bands[name], band_mode))

    s_kk, v_qk = band("kk", "mean", "shallow"), band("qk", "var", "shallow")
    shallow = 1 - s_kk * v_qk if shallow_form == ShallowForm.notes else (1 - s_kk) * v_qk
    middle = 1 - band("qq", "mean", "middle")
    stable_similar = band("qq", "mean", "deep") * (1 - band("qq", "var", "deep_var"))
    deep = 1 - stable_similar if deep_form == DeepForm.inverted else stable_similar
    return {"w_shallow": shallow, "w_middle": middle, "w_deep": deep}


def inverse_similarity(stats: dict[str, Tensor], layers: list[int],
                       norm: Normalizer = Normalizer()) -> Tensor:
    """1 − N(mean over ``layers`` of S^QK), the fused scripts' second map."""
    similarity = torch.stack([per_frame_maps(stats, stat_key("qk", "mean", layer))
                              for layer in layers]).mean(dim=0)
    return 1 - norm(similarity)


def fuse(cues: dict[str, Tensor], *, norm: Normalizer = Normalizer(),
         fusion: str = Fusion.product, inv_similarity: Tensor | None = None) -> Tensor:
    """The dynamic map: N(w_shallow·w_middle·w_deep) (``product``, VGGT4D) or N(sum) (the
    robust script); with ``inv_similarity`` averaged with it (the fused/refined scripts)."""
    shallow, middle, deep = (cues[name] for name in CUES)
    fused = norm(shallow + middle + deep if fusion == Fusion.sum else shallow * middle * deep)
    return fused if inv_similarity is None else (fused + inv_similarity) / 2


def config_normalizer(cfg: MapsConfig) -> Normalizer:
    """The :class:`Normalizer` of the ``maps`` settings."""
    return Normalizer(cfg.normalize, (cfg.percentiles[0], cfg.percentiles[1]),
                      cfg.normalize_scope)


@dataclass
class DynamicMaps:
    """Output of the maps stage: cues and fused map ``(T, h, w)``, Easi3R maps per layer."""

    cues: dict[str, Tensor]
    dynamic: Tensor
    easi3r: dict[int, dict[str, Tensor]]

    def save(self, path) -> None:
        tensors = {**self.cues, "dynamic": self.dynamic}
        for layer, maps in self.easi3r.items():
            tensors.update({f"{name}.L{layer:02d}": value for name, value in maps.items()})
        write_safetensors(path, tensors)


class MapsStage(Stage):
    """Gram statistics → ``dynamic_maps.safetensors`` (cheap: sweeps rerun only this onward)."""

    name = "maps"
    requires = ("gram_stats",)
    provides = ("maps",)

    def reads(self, cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``maps.cue=query_cosine`` reads the temporal statistics instead of the Gram ones."""
        if cfg.maps.cue == Cue.query_cosine:
            return ("temporal_stats",), ()
        return self.requires, self.optional

    def check(self, ctx) -> None:
        """The cues need all three pairs, and every layer they read must be computed."""
        cfg = ctx.cfg
        if cfg.maps.cue == Cue.query_cosine:
            return
        if set(cfg.gram.pairs) != set(Pair):
            raise UserError(f"gram.pairs={[str(p) for p in cfg.gram.pairs]}: the maps stage "
                            f"needs qq, kk and qk")
        if not cfg.gram.layers:
            return
        band_blocks = {layer for band in cue_bands(cfg).values() for layer in band}
        needed = set()
        if cfg.maps.band_mode == BandMode.mean_of_layers:
            needed |= band_blocks
        if cfg.maps.mix_inv_similarity:
            needed |= set(cfg.maps.std_layers or band_blocks)
        missing = sorted(needed - set(cfg.gram.layers))
        if missing:
            raise UserError(f"gram.layers={list(cfg.gram.layers)} lacks layers {missing} that "
                            f"the bands / maps.std_layers use; add them or set gram.layers=[]")

    def run(self, ctx) -> None:
        cfg = ctx.cfg
        if cfg.maps.cue == Cue.query_cosine:
            cue = query_cosine_cue(ctx.artifacts["temporal_stats"])
            maps = DynamicMaps({"query_cosine": cue}, config_normalizer(cfg.maps)(cue), {})
            maps.save(ctx.out_dir / "dynamic_maps.safetensors")
            ctx.artifacts["maps"] = maps
            log.info("maps: 1 - mean query cosine across frames (%s)", cfg.maps.normalize)
            return
        stats: dict[str, Tensor] = ctx.artifacts["gram_stats"]
        bands = cue_bands(cfg)
        norm = config_normalizer(cfg.maps)
        cues = vggt4d_cues(stats, bands, norm=norm, band_mode=cfg.maps.band_mode,
                           shallow_form=cfg.maps.shallow_form, deep_form=cfg.maps.deep_form)
        inverse = None
        if cfg.maps.mix_inv_similarity:
            layers = cfg.maps.std_layers or sorted({i for band in bands.values() for i in band})
            inverse = inverse_similarity(stats, layers, norm)
        dynamic = fuse(cues, norm=norm, fusion=cfg.maps.fusion, inv_similarity=inverse)
        layers = sorted({int(key.rsplit(".L", 1)[1]) for key in stats
                         if key.startswith("qk.mean.L")})
        easi3r = {layer: easi3r_maps(stats, layer, norm) for layer in layers}
        maps = DynamicMaps(cues, dynamic, easi3r)
        maps.save(ctx.out_dir / "dynamic_maps.safetensors")
        ctx.artifacts["maps"] = maps
        log.info("maps: cues over bands %s, fusion %s, %d layers of Easi3R maps",
                 {name: [band[0], band[-1]] for name, band in bands.items()},
                 cfg.maps.fusion, len(layers))
