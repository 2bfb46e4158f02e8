"""PTv3 v3m2 encoder and its checkpoints, checked against independent references.

References are written here from the official semantics (Concerto ``concerto/model.py``), never
with the code under test: brute-force patch attention with an explicit float64 softmax,
dict-based grid pooling, a hand-written key list and parameter-count formula, Python-loop
feature gathering, and an end-to-end float64 encoder built from the state dict alone (it uses the
project's serialisation and neighbour table, which ``test_ptv3_serialization.py`` /
``test_ptv3_sparse_conv.py`` check against Pointcept and spconv). Everything runs the
random-weight "tiny" variant on a few hundred voxels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vggt4d.errors import UserError
from vggt4d.ptv3.checkpoint import check_checkpoint, load_encoder, save_checkpoint
from vggt4d.ptv3.model import (
    VARIANTS,
    Block,
    GridPooling,
    Level,
    PTv3Config,
    PTv3Encoder,
    SerializedAttention,
    features_at_input,
    patch_layout,
)
from vggt4d.ptv3.serialization import ORDERS, serialize
from vggt4d.ptv3.sparse_conv import neighbour_index

TINY = VARIANTS["tiny"]

#: Keyword arguments of Concerto's ``PointTransformerV3.__init__`` (the released config keys).
OFFICIAL_KWARGS = {
    "in_channels", "order", "stride", "enc_depths", "enc_channels", "enc_num_head",
    "enc_patch_size", "dec_depths", "dec_channels", "dec_num_head", "dec_patch_size",
    "mlp_ratio", "qkv_bias", "qk_scale", "attn_drop", "proj_drop", "drop_path", "layer_scale",
    "pre_norm", "shuffle_orders", "enable_rpe", "enable_flash", "upcast_attention",
    "upcast_softmax", "traceable", "mask_token", "enc_mode", "freeze_encoder",
}  # fmt: skip


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm and biases too) so no weight stays at its default."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return module.eval()


def _model(config: PTv3Config = TINY, seed: int = 0) -> PTv3Encoder:
    return _randomise(PTv3Encoder(config), seed)


def _voxels(counts: tuple[int, ...], extent: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder inputs: clouds of exactly ``counts`` unique voxels each, in one shuffled batch."""
    generator = torch.Generator().manual_seed(seed)
    grids = []
    for count in counts:
        cells = torch.randperm(extent**3, generator=generator)[:count]
        grids.append(torch.stack([cells // extent**2, cells // extent % extent, cells % extent], 1))
    grid = torch.cat(grids)
    batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    mix = torch.randperm(len(grid), generator=generator)
    grid, batch = grid[mix], batch[mix]
    coord = (grid + torch.rand(grid.shape, generator=generator)) * 0.02
    feat = torch.randn(len(grid), 9, generator=generator)
    return {"coord": coord, "grid_coord": grid, "feat": feat, "batch": batch}


def _encode(model: PTv3Encoder, voxels: dict, seed: int | None = 0) -> list[Level]:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return model(**voxels, generator=generator)


# --- (1) checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_features(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "tiny.pth", model)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"config", "state_dict"}
    assert set(raw["config"]) == OFFICIAL_KWARGS
    assert raw["config"]["enc_channels"] == (16, 16, 32, 32, 64)
    loaded = load_encoder(path, "tiny")
    assert not loaded.training
    voxels = _voxels((300,))
    for ours, theirs in zip(_encode(model, voxels), _encode(loaded, voxels), strict=True):
        assert torch.equal(ours.feat, theirs.feat)


def test_a_half_precision_checkpoint_loads_into_float32_weights(tmp_path):
    """As Concerto's load copies into float32 parameters: the features equal those of a float32
    encoder holding the half-rounded weights."""
    model = _model()
    half = {key: value.half() if value.is_floating_point() else value
            for key, value in model.state_dict().items()}
    loaded = load_encoder(_write(tmp_path / "half.pth", half), "tiny")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    reference = PTv3Encoder(TINY).eval()
    reference.load_state_dict({key: value.float() for key, value in half.items()})
    voxels = _voxels((300,))
    for ours, theirs in zip(_encode(loaded, voxels), _encode(reference, voxels), strict=True):
        assert torch.equal(ours.feat, theirs.feat)


def test_check_checkpoint_refuses_what_loading_refuses_without_loading(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "tiny.pth", _model())
    assert check_checkpoint(path, "tiny") == path
    assert "enc_depths" in _one_line_error(lambda: check_checkpoint(path, "small"))
    state = {k: v for k, v in PTv3Encoder(TINY).state_dict().items() if "enc4" not in k}
    message = _one_line_error(lambda: check_checkpoint(_write(tmp_path / "m.pth", state), "tiny"))
    assert "missing keys enc.enc4" in message
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert check_checkpoint(legacy, "tiny") == legacy  # no mmap for the old format: read in
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    assert "cannot read" in _one_line_error(lambda: check_checkpoint(truncated, "tiny"))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    check_checkpoint(path, "tiny")
    assert loads and all(call.get("mmap") for call in loads)  # memory-mapped, not read in


def _write(path, state_dict, config=None):
    config = TINY.to_official() if config is None else config
    torch.save({"config": config, "state_dict": state_dict}, path)
    return path


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_checkpoint_key_and_shape_errors_are_listed_on_one_line(tmp_path):
    state = PTv3Encoder(TINY).state_dict()
    names = sorted(state)

    missing = {k: v for k, v in state.items() if k not in names[:7]}
    message = _one_line_error(lambda: load_encoder(_write(tmp_path / "m.pth", missing), "tiny"))
    assert "missing keys" in message and names[0] in message and "and 2 more" in message

    extra = {**state, "module.head.weight": torch.zeros(2)}
    message = _one_line_error(lambda: load_encoder(_write(tmp_path / "u.pth", extra), "tiny"))
    assert "unexpected keys module.head.weight" in message and "missing" not in message

    key = "enc.enc1.down.proj.weight"
    bad = {**state, key: torch.zeros(3, 5)}
    message = _one_line_error(lambda: load_encoder(_write(tmp_path / "s.pth", bad), "tiny"))
    assert f"{key} (3, 5) vs (16, 16)" in message


def test_checkpoint_config_must_match_variant(tmp_path):
    path = save_checkpoint(tmp_path / "tiny.pth", _model())
    message = _one_line_error(lambda: load_encoder(path, "small"))
    assert "enc_depths (1, 1, 1, 1, 1) vs (2, 2, 2, 6, 2)" in message
    assert "enc_channels" in message and "enable_flash" not in message

    runtime = dataclasses.replace(TINY, enable_flash=False, enc_patch_size=(32,) * 5)
    state = PTv3Encoder(TINY).state_dict()
    loaded = load_encoder(_write(tmp_path / "r.pth", state, runtime.to_official()), "tiny")
    assert loaded.config == runtime


def test_override_of_enable_flash_is_honoured(tmp_path):
    """A batch with a 40-voxel cloud: the non-flash path shrinks every patch to 40 voxels."""
    model = _model()
    path = save_checkpoint(tmp_path / "tiny.pth", model)
    loaded = load_encoder(path, "tiny", overrides={"enable_flash": False})
    assert loaded.config.enable_flash is False
    reference = PTv3Encoder(dataclasses.replace(TINY, enable_flash=False)).eval()
    reference.load_state_dict(model.state_dict())
    voxels = _voxels((300, 40))
    ours, theirs, flash = (
        _encode(loaded, voxels),
        _encode(reference, voxels),
        _encode(model, voxels),
    )
    assert torch.equal(ours[0].feat, theirs[0].feat)
    assert not torch.allclose(ours[0].feat, flash[0].feat, atol=1e-3)


def test_overrides_of_weight_fields_and_bad_sources_are_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "tiny.pth", _model())
    message = _one_line_error(lambda: load_encoder(path, "tiny", overrides={"enc_channels": [8]}))
    assert "cannot override enc_channels" in message
    assert "unknown PTv3 variant" in _one_line_error(lambda: load_encoder(path, "huge"))
    message = _one_line_error(lambda: load_encoder(tmp_path / "none.pth", "tiny"))
    assert "neither a file nor a released name" in message
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "cannot read" in _one_line_error(lambda: load_encoder(tmp_path / "junk.pth", "tiny"))
    torch.save(PTv3Encoder(TINY).state_dict(), tmp_path / "bare.pth")
    message = _one_line_error(lambda: load_encoder(tmp_path / "bare.pth", "tiny"))
    assert "'config' and 'state_dict'" in message


def test_released_name_without_hub_says_what_to_download():
    message = _one_line_error(lambda: load_encoder("concerto_small", "small"))
    assert "huggingface.co/Pointcept/Concerto/resolve/main/concerto_small.pth" in message


def test_official_config_dicts():
    official = {**VARIANTS["large"].to_official(), "type": "PT-v3m2"}
    official.update(enc_channels=[64, 128, 256, 512, 768], order="z")
    config = PTv3Config.from_official(official)
    assert config.enc_channels == (64, 128, 256, 512, 768) and config.order == ("z",)
    for variant in VARIANTS.values():
        assert PTv3Config.from_official(variant.to_official()) == variant
    assert "unknown PTv3 config keys: colour" in _one_line_error(
        lambda: PTv3Config.from_official({"colour": 1})
    )
    assert "enc_depths" in _one_line_error(lambda: PTv3Config.from_official({"enc_depths": "3"}))
    assert "PT-v3m1" in _one_line_error(lambda: PTv3Config.from_official({"type": "PT-v3m1"}))


# --- (2) state-dict layout and size -------------------------------------------------------------


def _design_keys(config: PTv3Config) -> set[str]:
    """Concerto's released key list, expanded for ``config``."""
    keys = {"embedding.mask_token"}
    keys |= {f"embedding.stem.{m}.{p}" for m in ("linear", "norm") for p in ("weight", "bias")}
    block_modules = ("cpe.0", "cpe.1", "cpe.2", "norm1.0", "attn.qkv", "attn.proj", "norm2.0",
                     "mlp.0.fc1", "mlp.0.fc2")  # fmt: skip
    for s, depth in enumerate(config.enc_depths):
        if s > 0:
            keys |= {
                f"enc.enc{s}.down.{m}.{p}" for m in ("proj", "norm.0") for p in ("weight", "bias")
            }
        for i in range(depth):
            keys |= {
                f"enc.enc{s}.block{i}.{m}.{p}" for m in block_modules for p in ("weight", "bias")
            }
    return keys


def _parameter_count(config: PTv3Config) -> int:
    """Parameters from the layer sizes: embedding, pooling projections + norms, blocks."""
    c = config.enc_channels
    total = config.in_channels * c[0] + c[0] + 2 * c[0] + c[0]  # linear, norm, mask token
    for s in range(1, len(c)):
        total += c[s - 1] * c[s] + c[s] + 2 * c[s]
    for s, depth in enumerate(config.enc_depths):
        cpe = 27 * c[s] ** 2 + c[s] + c[s] ** 2 + c[s] + 2 * c[s]
        attn = 3 * c[s] ** 2 + 3 * c[s] + c[s] ** 2 + c[s]
        mlp = 4 * c[s] ** 2 + 4 * c[s] + 4 * c[s] ** 2 + c[s]
        total += depth * (cpe + attn + mlp + 4 * c[s])
    return total


def test_small_state_dict_keys_and_shapes_are_official():
    with torch.device("meta"):
        model = PTv3Encoder(VARIANTS["small"])
    state = model.state_dict()
    assert set(state) == _design_keys(VARIANTS["small"])
    assert state["enc.enc3.block5.cpe.0.weight"].shape == (256, 3, 3, 3, 256)
    assert state["enc.enc3.block5.attn.qkv.weight"].shape == (768, 256)
    assert state["enc.enc3.block5.mlp.0.fc1.weight"].shape == (1024, 256)
    assert state["enc.enc4.down.proj.weight"].shape == (512, 256)


@pytest.mark.parametrize(
    ("variant", "released"), [("small", 38.7), ("base", 108.5), ("large", 207.7)]
)
def test_parameter_counts_match_the_release(variant, released):
    """The released sizes (M) are Concerto's ``{n / 1e6:.2f}`` print rounded again: 38.65 → 38.7."""
    with torch.device("meta"):
        count = sum(p.numel() for p in PTv3Encoder(VARIANTS[variant]).parameters())
    assert count == _parameter_count(VARIANTS[variant])
    assert abs(count / 1e6 - released) < 0.06


# --- (3) serialized patch attention -------------------------------------------------------------


def _reference_patches(counts, patch_size, per_cloud):
    """(members, number of real members) per patch, in serial positions, from the official rule:
    ``K`` shrinks to the cloud (flash) or the smallest cloud (non-flash); a short last patch is
    filled with the last positions of the patch before it."""
    shared = min(patch_size, *counts)
    patches, start = [], 0
    for n in counts:
        k = min(patch_size, n) if per_cloud else shared
        chunks = [list(range(start + i, start + min(i + k, n))) for i in range(0, n, k)]
        real = len(chunks[-1])
        if real < k:
            chunks[-1] += chunks[-2][real - k :]
        patches += [(chunk, k) for chunk in chunks[:-1]] + [(chunks[-1], real)]
        start += n
    return patches


def _brute_force_attention(w, prefix, heads, x, order, counts, patch_size, per_cloud):
    """Attention of ``x`` ``(N, C)`` with float64 weights ``w[prefix + "qkv.weight"]`` etc.:
    per patch and head an explicit softmax; every voxel keeps the output of its own patch."""
    x = x.double()
    channels = x.shape[1]
    dim = channels // heads
    qkv = x @ w[prefix + "qkv.weight"].T + w[prefix + "qkv.bias"]
    out = torch.zeros_like(x)
    for members, real in _reference_patches(counts, patch_size, per_cloud):
        points = order[torch.tensor(members)]
        for h in range(heads):
            q, k, v = (
                qkv[points, t * channels + h * dim : t * channels + (h + 1) * dim] for t in range(3)
            )
            logits = q @ k.T * dim**-0.5
            weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            out[points[:real], h * dim : (h + 1) * dim] = (weights @ v)[:real]
    return out @ w[prefix + "proj.weight"].T + w[prefix + "proj.bias"]


def _float64(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.double() for key, value in module.state_dict().items()}


@pytest.mark.parametrize(
    ("counts", "per_cloud"),
    [((150,), True), ((128,), True), ((40,), True), ((150, 40), True), ((150, 40), False),
     ((200, 70, 90), False), ((200, 70, 90), True)],
)  # fmt: skip
def test_patch_attention_matches_brute_force(counts, per_cloud):
    patch_size, channels = 64, 16
    attn = _randomise(SerializedAttention(channels, 2, qkv_bias=True, qk_scale=None, upcast=False))
    generator = torch.Generator().manual_seed(len(counts))
    n = sum(counts)
    batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    batch = batch[torch.randperm(n, generator=generator)]
    order = torch.cat(
        [
            members[torch.randperm(len(members), generator=generator)]
            for members in (torch.nonzero(batch == b).squeeze(1) for b in range(len(counts)))
        ]
    )
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    x = torch.randn(n, channels, generator=generator)
    with torch.no_grad():
        ours = attn(x, order, inverse, patch_layout(counts, patch_size, per_cloud))
    expected = _brute_force_attention(
        _float64(attn), "", 2, x, order, counts, patch_size, per_cloud
    )
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_post_norm_block_with_layer_scale():
    """``pre_norm=False``: norms after the residual sums; layer scale multiplies each branch."""
    config = dataclasses.replace(TINY, pre_norm=False, layer_scale=0.5)
    block = _randomise(Block(config, stage=0))
    voxels = _voxels((100,))
    neighbours = neighbour_index(voxels["grid_coord"], None)
    order = torch.argsort(voxels["grid_coord"] @ torch.tensor([576, 24, 1]))
    inverse = torch.argsort(order)
    layout = patch_layout([100], 64, per_cloud=True)
    x = torch.randn(100, 16)
    with torch.no_grad():
        ours = block(x, neighbours, order, inverse, layout)
        conv, linear, norm = block.cpe
        x = x + norm(linear(conv(x, neighbours)))
        x = block.norm1(x + block.attn(x, order, inverse, layout) * block.ls1[0].gamma)
        expected = block.norm2(x + block.mlp(x) * block.ls2[0].gamma)
    torch.testing.assert_close(ours, expected)
    assert {"ls1.0.gamma", "ls2.0.gamma"} <= set(block.state_dict())


# --- (4) grid pooling ---------------------------------------------------------------------------


def _reference_pool(w, prefix, feat, coord, grid, batch, stride):
    """Dict-based pooling: cells ``(batch, grid // stride)`` in sorted order, max of the
    projected features, mean coordinate, then LayerNorm and GELU (float64)."""
    cells: dict[tuple[int, ...], list[int]] = {}
    for i, (b, cell) in enumerate(zip(batch.tolist(), grid.tolist(), strict=True)):
        cells.setdefault((b, *(c // stride for c in cell)), []).append(i)
    keys = sorted(cells)
    projected = feat.double() @ w[prefix + "proj.weight"].T + w[prefix + "proj.bias"]
    maxed = torch.stack([projected[cells[key]].max(dim=0).values for key in keys])
    norm_w, norm_b = w[prefix + "norm.0.weight"], w[prefix + "norm.0.bias"]
    pooled = F.gelu(F.layer_norm(maxed, norm_w.shape, norm_w, norm_b))
    mean = torch.stack([coord[cells[key]].double().mean(dim=0) for key in keys])
    slot = {key: j for j, key in enumerate(keys)}
    parent = torch.empty(len(grid), dtype=torch.long)
    for key, members in cells.items():
        parent[members] = slot[key]
    new_grid = torch.tensor([key[1:] for key in keys])
    return pooled, mean, new_grid, torch.tensor([key[0] for key in keys]), parent


def test_grid_pooling_matches_dict_reference():
    pool = _randomise(GridPooling(8, 12, stride=2))
    voxels = _voxels((120, 80), extent=10, seed=3)
    feat = torch.randn(200, 8, generator=torch.Generator().manual_seed(4))
    level = Level(feat, voxels["coord"], voxels["grid_coord"], voxels["batch"], None)
    with torch.no_grad():
        pooled = pool(level)
    fields = ("coord", "grid_coord", "batch")
    expected = _reference_pool(_float64(pool), "", feat, *(voxels[k] for k in fields), stride=2)
    torch.testing.assert_close(pooled.feat.double(), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled.coord.double(), expected[1])
    assert torch.equal(pooled.grid_coord, expected[2])
    assert torch.equal(pooled.batch, expected[3])
    assert torch.equal(pooled.parent_inverse, expected[4])


def _reference_encoder(w, config, voxels, seed):
    """The whole encoder from the official semantics with float64 state-dict weights."""
    x = voxels["feat"].double() @ w["embedding.stem.linear.weight"].T
    x = x + w["embedding.stem.linear.bias"]
    norm_w, norm_b = w["embedding.stem.norm.weight"], w["embedding.stem.norm.bias"]
    x = F.gelu(F.layer_norm(x, norm_w.shape, norm_w, norm_b))
    coord, grid, batch = voxels["coord"], voxels["grid_coord"], voxels["batch"]
    generator = torch.Generator().manual_seed(seed)
    features = []
    for s, depth in enumerate(config.enc_depths):
        if s > 0:
            x, coord, grid, batch, _ = _reference_pool(
                w, f"enc.enc{s}.down.", x, coord, grid, batch, config.stride[s - 1]
            )
        rows = serialize(grid, batch, config.order, shuffle=True, generator=generator).order
        nbr = neighbour_index(grid, batch)
        counts = torch.bincount(batch).tolist()
        heads, size = config.enc_num_head[s], config.enc_patch_size[s]

        def ln(t, key):
            return F.layer_norm(t, t.shape[1:], w[key + ".weight"], w[key + ".bias"])

        for i in range(depth):
            b = f"enc.enc{s}.block{i}."
            kernel = w[b + "cpe.0.weight"].flatten(1, 3)  # (C, 27, C)
            gathered = torch.where((nbr >= 0)[..., None], x[nbr.clamp(min=0)], 0.0)
            conv = torch.einsum("njc,ojc->no", gathered, kernel) + w[b + "cpe.0.bias"]
            x = x + ln(conv @ w[b + "cpe.1.weight"].T + w[b + "cpe.1.bias"], b + "cpe.2")
            order = rows[i % len(config.order)]
            y = ln(x, b + "norm1.0")
            x = x + _brute_force_attention(w, b + "attn.", heads, y, order, counts, size, True)
            y = F.gelu(ln(x, b + "norm2.0") @ w[b + "mlp.0.fc1.weight"].T + w[b + "mlp.0.fc1.bias"])
            x = x + y @ w[b + "mlp.0.fc2.weight"].T + w[b + "mlp.0.fc2.bias"]
        features.append(x)
    return features


def test_encoder_matches_reference_end_to_end():
    """Two clouds (one smaller than a patch), patches padded at every stage."""
    model = _model(dataclasses.replace(TINY, enc_patch_size=(48, 40, 32, 16, 8)))
    voxels = _voxels((250, 30), seed=8)
    expected = _reference_encoder(_float64(model), model.config, voxels, seed=5)
    for level, reference in zip(_encode(model, voxels, seed=5), expected, strict=True):
        torch.testing.assert_close(level.feat.double(), reference, atol=1e-4, rtol=1e-4)


# --- (5) features back at the input voxels ------------------------------------------------------


def _chain(channels, sizes, seed=0):
    """Synthetic levels with random features and random pooling maps onto every coarser voxel."""
    generator = torch.Generator().manual_seed(seed)
    levels = []
    for s, (c, n) in enumerate(zip(channels, sizes, strict=True)):
        parent = None
        if s > 0:
            parent = torch.cat(
                [torch.arange(n), torch.randint(0, n, (sizes[s - 1] - n,), generator=generator)]
            )
            parent = parent[torch.randperm(sizes[s - 1], generator=generator)]
        feat = torch.randn(n, c, generator=generator)
        levels.append(
            Level(
                feat,
                torch.zeros(n, 3),
                torch.zeros(n, 3, dtype=torch.long),
                torch.zeros(n, dtype=torch.long),
                parent,
            )
        )
    return levels


def test_features_at_input_channels_and_order():
    levels = _chain(VARIANTS["large"].enc_channels, (9, 7, 5, 3, 2))
    assert features_at_input(levels).shape == (9, 1728)
    demo = features_at_input(levels, (2, 3, 4))
    assert demo.shape == (9, 1536)
    for i in range(9):
        point, expected = i, {}
        for s in range(5):
            if s > 0:
                point = int(levels[s].parent_inverse[point])
            expected[s] = levels[s].feat[point]
        assert torch.equal(demo[i], torch.cat([expected[2], expected[3], expected[4]]))
        assert torch.equal(features_at_input(levels, [1])[i], expected[1])


@pytest.mark.parametrize("use_levels", [(), (3, 2), (2, 2), (5,), (-1,)])
def test_features_at_input_rejects_bad_levels(use_levels):
    with pytest.raises(UserError, match="use_levels"):
        features_at_input(_chain((4, 4, 4, 4, 4), (5, 4, 3, 2, 1)), use_levels)


def test_encoder_levels_shapes():
    voxels = _voxels((300,))
    levels = _encode(_model(), voxels)
    assert [level.feat.shape[1] for level in levels] == list(TINY.enc_channels)
    assert levels[0].parent_inverse is None
    for coarse, fine in zip(levels[1:], levels[:-1], strict=True):
        assert coarse.parent_inverse.shape == (fine.feat.shape[0],)
    assert torch.equal(levels[0].grid_coord, voxels["grid_coord"])
    assert torch.equal(levels[1].grid_coord, torch.unique(voxels["grid_coord"] // 2, dim=0))
    assert features_at_input(levels).shape == (300, sum(TINY.enc_channels))


@pytest.mark.parametrize(
    ("change", "match"),
    [({"feat": torch.zeros(300, 6)}, "feat"),
     ({"grid_coord": torch.full((300, 3), -1)}, "grid_coord"),
     ({"batch": torch.full((300,), 1)}, "batch"),
     ({"grid_coord": torch.zeros(300, 3, dtype=torch.long)}, "duplicate")],
)  # fmt: skip
def test_encoder_rejects_bad_inputs(change, match):
    with pytest.raises(UserError, match=match):
        _encode(PTv3Encoder(TINY), {**_voxels((300,)), **change})


# --- (6) determinism and order shuffling --------------------------------------------------------


def _same(a: list[Level], b: list[Level]) -> list[bool]:
    return [torch.equal(x.feat, y.feat) for x, y in zip(a, b, strict=True)]


def test_seeded_generator_is_reproducible_and_shuffle_changes_orders():
    model, voxels = _model(), _voxels((600,))
    first = _encode(model, voxels, seed=1)
    assert all(_same(first, _encode(model, voxels, seed=1)))
    assert not all(all(_same(first, _encode(model, voxels, seed=s))) for s in range(2, 5))
    torch.manual_seed(7)
    global_draw = _encode(model, voxels, seed=None)
    torch.manual_seed(7)
    assert all(_same(global_draw, _encode(model, voxels, seed=None)))


def test_without_shuffle_orders_only_stage_zero_is_fixed():
    """Official quirk: GridPooling re-serialises with shuffling on whatever shuffle_orders says."""
    model = _model(dataclasses.replace(TINY, shuffle_orders=False))
    voxels = _voxels((600,))
    first = _encode(model, voxels, seed=1)
    runs = [_encode(model, voxels, seed=s) for s in range(2, 6)]
    assert all(_same(first, run)[0] for run in runs)
    assert not all(_same(first, run)[1] for run in runs)


def test_block_i_attends_along_serialisation_row_i_mod_orders(monkeypatch):
    """Stage 0 serialises once (shuffled rows); block ``i`` reads row ``i % 4`` of it."""
    model = _model(dataclasses.replace(TINY, enc_depths=(6, 1, 1, 1, 1)))
    seen = []
    original = Block.forward

    def recording(block, x, neighbours, order, inverse, layout):
        seen.append(order)
        return original(block, x, neighbours, order, inverse, layout)

    monkeypatch.setattr(Block, "forward", recording)
    voxels = _voxels((200,))
    _encode(model, voxels, seed=4)
    generator = torch.Generator().manual_seed(4)
    rows = serialize(
        voxels["grid_coord"], voxels["batch"], ORDERS, shuffle=True, generator=generator
    )
    assert not torch.equal(rows.order[0], rows.order[1])
    for i in range(6):
        assert torch.equal(seen[i], rows.order[i % 4])


def test_flash_semantics_encode_each_cloud_as_if_alone():
    """Per-cloud patches, pooling and convolution: a cloud's features do not depend on the other
    clouds of its batch (the order shuffles draw once per serialisation, batch or not)."""
    model, big, small = _model(), _voxels((500,), seed=2), _voxels((40,), seed=5)
    is_small = torch.zeros(540, dtype=torch.bool)
    is_small[torch.randperm(540, generator=torch.Generator().manual_seed(6))[:40]] = True
    together = {}
    for key in big:
        together[key] = big[key].new_empty((540, *big[key].shape[1:]))
        together[key][~is_small], together[key][is_small] = big[key], small[key]
    together["batch"][is_small] = 1
    for s, (a, b) in enumerate(zip(_encode(model, together), _encode(model, big), strict=True)):
        rows = ~is_small if s == 0 else a.batch == 0
        torch.testing.assert_close(a.feat[rows], b.feat, atol=1e-5, rtol=1e-5)


# --- (7) CUDA ------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model, voxels = _model(), _voxels((600, 90))
    cpu = _encode(model, voxels)
    cuda = _encode(model.cuda(), {k: v.cuda() for k, v in voxels.items()})
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(b.feat.cpu(), a.feat, atol=1e-4, rtol=1e-4)
        assert torch.equal(b.grid_coord.cpu(), a.grid_coord)
