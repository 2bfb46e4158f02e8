"""``python -m vggt4d.run [overrides]``: the Hydra entry point; it only composes stages.

User errors (bad paths, bad values, inputs that do not fit) print one ``error:`` line and exit
with status 2; a job that failed before writing any result leaves no job directory behind, one
that failed later keeps what it wrote and ends its ``run.log`` with the error. In a multirun the
job returns a :class:`vggt4d.sweeps.JobFailure` instead of exiting (launchers record returns,
not exits) and an unexpected exception is logged with its traceback to ``run.log`` and raised
to Hydra; the sweeper names every failed job at the end. An output folder that Hydra itself
cannot create or write its files into (read-only, full disk) is one ``error:`` line too
(:func:`cli`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from vggt4d.cache import Cache
from vggt4d.config import validate
from vggt4d.errors import UserError
from vggt4d.evaluate import EvalStage
from vggt4d.export.stage import ExportStage
from vggt4d.frames import FramesStage
from vggt4d.gram import GramStage
from vggt4d.io import OutputError, describe_os_error, output_error, write_json
from vggt4d.latent import LatentStage
from vggt4d.maps import MapsStage
from vggt4d.masks import MasksStage
from vggt4d.pictures import LayerPicturesStage, PicturesStage
from vggt4d.pipeline import Context, JobInfo, execute, resolve
from vggt4d.predict import PredictStage
from vggt4d.refine import RefineStage
from vggt4d.second_pass import SecondPassStage
from vggt4d.stage import Stage
from vggt4d.sweeps import JobFailure, one_line
from vggt4d.temporal import TemporalStage
from vggt4d.tracking import TrackingStage, wait_for_logging

log = logging.getLogger("vggt4d")

STAGES: dict[str, type[Stage]] = {
    stage.name: stage
    for stage in (FramesStage, PredictStage, GramStage, TemporalStage, MapsStage, MasksStage,
                  SecondPassStage, RefineStage, LayerPicturesStage, PicturesStage, EvalStage,
                  LatentStage, ExportStage, TrackingStage)
}
"""Every stage the runner can compose, by the name used in ``pipeline``, in the order stages
run when nothing they read decides it."""

TIMINGS = "timings.json"

HYDRA_BOOKKEEPING = (".hydra", "run.log")


def remove_if_no_results(out_dir: Path) -> bool:
    """Delete a job directory holding nothing but Hydra's own files; True when it is gone."""
    if out_dir.is_dir() and any(p.name not in HYDRA_BOOKKEEPING for p in out_dir.iterdir()):
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    return True


def log_to_file_only(message: str,
                     exc_info: tuple[type[BaseException], BaseException, TracebackType] | None
                     = None) -> None:
    """Append an error record (with ``exc_info``'s traceback) to the job's ``run.log`` (Hydra's
    file handler) without repeating it on the console, where the ``error:`` line already stands."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_log_write_failures() -> None:
    """A job log that cannot be written (a full disk) costs one warning line on the console
    instead of logging's traceback for every record; other logging errors report as usual."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = _log_write_failure(handler)


def _log_write_failure(handler: logging.FileHandler) -> Callable[[logging.LogRecord], None]:
    default, reported = handler.handleError, []

    def handle_error(record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            default(record)
        elif not reported:
            reported.append(err)
            print(f"warning: cannot write {handler.baseFilename}: {describe_os_error(err)}; "
                  f"the log goes on on the console only", file=sys.stderr)

    return handle_error


def run_job(cfg: DictConfig, out_dir: Path, job: JobInfo | None = None) -> Context:
    """Validate ``cfg`` and run its pipeline into ``out_dir``; the seconds each stage took go
    to ``timings.json`` (with scene.rrd, the result files that differ between identical runs)."""
    run = validate(cfg)
    cache = Cache(Path(run.cache_dir).expanduser().absolute())
    ctx = Context(run, out_dir, cache, job=job or JobInfo())
    execute(resolve(list(run.pipeline), STAGES, run), ctx)
    write_json(out_dir / TIMINGS, ctx.timings)
    for line in explain(run.model.weights, ctx.artifacts.get("metrics")):
        log.info(line)
    return ctx


def explain(weights: str, metrics: dict | None) -> list[str]:
    """What the job's figures mean, in words (the last lines of its log)."""
    lines = []
    if metrics and "JM" in metrics:
        lines.append(f"masks vs ground truth ({metrics['protocol']}): JM {metrics['JM']:.3f} = "
                     f"mean IoU over frames, FM {metrics['FM']:.3f} = boundary F-measure "
                     f"(1 = perfect)")
    if weights == "random":
        lines.append("model.weights=random: DA3 has random weights, so depth, cameras and masks "
                     "are noise and a JM near 0 is expected; use released weights "
                     "(model.weights=<hub id or folder>) or the demo (experiment=demo)")
    elif weights == "demo":
        lines.append("model.weights=demo: hand-built da3-small weights that see the synthetic "
                     "scene's red sphere (vggt4d/demo_weights.py): the masks find it; depth and "
                     "cameras from these weights mean nothing")
    return lines


def sequential_jobs_follow() -> bool:
    """True inside a multirun of Hydra's basic launcher, whose next job runs in this process:
    this job's W&B logging may then overlap it (the interpreter still waits at exit)."""
    hydra_cfg = HydraConfig.get()
    return (hydra_cfg.mode == RunMode.MULTIRUN
            and hydra_cfg.launcher._target_.endswith("BasicLauncher"))


def hydra_job() -> JobInfo:
    """Run name from the overrides; in a multirun, the sweep directory names the group."""
    hydra_cfg = HydraConfig.get()
    group, num = None, 0
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").strip("_.")
        num = hydra_cfg.job.num
    return JobInfo(name=hydra_cfg.job.override_dirname or "default", group=group, num=num)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> JobFailure | None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    report_log_write_failures()
    try:
        run_job(cfg, out_dir, hydra_job())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        kept = not remove_if_no_results(out_dir)
        if kept:
            log_to_file_only(f"error: {err} (files written before the error are kept)")
        if multirun:
            return JobFailure(tuple(hydra_cfg.overrides.task), str(err), kept)
        sys.exit(2)
    except Exception:
        if multirun:
            log_to_file_only("error: the job failed", sys.exc_info())
        raise
    finally:
        if not sequential_jobs_follow():
            wait_for_logging()
    print(f"outputs: {out_dir}")
    return None


def raised_in_job(err: BaseException) -> bool:
    """True when ``err`` came through :func:`main`'s body (the job), not only Hydra's set-up."""
    job, frame = main.__wrapped__.__code__, err.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code is job:
            return True
        frame = frame.tb_next
    return False


def output_folder_error(err: OSError) -> OutputError:
    """The one-line error for an output folder Hydra could not create or write its own files
    into; a half-written job folder (Hydra's files only) is removed. A write that fails without
    a file name (a full disk) is placed by the job log Hydra had opened in that folder."""
    logs = [Path(h.baseFilename) for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler)]
    if logs:
        remove_if_no_results(logs[0].parent)
    folder = err.filename or (logs[0].parent if logs else "the output folder")
    return output_error(Path(folder), err)


def cli() -> None:
    """``python -m vggt4d.run``: :func:`main`, with the errors Hydra meets outside the job — an
    output folder it cannot create or write (read-only, full disk), a launcher's user error —
    printed as one ``error:`` line with exit status 2 instead of a traceback.

    Hydra hands exceptions to its caller only under ``HYDRA_FULL_ERROR``, so it is set for the
    call; a composition error (a misspelt choice, a missing option) becomes one ``error:`` line
    too, with the allowed values, and any other exception keeps its full traceback. A user who
    sets ``HYDRA_FULL_ERROR`` gets every traceback.
    """
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        options = [o for o in getattr(err, "options", None) or () if not o.endswith("_schema")]
        listed = f" (options: {', '.join(options)})" if options else ""
        where = f"cannot parse override '{err.override}': " if hasattr(err, "override") else ""
        print(f"error: {where}{one_line(err)}{listed}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError) as err:  # logging's ValueError: run.log cannot be opened
        cause = err if isinstance(err, OSError) else err.__cause__
        if raised_in_job(err) or not isinstance(cause, OSError):
            raise
        print(f"error: {output_folder_error(cause)}", file=sys.stderr)
        sys.exit(2)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
