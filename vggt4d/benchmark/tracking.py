"""The table's own W&B run (``logger=wandb``, offline by default, next to the table files): the
table as a W&B Table (``benchmark/table``), the published rows as another
(``benchmark/published``), the bar chart, the averages in the summary and the protocol in the
run's config. Like the jobs' logging it never fails the command: a W&B error is one warning."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def table_rows(table: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B Table: one row per sequence, the average, each failed
    sequence (empty numbers, its error) and the protocol on every row."""
    keys = [column["key"] for column in table["columns"]]
    columns = ["kind", "sequence", "frames", *keys, "note"]
    rows = [["sequence", row["sequence"], row["frames"], *(row[k] for k in keys), ""]
            for row in table["sequences"]]
    average = table["average"]
    rows.append(["average", f"{average['sequences']} sequences", None,
                 *(average.get(k) for k in keys), "; ".join(table["averaging"].values())])
    rows += [["failed", item["sequence"], None, *(None for _ in keys), item["error"]]
             for item in table["failed"]]
    return columns, rows


def log_table(table: dict, chart: Path, out_dir: Path, logger) -> Path | None:
    """Write the table's W&B run under ``out_dir`` with ``logger`` (a
    :class:`vggt4d.config.logger.LoggerConfig`); the run folder, None when logging is off or
    failed."""
    if str(logger.kind) == "none":
        return None
    try:
        import wandb

        run = wandb.init(
            project=logger.project, entity=logger.entity, mode=str(logger.mode),
            dir=str(out_dir), job_type="benchmark", name=f"benchmark-{table['table']}",
            group=f"benchmark-{table['table']}", tags=[table["model"]["name"], *logger.tags],
            config={key: table[key] for key in ("table", "dataset", "model", "protocol")},
            reinit="finish_previous", settings=wandb.Settings(silent=True))
        try:
            columns, rows = table_rows(table)
            keys = [column["key"] for column in table["columns"]]
            published = [[row["method"], *(row.get(k) for k in keys), row["source"]]
                         for row in table["published"]]
            run.log({"benchmark/table": wandb.Table(columns=columns, data=rows),
                     "benchmark/published": wandb.Table(columns=["method", *keys, "source"],
                                                        data=published),
                     "benchmark/chart": wandb.Image(str(chart))})
            run.summary.update({f"average/{key}": value for key, value in table["average"].items()})
            folder = Path(run.dir).parent
        finally:
            run.finish()
    except Exception as err:  # W&B must never cost the user the table
        log.warning("W&B logging of the table failed (%s: %s); the table files are complete",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    return folder
