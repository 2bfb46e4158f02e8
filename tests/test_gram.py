"""Gram statistics: both engines against a dense float64 reference, windows, token offsets."""

from __future__ import annotations

import itertools

import pytest
import torch

from vggt4d.config.gram import GramConfig
from vggt4d.errors import UserError
from vggt4d.gram import (
    GramCollector,
    chunked_statistics,
    config_windows,
    dense_statistics,
    group_heads,
    moments_statistics,
    similarity_factor,
    special_token_count,
    stat_key,
)
from vggt4d.hook import capture_attention


def _vectors(frames=5, heads=3, patches=20, dim=8, seed=0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(frames, heads, patches, dim, generator=generator) + offset
    k = torch.randn(frames, heads, patches, dim, generator=generator) * 0.5 + offset
    return q, k


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


CASES = list(itertools.product(("all", "offsets", "attended"), ("pairs", "spatial"),
                               ("mean", "keep"), (True, False)))


@pytest.mark.parametrize(("window", "variance", "heads", "include_self"), CASES)
def test_engines_match_the_dense_reference_and_each_other(window, variance, heads, include_self):
    spec = GramConfig(window=window, offsets=(-2, 1, 3), include_self=include_self,
                    variance=variance, heads=heads, scale=True)
    q, k = _vectors()
    windows = config_windows(spec, 5, True)
    x, y = group_heads(q, heads), group_heads(k, heads)
    factor = similarity_factor(3, 8, scale=spec.scale, heads=spec.heads)
    ref_mean, ref_var = dense_statistics(x, y, windows, factor=factor, variance=variance)
    mom_mean, mom_var = moments_statistics(x, y, windows, factor=factor, variance=variance)
    chk_mean, chk_var = chunked_statistics(x, y, windows, factor=factor, variance=variance,
                                           chunk_size=7)
    for got in (mom_mean, chk_mean):
        assert _relative_error(got, ref_mean) < 1e-5
    for got in (mom_var, chk_var):
        assert _relative_error(got, ref_var) < 1e-5
    assert _relative_error(mom_var, chk_var) < 1e-4
    assert _relative_error(mom_mean, chk_mean) < 1e-4


def test_moments_stay_accurate_when_the_mean_dwarfs_the_spread():
    """Naive E[y²] − E[y]² in fp32 would lose every digit here; the shifted moments do not."""
    q, k = _vectors(offset=300.0)
    spec = GramConfig()
    windows = config_windows(spec, 5, True)
    x, y = group_heads(q, "mean"), group_heads(k, "mean")
    _, ref_var = dense_statistics(x, y, windows, factor=1 / 3, variance="pairs")
    _, got = moments_statistics(x, y, windows, factor=1 / 3, variance="pairs")
    _, chunk = chunked_statistics(x, y, windows, factor=1 / 3, variance="pairs", chunk_size=6)
    assert _relative_error(got, ref_var) < 1e-3
    assert _relative_error(chunk, ref_var) < 1e-3


def test_heads_mean_equals_the_average_of_per_head_similarities():
    q, k = _vectors()
    windows = [tuple(range(5))] * 5
    x, y = q.double(), k.double()
    # independent: per-head similarity matrices averaged over heads, then statistics
    sims = torch.einsum("thpd,shqd->thpsq", x, y).mean(dim=1)  # (T, P, S, Q)
    mean, var = moments_statistics(group_heads(q, "mean"), group_heads(k, "mean"), windows,
                                   factor=1 / 3, variance="pairs")
    torch.testing.assert_close(mean[:, 0].double(), sims.mean(dim=(2, 3)), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(var[:, 0].double(), sims.flatten(2).var(dim=2), rtol=1e-4,
                               atol=1e-5)


def test_windows():
    vggt4d = GramConfig(window="offsets", include_self=False)
    windows = config_windows(vggt4d, 10, True)
    assert windows[0] == (2, 4, 6)
    assert windows[5] == (1, 3, 7, 9)
    assert windows[9] == (3, 5, 7)
    user = GramConfig(window="offsets", offsets=(-2, -1, 1, 2), include_self=True)
    assert config_windows(user, 6, False)[0] == (0, 1, 2)
    attended = GramConfig(window="attended")
    assert config_windows(attended, 3, False) == [(0,), (1,), (2,)]
    assert config_windows(attended, 3, True) == [(0, 1, 2)] * 3
    assert config_windows(GramConfig(include_self=False), 3, True)[1] == (0, 2)


def test_window_longer_than_the_clip_fails_clearly():
    with pytest.raises(UserError, match="leaves frame 0 of a 3-frame clip"):
        config_windows(GramConfig(window="offsets", offsets=(-8, 8), include_self=False), 3, True)


def test_special_tokens_from_model_or_search():
    assert special_token_count(1 + 35, (7, 5), 1) == 1
    assert special_token_count(5 + 35, (7, 5), None) == 5
    with pytest.raises(UserError, match="do not fit the 7x5 patch grid"):
        special_token_count(40, (7, 5), 1)
    with pytest.raises(UserError, match="no count of 0-16 special tokens"):
        special_token_count(80, (7, 5), None)


def test_collector_on_a_real_forward_matches_independent_statistics(small_net, clip_images):
    spec = GramConfig(window="offsets", offsets=(-1, 1), include_self=False, variance="spatial")
    collector = GramCollector(spec, frozenset({2, 5}))
    captured = {}

    def both(capture):
        captured[capture.layer] = (capture.q.clone(), capture.k.clone(), capture.is_global)
        collector(capture)

    with torch.inference_mode(), capture_attention(small_net, both):
        small_net(clip_images, export_feat_layers=[])
    assert sorted(collector.maps) == sorted(stat_key(p, s, layer) for p in ("qq", "kk", "qk")
                                            for s in ("mean", "var") for layer in (2, 5))
    for layer in (2, 5):
        q, k, _ = captured[layer]
        q, k = q[:, :, 1:].double(), k[:, :, 1:].double()
        for t in range(4):
            sources = [s for s in (t - 1, t + 1) if 0 <= s < 4]
            # similarity of every (query patch, source frame, source patch), heads averaged
            sims = torch.einsum("hpd,shqd->psq", q[t], k[sources]) / 6
            spread = sims.mean(dim=1).std(dim=1).reshape(7, 5)
            torch.testing.assert_close(collector.maps[stat_key("qk", "var", layer)][t].double(),
                                       spread, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(collector.maps[stat_key("qk", "mean", layer)][t].double(),
                                       sims.mean(dim=(1, 2)).reshape(7, 5), rtol=1e-4,
                                       atol=1e-6)


def test_exact_band_averages_similarities_over_layers_before_the_spread(small_net, clip_images):
    spec = GramConfig(variance="spatial")
    collector = GramCollector(spec, frozenset({1, 2}), exact_bands={"middle": (1, 2)})
    captured = {}

    def both(capture):
        captured[capture.layer] = (capture.q[:, :, 1:].double(), capture.k[:, :, 1:].double())
        collector(capture)

    with torch.inference_mode(), capture_attention(small_net, both):
        small_net(clip_images, export_feat_layers=[])
    sims = sum(torch.einsum("thpd,shqd->tpsq", *captured[layer]) for layer in (1, 2)) / 12
    expected_std = sims.mean(dim=2).std(dim=2).reshape(4, 7, 5)
    got = collector.maps["qk.var.band_middle"]
    torch.testing.assert_close(got.double(), expected_std, rtol=1e-4, atol=1e-6)
    mean_of_layers = (collector.maps[stat_key("qk", "var", 1)]
                      + collector.maps[stat_key("qk", "var", 2)]) / 2
    assert not torch.allclose(mean_of_layers, got, rtol=1e-3)
    torch.testing.assert_close(collector.maps["qk.mean.band_middle"],
                               (collector.maps[stat_key("qk", "mean", 1)]
                                + collector.maps[stat_key("qk", "mean", 2)]) / 2,
                               rtol=1e-4, atol=1e-6)


def test_non_finite_qk_names_the_layer():
    from vggt4d.hook import BlockQK, FrameLayout, _ClipState

    q, k = _vectors(frames=2, patches=1 + 6)
    q[1, 0, 3, 0] = float("nan")
    layout = FrameLayout(2, 7, 1, (2, 3))
    capture = BlockQK(7, False, layout, q, k, _ClipState(layout))
    with pytest.raises(UserError, match="in Q of layer 7"):
        GramCollector(GramConfig(), frozenset({7}))(capture)
