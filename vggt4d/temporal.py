"""The cross-frame query cosine of the AnyDynamics "hooks" research script, computed while DA3
runs.

For a block ℓ, frame t, head h and patch p, with q the query *after qk-norm and before RoPE*
(``q_norm(qkv(x))``, the tensor the script's forward hook recomputed on each global block's
attention) and û = q / max(‖q‖, 10⁻¹²) (``F.normalize``: a zero query has cosine 0):

    c_ℓ(t, h, p) = 1/(T − 1) · Σ_{s ≠ t} ⟨û_ℓ(t, h, p), û_ℓ(s, h, p)⟩

the mean cosine with the same patch position in every other frame. Heads are compared separately
and averaged (the script averaged ``1 − c`` over heads), then layers are averaged; the dynamic cue
is ``1 − mean_ℓ mean_h c_ℓ`` — a patch whose query changes across the clip is likely moving.
Layers: the global blocks (DA3-giant: 13, 15, …, 39) unless ``temporal.layers`` says otherwise.

The script built the (T × T) Gram matrix of every patch and head; here the closed form
``⟨û_t, Σ_s û_s⟩ − ‖û_t‖²`` costs O(T·H·P·d) and keeps no T × T matrix and no Q of other layers.
RoPE rotates a patch's query by an angle set by its position only, and the same patch has the
same position in every frame (global blocks even put every patch at (1, 1)), so this cosine is
the same before and after RoPE up to rounding; it is taken before RoPE, as the script did.
Frames are in input order (the script's hook saw DA3's internal order, in which a reference view
other than frame 0 had been moved first).

``temporal_stats.safetensors``: ``query_cosine.L{ℓ:02d}`` the (T, h, w) float32 map
mean_h c_ℓ per block; metadata: blocks, grid, model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vggt4d.errors import UserError
from vggt4d.hook import BlockQK
from vggt4d.io import read_safetensors, write_safetensors
from vggt4d.stage import ForwardTap, Stage

KEY_PREFIX = "query_cosine.L"
STATISTIC = "mean cosine of the pre-RoPE query with the same patch in every other frame"


def cosine_key(layer: int) -> str:
    """Key of block ``layer``'s map in ``temporal_stats.safetensors``."""
    return f"{KEY_PREFIX}{layer:02d}"


def check_frame_count(num_frames: int) -> None:
    """Refuse a clip with fewer than two frames (nothing to compare)."""
    if num_frames < 2:
        raise UserError(f"the query cosine compares frames: a clip of {num_frames} frame has "
                        f"none to compare with; use at least 2 frames")


def query_cosine(q: Tensor) -> Tensor:
    """Mean cosine of each query with the same (head, patch) in every other frame.

    ``q`` (T, H, P, d) → (T, H, P) float32, c(t, h, p) of the module docstring, computed in
    float32 as ``(⟨û_t, Σ_s û_s⟩ − ‖û_t‖²) / (T − 1)``.
    """
    frames = q.shape[0]
    check_frame_count(frames)
    unit = F.normalize(q.float(), dim=-1)
    total = unit.sum(dim=0)  # (H, P, d)
    with_all = torch.einsum("thpd,hpd->thp", unit, total)
    return (with_all - torch.linalg.vector_norm(unit, dim=-1).square()) / (frames - 1)


def query_cosine_cue(stats: dict[str, Tensor]) -> Tensor:
    """The dynamic cue ``1 − mean over blocks`` of the per-block maps: (T, h, w) float32."""
    maps = [stats[key] for key in sorted(stats) if key.startswith(KEY_PREFIX)]
    if not maps:
        raise UserError("temporal_stats.safetensors holds no query_cosine maps: run the "
                        "temporal stage (it computes them inside the DA3 forward)")
    return 1 - torch.stack(maps).mean(dim=0)


@dataclass
class QueryCosineCollector:
    """Q/K consumer for :func:`vggt4d.hook.capture_attention`: the map mean_h c_ℓ of each
    selected block as the forward reaches it; nothing of a block is kept beyond its (T, h, w)
    map."""

    layers: frozenset[int]
    maps: dict[str, Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None

    def __call__(self, capture: BlockQK) -> None:
        if capture.layer not in self.layers:
            return
        layout = capture.layout
        q = capture.q_pre_rope[:, :, layout.patch_start_idx:]
        if not torch.isfinite(q).all():
            raise UserError(f"non-finite values (NaN/inf) in the queries of layer "
                            f"{capture.layer}; try dtype=fp32 or another checkpoint")
        cosine = query_cosine(q).mean(dim=1)  # heads averaged, (T, P)
        self.grid = layout.grid
        self.maps[cosine_key(capture.layer)] = cosine.reshape(len(cosine), *layout.grid).cpu()


def temporal_layers(cfg) -> list[int]:
    """Blocks of the statistic: ``temporal.layers`` or the model's global blocks."""
    layers = sorted(set(cfg.temporal.layers or cfg.model.global_blocks))
    if not layers:
        raise UserError(f"{cfg.model.name} has no global (cross-frame) blocks: name the blocks "
                        f"whose queries to compare with temporal.layers=[...]")
    return layers


class TemporalStage(Stage):
    """Query cosines computed inside the (cached) DA3 forward → ``temporal_stats.safetensors``."""

    name = "temporal"
    requires = ("prediction",)
    provides = ("temporal_stats",)
    output = "temporal_stats.safetensors"

    def check(self, ctx) -> None:
        """The blocks exist."""
        temporal_layers(ctx.cfg)

    def forward_tap(self, ctx) -> ForwardTap:
        layers = temporal_layers(ctx.cfg)
        collector = QueryCosineCollector(frozenset(layers))
        metadata = {"model": ctx.cfg.model.name, "statistic": STATISTIC, "layers": layers}

        def save(out_dir) -> None:
            write_safetensors(out_dir / self.output, collector.maps,
                              {**metadata, "grid": list(collector.grid or ())})

        return ForwardTap(key={"temporal": metadata}, files=(self.output,), save=save,
                          on_qk=collector, qk_layers=frozenset(layers),
                          check_frames=check_frame_count)

    def load(self, ctx) -> None:
        ctx.artifacts["temporal_stats"] = read_safetensors(ctx.out_dir / self.output)

    run = load
