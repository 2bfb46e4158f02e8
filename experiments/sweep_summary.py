"""Summarise a Hydra multirun folder without W&B: one CSV row per job, one plot per metric.

    python experiments/sweep_summary.py outputs/multirun/2026-11-21/12-00-00-123456

Reads every job folder holding ``.hydra/overrides.yaml`` and ``metrics.json``; the swept settings
are the overrides whose values differ between jobs. Writes ``sweep_summary.csv`` (job, swept
settings, metrics) and ``sweep_summary.png`` (each metric against each swept setting) into the
multirun folder, atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import yaml
from matplotlib.figure import Figure  # drawn without pyplot: no display or backend needed

from vggt4d.errors import UserError
from vggt4d.io import atomic_write

METRICS = ("JM", "JR", "FM", "FR", "area_fraction", "temporal_iou")


def read_job(folder: Path) -> dict[str, object]:
    """Overrides (key → value string) and scalar metrics of one job folder."""
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
    settings = dict(item.split("=", 1) for item in overrides if "=" in item)
    metrics = json.loads((folder / "metrics.json").read_text())
    values = {key: metrics[key] for key in METRICS if key in metrics}
    values.update({key: metrics["unsupervised"][key] for key in METRICS
                   if key in metrics.get("unsupervised", {})})
    return {"job": folder.name, "settings": settings, "metrics": values}


def read_sweep(root: Path) -> list[dict[str, object]]:
    if not root.is_dir():
        raise UserError(f"{root}: no such multirun folder")
    jobs = [read_job(folder) for folder in sorted(root.iterdir(), key=lambda p: p.name)
            if (folder / ".hydra" / "overrides.yaml").is_file()
            and (folder / "metrics.json").is_file()]
    if not jobs:
        raise UserError(f"{root} holds no finished jobs (folders with .hydra/overrides.yaml and "
                        f"metrics.json); run a sweep with `python -m vggt4d.run -m ...` first")
    return jobs


def swept_settings(jobs: list[dict[str, object]]) -> list[str]:
    """Override keys whose value is not the same in every job."""
    keys = sorted({key for job in jobs for key in job["settings"]})
    return [key for key in keys if len({job["settings"].get(key) for job in jobs}) > 1]


def summary_csv(jobs: list[dict[str, object]], swept: list[str]) -> str:
    metrics = [m for m in METRICS if any(m in job["metrics"] for job in jobs)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["job", *swept, *metrics])
    for job in jobs:
        writer.writerow([job["job"], *(job["settings"].get(k, "") for k in swept),
                         *(job["metrics"].get(m, "") for m in metrics)])
    return buffer.getvalue()


def summary_figure(jobs: list[dict[str, object]], swept: list[str]) -> Figure:
    """A grid: rows = metrics, columns = swept settings; one point per job, mean as a bar."""
    metrics = [m for m in METRICS if any(m in job["metrics"] for job in jobs)]
    columns = swept or ["job"]
    figure = Figure(figsize=(3.2 * len(columns), 2.4 * len(metrics)), layout="constrained")
    axes = figure.subplots(len(metrics), len(columns), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, key in enumerate(columns):
            ax = axes[row][col]
            labels = [job["settings"].get(key, job["job"]) if key != "job" else job["job"]
                      for job in jobs]
            order = sorted(set(labels))
            for position, label in enumerate(order):
                values = [job["metrics"][metric] for job, lab in zip(jobs, labels, strict=True)
                          if lab == label and metric in job["metrics"]]
                if values:
                    ax.bar(position, sum(values) / len(values), color="#9ecae1")
                    ax.scatter([position] * len(values), values, color="#08519c", zorder=3)
            ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
            ax.set_title(f"{metric} vs {key}", fontsize=8)
    return figure


def summarize(root: Path) -> tuple[Path, Path]:
    jobs = read_sweep(root)
    swept = swept_settings(jobs)
    csv_path = atomic_write(root / "sweep_summary.csv",
                            lambda tmp: tmp.write_text(summary_csv(jobs, swept)))
    figure = summary_figure(jobs, swept)
    png_path = atomic_write(root / "sweep_summary.png",
                            lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return csv_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun", type=Path, help="a Hydra multirun folder")
    args = parser.parse_args(argv)
    try:
        for path in summarize(args.multirun):
            print(path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
