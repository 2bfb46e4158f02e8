"""``cluster.*``: resources of one sweep job for ``hydra/launcher=slurm`` (and ``local``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    """Resources of one sweep job for ``hydra/launcher=slurm`` (and ``local``, joblib); null
    means automatic, planned from ``sinfo`` and the jobs' configs (:mod:`vggt4d.cluster`)."""

    partition: str | None = None
    """Slurm partition; null = the cluster's default partition."""
    gpus_per_job: int | None = None
    """null = 1 when the jobs use CUDA (device=cuda, or device=auto on a partition with GPUs),
    else none; CPU jobs never request GPUs."""
    cpus_per_job: int | None = None
    """null = an equal share of a node among the array tasks running at once, at most 8."""
    mem_gb: int | None = None
    """null = 1.25 × the largest job's memory estimate (the DA3 forward on CPU; weights and
    buffers with CUDA), at least 2."""
    time_limit_min: int = 120
    array_parallelism: int = 8
    """Array tasks running at once."""
    local_jobs: int = 1
    """Parallel jobs of ``hydra/launcher=local``: one per GPU when several (device=auto gives
    job n the GPU n mod count)."""

    def check(self) -> None:
        """Refuse counts that no scheduler can grant (one line naming the setting)."""
        from vggt4d.errors import UserError

        for name, low, automatic in (("gpus_per_job", 0, True), ("cpus_per_job", 1, True),
                                     ("mem_gb", 1, True), ("time_limit_min", 1, False),
                                     ("array_parallelism", 1, False), ("local_jobs", 1, False)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"cluster.{name}={value} must be >= {low}"
                                + (" (or null = automatic)" if automatic else ""))
