"""VGGT4D's cues and fused map against a float64 reference written here from the paper's
formulas (the official code's order: statistics normalised per frame, then combined), with the
deep cue's S^QQ and V^QQ over two different layer sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggt4d.gram import band_key, stat_key
from vggt4d.maps import Normalizer, fuse, inverse_similarity, vggt4d_cues

FRAMES, ROWS, COLS = 3, 4, 5
LAYERS = range(8)
BANDS = {"shallow": (0,), "middle": (1, 2), "deep": (4, 5, 6), "deep_var": (5,)}


def _stats(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {stat_key(pair, stat, layer): torch.rand(FRAMES, ROWS, COLS, generator=generator) * 3
            for pair in ("qq", "kk", "qk") for stat in ("mean", "var") for layer in LAYERS}


def _n(x: np.ndarray) -> np.ndarray:
    """(x − min)/(max − min + 1e-6) per frame, float64."""
    low = x.min(axis=(1, 2), keepdims=True)
    high = x.max(axis=(1, 2), keepdims=True)
    return (x - low) / (high - low + 1e-6)


def _band(stats, pair, stat, layers) -> np.ndarray:
    return np.mean([stats[stat_key(pair, stat, i)].double().numpy() for i in layers], axis=0)


def test_fused_map_follows_the_paper_with_distinct_deep_bands():
    stats = _stats()
    s_kk, v_qk = _band(stats, "kk", "mean", (0,)), _band(stats, "qk", "var", (0,))
    s_qq_mid = _band(stats, "qq", "mean", (1, 2))
    s_qq_deep, v_qq_deep = _band(stats, "qq", "mean", (4, 5, 6)), _band(stats, "qq", "var", (5,))
    w_shallow = (1 - _n(s_kk)) * _n(v_qk)
    w_middle = 1 - _n(s_qq_mid)
    w_deep = _n(s_qq_deep) * (1 - _n(v_qq_deep))
    expected = _n(w_shallow * w_middle * w_deep)

    cues = vggt4d_cues(stats, BANDS)
    fused = fuse(cues).double().numpy()
    np.testing.assert_allclose(cues["w_deep"].double().numpy(), w_deep, atol=1e-6)
    np.testing.assert_allclose(fused, expected, atol=1e-5)
    # the variance band matters: the deep band's own V^QQ gives another map
    same_band = vggt4d_cues(stats, {**BANDS, "deep_var": BANDS["deep"]})
    assert not torch.allclose(same_band["w_deep"], cues["w_deep"], atol=1e-3)


def test_exact_band_mode_reads_the_band_statistics():
    stats = _stats(1)
    generator = torch.Generator().manual_seed(7)
    for band in BANDS:
        for pair in ("qq", "kk", "qk"):
            for stat in ("mean", "var"):
                stats[band_key(pair, stat, band)] = torch.rand(FRAMES, ROWS, COLS,
                                                               generator=generator)
    cues = vggt4d_cues(stats, BANDS, band_mode="exact")
    s_qq = stats[band_key("qq", "mean", "deep")].double().numpy()
    v_qq = stats[band_key("qq", "var", "deep_var")].double().numpy()
    np.testing.assert_allclose(cues["w_deep"].double().numpy(), _n(s_qq) * (1 - _n(v_qq)),
                               atol=1e-6)


@pytest.mark.parametrize(("fusion", "combine"), [("product", np.prod), ("sum", np.sum)])
def test_fusion_options(fusion, combine):
    stats = _stats(2)
    cues = vggt4d_cues(stats, BANDS, shallow_form="notes", deep_form="inverted")
    s_kk, v_qk = _band(stats, "kk", "mean", (0,)), _band(stats, "qk", "var", (0,))
    deep = 1 - _n(_band(stats, "qq", "mean", (4, 5, 6))) * (1 - _n(_band(stats, "qq", "var", (5,))))
    parts = [1 - _n(s_kk) * _n(v_qk), 1 - _n(_band(stats, "qq", "mean", (1, 2))), deep]
    np.testing.assert_allclose(cues["w_deep"].double().numpy(), deep, atol=1e-6)
    inverse = inverse_similarity(stats, [0, 3])
    expected_inverse = 1 - _n(_band(stats, "qk", "mean", (0, 3)))
    np.testing.assert_allclose(inverse.double().numpy(), expected_inverse, atol=1e-6)
    mixed = fuse(cues, fusion=fusion, inv_similarity=inverse).double().numpy()
    expected = (_n(combine(np.stack(parts), axis=0)) + expected_inverse) / 2
    np.testing.assert_allclose(mixed, expected, atol=1e-5)


def test_percentile_and_sequence_normalisation():
    maps = torch.rand(FRAMES, ROWS, COLS, generator=torch.Generator().manual_seed(3)).double()
    values = maps.numpy()
    low, high = np.percentile(values, [10, 90])  # one pair for the whole sequence
    expected = (np.clip(values, low, high) - low) / (high - low + 1e-6)
    got = Normalizer("percentile", (10.0, 90.0), "sequence")(maps).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    constant = Normalizer()(torch.ones(2, 3, 3))
    assert torch.equal(constant, torch.zeros(2, 3, 3))  # nothing stands out, never NaN
