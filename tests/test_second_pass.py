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
