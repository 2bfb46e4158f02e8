"""The second masked pass: hidden keys/values really are hidden, nothing hidden = first pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggt4d.errors import UserError
from vggt4d.hook import KeyMask, capture_attention
from vggt4d.second_pass import patch_drop

FRAMES, TOKENS = 4, 1 + 7 * 5  # clip_images: 98x70 pixels -> 7x5 patches


def _drop(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    drop = torch.rand(FRAMES, TOKENS, generator=generator) < 0.3
    drop[:, 0] = False  # special tokens are never hidden
    return drop


class NoisyKeysValues(torch.nn.Module):
    """Wraps a qkv projection and adds noise to the keys and values of chosen tokens."""

    def __init__(self, qkv: torch.nn.Linear, token_rows: torch.Tensor) -> None:
        super().__init__()
        self.qkv, self.rows = qkv, token_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        dim = out.shape[-1] // 3
        noise = torch.randn_like(out) * 5
        noise[..., :dim] = 0  # queries untouched
        return out + noise * self.rows.reshape(out.shape[0], out.shape[1], 1)


def _attention_outputs(net, images, layer, key_mask, noisy_rows=None, strategy="first"):
    block = net.backbone.pretrained.blocks[layer]
    seen = {}
    handle = block.attn.register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].clone(), out=out.clone()))
    original = block.attn.qkv
    if noisy_rows is not None:
        block.attn.qkv = NoisyKeysValues(original, noisy_rows)
    try:
        with torch.inference_mode(), capture_attention(net, key_mask=key_mask):
            net(images, export_feat_layers=[], ref_view_strategy=strategy)
    finally:
        block.attn.qkv = original
        handle.remove()
    return seen


@pytest.mark.parametrize("layer", [1, 3, 5])  # per-frame blocks and a global block (5)
def test_outputs_do_not_depend_on_hidden_keys_and_values(small_net, clip_images, layer):
    drop = _drop(layer)
    key_mask = KeyMask(drop, frozenset({layer}))
    is_global = layer == 5
    rows = drop.reshape(1, -1).float() if is_global else drop.float()
    clean = _attention_outputs(small_net, clip_images, layer, key_mask)
    noisy = _attention_outputs(small_net, clip_images, layer, key_mask, rows)
    torch.testing.assert_close(noisy["out"], clean["out"], rtol=0, atol=1e-5)
    # control: without the mask the same noise changes the outputs
    unmasked = _attention_outputs(small_net, clip_images, layer, None, rows)
    assert (unmasked["out"] - clean["out"]).abs().max() > 1e-2 or not drop.any()


@pytest.mark.parametrize("layer", [3, 5])  # both run after DA3 moved its reference view first
def test_hidden_tokens_follow_their_frames_through_da3_reordering(small_net, layer):
    from test_hook import _images_with_reordering, _reference_permutation

    images, ref = _images_with_reordering(small_net)
    order = _reference_permutation(FRAMES, ref)  # order[position] = input frame
    drop = _drop(layer + 10)
    internal = drop[order].float()  # the noise is added where DA3 holds those tokens
    rows = internal.reshape(1, -1) if layer == 5 else internal
    key_mask = KeyMask(drop, frozenset({layer}))
    clean = _attention_outputs(small_net, images, layer, key_mask, strategy="saddle_balanced")
    noisy = _attention_outputs(small_net, images, layer, key_mask, rows, "saddle_balanced")
    torch.testing.assert_close(noisy["out"], clean["out"], rtol=0, atol=1e-5)


def test_masked_attention_equals_a_manual_masked_softmax(small_net, clip_images):
    layer = 1  # no qk-norm or RoPE before block 4 in da3-small: plain scaled dot products
    drop = _drop(7)
    seen = _attention_outputs(small_net, clip_images, layer, KeyMask(drop, frozenset({layer})))
    attn = small_net.backbone.pretrained.blocks[layer].attn
    x = seen["x"].double()  # (T, N, C), attention input
    heads = attn.num_heads
    qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.view(FRAMES, TOKENS, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(drop[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(FRAMES, TOKENS, -1)
    expected = out @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(seen["out"].double(), expected, rtol=1e-4, atol=1e-5)


def test_masking_nothing_is_exactly_the_first_pass(small_net, clip_images):
    nothing = KeyMask(torch.zeros(FRAMES, TOKENS, dtype=torch.bool), frozenset(range(5)))
    with torch.inference_mode():
        plain = small_net(clip_images, export_feat_layers=[])
        with capture_attention(small_net, key_mask=nothing):
            masked = small_net(clip_images, export_feat_layers=[])
    for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
        assert torch.equal(plain[key], masked[key]), key


def test_a_frame_with_every_patch_hidden_stays_finite(small_net, clip_images):
    drop = torch.zeros(FRAMES, TOKENS, dtype=torch.bool)
    drop[2, 1:] = True
    with torch.inference_mode(), capture_attention(small_net,
                                                   key_mask=KeyMask(drop, frozenset(range(12)))):
        out = small_net(clip_images, export_feat_layers=[])
    assert torch.isfinite(out["depth"]).all() and torch.isfinite(out["extrinsics"]).all()


def test_patch_drop_rules_against_a_brute_force_count():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 28, 42)) < 0.05  # 2x3 patches of 14 px
    for rule, fraction in (("any", 0.1), ("area", 0.04)):
        got = patch_drop(masks, (2, 3), 1, rule, fraction).numpy()
        assert not got[:, 0].any()
        for t in range(2):
            for row in range(2):
                for col in range(3):
                    covered = masks[t, row * 14:(row + 1) * 14, col * 14:(col + 1) * 14].mean()
                    expected = covered > 0 if rule == "any" else covered > fraction
                    assert got[t, 1 + row * 3 + col] == expected
    with pytest.raises(UserError, match="do not match the 3x2 patch grid"):
        patch_drop(masks[:, :27], (2, 3), 1)


def test_vggt_layers_map_to_da3s_alternating_blocks():
    from vggt4d.second_pass import hidden_blocks

    # VGGT layer i = a per-frame and a global block; DA3 alternates them from alt_start on
    assert hidden_blocks([0, 1, 2, 3, 4], "vggt", 13, 40) == list(range(12, 22))  # giant
    assert hidden_blocks([0, 1], "vggt", 8, 24) == [8, 9, 10, 11]  # large: 9, 11 global
    assert hidden_blocks([0, 1, 2, 3, 4], "vggt", 4, 12) == list(range(4, 12))  # small: 4 pairs
    assert hidden_blocks([1, 2], "blocks", 4, 12) == [1, 2]
    with pytest.raises(UserError, match="layer_rule=blocks"):
        hidden_blocks([0], "vggt", -1, 24)  # da3mono/da3metric: no global blocks


def test_hiding_dynamic_patches_reaches_across_frames_with_the_demo_weights():
    """With the built-in demo weights on the synthetic scene, hiding the sphere's patches in the
    blocks VGGT4D's layers 0-4 map to changes the cross-frame (global block 5) attention of
    static queries in every frame, while their attention among the keys still visible keeps its
    proportions; blocks 0-4 taken literally (all per-frame in DA3) never reach block 5."""
    from vggt4d.demo_weights import plant
    from vggt4d.frames import normalize, processing_size, resize_frames
    from vggt4d.model import build_network
    from vggt4d.second_pass import hidden_blocks
    from vggt4d.synthetic import SyntheticConfig, render_scene

    torch.manual_seed(0)
    net = plant(build_network("da3-small")).eval()
    scene = render_scene(SyntheticConfig(num_frames=4, width=140, height=98, object_speed=2.5))
    size = processing_size(98, 140, 140)
    frames = resize_frames(scene.frames, size)
    masks = np.stack([np.asarray(resize_frames(m[None, ..., None].repeat(3, -1).astype(np.uint8)
                                               * 255, size)[0, ..., 0] > 127)
                      for m in scene.dynamic_masks])
    grid = (size[0] // 14, size[1] // 14)
    drop = patch_drop(masks, grid, 1)
    assert drop.any()
    images = normalize(frames)[None]
    global_block = 5

    def run(blocks):
        seen = {}

        def keep(capture):
            if capture.layer == global_block:
                seen["q"], seen["k"] = capture.q.double(), capture.k.double()
                seen["x"] = capture.attn_input[0].double()  # (T·N, C), frames in input order

        attn = net.backbone.pretrained.blocks[global_block].attn
        handle = attn.proj.register_forward_hook(
            lambda _m, args, _o: seen.update(out=args[0][0].double()))
        key_mask = KeyMask(drop, frozenset(blocks)) if blocks else None
        try:
            with torch.inference_mode(), capture_attention(net, keep, key_mask=key_mask,
                                                           layers=[global_block]):
                net(images, export_feat_layers=[], ref_view_strategy="first")
        finally:
            handle.remove()
        return seen

    plain = run([])
    mapped = run(hidden_blocks([0, 1, 2, 3, 4], "vggt", 4, 12))
    literal = run(hidden_blocks([0, 1, 2, 3, 4], "blocks", 4, 12))
    assert torch.equal(literal["out"], plain["out"])  # per-frame blocks only: block 5 untouched

    frames_n, heads, tokens, dim = plain["q"].shape
    q = plain["q"].transpose(0, 1).reshape(heads, -1, dim)
    k = plain["k"].transpose(0, 1).reshape(heads, -1, dim)
    logits = q @ k.transpose(-1, -2) / dim**0.5  # (heads, T·N, T·N): every frame's keys
    hidden = drop.reshape(-1)
    before = logits.softmax(-1)
    after = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    static = ~hidden
    assert (after[:, static][..., hidden] == 0).all()
    ratio = after[:, static][..., ~hidden] / before[:, static][..., ~hidden]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))  # proportions kept
    # the forward's output is exactly that masked attention, and differs for static queries of
    # every frame, including frames whose own patches are not hidden
    attn = net.backbone.pretrained.blocks[global_block].attn
    with torch.no_grad():
        qkv = plain["x"] @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    v = qkv.view(-1, 3, heads, dim)[:, 2].transpose(0, 1)  # (heads, T·N, d)
    expected = (after @ v).transpose(0, 1).reshape(frames_n * tokens, heads * dim)
    torch.testing.assert_close(mapped["out"], expected, rtol=1e-4, atol=1e-5)
    change = (mapped["out"] - plain["out"]).reshape(frames_n, tokens, -1).abs().amax(-1)
    static_by_frame = static.reshape(frames_n, tokens)
    for t in range(frames_n):
        assert (change[t][static_by_frame[t]] > 1e-6).all(), t
