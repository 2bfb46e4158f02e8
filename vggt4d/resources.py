"""Device, dtype and a memory estimate taken before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from vggt4d.errors import UserError

DTYPE_OF = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1024**3

BLOCK_ACTIVATION_FACTOR = 16
"""Live values per backbone token and channel at a block's peak (x, qkv, attention output, 4×
MLP hidden, residuals, the four kept out-layer features at 2× width)."""

HEAD_ACTIVATION_FACTOR = 2.5
"""Live fp32 values per pixel and head feature channel at the DPT head's peak (measured on CPU:
2.0 for da3-small at 12 frames and da3-base at 8 frames, 2.7 for da3-small at 4 frames)."""

FORWARD_OVERHEAD_BYTES = GIB // 4
"""Fixed cost of a forward whatever its size (thread pools, allocator slack; measured ≈ 0.15 GiB
RSS growth beyond the formula for small clips on CPU)."""

RUNTIME_OVERHEAD_BYTES = GIB // 2
"""Python, torch and the DA3 package themselves (measured ≈ 0.4 GiB RSS after import on CPU)."""


def resolve_device(name: str, job_num: int = 0) -> torch.device:
    """``auto``: CUDA when available — with several GPUs, sweep job n gets GPU n mod count —
    else CPU; anything else is a torch device string."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", job_num % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device='{name}' is not a torch device "
                        f"(use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device='{name}' but CUDA is not available here; use device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (CPU bf16 kernels are slow or missing)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_OF[name]


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a hooked DA3 forward needs: weights + peak activations + captured tensors."""

    weights: int
    activations: int
    captured: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.captured + RUNTIME_OVERHEAD_BYTES


def estimate_forward_memory(
    *, num_params: int, frames: int, height: int, width: int, embed_dim: int,
    head_features: int, dtype: torch.dtype, captured_bytes: int = 0,
) -> MemoryEstimate:
    """Weights (fp32 storage) + activations of one forward over the whole clip.

    activations = bytes(dtype)·T·(1 + h·w)·C·16 + 4·T·H·W·F·2.5 + 0.25 GiB, with C the embed
    width and F the head features: the backbone keeps every frame's tokens (global blocks see the
    whole clip); DA3 runs its DPT head in fp32 whatever the autocast dtype.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = frames * (1 + (height // 14) * (width // 14))
    head = 4 * frames * height * width * head_features * HEAD_ACTIVATION_FACTOR
    activations = int(itemsize * tokens * embed_dim * BLOCK_ACTIVATION_FACTOR + head
                      + FORWARD_OVERHEAD_BYTES)
    return MemoryEstimate(weights=4 * num_params, activations=activations, captured=captured_bytes)


def check_memory(estimate: MemoryEstimate, available: int, what: str) -> None:
    """Refuse (before loading the model) when the estimate exceeds ``available`` bytes."""
    if estimate.total > available:
        raise UserError(
            f"{what} needs about {estimate.total / GIB:.1f} GiB (weights "
            f"{estimate.weights / GIB:.1f}, activations {estimate.activations / GIB:.1f}, captured "
            f"{estimate.captured / GIB:.1f}) but {available / GIB:.1f} GiB is available; lower "
            f"data.max_frames or process_res, or choose a smaller model"
        )
