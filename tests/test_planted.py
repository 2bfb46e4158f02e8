"""End to end with a planted answer: DA3-small weights whose attention sees the object's colour.

The weights are built by hand so that the VGGT4D cues must light up exactly on the synthetic
scene's red sphere: every block's attention and MLP branches are switched off (layer scale 0), so
the residual stream keeps the patch embedding, which carries each patch's mean colour plus two
large constant channels (they make LayerNorm act as a fixed scaling); block 0's MLP writes an
object indicator ι = clamp((0.3 − (G + B)) / 0.15, 0, 1) — the sphere is the only place where
green + blue is that low — into one channel; three blocks before qk-norm and RoPE get Q/K rows
reading ι and colour (the bands point at them):
- shallow (block 2): q = ι·e1, k = ι·e1 + (1 − ι)·e2 → low S^KK and high V^QK on the object;
- middle (block 3): q = k = ι·e1 + (1 − ι)·e2 → low S^QQ on the object;
- deep (block 1): q = (1 + ι/2)·e1 + 24·(G − B)·e2 → high S^QQ, low V^QQ on the object (whose
  G − B is 0 while the room's varies).
Block 3, the strongest cue, runs after DA3 moved its reference view first (the ``middle``
strategy forces a reordering: identical class tokens would make the default pick frame 0), and
the object moves fast, so frames out of order would put masks on the wrong frames.
The run goes through the hub checkpoint layout, preprocessing, the hook, the Gram engine, maps,
upsampling, multi-Otsu and evaluation: a transposed grid, a wrong token offset, a frame-order or
an upsampling mistake breaks the IoU.
"""

from __future__ import annotations

import json
import math

import torch
from hydra import compose, initialize_config_module

from vggt4d.frames import IMAGENET_MEAN, IMAGENET_STD
from vggt4d.model import build_network, save_hub_checkpoint
from vggt4d.run import run_job

BIG = 100.0
IOTA = 5
SHARPNESS = 20.0  # GELU(s·y)/s ≈ relu(y)
INDICATOR = (0, 0, 0, 1, 0.0)  # rows: (a_R, a_G, a_B, a_iota, bias) in [0, 1] colour units
COMPLEMENT = (0, 0, 0, -1, 1.0)
SHALLOW, MIDDLE, DEEP = 2, 3, 1
PLANTED = {
    SHALLOW: ([INDICATOR], [INDICATOR, COMPLEMENT]),
    MIDDLE: ([INDICATOR, COMPLEMENT], [INDICATOR, COMPLEMENT]),
    DEEP: ([(0, 0, 0, 0.5, 1.0), (0, 24.0, -24.0, 0, 0.0)], []),
}


def plant(net: torch.nn.Module, low: float = 0.3, width: float = 0.15) -> torch.nn.Module:
    vit = net.backbone.pretrained
    dim = vit.embed_dim
    kappa = 1.0 / math.sqrt(2 * BIG**2 / dim)  # LayerNorm(x)_c ≈ kappa·x_c for small channels

    def read(row):
        """Weights on LayerNorm channels and bias for a·(R, G, B, ι) + b."""
        weight = torch.zeros(dim)
        for c in range(3):
            weight[c] = row[c] * IMAGENET_STD[c] / kappa
        weight[IOTA] = row[3] / kappa
        return weight, row[4] + sum(row[c] * IMAGENET_MEAN[c] for c in range(3))

    with torch.no_grad():
        vit.pos_embed.zero_()
        proj = vit.patch_embed.proj
        proj.weight.zero_()
        proj.bias.zero_()
        for c in range(3):
            proj.weight[c, c] = 1.0 / (14 * 14)
        proj.bias[3], proj.bias[4] = BIG, -BIG
        for block in vit.blocks:
            for module in (block.ls1, block.ls2):
                module.gamma.zero_()
            for norm in (block.norm1, block.norm2):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
        mlp = vit.blocks[0].mlp
        for layer in (mlp.fc1, mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
        weight, bias = read((0, -1 / width, -1 / width, 0, low / width))
        for unit, shift in ((0, 0.0), (1, -1.0)):  # clamp(y, 0, 1) = relu(y) − relu(y − 1)
            mlp.fc1.weight[unit] = SHARPNESS * weight
            mlp.fc1.bias[unit] = SHARPNESS * (bias + shift)
        mlp.fc2.weight[IOTA, 0], mlp.fc2.weight[IOTA, 1] = 1 / SHARPNESS, -1 / SHARPNESS
        vit.blocks[0].ls2.gamma[IOTA] = 1.0
        for layer, (q_rows, k_rows) in PLANTED.items():
            qkv = vit.blocks[layer].attn.qkv
            qkv.weight.zero_()
            qkv.bias.zero_()
            for base, rows in ((0, q_rows), (dim, k_rows)):
                for j, row in enumerate(rows):
                    qkv.weight[base + j], qkv.bias[base + j] = read(row)
    return net


def test_planted_weights_find_the_moving_object_end_to_end(tmp_path):
    torch.manual_seed(0)
    save_hub_checkpoint(plant(build_network("da3-small")), tmp_path / "planted", "da3-small")
    overrides = [
        "model=da3-small", f"model.weights={tmp_path / 'planted'}", "data.num_frames=8",
        "data.object_speed=2.5", "model.ref_view_strategy=middle",
        f"bands.shallow=[{SHALLOW},{SHALLOW}]", f"bands.middle=[{MIDDLE},{MIDDLE}]",
        f"bands.deep=[{DEEP},{DEEP}]", "gram.layers=[1,2,3]",
        "pipeline=[predict,gram,maps,masks,eval]", f"cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_job(cfg, tmp_path / "job")
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    # The issue's bar is 0.5; this construction scores 0.83, and leaving DA3's frame order in
    # place drops it to 0.56, so the bar here is 0.7.
    assert metrics["JM"] >= 0.7, metrics
    assert metrics["JR"] >= 0.5, metrics
    assert len(list((tmp_path / "job" / "masks").glob("dynamic_*.png"))) == 8
