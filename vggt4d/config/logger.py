"""``logger=``: experiment tracking (:mod:`vggt4d.tracking`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class LoggerKind(StrEnum):
    wandb = "wandb"
    none = "none"


class LoggerMode(StrEnum):
    """W&B: ``offline`` (files under the job, ``wandb sync`` later), ``online``, ``disabled``."""

    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb
    mode: LoggerMode = LoggerMode.offline
    project: str = "vggt4d"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    background: bool = True
    """Write the run from a background thread (overlaps the next sweep job)."""
