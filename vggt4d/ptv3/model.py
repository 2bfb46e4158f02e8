"""Point Transformer V3 "v3m2" encoder (the Concerto / Sonata backbone), inference only.

Written here because neither Pointcept nor the Concerto package is installable from PyPI (and
their CUDA-only dependencies, spconv-cu / torch-scatter / flash-attn, are not available on CPU).
Module names follow the official ``PointTransformerV3`` so that a released checkpoint's
``state_dict`` loads unchanged (:mod:`vggt4d.ptv3.checkpoint`), and the forward pass reproduces
the official model in eval mode (dropout and drop-path are inactive there and are not built).

Forward pass, for voxels ``(coord, grid_coord, feat, batch)`` of one or more point clouds:

1. **Embedding**: ``x = GELU(LayerNorm(Linear(feat)))``.
2. **Five stages** ``s = 0 … 4``. Stage ``s > 0`` starts with *grid pooling*:
   ``cell = grid_coord // stride``; voxels of one ``(batch, cell)`` merge into one (cells sorted
   lexicographically by ``(batch, x, y, z)``); ``x = GELU(LayerNorm(max_{members} Linear(x)))``,
   ``coord = mean_{members} coord``. Each stage serialises its voxels along the configured curves
   (:func:`vggt4d.ptv3.serialization.serialize`) and runs its blocks; block ``i`` uses row
   ``i % len(order)`` of the serialisation.
3. **Block** (pre-norm): ``x += LN(Linear(SubMConv3d(x)))``, ``x += attn(LN(x))``,
   ``x += mlp(LN(x))`` with ``mlp = Linear(rC→C)·GELU·Linear(C→rC)``; with ``pre_norm=False`` the
   norms follow the residual sums instead. Optional layer scale multiplies each branch by γ.
4. **Serialized attention**: softmax attention inside patches of ``K`` consecutive voxels of the
   block's curve order, per point cloud. A cloud of ``n > K`` voxels is padded to
   ``ceil(n / K)·K`` slots; with ``r = n mod K > 0`` the last ``K − r`` slots repeat the voxels
   ``K`` positions earlier (the tail of the previous patch); only the ``n`` real slots are read
   back. ``K`` shrinks as in the official code: with ``enable_flash`` (variable-length kernels)
   each cloud uses ``K_b = min(K, n_b)``; without it every cloud of the batch uses
   ``K = min(K, min_b n_b)``. For a single cloud the two are the same.

Order shuffling: the official model permutes the curve rows at stage 0 only when
``shuffle_orders`` is set, but its grid pooling always permutes them (``GridPooling`` is built
with its own ``shuffle_orders=True`` default). That is reproduced: pass a seeded CPU
``torch.Generator`` to make the draw reproducible (``None`` draws from torch's global generator,
as the official code does).

Precision: attention runs in the features' dtype through ``F.scaled_dot_product_attention``
(``upcast_attention`` / ``upcast_softmax`` lift a reduced-precision patch attention to float32).
The official flash path casts qkv to half (Concerto) or bfloat16 (Pointcept) before calling
flash-attn; that rounding is not imitated, so fp32 results here are the exact-arithmetic version
of both official paths (expect about 1e-3 relative difference from a GPU run of the official
model). With ``upcast_*`` the official non-flash path lifts only q·k or the softmax to float32;
here all of q, k and v are lifted, which differs in the last bits in reduced precision only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vggt4d.errors import UserError
from vggt4d.ptv3.serialization import ORDERS, serialize
from vggt4d.ptv3.sparse_conv import SubMConv3d, neighbour_index

__all__ = [
    "RUNTIME_FIELDS",
    "VARIANTS",
    "Level",
    "PTv3Config",
    "PTv3Encoder",
    "features_at_input",
    "patch_layout",
]

#: Largest grid coordinate PTv3 can serialise: 16 bits per axis with ``bit_length(max + 1)``.
MAX_GRID_COORD = 2**16 - 2

#: Config fields that neither change the weights nor the trained network: run-time choices
#: (patch size, flash semantics, order shuffling, precision), training-only regularisation and
#: decoder settings that encoder-only mode ignores. A checkpoint may differ from a variant in
#: these, and :func:`vggt4d.ptv3.checkpoint.load_encoder` accepts overrides for them only.
RUNTIME_FIELDS = frozenset(
    {
        "enc_patch_size",
        "enable_flash",
        "shuffle_orders",
        "upcast_attention",
        "upcast_softmax",
        "attn_drop",
        "proj_drop",
        "drop_path",
        "traceable",
        "freeze_encoder",
        "dec_depths",
        "dec_channels",
        "dec_num_head",
        "dec_patch_size",
    }
)

#: The value of a Pointcept backbone config's ``type`` key for this model.
OFFICIAL_TYPE = "PT-v3m2"


@dataclass(frozen=True)
class PTv3Config:
    """Constructor arguments of the official ``PointTransformerV3`` (v3m2), same names.

    Defaults are those of Concerto's ``concerto/model.py`` (the class that loads released
    checkpoints with ``PointTransformerV3(**ckpt["config"])``), so a key missing from a
    checkpoint's config means what it means there. Per-stage tuples have 5 entries
    (``stride``: 4); ``dec_*`` fields are kept for round trips only (encoder-only mode).
    """

    in_channels: int = 6
    order: tuple[str, ...] = ("z", "z-trans")
    stride: tuple[int, ...] = (2, 2, 2, 2)
    enc_depths: tuple[int, ...] = (3, 3, 3, 12, 3)
    enc_channels: tuple[int, ...] = (48, 96, 192, 384, 512)
    enc_num_head: tuple[int, ...] = (3, 6, 12, 24, 32)
    enc_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024, 1024)
    dec_depths: tuple[int, ...] = (3, 3, 3, 3)
    dec_channels: tuple[int, ...] = (96, 96, 192, 384)
    dec_num_head: tuple[int, ...] = (6, 6, 12, 32)
    dec_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    drop_path: float = 0.3
    layer_scale: float | None = None
    pre_norm: bool = True
    shuffle_orders: bool = True
    enable_rpe: bool = False
    enable_flash: bool = True
    upcast_attention: bool = False
    upcast_softmax: bool = False
    traceable: bool = False
    mask_token: bool = False
    enc_mode: bool = False
    freeze_encoder: bool = False

    @classmethod
    def from_official(cls, config: Mapping[str, object]) -> PTv3Config:
        """Read a released checkpoint's ``"config"`` dict (or a Pointcept backbone config).

        Sequences become tuples (a single ``order`` string becomes a 1-tuple); a ``"type"`` key
        is accepted when it names this model (``"PT-v3m2"``). Unknown keys and values of the
        wrong kind raise :class:`UserError`.
        """
        if not isinstance(config, Mapping):
            raise UserError(f"a PTv3 config must be a dict, got {type(config).__name__}")
        values = dict(config)
        kind = values.pop("type", OFFICIAL_TYPE)
        if kind != OFFICIAL_TYPE:
            raise UserError(f"config is for model type {kind!r}, not {OFFICIAL_TYPE!r}")
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown PTv3 config keys: {', '.join(map(str, unknown))}")
        defaults = cls()
        for name, value in values.items():
            values[name] = _coerce(name, value, getattr(defaults, name))
        return cls(**values)

    def to_official(self) -> dict[str, object]:
        """The config as the official constructor's keyword arguments (a plain dict)."""
        return dataclasses.asdict(self)

    def check_encoder(self) -> None:
        """Raise :class:`UserError` unless this config describes an encoder we can build."""
        stages = len(self.enc_depths)
        per_stage = {
            "enc_channels": self.enc_channels,
            "enc_num_head": self.enc_num_head,
            "enc_patch_size": self.enc_patch_size,
        }
        for name, value in per_stage.items():
            if len(value) != stages:
                raise UserError(f"{name} has {len(value)} entries for {stages} encoder stages")
        if len(self.stride) != stages - 1:
            raise UserError(f"stride has {len(self.stride)} entries for {stages} encoder stages")
        if not self.enc_mode:
            raise UserError("only encoder-only PTv3 configs (enc_mode=True) are supported")
        if self.enable_rpe:
            raise UserError("enable_rpe=True is not supported (no released Concerto model uses it)")
        unknown = [name for name in self.order if name not in ORDERS]
        if not self.order or unknown:
            raise UserError(f"order must name curves from {ORDERS}, got {self.order}")
        for channels, heads in zip(self.enc_channels, self.enc_num_head, strict=True):
            if heads < 1 or channels % heads:
                raise UserError(f"{channels} channels do not split into {heads} attention heads")
        if min(self.enc_depths) < 1 or min(self.enc_patch_size) < 1 or min(self.stride) < 1:
            raise UserError("enc_depths, enc_patch_size and stride must be positive")


def _coerce(name: str, value: object, default: object) -> object:
    """``value`` in the type of the field's ``default`` (tuples of ints / strings, scalars)."""
    if isinstance(default, tuple):
        if name == "order" and isinstance(value, str):
            return (value,)
        item = str if name == "order" else int
        if isinstance(value, list | tuple) and all(_is(v, item) for v in value):
            return tuple(value)
        raise UserError(f"config {name} must be a list of {item.__name__}, got {value!r}")
    if default is None:  # qk_scale, layer_scale
        if value is None or _is(value, float):
            return value
        raise UserError(f"config {name} must be a number or None, got {value!r}")
    if not _is(value, type(default)):
        raise UserError(f"config {name} must be {type(default).__name__}, got {value!r}")
    return value


def _is(value: object, kind: type) -> bool:
    """Type test where bool is not an int and ints count as floats."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _released(**arch: object) -> PTv3Config:
    """A Concerto release config: the pretraining backbone settings plus ``arch``."""
    return PTv3Config(
        in_channels=9,
        order=ORDERS,
        stride=(2, 2, 2, 2),
        enc_patch_size=(1024,) * 5,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=0.3,
        shuffle_orders=True,
        pre_norm=True,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=False,
        upcast_softmax=False,
        enc_mode=True,
        traceable=True,
        mask_token=True,
        **arch,
    )


#: Encoder variants. ``small`` / ``base`` / ``large`` are the released Concerto backbones
#: (``concerto_small`` / ``_base`` / ``_large``; base and large as in Pointcept's
#: ``configs/concerto/pretrain-concerto-v1m1-*``). ``tiny`` is NOT a released model: a
#: small random-weight encoder of the same structure for tests and demos.
VARIANTS: dict[str, PTv3Config] = {
    "tiny": dataclasses.replace(
        _released(
            enc_depths=(1, 1, 1, 1, 1),
            enc_channels=(16, 16, 32, 32, 64),
            enc_num_head=(1, 1, 2, 2, 4),
        ),
        enc_patch_size=(64,) * 5,
    ),
    "small": _released(
        enc_depths=(2, 2, 2, 6, 2),
        enc_channels=(32, 64, 128, 256, 512),
        enc_num_head=(2, 4, 8, 16, 32),
    ),
    "base": _released(
        enc_depths=(3, 3, 3, 12, 3),
        enc_channels=(48, 96, 192, 384, 512),
        enc_num_head=(3, 6, 12, 24, 32),
    ),
    "large": _released(
        enc_depths=(3, 3, 3, 12, 3),
        enc_channels=(64, 128, 256, 512, 768),
        enc_num_head=(4, 8, 16, 32, 48),
    ),
}


@dataclass
class Level:
    """Voxels of one encoder stage after its blocks.

    Attributes:
        feat: ``(N_s, C_s)`` features.
        coord: ``(N_s, 3)`` coordinates (stage 0: the input; later: mean over merged voxels).
        grid_coord: ``(N_s, 3)`` int64 voxel coordinates at this stage's pitch.
        batch: ``(N_s,)`` int64 point-cloud index.
        parent_inverse: ``(N_{s−1},)`` int64, the voxel of this stage each voxel of stage
            ``s − 1`` merged into; ``None`` at stage 0.
    """

    feat: Tensor
    coord: Tensor
    grid_coord: Tensor
    batch: Tensor
    parent_inverse: Tensor | None


@dataclass(frozen=True)
class PatchLayout:
    """Where each attention patch takes its voxels from, in serial positions.

    Attributes:
        groups: ``(K, slots)`` per patch size; ``slots`` is ``(P·K,)`` int64 serial positions,
            ``P`` patches of ``K`` consecutive slots.
        unpad: ``(N,)`` int64, for serial position ``j`` the row of its real slot in the
            concatenation of all groups' slots.
    """

    groups: tuple[tuple[int, Tensor], ...]
    unpad: Tensor


def padded_positions(count: int, patch_size: int) -> Tensor:
    """Serial positions filling the patches of one cloud of ``count ≥ K`` voxels (``K =
    patch_size``, already shrunk by :func:`patch_layout`).

    ``ceil(count / K)·K`` slots, slot ``j`` holding position ``j`` for ``j < count`` and ``j − K``
    for the ``K − count mod K`` slots after the last voxel (the official padding: the tail of the
    previous patch).
    """
    slots = -(-count // patch_size) * patch_size
    positions = torch.arange(slots)
    positions[count:] -= patch_size
    return positions


def patch_layout(
    counts: Sequence[int], patch_size: int, per_cloud: bool, device: torch.device | str = "cpu"
) -> PatchLayout:
    """Patch layout of a batch whose clouds hold ``counts`` voxels (contiguous in serial order).

    ``per_cloud`` (the official flash path): cloud ``b`` uses ``K_b = min(patch_size, n_b)``;
    otherwise (the official non-flash path) all clouds use ``K = min(patch_size, min_b n_b)``.
    """
    shared = min(patch_size, *counts)
    sizes = [min(patch_size, n) if per_cloud else shared for n in counts]
    by_size: dict[int, list[Tensor]] = {}
    placed: list[tuple[int, int]] = []  # per cloud: (patch size, first slot within its group)
    start = 0
    for count, size in zip(counts, sizes, strict=True):
        pieces = by_size.setdefault(size, [])
        placed.append((size, sum(len(piece) for piece in pieces)))
        pieces.append(start + padded_positions(count, size))
        start += count
    group_start, total = {}, 0
    for size, pieces in by_size.items():
        group_start[size] = total
        total += sum(len(piece) for piece in pieces)
    unpad = torch.cat(
        [
            group_start[size] + first + torch.arange(count)
            for (size, first), count in zip(placed, counts, strict=True)
        ]
    )
    groups = tuple((size, torch.cat(pieces).to(device)) for size, pieces in by_size.items())
    return PatchLayout(groups=groups, unpad=unpad.to(device))


class SerializedAttention(nn.Module):
    """Multi-head softmax attention inside serialisation patches (``attn.qkv`` / ``attn.proj``).

    ``qkv`` channels are laid out ``(3, heads, head_dim)``; the scale is ``qk_scale`` or
    ``head_dim ** −0.5``.
    """

    def __init__(
        self, channels: int, num_heads: int, qkv_bias: bool, qk_scale: float | None, upcast: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (channels // num_heads) ** -0.5
        self.upcast = upcast
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, order: Tensor, inverse: Tensor, layout: PatchLayout) -> Tensor:
        """``x`` ``(N, C)``; ``order`` / ``inverse`` ``(N,)`` one serialisation row → ``(N, C)``."""
        channels = x.shape[1]
        qkv = self.qkv(x)
        outputs = []
        for size, slots in layout.groups:
            packed = qkv[order[slots]].view(-1, size, 3, self.num_heads, channels // self.num_heads)
            q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (P, H, K, D)
            if self.upcast:
                q, k, v = q.float(), k.float(), v.float()
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            outputs.append(out.transpose(1, 2).reshape(-1, channels).to(x.dtype))
        return self.proj(torch.cat(outputs)[layout.unpad[inverse]])


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))`` (keys ``fc1`` / ``fc2``)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``x · γ`` (key ``gamma``), γ initialised to ``init``."""

    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """One PTv3 block: conditional positional encoding, serialized attention, MLP."""

    def __init__(self, config: PTv3Config, stage: int) -> None:
        super().__init__()
        channels = config.enc_channels[stage]
        self.pre_norm = config.pre_norm
        self.cpe = nn.ModuleList(
            [
                SubMConv3d(channels, channels, kernel_size=3, bias=True),
                nn.Linear(channels, channels),
                nn.LayerNorm(channels),
            ]
        )
        scale = [] if config.layer_scale is None else [LayerScale(channels, config.layer_scale)]
        self.norm1 = nn.Sequential(nn.LayerNorm(channels))
        self.ls1 = nn.Sequential(*scale)
        self.attn = SerializedAttention(
            channels,
            config.enc_num_head[stage],
            qkv_bias=config.qkv_bias,
            qk_scale=config.qk_scale,
            upcast=config.upcast_attention or config.upcast_softmax,
        )
        self.norm2 = nn.Sequential(nn.LayerNorm(channels))
        self.ls2 = nn.Sequential(*[LayerScale(channels, config.layer_scale) for _ in scale])
        self.mlp = nn.Sequential(MLP(channels, int(channels * config.mlp_ratio)))

    def forward(
        self, x: Tensor, neighbours: Tensor, order: Tensor, inverse: Tensor, layout: PatchLayout
    ) -> Tensor:
        """``x`` ``(N, C)``, ``neighbours`` ``(N, 27)`` → ``(N, C)``."""
        conv, linear, norm = self.cpe
        x = x + norm(linear(conv(x, neighbours)))
        if self.pre_norm:
            x = x + self.ls1(self.attn(self.norm1(x), order, inverse, layout))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.ls1(self.attn(x, order, inverse, layout)))
        return self.norm2(x + self.ls2(self.mlp(x)))


class GridPooling(nn.Module):
    """Merge voxels into cells ``grid_coord // stride`` (keys ``proj``, ``norm.0``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = nn.Sequential(nn.LayerNorm(out_channels))
        self.act = nn.Sequential(nn.GELU())

    def forward(self, level: Level) -> Level:
        """Pooled level (features before the stage's blocks), ``parent_inverse`` set."""
        cell = torch.div(level.grid_coord, self.stride, rounding_mode="floor")
        keys = torch.cat([level.batch[:, None], cell], dim=1)
        unique, inverse, counts = torch.unique(
            keys, sorted=True, return_inverse=True, return_counts=True, dim=0
        )
        members = torch.argsort(inverse, stable=True)
        feat = torch.segment_reduce(self.proj(level.feat)[members], "max", lengths=counts)
        coord = torch.segment_reduce(level.coord[members], "mean", lengths=counts)
        return Level(
            feat=self.act(self.norm(feat)),
            coord=coord,
            grid_coord=unique[:, 1:].contiguous(),
            batch=unique[:, 0].contiguous(),
            parent_inverse=inverse,
        )


class Embedding(nn.Module):
    """``GELU(LayerNorm(Linear(feat)))`` (keys ``stem.linear``, ``stem.norm``, ``mask_token``).

    The mask token (a zero-initialised ``(1, C)`` parameter) is only used by masked pretraining;
    it is built when configured so that checkpoints load strictly.
    """

    def __init__(self, in_channels: int, channels: int, mask_token: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                linear=nn.Linear(in_channels, channels),
                norm=nn.LayerNorm(channels),
                act=nn.GELU(),
            )
        )
        self.mask_token = nn.Parameter(torch.zeros(1, channels)) if mask_token else None

    def forward(self, feat: Tensor) -> Tensor:
        return self.stem(feat)


class Stage(nn.Module):
    """Encoder stage ``s``: grid pooling (``down``, for ``s > 0``) then ``block{i}``."""

    def __init__(self, config: PTv3Config, stage: int) -> None:
        super().__init__()
        self.orders = config.order
        self.patch_size = config.enc_patch_size[stage]
        self.per_cloud_patches = config.enable_flash
        # the official stage-0 serialisation follows shuffle_orders; GridPooling always shuffles
        self.shuffle = config.shuffle_orders or stage > 0
        self.depth = config.enc_depths[stage]
        if stage > 0:
            self.down = GridPooling(
                config.enc_channels[stage - 1], config.enc_channels[stage], config.stride[stage - 1]
            )
        for i in range(self.depth):
            self.add_module(f"block{i}", Block(config, stage))

    def forward(self, level: Level, generator: torch.Generator | None) -> Level:
        """Pool (``s > 0``), serialise and run the blocks; returns this stage's level."""
        if hasattr(self, "down"):
            level = self.down(level)
        serial = serialize(
            level.grid_coord, level.batch, self.orders, shuffle=self.shuffle, generator=generator
        )
        neighbours = neighbour_index(level.grid_coord, level.batch)
        counts = torch.bincount(level.batch).tolist()
        layout = patch_layout(counts, self.patch_size, self.per_cloud_patches, level.feat.device)
        feat = level.feat
        for i in range(self.depth):
            row = i % len(self.orders)
            block = self.get_submodule(f"block{i}")
            feat = block(feat, neighbours, serial.order[row], serial.inverse[row], layout)
        return dataclasses.replace(level, feat=feat)


class PTv3Encoder(nn.Module):
    """PTv3 v3m2 encoder; state-dict keys equal the official ``PointTransformerV3``'s.

    Keys: ``embedding.stem.{linear,norm}.*``, ``embedding.mask_token``,
    ``enc.enc{s}.down.{proj,norm.0}.*`` (``s > 0``) and per block
    ``enc.enc{s}.block{i}.{cpe.0,cpe.1,cpe.2,norm1.0,attn.qkv,attn.proj,norm2.0,mlp.0.fc1,
    mlp.0.fc2}.*`` (plus ``ls1.0.gamma`` / ``ls2.0.gamma`` with layer scale).
    """

    def __init__(self, config: PTv3Config) -> None:
        super().__init__()
        config.check_encoder()
        self.config = config
        self.embedding = Embedding(config.in_channels, config.enc_channels[0], config.mask_token)
        self.enc = nn.ModuleDict(
            {f"enc{s}": Stage(config, s) for s in range(len(config.enc_depths))}
        )
        self.apply(_init_weights)

    def forward(
        self,
        coord: Tensor,
        grid_coord: Tensor,
        feat: Tensor,
        batch: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Level]:
        """Encode voxels; one :class:`Level` per stage, stage 0 first.

        Args:
            coord: ``(N, 3)`` float coordinates (only averaged by pooling).
            grid_coord: ``(N, 3)`` integer voxel coordinates in ``[0, 65534]``, unique per cloud
                (:func:`vggt4d.ptv3.sparse_conv.neighbour_index` rejects repeats).
            feat: ``(N, in_channels)`` float input features.
            batch: ``(N,)`` integer cloud index, every index ``0 … B−1`` present; ``None``: one
                cloud.
            generator: CPU generator for the curve-order shuffles; ``None``: torch's global one.
        """
        grid_coord, batch = _check_inputs(coord, grid_coord, feat, batch, self.config.in_channels)
        level = Level(self.embedding(feat), coord, grid_coord, batch, parent_inverse=None)
        levels = []
        for stage in self.enc.values():
            level = stage(level, generator)
            levels.append(level)
        return levels


def _check_inputs(
    coord: Tensor, grid_coord: Tensor, feat: Tensor, batch: Tensor | None, in_channels: int
) -> tuple[Tensor, Tensor]:
    """Validate encoder inputs (:class:`UserError`); returns int64 ``grid_coord`` and ``batch``."""
    n = coord.shape[0] if coord.ndim == 2 else -1
    if n < 1 or coord.shape[1] != 3 or not coord.is_floating_point():
        raise UserError(f"coord must be a non-empty float (N, 3) tensor, got {tuple(coord.shape)}")
    if grid_coord.shape != (n, 3) or grid_coord.is_floating_point():
        raise UserError(f"grid_coord must be an integer ({n}, 3) tensor")
    if feat.shape != (n, in_channels) or not feat.is_floating_point():
        raise UserError(f"feat must be a float ({n}, {in_channels}) tensor")
    if int(grid_coord.min()) < 0 or int(grid_coord.max()) > MAX_GRID_COORD:
        raise UserError(f"grid_coord must lie in [0, {MAX_GRID_COORD}] (grid-sample first)")
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=coord.device)
    if batch.shape != (n,) or batch.is_floating_point():
        raise UserError(f"batch must be an integer ({n},) tensor")
    if int(batch.min()) < 0 or bool((torch.bincount(batch) == 0).any()):
        raise UserError("batch must use every cloud index 0 … B−1")
    return grid_coord.long(), batch.long()


def _init_weights(module: nn.Module) -> None:
    """Official initialisation of linear layers: truncated normal (σ 0.02) weights, zero biases
    (:class:`SubMConv3d` initialises itself the same way; LayerNorm keeps its defaults)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def features_at_input(levels: Sequence[Level], use_levels: Sequence[int] | None = None) -> Tensor:
    """Features of the chosen levels gathered back to the stage-0 voxels, concatenated.

    Level ``s`` reaches stage 0 through the composed pooling inverses,
    ``idx_s = parent_inverse_s[… parent_inverse_1[i]]``; channels are ordered shallow level
    first, as the official demos' pooling-chain walk produces them. ``use_levels`` must be
    strictly increasing stage indices; ``None`` takes all (1728 channels for large), ``(2, 3,
    4)`` the official demos' choice (1536 for large).

    Returns:
        ``(N_0, Σ_s C_s)``.
    """
    chosen = list(range(len(levels))) if use_levels is None else list(use_levels)
    increasing = all(a < b for a, b in itertools.pairwise(chosen))
    if not chosen or not increasing or not all(0 <= s < len(levels) for s in chosen):
        raise UserError(
            f"use_levels must be strictly increasing levels in 0 … {len(levels) - 1}, "
            f"got {use_levels}"
        )
    index = torch.arange(levels[0].feat.shape[0], device=levels[0].feat.device)
    parts = []
    for s in range(chosen[-1] + 1):
        if s > 0:
            index = levels[s].parent_inverse[index]
        if s in chosen:
            parts.append(levels[s].feat[index])
    return torch.cat(parts, dim=1)
