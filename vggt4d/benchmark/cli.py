"""``python -m vggt4d.benchmark table=<table> root=<dataset folder> [out=DIR] [sequences=a,b|all]
[run overrides ...]``: one command per published table.

Every other argument is an override of ``python -m vggt4d.run`` given to every job (``model=``,
``experiment=``, ``process_res=``, ``hydra/launcher=local|slurm``, ``cluster.*``, ``cache_dir=``,
``logger=none``, ...). The command checks the jobs' config, keeps the sequences already
finished with the same settings, runs the others as one multirun (one job per sequence, sharing
the DA3 cache), then writes ``table.md``, ``table.csv``, ``table.json``, ``table.png`` and the
table's W&B run in ``out`` (default ``outputs/benchmarks/<table>/<model>``) and prints the
Markdown. Exit status: 0 when every sequence was scored, 1 when some failed (they are listed in
the table, not averaged), 2 on bad input (one ``error:`` line, nothing run).
"""

from __future__ import annotations

import json
import logging
import sys

from vggt4d.benchmark.jobs import Plan, failure_reason, is_finished, launch, plan, table_names
from vggt4d.benchmark.table import NotScored, SequenceResult, build_table, sequence_result
from vggt4d.errors import UserError

log = logging.getLogger("vggt4d.benchmark")

DRIVER_KEYS = ("table", "root", "out", "sequences")
EXIT_FAILED_SEQUENCES = 1
EXIT_USER_ERROR = 2


def split_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The command's own ``key=value`` arguments (:data:`DRIVER_KEYS`) and the job overrides."""
    own: dict[str, str] = {}
    overrides = []
    for argument in argv:
        key, _, value = argument.partition("=")
        if key in DRIVER_KEYS:
            own[key] = value
        else:
            overrides.append(argument)
    for key in ("table", "root"):
        if not own.get(key):
            raise UserError(f"give {key}=...: python -m vggt4d.benchmark table=<"
                            f"{'|'.join(table_names())}> root=<dataset folder> [overrides]")
    return own, overrides


def published_rows(table: str) -> dict:
    """The published numbers of ``table`` (``published.yaml`` beside this module)."""
    import importlib.resources

    from omegaconf import OmegaConf

    text = (importlib.resources.files("vggt4d.benchmark") / "published.yaml").read_text("utf-8")
    entries = OmegaConf.to_container(OmegaConf.create(text))
    return entries.get(table, {"title": table, "rows": []})


def protocol_record(plan_: Plan, argv: list[str]) -> dict:
    """What every number of the table was made with (stored in table.json and the W&B run)."""
    run = plan_.run
    data, settings = run.data, run.eval
    return {
        "dataset": str(data.dataset), "root": str(data.root),
        "model": {"name": run.model.name, "weights": str(run.model.weights)},
        "protocol": {
            "config": f"conf/benchmark/{plan_.table}.yaml",
            "frames": {"start": data.start, "stop": data.stop, "stride": data.stride,
                       "max_frames": data.max_frames},
            "data_options": dict(data.options), "process_res": run.process_res,
            "eval": {"metrics": [str(m) for m in settings.metrics],
                     "protocol": str(settings.protocol), "bound_th": settings.bound_th,
                     "depth_alignment": str(settings.depth_alignment),
                     "depth_cap": settings.depth_cap, "depth_clip": settings.depth_clip},
            "pipeline": [str(stage) for stage in run.pipeline],
        },
        "command": " ".join(["python -m vggt4d.benchmark", *argv]),
        "out_dir": str(plan_.out_dir),
    }


def collect(plan_: Plan, reported: dict[str, str]
            ) -> tuple[list[SequenceResult], dict[str, str]]:
    """Scored sequences and the reason of each failed one, in the table's sequence order."""
    families = [str(family) for family in plan_.run.eval.metrics]
    results, failed = [], {}
    for sequence in plan_.sequences:
        if not is_finished(plan_, sequence):
            failed[sequence] = failure_reason(plan_, sequence, reported)
            continue
        metrics = json.loads((plan_.job_dir(sequence) / "metrics.json").read_text("utf-8"))
        try:
            results.append(sequence_result(sequence, metrics, families))
        except NotScored as err:
            failed[sequence] = str(err)
    return results, failed


def run_table(argv: list[str]) -> int:
    """The command (module docstring); raises :class:`UserError` on bad input."""
    from vggt4d.benchmark.table import markdown, write_table_files
    from vggt4d.benchmark.tracking import log_table

    own, overrides = split_arguments(argv)
    plan_ = plan(own["table"], own["root"], overrides, out=own.get("out"),
                 sequences=own.get("sequences"))
    pending = [sequence for sequence in plan_.sequences if not is_finished(plan_, sequence)]
    log.info("benchmark %s: %d of %d sequence(s) already finished in %s", plan_.table,
             len(plan_.sequences) - len(pending), len(plan_.sequences), plan_.sequence_root)
    reported: dict[str, str] = {}
    if pending:
        status, reported = launch(plan_, pending)
        if status == EXIT_USER_ERROR and not reported:
            raise UserError("the sweep was refused before any job ran (see the error lines "
                            "above); no table written")
    results, failed = collect(plan_, reported)
    table = build_table(plan_.table, results, failed, [str(m) for m in plan_.run.eval.metrics],
                        published_rows(plan_.table), protocol_record(plan_, argv))
    files = write_table_files(table, plan_.out_dir)
    log_table(table, files["chart"], plan_.out_dir, plan_.run.logger)
    print(markdown(table))
    print(f"table: {files['markdown']} (+ .csv, .json, .png)")
    if failed:
        print(f"error: {len(failed)} of {len(plan_.sequences)} sequence(s) failed: "
              + ", ".join(failed), file=sys.stderr)
        return EXIT_FAILED_SEQUENCES
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.strip() + "\n\ntables: " + ", ".join(table_names()))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        return run_table(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
