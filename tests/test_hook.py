"""The Q/K capture: exactness, independence from DA3's view reordering, clean restore."""

from __future__ import annotations

import math

import pytest
import torch
from depth_anything_3.model.dinov2 import vision_transformer as da3_vit

from vggt4d.hook import capture_attention

ALT_START = 4  # da3-small


def _forward(net, images, strategy="saddle_balanced"):
    with torch.inference_mode():
        return net(images, export_feat_layers=[], ref_view_strategy=strategy)


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """2-D rotary embedding in float64, written from its definition: the first half of each head
    is rotated by the row position, the second half by the column position; inside a half of
    width D, feature i (< D/2) pairs with i + D/2 and turns by angle pos · base^(−2i/D)."""
    def rotate(half: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        width = half.shape[-1]
        freqs = base ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
        angle = pos[:, None].double() * freqs[None]  # (N, width/2)
        first, second = half[..., : width // 2], half[..., width // 2:]
        cos, sin = angle.cos(), angle.sin()
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    width = x.shape[-1] // 2
    return torch.cat([rotate(x[..., :width], positions[:, 0]),
                      rotate(x[..., width:], positions[:, 1])], dim=-1)


def _qk_reference(block, tokens: torch.Tensor, layer: int, grid: tuple[int, int]):
    """Q, K (T, heads, N, 64) in float64 from a block's weights and its input tokens (T, N, C)."""
    attn = block.attn
    x = torch.nn.functional.layer_norm(tokens.double(), (tokens.shape[-1],),
                                       block.norm1.weight.double(), block.norm1.bias.double(),
                                       block.norm1.eps)
    qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    frames, count, channels = x.shape
    heads = attn.num_heads
    q, k, _ = qkv.view(frames, count, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    if layer >= ALT_START:  # qk-norm and RoPE start together in da3-small
        def norm(v, ln):
            return torch.nn.functional.layer_norm(v, (v.shape[-1],), ln.weight.double(),
                                                  ln.bias.double(), ln.eps)
        q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        patch_pos = torch.stack([rows.flatten(), cols.flatten()], -1) + 1
        if layer % 2 == 1:  # global blocks put every patch at (1, 1)
            patch_pos = torch.ones_like(patch_pos)
        positions = torch.cat([torch.zeros(1, 2, dtype=torch.long), patch_pos])
        q, k = _rope_reference(q, positions), _rope_reference(k, positions)
    return q, k


def _reference_permutation(num_frames: int, ref: int) -> list[int]:
    """DA3 puts the reference view first and keeps the others in order."""
    return [ref] + [t for t in range(num_frames) if t != ref]


def _images_with_reordering(net):
    """Random clips until DA3's default strategy picks a reference other than frame 0."""
    chosen = []
    original = da3_vit.select_reference_view

    def spy(x, *args, **kwargs):
        chosen.append(int(original(x, *args, **kwargs)[0]))
        return original(x, *args, **kwargs)

    da3_vit.select_reference_view = spy
    try:
        for seed in range(50):
            images = torch.randn(1, 4, 3, 98, 70, generator=torch.Generator().manual_seed(seed))
            _forward(net, images)
            if chosen[-1] != 0:
                return images, chosen[-1]
    finally:
        da3_vit.select_reference_view = original
    raise AssertionError("no clip made DA3 reorder its views")


def test_hooked_forward_equals_plain_forward(small_net, clip_images):
    plain = _forward(small_net, clip_images)
    calls = []
    with torch.inference_mode(), capture_attention(small_net, lambda c: calls.append(c.q.sum())):
        hooked = small_net(clip_images, export_feat_layers=[])
    assert len(calls) == 12
    for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
        torch.testing.assert_close(hooked[key], plain[key], rtol=0, atol=1e-5)


def test_captured_qk_equal_independent_recomputation_in_input_order(small_net):
    """Covers exactness (post-norm, post-RoPE Q/K) and input frame order after DA3 reorders."""
    images, ref = _images_with_reordering(small_net)
    order = _reference_permutation(4, ref)  # order[position] = input frame
    raw_inputs, captured = {}, {}
    blocks = small_net.backbone.pretrained.blocks

    def keep_input(layer):
        def hook(_module, args):
            raw_inputs[layer] = args[0].detach().clone()
        return hook

    handles = [b.register_forward_pre_hook(keep_input(i)) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode(), capture_attention(
            small_net, lambda c: captured.__setitem__(c.layer, (c.q.clone(), c.k.clone()))
        ):
            small_net(images, export_feat_layers=[])
    finally:
        for handle in handles:
            handle.remove()

    grid = (7, 5)
    for layer, block in enumerate(blocks):
        tokens = raw_inputs[layer].reshape(4, 1 + 35, -1)  # DA3's internal frame order
        ref_q, ref_k = _qk_reference(block, tokens, layer, grid)
        # blocks from alt_start - 1 on run after DA3 moved the reference view to position 0
        positions = (range(4) if layer < ALT_START - 1
                     else [order.index(t) for t in range(4)])
        got_q, got_k = captured[layer]
        for frame, position in enumerate(positions):
            torch.testing.assert_close(got_q[frame].double(), ref_q[position], rtol=1e-4,
                                       atol=1e-4)
            torch.testing.assert_close(got_k[frame].double(), ref_k[position], rtol=1e-4,
                                       atol=1e-4)


def test_local_and_global_blocks_share_one_layout(small_net, clip_images):
    seen = []
    with torch.inference_mode(), capture_attention(small_net, seen.append):
        small_net(clip_images, export_feat_layers=[])
    for capture in seen:
        expected_global = capture.layer >= ALT_START and capture.layer % 2 == 1
        assert capture.is_global == expected_global
        assert capture.layout.grid == (7, 5)
        assert capture.layout.patch_start_idx == 1
        assert capture.layout.tokens_per_frame == 1 + 7 * 5
        assert tuple(capture.q.shape) == (4, 6, 36, 64)
        assert tuple(capture.k.shape) == (4, 6, 36, 64)
    assert [c.layer for c in seen] == list(range(12))


def test_block_tokens_come_in_input_order(small_net):
    images, ref = _images_with_reordering(small_net)
    order = _reference_permutation(4, ref)
    raw, tokens = {}, {}
    block = small_net.backbone.pretrained.blocks[7]  # a global block after the reordering
    handle = block.register_forward_hook(lambda _m, a, out: raw.setdefault("out", out.clone()))
    try:
        with torch.inference_mode(), capture_attention(
            small_net, on_tokens=lambda b: tokens.setdefault(b.layer, b), token_layers=[7]
        ):
            small_net(images, export_feat_layers=[])
    finally:
        handle.remove()
    internal = raw["out"].reshape(4, 36, -1)
    for frame in range(4):
        torch.testing.assert_close(tokens[7].tokens_out[frame], internal[order.index(frame)])
    assert list(tokens) == [7]


def test_originals_restored_on_exit_and_on_error(small_net, clip_images):
    vit = small_net.backbone.pretrained
    original_select = da3_vit.select_reference_view

    def failing(_capture):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"), torch.inference_mode(), \
            capture_attention(small_net, failing, on_tokens=lambda b: None):
        small_net(clip_images, export_feat_layers=[])
    assert da3_vit.select_reference_view is original_select
    for block in vit.blocks:
        assert "forward" not in block.attn.__dict__
        assert not block._forward_hooks
    assert not small_net.backbone._forward_pre_hooks
    # and the network still computes what it computed before
    first = _forward(small_net, clip_images)
    with capture_attention(small_net, lambda c: None):
        pass
    torch.testing.assert_close(_forward(small_net, clip_images)["depth"], first["depth"])


def test_selected_layers_only(small_net, clip_images):
    seen = []
    with torch.inference_mode(), capture_attention(small_net, seen.append, layers=[0, 5]):
        small_net(clip_images, export_feat_layers=[])
    assert [c.layer for c in seen] == [0, 5]
    assert not math.isnan(float(seen[1].q.sum()))


def test_nested_model_hooks_only_the_any_view_network():
    from vggt4d.hook import hooked_backbone
    from vggt4d.model import build_network

    nested = build_network("da3nested-giant-large", empty=True)
    assert hooked_backbone(nested, "da3") is nested.da3.backbone
    assert len(hooked_backbone(nested, "da3").pretrained.blocks) == 40
    assert hooked_backbone(nested, "da3") is not nested.da3_metric.backbone
