"""Capture Q and K of every DA3 backbone block exactly as the attention multiplies them.

DA3's ``Attention.forward`` computes ``qkv → q_norm/k_norm → RoPE → SDPA`` in one function, so
the post-RoPE Q/K never leave it and a forward hook cannot see them (docs/method.md). While
:func:`capture_attention` is active, the attention forward of each selected block is replaced by
:func:`_attention_with_capture`, which performs the same operations with the block's own modules
and hands Q and K to a consumer before ``F.scaled_dot_product_attention``. Everything is restored
on exit, also when the forward raises.

Layout given to consumers, for local (per-frame) and global (whole-clip) blocks alike:
``q, k`` of shape ``(T, heads, N, head_dim)`` with ``N = patch_start_idx + h·w`` tokens per frame
(special token first, then the patch grid row-major), frames in *input* order. A consumer that
asks for ``q_pre_rope`` / ``k_pre_rope`` (after qk-norm, before RoPE: what the AnyDynamics "hooks"
research script took, a forward hook recomputing ``q_norm(qkv(x))``) gets them in the same layout,
recomputed from the attention's input with the block's own ``qkv`` and ``q_norm``/``k_norm`` —
bit-identical to the forward's intermediate, and computed only for a consumer that reads them.
DA3 moves a reference view to position 0 before block ``alt_start − 1`` when it has ≥ 3 frames and
no poses; the permutation it applies is recorded here (by wrapping its ``select_reference_view``)
and undone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from depth_anything_3.model.dinov2 import vision_transformer as da3_vit
from depth_anything_3.model.reference_view_selector import reorder_by_reference
from torch import Tensor, nn

PATCH_SIZE = 14


@dataclass(frozen=True)
class FrameLayout:
    """Token layout of one clip inside the backbone."""

    num_frames: int
    tokens_per_frame: int
    patch_start_idx: int
    grid: tuple[int, int]
    """(h, w): patch rows and columns; ``tokens_per_frame = patch_start_idx + h·w``."""


@dataclass(frozen=True)
class KeyMask:
    """Tokens whose keys and values are removed in chosen blocks (the second masked pass).

    ``drop`` is ``(T, N)`` bool in input frame order, True = this token's key/value is hidden from
    every query (all tokens still query); special tokens must stay False, so every query keeps at
    least one key. Local blocks hide them within their frame, global blocks across the clip.
    """

    drop: Tensor
    layers: frozenset[int]


@dataclass
class _ClipState:
    """Per-forward state shared by the block wrappers: layout and DA3's view permutation."""

    layout: FrameLayout | None = None
    order: Tensor | None = None
    """``order[p]``: input frame at DA3's internal position ``p`` (None: identity)."""
    inverse_order: Tensor | None = None
    """``inverse_order[t]``: position of input frame ``t`` in DA3's order (None: identity)."""
    drop: Tensor | None = None
    """The key mask's ``(T, N)`` tokens to hide, on the clip's device (None: nothing hidden)."""
    _keep: dict[bool, Tensor] = field(default_factory=dict)

    def set_order(self, order: Tensor | None) -> None:
        self.order = order
        self.inverse_order = None if order is None else torch.argsort(order)
        self._keep.clear()

    def keep_keys(self, is_global: bool) -> Tensor | None:
        """SDPA boolean mask (True = may attend) hiding the dropped keys, broadcast over the
        queries: ``(T, 1, 1, N)`` in a per-frame block, ``(1, 1, 1, T·N)`` in a global one, in
        DA3's current frame order; None when nothing is hidden (exactly the plain forward)."""
        if self.drop is None:
            return None
        if is_global not in self._keep:
            keep = ~self.to_internal_order(self.drop)
            self._keep[is_global] = (keep.reshape(1, 1, 1, -1) if is_global
                                     else keep[:, None, None, :])
        return self._keep[is_global]

    def to_input_order(self, frames_first: Tensor) -> Tensor:
        """Reorder a ``(T, ...)`` tensor from DA3's internal frame order to input order."""
        if self.inverse_order is None:
            return frames_first
        return frames_first.index_select(0, self.inverse_order.to(frames_first.device))

    def to_internal_order(self, frames_first: Tensor) -> Tensor:
        """Reorder a ``(T, ...)`` tensor from input order to DA3's internal frame order."""
        if self.order is None:
            return frames_first
        return frames_first.index_select(0, self.order.to(frames_first.device))


@dataclass
class BlockQK:
    """Q and K of one block for one clip; ``q``/``k`` are ``(T, heads, N, head_dim)``, input order.

    The reordering to that layout is done lazily, so a consumer that ignores a block costs nothing.
    """

    layer: int
    is_global: bool
    layout: FrameLayout
    raw_q: Tensor = field(repr=False)
    raw_k: Tensor = field(repr=False)
    state: _ClipState = field(repr=False)
    attn_input: Tensor | None = field(default=None, repr=False)
    """The attention's input ``x`` (the block's normalised tokens), for :attr:`q_pre_rope`."""
    attn: nn.Module | None = field(default=None, repr=False)
    """The block's ``Attention`` module, for :attr:`q_pre_rope`."""

    def _frames_first(self, x: Tensor) -> Tensor:
        """(B·T, heads, N, d) local or (1, heads, T·N, d) global → (T, heads, N, d), input order."""
        if self.is_global:
            heads, _, dim = x.shape[1:]
            x = x.view(heads, self.layout.num_frames, self.layout.tokens_per_frame, dim)
            x = x.transpose(0, 1)
        return self.state.to_input_order(x)

    @cached_property
    def q(self) -> Tensor:
        return self._frames_first(self.raw_q)

    @cached_property
    def k(self) -> Tensor:
        return self._frames_first(self.raw_k)

    @cached_property
    def _pre_rope(self) -> tuple[Tensor, Tensor]:
        """``q_norm(q), k_norm(k)`` of ``qkv(x)`` in the raw layout, as the forward computes them
        before RoPE: the same modules and input, and (read during the consumer call) the same
        autocast state, so the same values."""
        if self.attn_input is None or self.attn is None:
            raise ValueError(f"layer {self.layer}: this capture carries no attention input, so "
                             f"its pre-RoPE Q/K cannot be recomputed")
        batch, tokens, channels = self.attn_input.shape
        heads = self.attn.num_heads
        qkv = self.attn.qkv(self.attn_input).reshape(batch, tokens, 3, heads, channels // heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.attn.q_norm(q), self.attn.k_norm(k)

    @cached_property
    def q_pre_rope(self) -> Tensor:
        """Q after qk-norm, before RoPE: ``(T, heads, N, head_dim)``, input order (equal to
        :attr:`q` in blocks without RoPE); recomputed on first access only."""
        return self._frames_first(self._pre_rope[0])

    @cached_property
    def k_pre_rope(self) -> Tensor:
        """K after qk-norm, before RoPE, as :attr:`q_pre_rope`."""
        return self._frames_first(self._pre_rope[1])


@dataclass
class BlockTokens:
    """Input and output tokens of one block, ``(T, N, C)`` each, frames in input order."""

    layer: int
    is_global: bool
    layout: FrameLayout
    tokens_in: Tensor
    tokens_out: Tensor
    norm: nn.Module | None = field(default=None, repr=False)
    """The backbone's final LayerNorm, which DA3 applies to the intermediate layers it reads."""


QKConsumer = Callable[[BlockQK], None]
TokenConsumer = Callable[[BlockTokens], None]


def hooked_net(net: nn.Module, hooked_network: str = "") -> nn.Module:
    """``net[.hooked_network]``: the ``DepthAnything3Net`` whose attention is hooked."""
    model = net
    for name in filter(None, hooked_network.split(".")):
        model = getattr(model, name)
    return model


def hooked_backbone(net: nn.Module, hooked_network: str = "") -> nn.Module:
    """The ``DinoV2`` backbone of ``net[.hooked_network]``; its ViT is ``.pretrained``.

    Its forward receives the ``(B, T, 3, H, W)`` images, so a pre-hook there starts each clip.
    """
    return hooked_net(net, hooked_network).backbone


def is_global_block(layer: int, alt_start: int) -> bool:
    """DA3's rule: block ``i`` attends across frames iff ``alt_start != -1``, ``i >= alt_start``
    and ``i`` is odd."""
    return alt_start != -1 and layer >= alt_start and layer % 2 == 1


def _attention_with_capture(
    attn: nn.Module, layer: int, is_global: bool, state: _ClipState,
    consumer: QKConsumer | None, key_mask: KeyMask | None,
) -> Callable[..., Tensor]:
    """A drop-in ``Attention.forward`` that reports post-norm, post-RoPE Q/K to ``consumer`` and
    hides the keys/values of ``key_mask`` tokens."""

    def forward(x: Tensor, pos: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        batch, tokens, channels = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None and pos is not None:
            q, k = attn.rope(q, pos), attn.rope(k, pos)
        if consumer is not None:
            consumer(BlockQK(layer, is_global, state.layout, q, k, state, x, attn))
        mask = attn_mask[:, None].repeat(1, heads, 1, 1) if attn_mask is not None else None
        keep = state.keep_keys(is_global) if key_mask else None
        if keep is not None and mask is None:
            mask = keep
        elif keep is not None and mask.dtype == torch.bool:
            mask = mask & keep
        elif keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))

    return forward


@contextmanager
def capture_attention(
    net: nn.Module,
    on_qk: QKConsumer | None = None,
    *,
    hooked_network: str = "",
    layers: Sequence[int] | None = None,
    on_tokens: TokenConsumer | None = None,
    token_layers: Sequence[int] | None = None,
    key_mask: KeyMask | None = None,
) -> Iterator[None]:
    """Within the block, every forward of ``net`` reports Q/K (and optionally block tokens).

    Args:
        net: a DA3 network (``DepthAnything3Net`` or the nested one).
        on_qk: called once per selected block and forward with a :class:`BlockQK`.
        hooked_network: attribute path to the sub-network to hook (``"da3"`` for nested models).
        layers: blocks whose Q/K are reported (default: all).
        on_tokens: called with each selected block's input and output tokens.
        token_layers: blocks whose tokens are reported (default: all when ``on_tokens`` is set).
        key_mask: tokens whose keys/values are hidden in ``key_mask.layers`` (second pass).
    """
    backbone = hooked_backbone(net, hooked_network)
    vit = backbone.pretrained
    blocks = vit.blocks
    state = _ClipState()
    handles = []
    patched_attn = []
    original_select = da3_vit.select_reference_view

    def start_clip(_module: nn.Module, args: tuple) -> None:
        images = args[0]
        if images.ndim != 5 or images.shape[0] != 1:
            raise ValueError(f"capture expects one clip (1, T, 3, H, W), got {tuple(images.shape)}")
        frames, height, width = images.shape[1], images.shape[-2], images.shape[-1]
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        state.layout = FrameLayout(frames, vit.patch_start_idx + grid[0] * grid[1],
                                   vit.patch_start_idx, grid)
        state.set_order(None)
        state.drop = None
        if key_mask is not None:
            expected = (frames, state.layout.tokens_per_frame)
            if tuple(key_mask.drop.shape) != expected:
                raise ValueError(f"key mask of shape {tuple(key_mask.drop.shape)} does not fit "
                                 f"{frames} frames of {expected[1]} tokens")
            if bool(key_mask.drop.any()):
                state.drop = key_mask.drop.to(images.device)

    def recording_select(x: Tensor, *args, **kwargs) -> Tensor:
        ref_index = original_select(x, *args, **kwargs)
        positions = torch.arange(x.shape[1], device=ref_index.device).view(1, -1, 1, 1)
        state.set_order(reorder_by_reference(positions, ref_index)[0, :, 0, 0])
        return ref_index

    def report_tokens(layer: int, is_global: bool) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: Tensor) -> None:
            shape = (state.layout.num_frames, state.layout.tokens_per_frame, -1)
            on_tokens(BlockTokens(layer, is_global, state.layout,
                                  state.to_input_order(args[0].reshape(shape)),
                                  state.to_input_order(output.reshape(shape)), vit.norm))
        return hook

    qk_layers = set(range(len(blocks)) if layers is None else layers)
    tok_layers = set(range(len(blocks)) if token_layers is None else token_layers)
    try:
        handles.append(backbone.register_forward_pre_hook(start_clip))
        da3_vit.select_reference_view = recording_select
        masked_layers = key_mask.layers if key_mask is not None else frozenset()
        for layer, block in enumerate(blocks):
            is_global = is_global_block(layer, vit.alt_start)
            consumer = on_qk if on_qk is not None and layer in qk_layers else None
            masked = key_mask if layer in masked_layers else None
            if consumer is not None or masked is not None:
                block.attn.forward = _attention_with_capture(block.attn, layer, is_global,
                                                             state, consumer, masked)
                patched_attn.append(block.attn)
            if on_tokens is not None and layer in tok_layers:
                handles.append(block.register_forward_hook(report_tokens(layer, is_global)))
        yield
    finally:
        da3_vit.select_reference_view = original_select
        for attn in patched_attn:
            del attn.forward
        for handle in handles:
            handle.remove()
