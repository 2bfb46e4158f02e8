"""Sweep jobs that fail: the record a job returns, the check of every job before the first one
runs, and the summary at the end of a sweep.

A multirun job never exits the process: under joblib and submitit an exit would leave no result
behind (submitit then waits for a result file that never comes). A user error is returned as a
:class:`JobFailure`, anything else is raised and recorded by Hydra as a ``FAILED`` job return;
the sweeper (``hydra/sweeper=vggt4d``) names both at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from vggt4d.errors import UserError

CONFIG_ERRORS = (UserError, HydraException, OmegaConfBaseException)
"""Errors that name bad input: reported by their message alone."""


@dataclass(frozen=True)
class JobFailure:
    """What a multirun job returns when it fails on bad input: its overrides, the one-line
    error and whether its folder keeps files written before the error."""

    overrides: tuple[str, ...]
    error: str
    kept: bool


@dataclass(frozen=True)
class FailedJob:
    """One failed job of a sweep: its number (``hydra.job.num``), overrides and error line."""

    num: int
    overrides: tuple[str, ...]
    error: str


def one_line(err: BaseException) -> str:
    """The error's first non-empty line; unexpected exceptions (not a user or config error)
    also name their type."""
    text = first_line(err)
    if isinstance(err, HydraException) and isinstance(err.__cause__, OmegaConfBaseException):
        return f"{text}: {first_line(err.__cause__)}"  # "Error merging override x=y": why
    if isinstance(err, CONFIG_ERRORS):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def failure_of(result: JobReturn) -> str | None:
    """The error line of a failed job's return, None when the job succeeded."""
    if result.status == JobStatus.FAILED:
        return one_line(result._return_value)
    if isinstance(result._return_value, JobFailure):
        return result._return_value.error
    return None


def failed_jobs(results: Sequence[JobReturn], batch: Sequence[Sequence[str]],
                first_num: int) -> list[FailedJob]:
    """The failed jobs among a launched batch (job ``first_num + i`` ran ``batch[i]``)."""
    failed = []
    for index, (result, overrides) in enumerate(zip(results, batch, strict=True)):
        error = failure_of(result)
        if error is not None:
            failed.append(FailedJob(first_num + index, tuple(overrides), error))
    return failed


def describe(overrides: Sequence[str], shared: frozenset[str] = frozenset()) -> str:
    """The overrides that tell a job apart (those not in ``shared``), space-separated."""
    return " ".join(o for o in overrides if o not in shared) or " ".join(overrides) or "defaults"


def shared_overrides(jobs: Sequence[Sequence[str]]) -> frozenset[str]:
    """Overrides every job of a sweep has (none when it has one job: then all are named)."""
    if len(jobs) < 2:
        return frozenset()
    return frozenset.intersection(*(frozenset(job) for job in jobs))


def failure_summary(failed: Sequence[FailedJob], total: int, sweep_dir: Path,
                    shared: frozenset[str] = frozenset()) -> list[str]:
    """``error:`` lines: one per failed job (number, distinguishing overrides, error), then
    the count."""
    lines = [f"error: job {job.num} ({describe(job.overrides, shared)}) failed: {job.error}"
             for job in failed]
    finished = total - len(failed)
    kept = f"; the {finished} finished job(s) are in {sweep_dir}" if finished else ""
    lines.append(f"error: {len(failed)} of {total} sweep job(s) failed{kept}")
    return lines


def refusals(jobs: Sequence[Sequence[str]], check: Callable[[Sequence[str]], object]) -> list[str]:
    """``error:`` lines for the jobs whose config does not compose or validate.

    ``check(overrides)`` composes job ``i``'s config and validates it, raising
    :class:`UserError` (or a Hydra/OmegaConf composition error). Jobs failing with the same
    message share one line naming the first of them and the numbers of the others.
    """
    shared = shared_overrides(jobs)
    first_of: dict[str, tuple[int, Sequence[str]]] = {}
    others: dict[str, list[int]] = {}
    for num, overrides in enumerate(jobs):
        try:
            check(overrides)
        except CONFIG_ERRORS as err:
            message = one_line(err)
            if message in first_of:
                others[message].append(num)
            else:
                first_of[message], others[message] = (num, overrides), []
    lines = []
    for message, (num, overrides) in first_of.items():
        also = f" (also jobs {', '.join(map(str, others[message]))})" if others[message] else ""
        lines.append(f"error: job {num} ({describe(overrides, shared)}){also}: {message}")
    return lines


@contextmanager
def quiet(logger_name: str = "vggt4d") -> Iterator[None]:
    """Hold back the INFO lines of ``logger_name`` (checks before launch repeat what each job
    logs again when it runs)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
