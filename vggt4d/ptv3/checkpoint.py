"""Save and load PTv3 encoder checkpoints in the released Concerto layout.

A released checkpoint (``Pointcept/Concerto`` on the Hugging Face hub, ``<name>.pth``) is a
``torch.save``'d dict ``{"config": <PointTransformerV3 keyword arguments>, "state_dict": ...}``
that Concerto's ``load`` reads with ``torch.load(weights_only=True)`` and passes to
``PointTransformerV3(**config).load_state_dict(state_dict)`` — strict, with no key prefix. The
config holds only plain values (numbers, strings, tuples, ``None``), so ``weights_only`` loading
works here as well.

Loading is strict and explained in one line: missing / unexpected keys, shape mismatches, and
config fields that differ from the chosen variant. Only the fields of
:data:`vggt4d.ptv3.model.RUNTIME_FIELDS` (patch size, flash semantics, order shuffling,
precision, dropout / drop-path, decoder settings) may differ from the variant or be overridden:
they leave the weights and the trained network unchanged. Every other field must match.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from vggt4d.errors import UserError
from vggt4d.io import atomic_write
from vggt4d.ptv3.model import RUNTIME_FIELDS, VARIANTS, PTv3Config, PTv3Encoder

__all__ = [
    "HUB_REPO",
    "RELEASED",
    "check_checkpoint",
    "load_encoder",
    "resolve_checkpoint",
    "save_checkpoint",
]

#: Hugging Face hub repository of the released Concerto checkpoints.
HUB_REPO = "Pointcept/Concerto"

#: Released checkpoint names (``<name>.pth`` in :data:`HUB_REPO`) and their variants.
RELEASED = {"concerto_small": "small", "concerto_base": "base", "concerto_large": "large"}

#: Where the ``concerto`` package's own ``load`` keeps the released checkpoints it downloads.
CONCERTO_CACHE = Path("~/.cache/concerto/ckpt")

#: Most keys or fields named in one error line before "and N more".
SHOWN = 5


def save_checkpoint(path: str | Path, model: PTv3Encoder, config: PTv3Config | None = None) -> Path:
    """Write ``{"config": config.to_official(), "state_dict": model.state_dict()}`` atomically.

    ``config`` defaults to ``model.config``; a different one may only change run-time fields.
    Tensors are saved on the CPU.
    """
    config = model.config if config is None else config
    _check_fields(config, model.config, "the config to save", "the model's config",
                  "to save vs model's")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    checkpoint = {"config": config.to_official(), "state_dict": state}
    return atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def load_encoder(
    source: str | Path,
    variant: str,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, object] | None = None,
) -> PTv3Encoder:
    """Build the encoder of ``variant`` from a checkpoint, in eval mode on ``device``.

    Args:
        source: a local ``.pth`` file, or a released name (:data:`RELEASED`) downloaded from the
            hub (or taken from the hub cache).
        variant: a key of :data:`vggt4d.ptv3.model.VARIANTS` the checkpoint must match.
        device: where the weights go.
        overrides: official config fields to change, run-time fields only (for example
            ``{"enable_flash": False, "enc_patch_size": [256] * 5}``).

    The network is built on the meta device and takes the checkpoint's tensors, so no memory
    is spent on an initialisation that loading would overwrite. Floating-point tensors become
    float32 (Concerto's ``load`` copies them into float32 parameters the same way), whatever
    precision the file stores.
    """
    config, state = _checked(source, variant, overrides, mmap=False)
    with torch.device("meta"):
        model = PTv3Encoder(config)
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def check_checkpoint(
    source: str | Path, variant: str, overrides: Mapping[str, object] | None = None
) -> Path:
    """Everything :func:`load_encoder` checks (config, keys, shapes) without reading the weights
    into memory (the file is memory-mapped); returns the local file. Lets a run refuse a bad
    checkpoint before hours of other work."""
    path = resolve_checkpoint(source)
    _checked(path, variant, overrides, mmap=True)
    return path


def _checked(
    source: str | Path, variant: str, overrides: Mapping[str, object] | None, mmap: bool
) -> tuple[PTv3Config, dict[str, Tensor]]:
    """The config (``overrides`` applied) and state dict of a checkpoint that fits ``variant``."""
    if variant not in VARIANTS:
        raise UserError(f"unknown PTv3 variant {variant!r}; expected one of {sorted(VARIANTS)}")
    path = resolve_checkpoint(source)
    checkpoint = _read(path, mmap)
    config = PTv3Config.from_official(checkpoint["config"])
    _check_fields(config, VARIANTS[variant], f"checkpoint {path}", f"variant {variant!r}",
                  "checkpoint vs variant")
    config = _override(config, overrides or {})
    with torch.device("meta"):
        model = PTv3Encoder(config)
    return config, _check_state(checkpoint["state_dict"], model, path)


def resolve_checkpoint(source: str | Path) -> Path:
    """The local file for ``source``: an existing path, or a released name, taken from the
    ``concerto`` package's download folder (:data:`CONCERTO_CACHE`) or the hub (cached)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source)
    if name not in RELEASED:
        raise UserError(
            f"PTv3 checkpoint {name} is neither a file nor a released name ({', '.join(RELEASED)})"
        )
    from vggt4d.hub import hub_folder

    filename = f"{name}.pth"
    fetched_by_concerto = CONCERTO_CACHE.expanduser() / filename
    if fetched_by_concerto.is_file():
        return fetched_by_concerto
    folder = hub_folder(HUB_REPO, [filename], filename,
                        f"download https://huggingface.co/{HUB_REPO}/resolve/main/{filename} "
                        f"and pass its local path (latent.weights=/path/to/{filename})")
    return folder / filename


def _read(path: Path, mmap: bool = False) -> dict:
    """The checkpoint dict at ``path`` (``weights_only`` unpickling, memory-mapped when asked
    and the file is in torch's zip format), shape-checked."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not (mmap and str(error).startswith("mmap can only be used")):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if reason.startswith("Weights only load failed"):
            reason = ("it holds Python objects besides tensors and plain values, which are not "
                      "unpickled for safety (a released Concerto checkpoint has none)")
        raise UserError(f"cannot read PTv3 checkpoint {path}: {reason}") from error
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise UserError(
            f"{path} is not a PTv3 checkpoint: expected a dict with 'config' and 'state_dict'"
        )
    return checkpoint


def _check_fields(config: PTv3Config, reference: PTv3Config, subject: str, against: str,
                  pair: str) -> None:
    """Raise unless ``config`` equals ``reference`` outside the run-time fields. The message
    ``{subject} does not match {against} ({pair}): field a vs b, …`` names each differing field
    with both values, ``config``'s first (``pair`` says so, e.g. "checkpoint vs variant")."""
    differing = [
        f"{field.name} {getattr(config, field.name)} vs {getattr(reference, field.name)}"
        for field in dataclasses.fields(PTv3Config)
        if field.name not in RUNTIME_FIELDS
        and getattr(config, field.name) != getattr(reference, field.name)
    ]
    if differing:
        raise UserError(f"{subject} does not match {against} ({pair}): {_listing(differing)}")


def _override(config: PTv3Config, overrides: Mapping[str, object]) -> PTv3Config:
    """``config`` with run-time ``overrides`` applied (other fields raise :class:`UserError`)."""
    fixed = sorted(name for name in overrides if name not in RUNTIME_FIELDS)
    if fixed:
        raise UserError(
            f"cannot override {', '.join(fixed)}: only run-time fields can change at load time "
            f"({', '.join(sorted(RUNTIME_FIELDS))})"
        )
    return PTv3Config.from_official({**config.to_official(), **overrides})


def _check_state(state: object, model: PTv3Encoder, path: Path) -> dict[str, Tensor]:
    """``state`` when its keys and shapes are exactly the model's, else a one-line error."""
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: 'state_dict' must map parameter names to tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = [f"missing keys {_listing(missing)}" if missing else ""]
        problems.append(f"unexpected keys {_listing(unexpected)}" if unexpected else "")
        raise UserError(f"{path} does not fit the encoder: {'; '.join(filter(None, problems))}")
    wrong = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong:
        raise UserError(f"{path}: shape mismatch (checkpoint vs encoder): {_listing(wrong)}")
    return dict(state)


def _listing(items: list[str]) -> str:
    """The first :data:`SHOWN` items joined with commas, then "and N more"."""
    shown = ", ".join(items[:SHOWN])
    return shown if len(items) <= SHOWN else f"{shown} and {len(items) - SHOWN} more"
