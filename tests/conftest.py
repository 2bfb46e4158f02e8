"""Shared fixtures: a seeded random-weight da3-small and small clips."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never reachable from tests


@pytest.fixture(scope="session")
def small_net():
    from vggt4d.model import build_network

    torch.manual_seed(0)
    return build_network("da3-small")


@pytest.fixture
def clip_images():
    """(1, 4, 3, 98, 70) normalised-looking images: a non-square 7×5 patch grid."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 3, 98, 70, generator=generator)
