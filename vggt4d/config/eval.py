"""``eval.*``: scoring masks against ground truth (:mod:`vggt4d.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vggt4d.errors import UserError


class Protocol(StrEnum):
    """Every convention of a mask benchmark at once (:func:`vggt4d.evaluate.protocol_rules`):
    ``davis2016`` (first/last frame left out, both-empty frames score 1), ``davis2017``
    (all frames, void 255 left out), ``vggt4d`` (all frames, an empty union scores J = 0)."""

    davis2016 = "davis2016"
    davis2017 = "davis2017"
    vggt4d = "vggt4d"


@dataclass
class EvalConfig:
    gt_path: str = ""
    """A DAVIS-style folder of ground-truth mask PNGs for real clips (synthetic: built in)."""
    protocol: Protocol = Protocol.davis2017
    bound_th: float = 0.008
    """Boundary tolerance: a fraction of the image diagonal, or pixels when >= 1."""

    def check(self) -> None:
        if not self.bound_th > 0 or (self.bound_th >= 1 and self.bound_th != int(self.bound_th)):
            raise UserError(f"eval.bound_th={self.bound_th} must be a fraction of the diagonal "
                            f"in (0, 1) or a whole number of pixels >= 1")
