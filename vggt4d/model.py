"""Build DA3 networks from their configs, check them against our depth table, load weights.

The network is built with ``depth_anything_3.cfg.create_object`` from the package's own YAML
(``depth_anything_3.api`` would import torchvision, which has no CPU build). Weights come from
``random`` (seeded init), a local directory in the hub layout (``config.json`` +
``model.safetensors``), a ``.safetensors`` file, or a hub repo id. Hub checkpoints prefix every
key with ``model.``; loading strips it and is strict.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from depth_anything_3.cfg import create_object, load_config
from depth_anything_3.registry import MODEL_REGISTRY
from safetensors.torch import load_file
from torch import nn

from vggt4d.config.model import ModelConfig
from vggt4d.errors import UserError
from vggt4d.hook import hooked_backbone, hooked_net, is_global_block

CHECKPOINT_PREFIX = "model."
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PRESET_OF_DINO = {
    "vits": "vit_small", "vitb": "vit_base", "vitl": "vit_large", "vitg": "vit_giant2",
}


def build_network(name: str, *, empty: bool = False) -> nn.Module:
    """The DA3 network ``name`` in eval mode; ``empty`` gives the shared meta-device copy (no
    memory, built once per process) for inspecting its structure — never run or modify it."""
    if empty:
        return _empty_network(name)
    return create_object(load_config(MODEL_REGISTRY[name])).eval()


@functools.cache
def _empty_network(name: str) -> nn.Module:
    with init_empty_weights():
        return create_object(load_config(MODEL_REGISTRY[name])).eval()


def depth_table(net: nn.Module, hooked_network: str) -> dict[str, object]:
    """The depth-table entries of :class:`ModelConfig` as read off a constructed network."""
    backbone = hooked_backbone(net, hooked_network)
    vit = backbone.pretrained
    return {
        "preset": PRESET_OF_DINO[backbone.name],
        "num_blocks": len(vit.blocks),
        "embed_dim": vit.embed_dim,
        "num_heads": vit.num_heads,
        "head_dim": vit.embed_dim // vit.num_heads,
        "alt_start": vit.alt_start,
        "global_blocks": [i for i in range(len(vit.blocks)) if is_global_block(i, vit.alt_start)],
        "out_layers": list(backbone.out_layers),
        "patch_start_idx": vit.patch_start_idx,
        "camera_head": getattr(hooked_net(net, hooked_network), "cam_dec", None) is not None,
    }


def check_depth_table(model: ModelConfig, net: nn.Module) -> None:
    """Raise when ``conf/model/<name>.yaml`` disagrees with the network DA3 builds."""
    try:
        actual = depth_table(net, model.hooked_network)
    except AttributeError as err:
        raise UserError(f"model.hooked_network='{model.hooked_network}' does not lead to a DA3 "
                        f"backbone in {model.name}: {err}") from None
    wrong = [f"{key}={getattr(model, key)} (network: {value})" for key, value in actual.items()
             if (list(getattr(model, key)) if isinstance(value, list) else getattr(model, key))
             != value]
    if wrong:
        raise UserError(f"model table for {model.name} does not match the network: "
                        + "; ".join(wrong))


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _read_checkpoint(path: Path, model_name: str) -> dict[str, torch.Tensor]:
    """State dict of a hub-layout directory or a ``.safetensors`` file, ``model.`` prefix kept."""
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        if not weights_file.is_file():
            raise UserError(f"model.weights={path}: no model.safetensors in that directory")
        if config_file.is_file():
            declared = json.loads(config_file.read_text()).get("model_name")
            if declared is not None and declared != model_name:
                raise UserError(f"model.weights={path} holds '{declared}' weights but "
                                f"model={model_name}; choose model={declared}")
        path = weights_file
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a bad file
        raise UserError(f"model.weights={path} is not a readable safetensors file "
                        f"({err})") from None


def _download(repo_id: str) -> Path:
    from vggt4d.hub import hub_folder

    return hub_folder(repo_id, ["config.json", "model.safetensors"], f"weights '{repo_id}'",
                      "use model.weights=random, or download config.json and model.safetensors "
                      "elsewhere and set model.weights=/local/dir")


def resolve_weights(weights: str) -> Path | None:
    """Local checkpoint path for ``weights`` (None for ``random`` and the built-in ``demo``),
    downloading hub ids."""
    if weights in ("random", "demo"):
        return None
    path = Path(weights).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(weights):
        return _download(weights)
    raise UserError(f"model.weights={weights}: no such file or directory (use a local "
                    f"checkpoint directory, a .safetensors file, a hub repo id, random or demo)")


def _alias_groups(net: nn.Module) -> list[set[str]]:
    """State-dict keys that name one shared tensor (DA3's DPT heads share their last convs)."""
    groups: dict[tuple, set[str]] = {}
    for key, value in net.state_dict(keep_vars=True).items():
        groups.setdefault((value.data_ptr(), value.shape, value.stride()), set()).add(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def load_weights(net: nn.Module, path: Path, model_name: str) -> None:
    """Load a checkpoint strictly into ``net``; missing or unexpected keys are listed.

    A checkpoint written with ``safetensors.save_model`` keeps one name per shared tensor; the
    other names of such a tensor are not reported missing.
    """
    state = _read_checkpoint(path, model_name)
    state = {key.removeprefix(CHECKPOINT_PREFIX): value for key, value in state.items()}
    expected = set(net.state_dict().keys())
    missing = expected - state.keys()
    for group in _alias_groups(net):
        present = group & state.keys()
        if present:
            missing -= group
            state.update({alias: state[next(iter(present))] for alias in group})
    missing = sorted(missing)
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit {model_name}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise UserError(f"checkpoint {path} does not fit {model_name}: {reason}") from None


def save_hub_checkpoint(net: nn.Module, directory: Path, model_name: str) -> None:
    """Write ``net`` in the official hub layout (used by tests and to export fine-tuned nets)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_name": model_name}))
    state = {CHECKPOINT_PREFIX + key: value.detach().clone().contiguous()
             for key, value in net.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def head_features(name: str) -> int:
    """Widest DPT head (``head.features``) of the variant, for the memory estimate."""
    def widths(node: object) -> list[int]:
        if not isinstance(node, dict):
            return []
        found = [node["head"]["features"]] if isinstance(node.get("head"), dict) else []
        return found + [w for value in node.values() for w in widths(value)]

    from omegaconf import OmegaConf

    config = OmegaConf.to_container(load_config(MODEL_REGISTRY[name]), resolve=True)
    return max(widths(config))


def memory_arguments(model: ModelConfig) -> dict:
    """The network's part of :func:`vggt4d.resources.estimate_forward_memory`'s arguments
    (parameter count, width, head features), from the network built on the meta device."""
    empty = build_network(model.name, empty=True)
    return {"num_params": parameter_count(empty),
            "embed_dim": depth_table(empty, model.hooked_network)["embed_dim"],
            "head_features": head_features(model.name)}
