"""The Hydra config tree: composition, schemas, validation, depth tables against networks."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from vggt4d.config import validate
from vggt4d.config.model import GIANT_BANDS, scale_band
from vggt4d.errors import UserError
from vggt4d.model import build_network, check_depth_table

MODELS = ["da3-small", "da3-base", "da3-large", "da3-giant", "da3nested-giant-large",
          "da3metric-large", "da3mono-large"]


def _compose(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_composes_and_matches_its_network(name):
    run = validate(_compose(f"model={name}"))
    assert run.model.name == name
    check_depth_table(run.model, build_network(name, empty=True))


def test_parameter_counts_of_the_built_networks():
    """The published sizes of the DA3 presets, so a wrong DA3 config would be noticed."""
    expected = {"da3-small": 34.3e6, "da3-large": 410.9e6, "da3-giant": 1355.7e6,
                "da3nested-giant-large": 1689.8e6}
    for name, count in expected.items():
        built = sum(p.numel() for p in build_network(name, empty=True).parameters())
        assert math.isclose(built, count, rel_tol=1e-3), name


def test_depth_table_mismatch_is_reported():
    run = validate(_compose("model=da3-large", "model.num_heads=12", "model.alt_start=6"))
    with pytest.raises(UserError, match=r"num_heads=12 \(network: 16\).*alt_start=6"):
        check_depth_table(run.model, build_network("da3-large", empty=True))


def test_typo_and_wrong_type_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        _compose("model.num_head=3")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose("process_res=big")
    with pytest.raises(ConfigCompositionException):
        _compose("data.strid=2", "data=images", "data.path=/tmp")


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("model=da3-tiny")
    assert "da3-small" in str(info.value.__cause__ or info.value) + str(info.value)


def test_giant_bands_are_the_users_and_smaller_depths_scale():
    giant = validate(_compose("model=da3-giant")).model.bands
    assert (giant.shallow, giant.middle, giant.deep) == ([1, 5], [6, 15], [18, 21])
    for name in MODELS:
        model = validate(_compose(f"model={name}")).model
        for band in ("shallow", "middle", "deep"):
            assert tuple(getattr(model.bands, band)) == scale_band(GIANT_BANDS[band],
                                                                  model.num_blocks)


@pytest.mark.parametrize("blocks", range(3, 65))
def test_scaled_bands_stay_inside_disjoint_and_ordered(blocks):
    bands = [scale_band(GIANT_BANDS[name], blocks) for name in ("shallow", "middle", "deep")]
    for first, last in bands:
        assert 0 <= first <= last < blocks
    # same fraction of depth: each band's centre is within one block of the giant's, scaled
    for (first, last), name in zip(bands, ("shallow", "middle", "deep"), strict=True):
        giant_first, giant_last = GIANT_BANDS[name]
        scaled_centre = (giant_first + giant_last + 1) / 2 * blocks / 40
        assert abs((first + last + 1) / 2 - scaled_centre) <= 1.0
    if blocks >= 12:
        assert bands[0][1] < bands[1][0] and bands[1][1] < bands[2][0]


def test_band_outside_the_model_names_the_valid_range():
    with pytest.raises(UserError, match=r"bands.deep=\[10, 14\].*<= 11"):
        validate(_compose("model=da3-small", "model.bands.deep=[10,14]"))


def test_process_res_is_rounded_with_a_warning(caplog):
    run = validate(_compose("process_res=500"))
    assert run.process_res == 504
    assert "not a multiple of 14" in caplog.text


def test_missing_data_path_is_one_line():
    with pytest.raises(UserError, match=r"data.path is required"):
        validate(_compose("data=images"))
