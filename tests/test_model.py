"""Weights: the official hub layout round trip, strict loading, clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt4d.errors import UserError
from vggt4d.model import build_network, load_weights, resolve_weights, save_hub_checkpoint


@pytest.fixture
def checkpoint_dir(tmp_path, small_net):
    directory = tmp_path / "DA3-SMALL"
    save_hub_checkpoint(small_net, directory, "da3-small")
    return directory


def test_hub_layout_round_trip_gives_identical_outputs(checkpoint_dir, small_net, clip_images):
    keys = load_file(str(checkpoint_dir / "model.safetensors")).keys()
    assert "model.backbone.pretrained.blocks.0.attn.qkv.weight" in keys
    assert json.loads((checkpoint_dir / "config.json").read_text()) == {"model_name": "da3-small"}

    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    fresh = build_network("da3-small")
    load_weights(fresh, resolve_weights(str(checkpoint_dir)), "da3-small")
    with torch.inference_mode():
        expected = small_net(clip_images, export_feat_layers=[])
        got = fresh(clip_images, export_feat_layers=[])
    for key in ("depth", "depth_conf", "extrinsics"):
        assert torch.equal(expected[key], got[key])


def test_safetensors_file_path_also_loads(checkpoint_dir):
    net = build_network("da3-small")
    load_weights(net, resolve_weights(str(checkpoint_dir / "model.safetensors")), "da3-small")


def test_checkpoint_of_another_variant_is_refused(checkpoint_dir):
    (checkpoint_dir / "config.json").write_text(json.dumps({"model_name": "da3-base"}))
    with pytest.raises(UserError, match=r"holds 'da3-base' weights but model=da3-small"):
        load_weights(build_network("da3-small"), checkpoint_dir, "da3-small")


def test_missing_and_unexpected_keys_are_listed(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    state = load_file(str(path))
    del state["model.backbone.pretrained.blocks.3.attn.qkv.bias"]
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    expected = (r"1 missing keys \['backbone.pretrained.blocks.3.attn.qkv.bias'\], "
                r"1 unexpected keys \['extra.weight'\]")
    with pytest.raises(UserError, match=expected):
        load_weights(build_network("da3-small"), checkpoint_dir, "da3-small")


def test_missing_path_and_unreachable_hub_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_weights(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"model\.weights=random") as info:
        resolve_weights("depth-anything/DA3-SMALL")
    assert "\n" not in str(info.value)


def test_random_weights_need_no_file():
    assert resolve_weights("random") is None


def test_checkpoint_with_one_name_per_shared_tensor_loads(checkpoint_dir, small_net, clip_images):
    """``safetensors.save_model`` drops the aliases of shared tensors; they are not missing."""
    path = checkpoint_dir / "model.safetensors"
    state = load_file(str(path))
    aliases = [k for k in state if ".output_conv2_aux." in k and k.split(".")[-3] != "0"
               and k.split(".")[-2] == "2"]
    assert aliases
    for key in aliases:
        del state[key]
    save_file(state, str(path))
    net = build_network("da3-small")
    load_weights(net, checkpoint_dir, "da3-small")
    with torch.inference_mode():
        assert torch.equal(net(clip_images, export_feat_layers=[])["depth"],
                           small_net(clip_images, export_feat_layers=[])["depth"])
