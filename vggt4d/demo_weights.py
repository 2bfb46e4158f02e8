"""The built-in demo checkpoint (``model.weights=demo``): hand-built da3-small weights whose
attention sees the synthetic scene's moving object, so the demo finds it end to end.

These are not trained weights: depth and cameras from them mean nothing. They exist so that a
newcomer (``make demo``, ``experiment=demo``) sees the method work on the embedded scene, and so
a test can pin the whole chain. Every block's attention and MLP branches are switched off
(layer scale 0), so the residual stream keeps the patch embedding, which carries each patch's
mean colour plus two large constant channels (they make LayerNorm act as a fixed scaling);
block 0's MLP writes an object indicator ι = clamp((0.3 − (G + B)) / 0.15, 0, 1) — the red
sphere is the only place where green + blue is that low — into one channel; three blocks before
qk-norm and RoPE get Q/K rows reading ι and colour (``experiment=demo`` points the bands at
them):
- shallow (block 2): q = ι·e1, k = ι·e1 + (1 − ι)·e2 → low S^KK and high V^QK on the object;
- middle (block 3): q = k = ι·e1 + (1 − ι)·e2 → low S^QQ on the object;
- deep (block 1): q = (1 + ι/2)·e1 + 24·(G − B)·e2 → high S^QQ, low V^QQ on the object (whose
  G − B is 0 while the room's varies).
"""

from __future__ import annotations

import math

import torch

from vggt4d.errors import UserError
from vggt4d.frames import IMAGENET_MEAN, IMAGENET_STD

DEMO_WEIGHTS = "demo"
"""``model.weights`` value of the built-in demo checkpoint."""
DEMO_MODEL = "da3-small"

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
    """Write the demo weights (module docstring) into a da3-small network, in place."""
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


def check_demo_model(model_name: str) -> None:
    """The demo weights exist for da3-small only."""
    if model_name != DEMO_MODEL:
        raise UserError(f"model.weights={DEMO_WEIGHTS} are hand-built {DEMO_MODEL} weights: use "
                        f"model={DEMO_MODEL} (or experiment=demo)")
