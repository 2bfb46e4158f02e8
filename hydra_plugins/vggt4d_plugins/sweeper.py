"""``hydra/sweeper=vggt4d``: Hydra's basic sweeper (cartesian product of the sweep values),
checked and reported.

Before any job runs, every job's config is composed and validated (``vggt4d.config.validate``):
one bad value refuses the whole sweep with an ``error:`` line naming the job, exit status 2.
After the last job, each failed job is named (number, overrides, one-line error), exit status 1;
the finished jobs' folders stay.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

EXIT_REFUSED = 2
"""Status of a sweep refused before launch (bad values: the status of a user error)."""
EXIT_JOBS_FAILED = 1
"""Status of a sweep in which some jobs failed."""


def exit_with(lines: Sequence[str], status: int) -> None:
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.exit(status)


class Vggt4dSweeper(BasicSweeper):
    """Basic sweeper that validates every job first and summarises failed jobs at the end."""

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        from vggt4d.errors import UserError
        from vggt4d.sweeps import failed_jobs, failure_summary, refusals, shared_overrides

        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(parsed, self.max_batch_size)
        jobs = [job for batch in self.overrides for job in batch]
        refused = refusals(jobs, self.check_job)
        if refused:
            exit_with(refused, EXIT_REFUSED)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        failed, launched = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            try:
                results = self.launcher.launch(batch, initial_job_idx=launched)
            except UserError as err:
                exit_with([f"error: {err}"], EXIT_REFUSED)
            failed += failed_jobs(results, batch, launched)
            launched += len(batch)
            returns.append(results)
        if failed:
            exit_with(failure_summary(failed, launched, sweep_dir, shared_overrides(jobs)),
                      EXIT_JOBS_FAILED)
        return returns

    def check_job(self, overrides: Sequence[str]) -> Any:
        """Compose one job's config as its launcher will and validate it (raises on bad input);
        the validated run config."""
        from vggt4d.config import validate
        from vggt4d.sweeps import quiet

        assert self.hydra_context is not None and self.config is not None
        with quiet():
            return validate(job_config(self.hydra_context.config_loader, self.config, overrides))


def job_config(loader: Any, sweep_config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The task config (no ``hydra`` node) a job with ``overrides`` receives, resolved with the
    job's own Hydra config in place as during the job."""
    config = loader.load_sweep_config(sweep_config, list(overrides))
    state = HydraConfig.instance()
    previous = state.cfg
    state.set_config(config)
    try:
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        OmegaConf.resolve(task)
    finally:
        if previous is not None:
            state.set_config(previous)
    return task
