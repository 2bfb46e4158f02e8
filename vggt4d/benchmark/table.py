"""A benchmark table from its jobs' ``metrics.json`` files: columns, the protocol's average, the
published numbers beside it, and the Markdown, CSV, JSON and bar-chart files.

Which numbers a sequence contributes (:func:`sequence_result`): the mask scores of the final
masks (top-level ``JM`` … ``FD``, refined when the refine stage ran), and the depth / pose errors
of the last DA3 pass (``geometry.pass2`` when the masked second pass ran, else ``pass1``). A
sequence whose job has no result, or whose numbers were not scored (``skipped``), is listed as
failed with its reason and left out of the average, never averaged silently.

Averages (:func:`average`) follow each protocol's own code:

* masks: mean over sequences, each weighing the same (davis2017-evaluation
  ``evaluation_method.py``; VGGT4D-style evaluation);
* depth: mean over sequences weighted by each sequence's scored pixels (MonST3R
  ``depth_metric.ipynb`` and CUT3R ``eval_depth.py``: ``np.average(..., weights=valid_pixels)``);
* pose: plain mean over sequences (MonST3R ``vo_eval.py::calculate_averages``).

Mask scores and δ<1.25 are given in percent, as the papers print them; every other number in
the units of :mod:`vggt4d.geometry_metrics`. All files use these units (each column says so).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vggt4d.io import atomic_write, write_json

AVERAGING = {
    "masks": "mean over sequences",
    "depth": "mean over sequences weighted by scored pixels",
    "pose": "mean over sequences",
}


@dataclass(frozen=True)
class Column:
    """One number of the table: its key in the results, label, family and display units."""

    key: str
    label: str
    family: str
    percent: bool = False
    lower_is_better: bool = False

    @property
    def heading(self) -> str:
        units = " (%)" if self.percent else ""
        return f"{self.label}{units} {'↓' if self.lower_is_better else '↑'}"

    def show(self, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value:.2f}" if self.percent else f"{value:.4f}"


COLUMNS: dict[str, tuple[Column, ...]] = {
    "masks": (Column("JM", "JM", "masks", percent=True), Column("JR", "JR", "masks", percent=True),
              Column("JD", "JD", "masks", percent=True, lower_is_better=True),
              Column("FM", "FM", "masks", percent=True), Column("FR", "FR", "masks", percent=True),
              Column("FD", "FD", "masks", percent=True, lower_is_better=True)),
    "depth": (Column("abs_rel", "Abs Rel", "depth", lower_is_better=True),
              Column("delta_1.25", "δ<1.25", "depth", percent=True)),
    "pose": (Column("ate", "ATE", "pose", lower_is_better=True),
             Column("rpe_trans", "RPE trans", "pose", lower_is_better=True),
             Column("rpe_rot_deg", "RPE rot (deg)", "pose", lower_is_better=True)),
}


def table_columns(families: list[str]) -> list[Column]:
    """The columns of the metric ``families`` a protocol scores, in family order."""
    return [column for family in COLUMNS if family in families for column in COLUMNS[family]]


class NotScored(Exception):
    """A finished job whose metrics lack a number the table needs (the reason as message)."""


@dataclass
class SequenceResult:
    """One sequence's numbers in display units, with its frame count, the DA3 pass the geometry
    came from and the depth pixels scored (the depth average's weight)."""

    sequence: str
    frames: int
    values: dict[str, float]
    geometry_pass: str | None = None
    pixels: int | None = None
    protocol: dict = field(default_factory=dict)


def sequence_result(name: str, metrics: dict, families: list[str]) -> SequenceResult:
    """The numbers of ``families`` in one job's ``metrics.json`` (see the module docstring);
    raises :class:`NotScored` naming what is missing."""
    values: dict[str, float] = {}
    protocol: dict = {}
    geometry = metrics.get("geometry", {})
    passes = [name for name in ("pass2", "pass1") if name in geometry]
    chosen = passes[0] if passes else None
    pixels = None
    for family in families:
        if family == "masks":
            if "JM" not in metrics:
                raise NotScored("no mask scores (the sequence has no mask ground truth)")
            found = metrics
            protocol["masks"] = metrics["protocol"]
        else:
            found = geometry.get(chosen, {}).get(family) if chosen else None
            if found is None:
                raise NotScored(f"no {family} scores (the sequence has no {family} ground truth)")
            if "skipped" in found:
                raise NotScored(f"{family} not scored: {found['skipped']}")
            protocol[family] = geometry.get("protocol", {}).get(family, {})
            if family == "depth":
                pixels = int(found["pixels"])
        for column in COLUMNS[family]:
            values[column.key] = float(found[column.key]) * (100.0 if column.percent else 1.0)
    frames = len(metrics["unsupervised"]["area_fraction_per_frame"])
    return SequenceResult(name, frames, values, chosen, pixels, protocol)


def average(results: list[SequenceResult], columns: list[Column]) -> dict[str, float]:
    """The protocol's average of each column over ``results`` (module docstring); empty when no
    sequence was scored."""
    if not results:
        return {}
    means = {}
    for column in columns:
        values = np.array([result.values[column.key] for result in results], dtype=np.float64)
        weights = (np.array([result.pixels for result in results], dtype=np.float64)
                   if column.family == "depth" else None)
        means[column.key] = float(np.average(values, weights=weights))
    return means


def build_table(name: str, results: list[SequenceResult], failed: dict[str, str],
                families: list[str], published: dict, record: dict) -> dict:
    """The table as one JSON-ready dict: ``record`` (table, dataset, model, protocol, command)
    plus columns, per-sequence rows, the average, failed sequences and the published rows."""
    columns = table_columns(families)
    rows = [{"sequence": r.sequence, "frames": r.frames, "geometry_pass": r.geometry_pass,
             "pixels": r.pixels, **{c.key: r.values[c.key] for c in columns},
             "protocol": r.protocol} for r in results]
    return {
        **record,
        "table": name,
        "title": published.get("title", name),
        "columns": [{"key": c.key, "heading": c.heading, "family": c.family,
                     "units": "percent" if c.percent else "as computed"} for c in columns],
        "averaging": {family: AVERAGING[family] for family in families},
        "sequences": rows,
        "average": {**average(results, columns), "sequences": len(results)},
        "failed": [{"sequence": sequence, "error": error} for sequence, error in failed.items()],
        "published": published.get("rows", []),
    }


def _columns(table: dict) -> list[Column]:
    return table_columns(list(table["averaging"]))


def _protocol_line(table: dict) -> str:
    protocol = table["protocol"]
    frames = protocol["frames"]
    selection = (f"frames [{frames['start']}:{frames['stop'] if frames['stop'] is not None else ''}"
                 f":{frames['stride']}]" + (f", first {frames['max_frames']}"
                                             if frames["max_frames"] else ""))
    parts = [f"dataset `{table['dataset']}`", selection, f"process_res {protocol['process_res']}"]
    evaluation = protocol["eval"]
    if "masks" in table["averaging"]:
        parts.append(f"masks: eval.protocol `{evaluation['protocol']}`, bound_th "
                     f"{evaluation['bound_th']}")
    if "depth" in table["averaging"]:
        parts.append(f"depth: `{evaluation['depth_alignment']}` alignment per sequence, cap "
                     f"{evaluation['depth_cap']}, clip {evaluation['depth_clip']}, bicubic "
                     "resize to the ground truth")
    if "pose" in table["averaging"]:
        parts.append("poses: Sim(3) Umeyama with scale (evo), RPE at 1 frame, RMSE")
    averaging = "; ".join(f"{family}: {how}" for family, how in table["averaging"].items())
    return "Protocol: " + "; ".join(parts) + f". Average: {averaging}."


def markdown(table: dict) -> str:
    """The table as Markdown: settings, per-sequence rows, the average, failed sequences, and the
    average beside the published numbers."""
    columns = _columns(table)
    model = table["model"]
    scored, failed = table["sequences"], table["failed"]
    lines = [
        f"# {table['title']} (`{table['table']}`)", "",
        f"Model `{model['name']}` (weights `{model['weights']}`), "
        f"{len(scored)} of {len(scored) + len(failed)} sequences scored.", "",
        _protocol_line(table), "",
        "| sequence | frames | " + " | ".join(c.heading for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for row in scored:
        lines.append(f"| {row['sequence']} | {row['frames']} | "
                     + " | ".join(c.show(row[c.key]) for c in columns) + " |")
    average_row = table["average"]
    lines.append(f"| **average** ({average_row['sequences']}) | | "
                 + " | ".join(f"**{c.show(average_row.get(c.key))}**" for c in columns) + " |")
    lines += ["", "Failed sequences (not averaged):" if failed else "Failed sequences: none."]
    lines += [f"- `{item['sequence']}`: {item['error']}" for item in failed]
    lines += ["", "## Beside the published numbers", "",
              "| method | " + " | ".join(c.heading for c in columns) + " | source |",
              "|---|" + "---:|" * len(columns) + "---|",
              f"| **this run** (`{model['name']}`) | "
              + " | ".join(c.show(average_row.get(c.key)) for c in columns)
              + " | this table's average |"]
    for row in table["published"]:
        lines.append(f"| {row['method']} | " + " | ".join(c.show(row.get(c.key)) for c in columns)
                     + f" | {row['source']} |")
    if not table["published"]:
        lines.append("| (no published numbers transcribed for this table) | "
                     + " | ".join("–" for _ in columns) + " | |")
    return "\n".join(lines) + "\n"


def csv_text(table: dict) -> str:
    """One CSV: a row per sequence (``kind=sequence``), the average, each failed sequence and
    each published row; the protocol line on every row."""
    columns = _columns(table)
    protocol = _protocol_line(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["kind", "name", "frames", *(c.key for c in columns), "pixels", "note",
                     "protocol"])
    for row in table["sequences"]:
        writer.writerow(["sequence", row["sequence"], row["frames"],
                         *(repr(row[c.key]) for c in columns), row["pixels"] or "", "", protocol])
    average_row = table["average"]
    writer.writerow(["average", f"{average_row['sequences']} sequences", "",
                     *(repr(average_row[c.key]) if c.key in average_row else "" for c in columns),
                     "", "; ".join(f"{f}: {h}" for f, h in table["averaging"].items()), protocol])
    for item in table["failed"]:
        writer.writerow(["failed", item["sequence"], "", *("" for _ in columns), "",
                         item["error"], protocol])
    for row in table["published"]:
        writer.writerow(["published", row["method"], "",
                         *(repr(row[c.key]) if c.key in row else "" for c in columns), "",
                         row["source"], ""])
    return buffer.getvalue()


def write_chart(table: dict, path: Path) -> Path:
    """A bar chart PNG: one panel per column, a bar per sequence, the average and each published
    number (in a second colour)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = _columns(table)
    figure, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1, 4.2),
                                squeeze=False)
    for axis, column in zip(axes[0], columns, strict=True):
        labels = [row["sequence"] for row in table["sequences"]]
        values = [row[column.key] for row in table["sequences"]]
        colours = ["tab:blue"] * len(values)
        if column.key in table["average"]:
            labels.append("average")
            values.append(table["average"][column.key])
            colours.append("navy")
        for row in table["published"]:
            if column.key in row:
                labels.append(row["method"])
                values.append(row[column.key])
                colours.append("tab:orange")
        axis.bar(range(len(values)), values, color=colours)
        axis.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        axis.set_title(column.heading, fontsize=9)
    figure.suptitle(f"{table['title']} — {table['model']['name']} "
                    f"(blue: sequences, navy: average, orange: published)", fontsize=9)
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(path, save)
    finally:
        plt.close(figure)


def write_table_files(table: dict, out_dir: Path) -> dict[str, Path]:
    """``table.md``, ``table.csv``, ``table.json`` and ``table.png`` in ``out_dir``."""
    files = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv",
             "json": out_dir / "table.json", "chart": out_dir / "table.png"}
    text, rows = markdown(table), csv_text(table)
    atomic_write(files["markdown"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(files["csv"], lambda tmp: tmp.write_text(rows, encoding="utf-8"))
    write_json(files["json"], table)
    write_chart(table, files["chart"])
    return files
