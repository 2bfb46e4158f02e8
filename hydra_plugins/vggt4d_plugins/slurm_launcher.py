"""``hydra/launcher=slurm``: submitit's Slurm launcher, planned and watched.

Before submitting, every job's config is read for its device and memory needs and ``sinfo`` for
the partition's nodes: one request per array task that fits (:func:`vggt4d.cluster.plan_request`)
or a one-line refusal. While waiting, the array is followed with ``squeue`` and the result files
(:func:`vggt4d.cluster.watch`) instead of submitit's ``sacct`` polling, so a sweep ends with or
without Slurm accounting; tasks that never ran come back as failed job returns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)

EXECUTOR_INIT_KEYS = ("submitit_folder", "max_num_timeout")
"""Launcher settings that configure submitit's executor itself, not each job."""


def executor_parameters(params: dict[str, Any], request: Any) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords: the launcher's settings with the planned
    request in place; settings not shared by all submitit executors get the ``slurm_`` prefix,
    unset ones (None) are left to submitit's defaults."""
    generic = {f.name for f in dataclasses.fields(BaseQueueConf)}
    values = {key: value for key, value in params.items() if key not in EXECUTOR_INIT_KEYS}
    values.update(partition=request.partition, gpus_per_node=request.gpus or None,
                  cpus_per_task=request.cpus, mem_gb=request.mem_gb,
                  timeout_min=request.time_min)
    return {key if key in generic else f"slurm_{key}": value
            for key, value in values.items() if value is not None}


class ClusterSlurmLauncher(SlurmLauncher):
    """One Slurm array per batch of sweep jobs, with a request that fits and a wait that ends."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from vggt4d.cluster import Slurm, Task, plan_request, watch
        from vggt4d.config.cluster import ClusterConfig
        from vggt4d.errors import UserError

        assert self.config is not None and self.hydra_context is not None
        slurm = Slurm()
        cluster = ClusterConfig(
            partition=self.params.get("partition"), gpus_per_job=self.params.get("gpus_per_node"),
            cpus_per_job=self.params.get("cpus_per_task"), mem_gb=self.params.get("mem_gb"),
            time_limit_min=self.params["timeout_min"],
            array_parallelism=self.params["array_parallelism"])
        request = plan_request(cluster, [self.job_needs(o) for o in job_overrides], slurm.nodes())
        log.info("Slurm request: %s", request.describe())

        executor = submitit.AutoExecutor(
            folder=self.params["submitit_folder"], cluster="slurm",
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0))
        executor.update_parameters(**executor_parameters(self.params, request))
        nums = [initial_job_idx + index for index in range(len(job_overrides))]
        for num, overrides in zip(nums, job_overrides, strict=True):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        try:
            jobs = executor.map_array(
                self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(nums), nums,
                [f"job_id_for_{num}" for num in nums], [state] * len(nums))
        except submitit.core.utils.FailedJobError as err:
            reasons = [line.strip().removeprefix("sbatch: error: ")
                       for line in str(err).splitlines() if line.strip()]
            raise UserError(f"sbatch refused the jobs: {'; '.join(reasons)}") from None
        tasks = [Task(job.job_id, job.paths.result_pickle, num, job.paths.stderr)
                 for job, num in zip(jobs, nums, strict=True)]
        try:
            watch(tasks, slurm)
        except KeyboardInterrupt:
            slurm.cancel([task.task_id for task in tasks if not task.result.exists()])
            raise
        return [self.job_return(job, task, overrides)
                for job, task, overrides in zip(jobs, tasks, job_overrides, strict=True)]

    def job_needs(self, overrides: Sequence[str]) -> Any:
        """Device and memory needs of one job, from its composed and validated config."""
        from hydra_plugins.vggt4d_plugins.sweeper import job_config
        from vggt4d.cluster import job_needs
        from vggt4d.config import validate
        from vggt4d.sweeps import quiet

        assert self.config is not None and self.hydra_context is not None
        with quiet():
            run = validate(job_config(self.hydra_context.config_loader, self.config, overrides))
        return job_needs(run)

    @staticmethod
    def job_return(job: Any, task: Any, overrides: Sequence[str]) -> JobReturn:
        """The job's own return, or a failed one saying why there is none."""
        from vggt4d.errors import UserError

        if task.failure is not None:
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                             _return_value=UserError(task.failure))
        try:
            return job.results()[0]
        except Exception as err:  # submitit's own failure (the job could not even start)
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                             _return_value=err)
