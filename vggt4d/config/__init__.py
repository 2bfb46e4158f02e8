"""The run configuration: one schema per config group (this package's modules), composed by
Hydra from ``conf/`` and checked by :func:`validate` before anything heavy runs."""

from vggt4d.config.root import (
    MAX_SEED,
    PATCH_SIZE,
    RunConfig,
    StageName,
    register_configs,
    validate,
)

register_configs()

__all__ = ["MAX_SEED", "PATCH_SIZE", "RunConfig", "StageName", "register_configs", "validate"]
