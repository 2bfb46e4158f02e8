"""The cross-frame query cosine: the closed form against float64 loops, the pre-RoPE capture
against the forward's own q_norm/k_norm outputs, and the collector through the real hooked
forward (da3-small, random weights) against a brute-force loop over layers, frames and patches."""

from __future__ import annotations

import pytest
import torch
from depth_anything_3.model.dinov2 import vision_transformer as da3_vit

from vggt4d.errors import UserError
from vggt4d.hook import capture_attention
from vggt4d.temporal import QueryCosineCollector, cosine_key, query_cosine, query_cosine_cue

GLOBAL_BLOCKS = (5, 7, 9, 11)  # da3-small
FRAMES, GRID = 4, (7, 5)  # the clip_images fixture


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two float64 vectors; 0 when either is zero."""
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def _brute_force(q: torch.Tensor) -> torch.Tensor:
    """(T, H, P, d) → (T, H, P): loops over frames, heads, patches and the other frames."""
    q = q.double()
    frames, heads, patches, _ = q.shape
    out = torch.zeros(frames, heads, patches, dtype=torch.float64)
    for t in range(frames):
        for h in range(heads):
            for p in range(patches):
                others = [_cosine(q[t, h, p], q[s, h, p]) for s in range(frames) if s != t]
                out[t, h, p] = sum(others) / len(others)
    return out


def test_query_cosine_equals_a_float64_loop():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(5, 3, 7, 8, generator=generator) + 0.7  # correlated frames
    q[2, 1, 4] = 0.0  # a zero query: cosine 0 with everything
    q[3, 0, 2] = 5.0 * q[0, 0, 2]  # a scaled copy: cosine 1 with frame 0
    got = query_cosine(q)
    expected = _brute_force(q)
    assert got.dtype == torch.float32 and tuple(got.shape) == (5, 3, 7)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert float(got[2, 1, 4]) == pytest.approx(0.0, abs=1e-7)
    # frames 0 and 3 of (head 0, patch 2) see each other with cosine 1: a hand check
    manual = (1.0 + sum(_cosine(q[0, 0, 2].double(), q[s, 0, 2].double())
                        for s in (1, 2, 4))) / 4
    assert float(got[0, 0, 2]) == pytest.approx(manual, abs=1e-6)


def test_identical_frames_have_cosine_one_and_cue_zero():
    q = torch.randn(1, 2, 6, 4).repeat(3, 1, 1, 1)
    torch.testing.assert_close(query_cosine(q), torch.ones(3, 2, 6))
    stats = {cosine_key(5): torch.ones(3, 2, 3), cosine_key(7): torch.full((3, 2, 3), 0.5),
             "other.L05": torch.zeros(3, 2, 3)}
    torch.testing.assert_close(query_cosine_cue(stats), torch.full((3, 2, 3), 0.25))


def test_one_frame_is_refused():
    with pytest.raises(UserError, match="at least 2 frames"):
        query_cosine(torch.randn(1, 2, 3, 4))
    with pytest.raises(UserError, match="no query_cosine maps"):
        query_cosine_cue({})


def _forward_with_norm_outputs(net, images, consumer, layers=None):
    """Hooked forward with DA3's reference view forced to the middle frame (so frames are
    reordered inside); returns each block's first q_norm/k_norm outputs (internal order) and
    DA3's reference index."""
    blocks = net.backbone.pretrained.blocks
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    refs = []
    original = da3_vit.select_reference_view

    def spy(x, *args, **kwargs):
        ref = original(x, *args, **kwargs)
        refs.append(int(ref[0]))
        return ref

    def keep(kind, layer):
        def hook(_module, _args, output):
            outputs.setdefault((kind, layer), output.detach().clone())
        return hook

    handles = [module.register_forward_hook(keep(kind, layer))
               for layer, block in enumerate(blocks)
               for kind, module in (("q", block.attn.q_norm), ("k", block.attn.k_norm))]
    da3_vit.select_reference_view = spy
    try:
        with torch.inference_mode(), capture_attention(net, consumer, layers=layers):
            net(images, export_feat_layers=[], ref_view_strategy="middle")
    finally:
        da3_vit.select_reference_view = original
        for handle in handles:
            handle.remove()
    assert refs == [FRAMES // 2]  # DA3 moved a view: input order is really exercised
    return outputs, refs[0]


def _input_order(raw: torch.Tensor, layer: int, ref: int) -> torch.Tensor:
    """A q_norm output (B·T, H, N, d) or (1, H, T·N, d) in DA3's order → (T, H, N, d) in input
    order (DA3 moves the reference view first before block alt_start − 1 = 3)."""
    if raw.shape[0] == 1:
        heads, _, dim = raw.shape[1:]
        raw = raw.view(heads, FRAMES, -1, dim).transpose(0, 1)
    if layer < 3:
        return raw
    order = [ref] + [t for t in range(FRAMES) if t != ref]  # order[position] = input frame
    return raw[[order.index(t) for t in range(FRAMES)]]


@pytest.fixture(scope="module")
def hooked_run(small_net):
    """One hooked forward of a 4-frame clip shared by the tests below: every block's pre-RoPE
    Q/K and post-RoPE Q, the collector over the global blocks, the q_norm/k_norm outputs."""
    images = torch.randn(1, FRAMES, 3, 98, 70, generator=torch.Generator().manual_seed(1))
    collector = QueryCosineCollector(frozenset(GLOBAL_BLOCKS))
    captured = {}

    def consumer(capture):
        collector(capture)
        captured[capture.layer] = (capture.q_pre_rope.clone(), capture.k_pre_rope.clone(),
                                   capture.q.clone())

    outputs, ref = _forward_with_norm_outputs(small_net, images, consumer)
    return captured, collector, outputs, ref


def test_pre_rope_qk_are_the_forwards_own_q_norm_outputs(hooked_run):
    captured, _, outputs, ref = hooked_run
    assert sorted(captured) == list(range(12))
    for layer, (q_pre, k_pre, q_post) in captured.items():
        assert tuple(q_pre.shape) == (FRAMES, 6, 36, 64)
        assert torch.equal(q_pre, _input_order(outputs["q", layer], layer, ref)), layer
        assert torch.equal(k_pre, _input_order(outputs["k", layer], layer, ref)), layer
        if layer >= 4:  # RoPE from alt_start on: the captured Q is rotated, the pre-RoPE one not
            assert not torch.allclose(q_pre[:, :, 1:], q_post[:, :, 1:])
        else:
            assert torch.equal(q_pre, q_post)


def test_pre_rope_queries_are_computed_only_when_read(small_net):
    images = torch.randn(1, 3, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    calls = []
    qkv = small_net.backbone.pretrained.blocks[5].attn.qkv
    handle = qkv.register_forward_hook(lambda *_: calls.append(1))
    try:
        for read in (False, True):
            calls.clear()
            with torch.inference_mode(), capture_attention(
                    small_net, lambda c, read=read: c.q_pre_rope if read else c.q, layers=[5]):
                small_net(images, export_feat_layers=[])
            assert len(calls) == (2 if read else 1)
    finally:
        handle.remove()


def test_collector_equals_a_brute_force_loop_through_the_hooked_forward(hooked_run):
    captured, collector, outputs, ref = hooked_run
    assert sorted(collector.maps) == [cosine_key(layer) for layer in GLOBAL_BLOCKS]
    assert collector.grid == GRID
    layer_maps = []
    for layer in GLOBAL_BLOCKS:
        q = _input_order(outputs["q", layer], layer, ref)[:, :, 1:].double()  # patches only
        brute = torch.zeros(FRAMES, q.shape[2], dtype=torch.float64)
        for t in range(FRAMES):
            for p in range(q.shape[2]):
                for s in range(FRAMES):
                    if s != t:  # heads at once: (H, d) pairs, then their mean
                        cosines = torch.nn.functional.cosine_similarity(q[t, :, p], q[s, :, p],
                                                                        dim=-1)
                        brute[t, p] += cosines.mean() / (FRAMES - 1)
        got = collector.maps[cosine_key(layer)]
        assert tuple(got.shape) == (FRAMES, *GRID)
        torch.testing.assert_close(got.double(), brute.view(FRAMES, *GRID), rtol=0, atol=1e-5)
        # the same patch has the same RoPE angle in every frame: the cosine ignores RoPE
        post_rope = query_cosine(captured[layer][2][:, :, 1:]).mean(dim=1)
        torch.testing.assert_close(post_rope.view(FRAMES, *GRID), got, rtol=0, atol=1e-4)
        layer_maps.append(brute.view(FRAMES, *GRID))
    cue = query_cosine_cue(collector.maps)
    torch.testing.assert_close(cue.double(), 1 - torch.stack(layer_maps).mean(dim=0),
                               rtol=0, atol=1e-5)
    assert float(cue.std()) > 0  # random weights still give a non-constant cue
